"""routing.json and a self-contained routing.html (`slm route eval --report DIR`): the quality vs strong-call
share plot of every router with its bootstrap band, and the APGR / CPT / AUC table."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

COLORS = {"random": "#7f7f7f", "cascade": "#1f77b4", "learned": "#d62728", "oracle": "#2ca02c"}


def _interval(entry: dict[str, Any]) -> str:
    value, ci = entry.get("value"), entry.get("ci95")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def plot_png(result: dict[str, Any]) -> str:
    """The curves as a base64 PNG."""
    from slmkit.eval.report import figure_png

    def draw(ax: Any) -> None:
        shares = result["shares"]
        for name, entry in result["routers"].items():
            color = COLORS.get(name)
            apgr = entry["apgr"]["value"]
            label = name + (f" (APGR {apgr:.2f})" if apgr is not None else "")
            ax.plot(shares, entry["curve"], label=label, color=color, lw=1.6)
            lo, hi = entry["curve_ci95"]
            ax.fill_between(shares, lo, hi, color=color, alpha=0.12, lw=0)
        ax.axhline(result["weak"], color="#999", ls=":", lw=1)
        ax.axhline(result["strong"], color="#999", ls="--", lw=1)
        point = result.get("learned_operating_point")
        if point:
            ax.scatter([point["strong_share"]], [point["quality"]], color=COLORS["learned"], zorder=4, marker="x")
        ax.set_xlabel("share of calls to the strong model")
        ax.set_ylabel("quality (mean per-item score)")

    return figure_png(draw, (6.4, 4.2))


def render_html(result: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_interval(r['apgr'])}</td><td>{_interval(r['cpt50'])}</td>"
        f"<td>{_interval(r['cpt80'])}</td><td>{_interval(r['auc'])}</td></tr>"
        for name, r in result["routers"].items()
    )
    diffs = "".join(
        f"<tr><td>{e(d['router'])} - {e(d['baseline'])}</td><td>{_interval(d)}</td></tr>"
        for d in result.get("apgr_differences", [])
    )
    tasks = ", ".join(f"{e(k)} ({v['items']} items)" for k, v in result["tasks"].items())
    return "\n".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>slmkit routing report</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}</style></head><body>",
        "<h1>slmkit routing report</h1>",
        f"<p>weak: {e(result['weak_model']['name'])} (quality {result['weak']:.3f}); strong: "
        f"{e(result['strong_model']['name'])} (quality {result['strong']:.3f}); tasks: {tasks}; "
        f"{result['items']} items{' held out from the router' if result.get('held_out_only') else ''}. "
        f"Bands and intervals: bootstrap 95% over items ({result['resamples']} resamples).</p>",
        f'<img alt="quality vs share of strong calls" src="data:image/png;base64,{plot_png(result)}">',
        "<h2>Routers</h2><table><thead><tr><th>router</th><th>APGR</th><th>CPT(50%)</th><th>CPT(80%)</th>"
        f"<th>AUC</th></tr></thead><tbody>{rows}</tbody></table>",
        "<h2>Paired APGR differences</h2><table><thead><tr><th>pair</th><th>APGR difference [95% CI]</th></tr>"
        f"</thead><tbody>{diffs}</tbody></table>" if diffs else "",
        "</body></html>",
    ])  # fmt: skip


def write_report(result: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, html_path = directory / "routing.json", directory / "routing.html"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    html_path.write_text(render_html(result))
    return json_path, html_path
