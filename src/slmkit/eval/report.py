"""report.json and a self-contained report.html: every model x metric with CIs, cost plots, Pareto fronts.

The HTML embeds its plots as base64 PNGs and its styles inline, so the one file can be mailed or
attached to an issue. Pareto fronts are computed per cost axis: a model is on the front when no other
model is at least as cheap and at least as good, and strictly better in one of the two.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import UserError

# (key in the merged cost dict, axis label, scale to display units, noise: (relative, absolute in display units)).
# Two costs closer than the noise are a tie: a model 2 MB lighter by the noise of a peak-RSS reading does not
# reach the memory front on that alone (quality decides between ties). Sizes on disk are exact.
COST_AXES: list[tuple[str, str, float, tuple[float, float]]] = [
    ("decode_ms_per_token", "decode latency, batch 1 (ms/token)", 1.0, (0.05, 0.0)),
    ("model_rss_bytes", "memory while generating (peak RSS - RSS before load, MB)", 1e-6, (0.05, 8.0)),
    ("weights_bytes", "size on disk (weights, MB)", 1e-6, (0.0, 0.0)),
]


def pareto_front(
    points: Sequence[tuple[float, float]], higher_is_better: bool = True, noise: tuple[float, float] = (0.0, 0.0)
) -> list[int]:
    """Indices of the non-dominated (cost, quality) points; lower cost is better.

    noise (relative, absolute): costs whose difference is within max(relative x the larger, absolute) are equal,
    so point j dominates i when it costs no more beyond the noise, is at least as good, and is strictly better in
    one of the two (cheaper beyond the noise, or higher quality)."""
    relative, absolute = noise

    def tied(a: float, b: float) -> bool:
        return abs(a - b) <= max(relative * max(abs(a), abs(b)), absolute)

    front = []
    for i, (cost_i, q_i) in enumerate(points):
        qi = q_i if higher_is_better else -q_i
        dominated = False
        for j, (cost_j, q_j) in enumerate(points):
            qj = q_j if higher_is_better else -q_j
            not_dearer = cost_j <= cost_i or tied(cost_i, cost_j)
            cheaper = cost_j < cost_i and not tied(cost_i, cost_j)
            if j != i and not_dearer and qj >= qi and (cheaper or qj > qi):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def _costs(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry.get("costs", {}), **entry.get("efficiency", {})}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def cost_fronts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per cost axis with data for every model: the points and the indices on the Pareto front."""
    models = report["models"]
    out: dict[str, dict[str, Any]] = {}
    if not models or any(m.get("quality") is None for m in models):
        return out
    higher = models[0]["quality"]["higher_is_better"]
    for key, label, scale, noise in COST_AXES:
        values = [_costs(m).get(key) for m in models]
        if not all(_finite(v) for v in values):
            continue
        points = [(float(v) * scale, float(m["quality"]["value"])) for v, m in zip(values, models, strict=True)]
        out[key] = {"label": label, "points": points, "front": pareto_front(points, higher, noise)}
    return out


