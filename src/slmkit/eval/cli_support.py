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
        for m in report["models"]:
            for t in m.get("tasks", []):
                f = t.get("formulations")
                if f:
                    console.print(
                        f"{m['name']} {t['task']}: cloze acc_norm {f['cloze']['value']:.3f}, lettered (MCF) acc "
                        f"{f['mcf']['value']:.3f}; better: {f['best']}"
                    )
    if any(m.get("compare") for m in report["models"]):
        base = next(m["compare"]["base"] for m in report["models"] if m.get("compare"))
        table = Table(
            title=f"against {base}: primary metric, its delta, and answer flips as shares of items "
            "(lost: right before, wrong now; gained: the reverse)"
        )
        for col in ("model", "task", "metric", "base", "value", "delta", "flips", "lost", "gained"):
            table.add_column(col, justify="left" if col in ("model", "task", "metric") else "right")
        for m in report["models"]:
            c = m.get("compare")
            for t in c["tasks"] if c else []:
                table.add_row(
                    m["name"], t["task"], t["metric"], f"{t['base']:.3f}", f"{t['value']:.3f}", f"{t['delta']:+.3f}",
                    f"{t['flips']:.3f}", f"{t['negative_flips']:.3f}", f"{t['positive_flips']:.3f}",
                )  # fmt: skip
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
            "KV B/token",
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
                f"{e['kv_bytes_per_token']:.0f}" if e.get("kv_bytes_per_token") is not None else "n/a",
            )
        console.print(table)
        first = next(m["efficiency"] for m in report["models"] if "efficiency" in m)
        console.print(
            f"[dim]measured on {first['device_name']}, {first['threads']} threads, {first['dtype']}; "
            f"KV cache: {first.get('kv_cache', 'full')}[/]"
        )


def _set_threads_and_check_batch(threads: int | None, batch_size: int) -> None:
    """--threads (torch's CPU threads, when given) and --batch-size, checked before any model loads."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")


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
    kv_cache: Any = None,
    compare: Path | None = None,
    olmes: bool = False,
) -> None:
    from slmkit.eval.runner import run_eval

    _set_threads_and_check_batch(threads, batch_size)
    options: dict[str, Any] = {"threads": threads} if threads else {}
    if kv_cache is not None:  # a KVCacheSpec: its fields travel to the measuring process as JSON
        import dataclasses

        options["kv_cache"] = dataclasses.asdict(kv_cache)
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
        compare=compare,
        olmes=olmes,
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


def run_lm_eval_command(
    models: list[Path],
    tasks: list[str],
    include: list[Path],
    conflicting: list[str],
    num_fewshot: int,
    limit: int | None,
    batch_size: int,
    threads: int | None,
    as_json: bool,
    console: Any,
) -> None:
    """`slm eval MODEL --lm-eval TASK [--lm-eval-include DIR]`: lm-eval's tasks through slmkit's registered adapter
    (no import by hand), printing lm-eval's own table (or --json: {model: lm-eval's "results"})."""
    if conflicting:
        raise UserError(
            f"--lm-eval runs lm-eval's tasks on their own; {', '.join(conflicting)} belong to slmkit's evaluation: "
            "run `slm eval` twice"
        )
    if not tasks:
        raise UserError("--lm-eval-include needs --lm-eval TASK (the tasks to run)")
    _set_threads_and_check_batch(threads, batch_size)
    from slmkit.interop.checkpoint import resolve_model_dir

    directories = [resolve_model_dir(m) for m in models]  # every path checked before minutes of evaluation
    from slmkit.eval.lm_eval_adapter import evaluate_lm_eval_tasks

    everything = {}
    for directory in directories:
        out = evaluate_lm_eval_tasks(
            str(directory), tasks, [str(d) for d in include], num_fewshot=num_fewshot or None, limit=limit,
            batch_size=batch_size,
        )  # fmt: skip
        everything[str(directory)] = out["results"]
        if not as_json:
            from lm_eval.utils import make_table

            console.print(f"[bold]{directory}[/]")
            print(make_table(out))
    if as_json:
        print(json.dumps(everything, default=str))


def json_view(report: dict[str, Any]) -> dict[str, Any]:
    """One model: its text scores at the top level (the keys `slm eval --json` always printed) plus
    `tasks` / `efficiency` when asked for. Several models: the whole report."""
    if len(report["models"]) != 1:
        return report
    m = report["models"][0]
    out: dict[str, Any] = {}
    if "text" in m:
        out.update({k: m["text"][k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes")})
    for key in ("tasks", "efficiency", "quality", "compare"):
        if key in m:
            out[key] = m[key]
    out["model"] = m["path"]
    return out
