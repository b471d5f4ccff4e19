"""report.html of a build: the plan against what happened, then the evaluation report of the shipped model.

One self-contained file (inline styles, the evaluation's plots as base64 PNGs from `slmkit.eval.report`).
"""

from __future__ import annotations

import html
import math
from typing import Any

from slmkit.eval.report import render_html


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(seconds: float, budget: float) -> str:
    width = max(0.0, min(seconds / budget, 1.0)) * 300
    return f'<span style="display:inline-block;height:10px;width:{width:.0f}px;background:#4c72b0"></span>'


def build_sections(data: dict[str, Any]) -> str:
    e = html.escape
    request, plan, result = data["request"], data["plan"], data.get("result", {})
    train = data["stages"]["train"]["steps"]
    budget = request["budget_seconds"]
    low, high = plan["loss_interval"]
    actual = train["evaluate"]["val_loss"]
    inside = "inside" if low <= actual <= high else "<b>outside</b>"
    targets = []
    if request.get("max_latency_ms"):
        targets.append(f"decode &le; {request['max_latency_ms']:g} ms/token")
    if request.get("max_size_bytes"):
        targets.append(f"weights &le; {request['max_size_bytes'] / 1e6:g} MB")
    parts = [
        "<h1>slm build</h1>",
        f"<p>Budget {budget / 60:g} min on {e(request['device'])}, data {e(', '.join(request['data']))}; targets: "
        f"{', '.join(targets) or 'none'}. Spent {data.get('spent_seconds', 0) / 60:.2f} min "
        f"({data.get('spent_seconds', 0) / budget:.0%} of the budget). Shipped: <b>{e(str(result.get('method')))}</b>"
        f"{'' if all(result.get('meets', {}).values()) else ' (<b>a target was missed</b>)'}.</p>",
        "<h2>Plan vs actual</h2>",
        _table(
            ["figure", "planned", "measured"],
            [
                [
                    "val loss, nats/token (the ladder's val windows)",
                    f"{_fmt(plan['predicted_loss'])} [{_fmt(low)}, {_fmt(high)}] ({plan['ci_level']:.0%})",
                    f"{_fmt(actual)} ({inside} the interval)",
                ],
                [
                    "held-out bits/byte (shipped model, 95% CI)",
                    _fmt(plan.get("predicted_bits_per_byte")),
                    f"{_fmt(result.get('bits_per_byte'))} [{_fmt(result.get('bits_per_byte_interval', [None])[0])}, "
                    f"{_fmt(result.get('bits_per_byte_interval', [None, None])[1])}]",
                ],
                ["shape", f"{plan['width']}x{plan['depth']} {e(plan['mixer'])}", ""],
                ["parameters (all / non-embedding)", f"{plan['total_params']:,} / {plan['params']:,}", ""],
                ["training tokens", f"{plan['tokens']:,}", f"{train['train']['tokens']:,}"],
                ["training minutes", _fmt(plan["train_minutes"], 2), _fmt(train["train"]["train_seconds"] / 60, 2)],
                [
                    "decode ms/token, batch 1",
                    _fmt(plan.get("predicted_decode_ms"), 2),
                    _fmt(result.get("decode_ms_per_token"), 2),
                ],
                ["weights, MB", "", _fmt(result.get("size_bytes", 0) / 1e6, 3)],
            ],
        ),
    ]
    if plan.get("binding"):
        parts.append(f"<p>The optimum was limited by: {e(', '.join(plan['binding']))}.</p>")
    if plan.get("families"):
        rows = [
            [e(f["mixer"]), _fmt(f["predicted_loss"]), f"{f['width']}x{f['depth']}", f"{f['tokens']:,}"]
            for f in plan["families"]
        ]
        parts.append(_table(["mixer family", "predicted loss", "shape", "tokens"], rows))
    rows = []
    planned = plan.get("stage_seconds", {})
    for name, stage in data["stages"].items():
        rows.append(
            [
                e(name),
                _fmt(planned.get(name), 1),
                _fmt(stage["seconds"], 1),
                f"{stage['seconds'] / budget:.1%}",
                _bar(stage["seconds"], budget),
            ]
        )
    spent = data.get("spent_seconds", 0)
    rows.append(["<b>total</b>", _fmt(budget, 1), _fmt(spent, 1), f"{spent / budget:.1%}", ""])
    parts.append(
        "<h2>Budget per stage</h2><p>Planned: data and plan as spent before planning, train the rest of the budget "
        "after the reservation for the later stages, which the post-training work timed on a tiny model predicts "
        "for the planned shape.</p>"
        + _table(["stage", "planned seconds", "spent seconds", "share of budget", ""], rows)
    )
    rows = []
    for c in data.get("candidates", []):
        meets = ", ".join(f"{k}: {'ok' if v else 'missed'}" for k, v in c["meets"].items())
        chosen = " <b>(shipped)</b>" if c["method"] == result.get("method") else ""
        rows.append(
            [
                e(c["method"]) + chosen,
                _fmt(c["loss"]),
                _fmt(c["bits_per_byte"]),
                _fmt(c["size_bytes"] / 1e6, 3),
                _fmt(c["decode_ms_per_token"], 2),
                meets,
            ]
        )
    latency = f"{request['max_latency_ms']:g} ms/token" if request.get("max_latency_ms") else "none"
    parts.append(
        f"<h2>Compression candidates</h2><p>Latency target: {latency}. Loss on {e('evenly spaced val windows')}; "
        "decode timed at batch 1 in the build's process (the shipped model again in a fresh process below).</p>"
        + _table(["method", "loss", "bits/byte", "MB", "decode ms/token", "targets"], rows)
    )
    machine = data.get("machine", {})
    rows = [
        [e(p["shape"]), f"{p['tokens_per_second']:,.0f}", f"{p['flops_per_second']:.3g}"]
        for p in machine.get("train", [])
    ]
    decode = {p["shape"]: p["ms"] for p in machine.get("decode", [])}
    for row in rows:
        row.append(_fmt(decode.get(row[0]), 2))
    parts.append(
        "<h2>This machine</h2>" + _table(["shape", "training tokens/s", "training FLOP/s", "decode ms/token"], rows)
    )
    parts.append(
        "<h2>Decisions</h2><ul>"
        + "".join(f"<li>{e(d['stage'])}: {e(d['decision'])}</li>" for d in data["decisions"])
        + "</ul>"
    )
    parts.append("<h2>Evaluation of the shipped model</h2>")
    return "\n".join(parts)


def render_report(data: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The evaluation report's page with the build's sections in front of it."""
    page = render_html(evaluation)
    marker = "<h1>slmkit evaluation report</h1>"
    if marker in page:
        return page.replace(marker, build_sections(data), 1).replace(
            "<title>slmkit evaluation report</title>", "<title>slm build report</title>", 1
        )
    return page.replace("<body>", "<body>" + build_sections(data), 1)
