"""What `slm eval` prints (used by the CLI only; the work is :func:`slmkit.eval.runner.run_eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit.errors import UserError


def _print_text_table(console: Any, title: str, result: Any) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("loss (nats)", "perplexity", "bits/byte", "tokens", "bytes"):
        table.add_column(col, justify="right")
    bpb = f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "n/a"
    table.add_row(
        f"{result['loss']:.4f}",
        f"{result['perplexity']:.2f}",
        bpb,
        f"{result['tokens']:,}",
        f"{result['bytes']:,}" if result["bytes"] else "n/a",
    )
    console.print(table)


def contamination_cell(task: dict[str, Any]) -> str:
    """'3/50 (6.0%)' of a task result with a contamination entry, '' without one."""
    c = task.get("contamination")
    if not c:
        return ""
    return f"{c['contaminated']}/{c['items']} ({c['rate']:.1%})"


def print_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    for m in report["models"]:
        if "text" in m:
            t = m["text"]
            split = f" ({t['split']})" if t.get("split") else ""
            _print_text_table(console, f"{m['name']} on {', '.join(t['data'])}{split}", t)
    if any(m.get("tasks") for m in report["models"]):
        table = Table(title="tasks (mean over templates, bootstrap 95% CI, template min-max)")
        contaminated = any("contamination" in t for m in report["models"] for t in m.get("tasks", []))
        columns = ("model", "task", "metric", "mean", "95% CI", "min-max", "chance", "n")
        for col in columns + (("contaminated",) if contaminated else ()):
            table.add_column(col, justify="left" if col in ("model", "task", "metric") else "right")
        for m in report["models"]:
            for t in m.get("tasks", []):
                for metric, v in t["metrics"].items():
                    table.add_row(
                        m["name"],
                        t["task"],
                        metric,
                        f"{v['mean']:.3f}",
                        f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
                        f"{v['min']:.3f}-{v['max']:.3f}",
                        f"{t['chance']:.3f}" if "chance" in t else "",
                        str(t["examples"]),
                        *([contamination_cell(t)] if contaminated else []),
                    )
        console.print(table)
    if any("efficiency" in m for m in report["models"]):
        table = Table(title="efficiency")
        for col in (
            "model",
            "params",
            "weights MB",
            "peak RSS MB",
            "TTFT ms",
            "prefill tok/s",
            "decode tok/s",
            "batch tok/s",
        ):
            table.add_column(col, justify="left" if col == "model" else "right")
        for m in report["models"]:
            e = m.get("efficiency")
            if not e:
                continue
            table.add_row(
                m["name"],
                f"{e['params']:,}",
                f"{e['weights_bytes'] / 1e6:.2f}",
                f"{e['peak_rss_bytes'] / 1e6:.0f}",
                f"{e['time_to_first_token_ms']:.1f}",
                f"{e['prefill_tokens_per_second']:.0f}",
                f"{e['decode_tokens_per_second']:.1f}",
                f"{e['batch_decode_tokens_per_second']:.1f} (N={e['batch_size']})",
            )
        console.print(table)
        first = next(m["efficiency"] for m in report["models"] if "efficiency" in m)
        console.print(f"[dim]measured on {first['device_name']}, {first['threads']} threads, {first['dtype']}[/]")


def run_eval_command(
    models: list[Path],
    data: list[Path],
    split: str,
    seq_len: int | None,
    batch_size: int,
    as_json: bool,
    tasks: list[str],
    suite: str | None,
    corpus: list[str],
    suite_size: int,
    templates: list[str],
    num_fewshot: int,
    seed: int,
    limit: int | None,
    efficiency: bool,
    report_dir: Path | None,
    threads: int | None,
    console: Any,
    err_console: Any,
    contamination_data: Path | None = None,
    contamination_n: int = 13,
) -> None:
    from slmkit.eval.runner import run_eval

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    options = {"threads": threads} if threads else {}
    report = run_eval(
        models,
        data=data or None,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        tasks=tasks,
        suite=suite,
        corpus=corpus or None,
        suite_size=suite_size,
        templates=templates or None,
        num_fewshot=num_fewshot,
        seed=seed,
        limit=limit,
        efficiency=efficiency,
        efficiency_options=options,
        on_status=None if as_json else (lambda msg: err_console.print(f"[dim]{msg}[/]")),
        contamination_data=contamination_data,
        contamination_n=contamination_n,
    )
    paths = None
    if report_dir is not None:
        from slmkit.eval.report import write_report

        paths = write_report(report, report_dir)
    if as_json:
        print(json.dumps(json_view(report)))
    else:
        print_report(console, report)
        if paths:
            console.print(f"wrote {paths[0]} and {paths[1]}")


def json_view(report: dict[str, Any]) -> dict[str, Any]:
    """One model: its text scores at the top level (the keys `slm eval --json` always printed) plus
    `tasks` / `efficiency` when asked for. Several models: the whole report."""
    if len(report["models"]) != 1:
        return report
    m = report["models"][0]
    out: dict[str, Any] = {}
    if "text" in m:
        out.update({k: m["text"][k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes")})
    for key in ("tasks", "efficiency", "quality"):
        if key in m:
            out[key] = m[key]
    out["model"] = m["path"]
    return out
