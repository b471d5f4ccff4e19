"""Terminal progress for long work (used by the CLI only; library code logs)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def describe_counts(counts: dict[str, int]) -> str:
    """'N parameters (M non-embedding)', plus ', A per token' where a token uses fewer (MoE); from
    `ModelConfig.param_counts()`."""
    text = f"{counts['params']:,} parameters ({counts['non_embedding_params']:,} non-embedding"
    active = counts.get("active_params", counts["params"])
    return text + (f", {active:,} per token)" if active != counts["params"] else ")")


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class RichReporter:
    """A live progress line: step, loss, val, tokens/s, estimated MFU, ETA (from budget progress)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self.val = ""

    def start(self, info: dict[str, Any]) -> None:
        budget = ", ".join(f"{k}={v}" for k, v in info["budget"].items())
        self.console.print(
            f"model: {describe_counts(info)}; "
            f"{info['device']} {info['dtype']}; {info['tokens_per_step']:,} tokens/step; budget: {budget}"
            + (f"; {info['optimizer']}, MFU vs {info['mfu_peak']}" if "mfu_peak" in info else "")
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=1000, status="starting")

    def step(self, m: dict[str, Any]) -> None:
        status = (
            f"step {m['step']}  loss {m['loss']:.3f}{self.val}  {_si(m['tokens_per_second'])} tok/s  "
            f"mfu {m['mfu'] * 100:.0f}%  lr {m['lr']:.1e}"
        )
        self.progress.update(self.task, completed=int(m["progress"] * 1000), status=status)

    def eval(self, m: dict[str, Any]) -> None:
        self.val = f"  val {m['val_loss']:.3f} ({m['val_bits_per_byte']:.3f} bpb)"

    def message(self, text: str) -> None:
        self.console.print(text)

    def end(self, result: Any) -> None:
        if self.task is not None:
            self.progress.stop()
        where = result.final_dir or result.run_dir
        self.console.print(
            f"stopped ({result.stop_reason}) at step {result.step}, {result.tokens:,} tokens, "
            f"{result.seconds:.0f} s; saved to {where}"
        )