def figure_png(draw: Callable[[Any], None], figsize: tuple[float, float]) -> str:
    """A base64 PNG of one matplotlib axes (Agg, 110 dpi) that `draw(ax)` fills; a grid and a small legend added
    after it, the figure closed whatever `draw` does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=110)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_png(axis: dict[str, Any], names: list[str], quality_name: str, higher: bool) -> str:
    def draw(ax: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        xs = [p[0] for p in axis["points"]]
        ys = [p[1] for p in axis["points"]]
        on = set(axis["front"])
        ax.scatter(
            [x for i, x in enumerate(xs) if i not in on],
            [y for i, y in enumerate(ys) if i not in on],
            c="#999",
            label="dominated",
        )
        ax.scatter([xs[i] for i in on], [ys[i] for i in on], c="#d62728", label="Pareto front", zorder=3)
        front = sorted(on, key=lambda i: xs[i])
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", c="#d62728", alpha=0.6)
        for i, name in enumerate(names):
            ax.annotate(name, (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        # few, plain tick labels: long values (hundreds of MB with decimals, offsets) otherwise run into each other
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.set_xlabel(axis["label"])
        ax.set_ylabel(quality_name + (" (higher is better)" if higher else " (lower is better)"))

    return figure_png(draw, (5.6, 3.8))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _ci(metric: dict[str, Any]) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['mean']:.3f} <span class=ci>[{lo:.3f}, {hi:.3f}]</span>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_EFFICIENCY_ROWS = [
    ("params", "parameters", 0),
    ("non_embedding_params", "non-embedding parameters", 0),
    ("active_params", "parameters a token uses (MoE: k experts)", 0),
    ("forward_flops_per_token", "forward FLOPs/token", 0),
    ("weights_bytes", "weights on disk (bytes)", 0),
    ("peak_rss_bytes", "peak RSS while generating (bytes)", 0),
    ("model_rss_bytes", "peak RSS - RSS before load (bytes)", 0),
    ("time_to_first_token_ms", "time to first token (ms)", 2),
    ("prefill_tokens_per_second", "prefill tokens/s", 1),
    ("decode_tokens_per_second", "decode tokens/s, batch 1", 1),
    ("batch_decode_tokens_per_second", "decode tokens/s, batch N", 1),
    ("batch_size", "N (batch size)", 0),
    ("kv_cache", "KV cache", 0),
    ("kv_bytes_per_token", "KV cache bytes per token", 0),
    ("energy_joules_per_token", "energy per generated token (J, batch 1)", 4),
    ("device_name", "device", 0),
    ("threads", "threads", 0),
]


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    models = report["models"]
    names = [m["name"] for m in models]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>slmkit evaluation report</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.ci{color:#777;font-size:12px}"
        "img{max-width:100%;border:1px solid #eee;margin:4px}.front{color:#d62728;font-weight:bold}</style>",
        "</head><body>",
        "<h1>slmkit evaluation report</h1>",
        f"<p>{len(models)} model(s); created {e(report.get('created', ''))}; host: "
        f"{e(str(report.get('host', {}).get('device_name', '')))}, "
        f"{e(str(report.get('host', {}).get('threads', '')))} threads. "
        "Intervals are bootstrap 95% CIs over examples; the task value is the mean over prompt templates "
        "(min and max across templates show format sensitivity).</p>",
    ]
    qualities = [m.get("quality") for m in models]
    if all(qualities):
        q0 = qualities[0]
        parts.append(f"<h2>Quality vs cost</h2><p>quality = {e(q0['name'])}; red points are on the Pareto front.</p>")
        fronts = cost_fronts(report)
        for axis in fronts.values():
            png = _plot_png(axis, names, q0["name"], q0["higher_is_better"])
            parts.append(f'<img alt="{e(q0["name"])} vs {e(axis["label"])}" src="data:image/png;base64,{png}">')
        if fronts:
            rows = [
                [e(n)] + [("<span class=front>yes</span>" if i in f["front"] else "no") for f in fronts.values()]
                for i, n in enumerate(names)
            ]
            parts.append(_table(["model"] + [f"on front: {e(f['label'])}" for f in fronts.values()], rows))
        if not any(k == "decode_ms_per_token" for k in fronts):
            parts.append(
                "<p>Latency and memory plots need measured efficiency: run with <code>--efficiency</code>.</p>"
            )
    # text scores
    if any("text" in m for m in models):
        rows = []
        for m in models:
            t = m.get("text")
            if t:
                rows.append(
                    [e(m["name"]), e(", ".join(t["data"])), _fmt(t["loss"], 4), _fmt(t["perplexity"], 2)]
                    + [_fmt(t["bits_per_byte"], 4), _fmt(t["tokens"])]
                )
        parts.append(
            "<h2>Text</h2>" + _table(["model", "data", "loss (nats)", "perplexity", "bits/byte", "tokens"], rows)
        )
    # tasks: model x task x metric
    task_names: list[str] = []
    for m in models:
        for t in m.get("tasks", []):
            if t["task"] not in task_names:
                task_names.append(t["task"])
    if task_names:
        parts.append("<h2>Tasks</h2>")
        overlap = any("contamination" in t for m in models for t in m.get("tasks", []))
        rows = []
        for m in models:
            by_name = {t["task"]: t for t in m.get("tasks", [])}
            for name in task_names:
                t = by_name.get(name)
                if t is None:
                    continue
                for metric, v in t["metrics"].items():
                    spread = f"{v['min']:.3f} / {v['max']:.3f}"
                    chance = _fmt(t.get("chance")) if "chance" in t else ""
                    row = [e(m["name"]), e(name), e(metric), _ci(v), spread, chance, _fmt(t["examples"])]
                    if overlap:
                        c = t.get("contamination")
                        row.append(f"{c['contaminated']}/{c['items']} ({c['rate']:.1%})" if c else "")
                    rows.append(row)
        headers = ["model", "task", "metric", "mean [95% CI]", "template min / max", "chance", "examples"]
        parts.append(_table(headers + (["contaminated"] if overlap else []), rows))
        details = []
        for m in models:
            for t in m.get("tasks", []):
                for metric, v in t["metrics"].items():
                    cells = [
                        f"{e(k)}: {x['value']:.3f} <span class=ci>[{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]</span>"
                        for k, x in v["by_template"].items()
                    ]
                    details.append([e(m["name"]), e(t["task"]), e(metric), "<br>".join(cells)])
        parts.append(
            "<details><summary>per template</summary>"
            + _table(["model", "task", "metric", "by template"], details)
            + "</details>"
        )
    # efficiency
    rows = []
    for key, label, digits in _EFFICIENCY_ROWS:
        values = [_costs(m).get(key) for m in models]
        if any(v is not None for v in values):
            rows.append([e(label)] + [e(_fmt(v, digits)) for v in values])
    if rows:
        parts.append("<h2>Efficiency</h2>" + _table(["", *map(e, names)], rows))
    parts.append(
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `directory` (created if needed)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--report {directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    report = {**report, "pareto": {k: v["front"] for k, v in cost_fronts(report).items()}}
    json_path, html_path = directory / "report.json", directory / "report.html"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    html_path.write_text(render_html(report))
    return json_path, html_path


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UserError(f"{path}: no report.json (write one with `slm eval MODEL --report DIR`)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("models"), list):
        raise UserError(f"{path}: not an slmkit report (no 'models' list)")
    return report
