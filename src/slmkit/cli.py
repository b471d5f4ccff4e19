"""The `slm` command. Thin: parse options, call one public function, print the result.

Heavy imports (torch, transformers, tokenizers) happen inside commands so `slm --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slmkit.errors import UserError

app = typer.Typer(
    name="slm",
    help="slmkit: build small language models end to end (data, tokenizer, training, evaluation, generation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare corpora: train a tokenizer and write token shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files (.txt .md .jsonl .parquet .py), directories, or "
            "builtin:pystdlib (the Python standard library's code)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output data directory.")],
    vocab_size: Annotated[int | None, typer.Option(help="Train a byte-level BPE tokenizer of this size.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Use this tokenizer.json instead of training one.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents (by content hash) for validation.")] = 0.01,
    text_field: Annotated[str, typer.Option(help="Field of .jsonl records / column of .parquet files.")] = "text",
) -> None:
    """Tokenize SOURCES into DATA_DIR: tokenizer.json, train.bin, val.bin and meta.json."""
    from slmkit.data.prepare import prepare

    if vocab_size is None and tokenizer is None:
        vocab_size = 8192
    meta = prepare(
        sources,
        out,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        text_field=text_field,
        progress=True,
    )
    _print_data_summary(out, meta)


def _print_data_summary(out: Path, meta: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{out}  (vocab {meta['vocab_size']}, {meta['dtype']})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="right")
    for split in ("train", "val"):
        s = meta["splits"][split]
        table.add_row(
            split,
            f"{s['documents']:,}",
            f"{s['tokens']:,}",
            f"{s['bytes']:,}",
            f"{s['bytes'] / max(s['tokens'], 1):.2f}",
        )
    _console().print(table)
    if meta.get("skipped_files"):
        _console(stderr=True).print(f"[yellow]skipped {meta['skipped_files']} unreadable or non-UTF-8 file(s)[/]")


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (a ModelConfig field), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Data dir written by `slm data prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="Run dir: checkpoints/, metrics.jsonl, final/.")],
    preset: Annotated[
        str | None, typer.Option(help="Model preset: tiny, micro, mini, small, medium, base, 124m.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of training options (and `model:` overrides).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Model field override, e.g. --set n_layers=6.")] = [],  # noqa: B006
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, wsd (warmup-stable-decay) or constant.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget: optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: training tokens.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget: wall-clock minutes of training.")] = None,
    max_flops: Annotated[float | None, typer.Option(help="Budget: training FLOPs (6N-style count).")] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Evaluate on val every N steps.")] = None,
    save_interval: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (init and data order).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 autocast on capable GPUs), float32, bfloat16.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
) -> None:
    """Train a model on DATA within a budget; checkpoints are resumable with --resume."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train as run_training
    from slmkit.ui import RichReporter

    options = {
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "warmup_steps": warmup_steps,
        "schedule": schedule,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_minutes": max_minutes,
        "max_flops": max_flops,
        "eval_interval": eval_interval,
        "save_interval": save_interval,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "preset": preset,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if compile:
        given["compile"] = True
    if resume:
        budgets = {k: given[k] for k in ("max_steps", "max_tokens", "max_minutes", "max_flops") if k in given}
        result = run_training(TrainConfig(), data, out, resume=True, reporter=RichReporter(), budget_overrides=budgets)
    else:
        base = TrainConfig.from_yaml(config).to_dict() if config else {}
        model_overrides = {**base.get("model", {}), **_parse_sets(set_)}
        cfg = TrainConfig.from_dict({**base, **given, "model": model_overrides})
        result = run_training(cfg, data, out, reporter=RichReporter())
    if result.stop_reason == "interrupted":
        _console(stderr=True).print(
            f"interrupted at step {result.step}; continue with: slm train --data {data} --out {out} --resume"
        )
        raise typer.Exit(130)


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass in (0, 1].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str], typer.Option(help="Stop at this string (repeatable).")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timing after the text.")] = False,
) -> None:
    """Continue PROMPT with MODEL, streaming text to the terminal."""
    from slmkit.api import load
    from slmkit.infer.generate import GenerationStats, stream_text
    from slmkit.infer.sampling import SamplingParams

    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    lm = load(model)
    stats = GenerationStats()
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for delta in stream_text(lm.model, lm.tokenizer, prompt, max_new_tokens, sampling, stop, stats):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose:
        _console(stderr=True).print(
            f"[dim]{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new; "
            f"prefill {stats.prefill_seconds * 1e3:.1f} ms, "
            f"decode {stats.decode_tokens_per_second:.1f} tokens/s; stop: {stats.stop_reason}[/]"
        )


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    data: Annotated[list[Path], typer.Option(help="A data dir (its val split) or text files (repeatable).")],
    split: Annotated[str, typer.Option(help="Split of a data dir: val or train.")] = "val",
    seq_len: Annotated[int | None, typer.Option(help="Window length (default: the model's context).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Loss (nats/token), perplexity and bits per byte of MODEL on a data dir's split or on text files."""
    from slmkit.api import evaluate

    result = evaluate(model, data, split=split, seq_len=seq_len, batch_size=batch_size)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"{model} on {', '.join(map(str, data))} ({split})")
    for col in ("loss (nats)", "perplexity", "bits/byte", "tokens", "bytes"):
        table.add_column(col, justify="right")
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    table.add_row(
        f"{result.loss:.4f}",
        f"{result.perplexity:.2f}",
        bpb,
        f"{result.tokens:,}",
        f"{result.bytes:,}" if result.bytes else "n/a",
    )
    _console().print(table)


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    method: Annotated[
        str,
        typer.Option(
            help="int8, int4, gptq-int4, awq-int4, prune-magnitude, prune-wanda, prune-2:4, prune-structured, lowrank."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (written atomically).")],
    data: Annotated[
        Path | None, typer.Option(help="Data dir: calibration windows (train split), before/after scores (val).")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="int4: inputs per scale/zero group (default 128, less where 128 won't fit)."),
    ] = None,
    outliers: Annotated[float, typer.Option(help="int4: share of weights kept in fp16 (SpQR-style).")] = 0.0,
    sparsity: Annotated[float, typer.Option(help="prune-magnitude / prune-wanda: share of weights zeroed.")] = 0.5,
    heads_keep: Annotated[float, typer.Option(help="prune-structured: share of attention heads kept.")] = 1.0,
    ffn_keep: Annotated[float, typer.Option(help="prune-structured: share of FFN channels kept.")] = 1.0,
    drop_layers: Annotated[int, typer.Option(help="prune-structured: number of whole layers removed.")] = 0,
    energy: Annotated[float, typer.Option(help="lowrank: share of squared singular values kept per layer.")] = 0.9,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows from the train split.")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    eval_windows: Annotated[int | None, typer.Option(help="Val windows scored before/after (default: all).")] = None,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Measure peak memory and decode speed in a subprocess.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Quantize, prune or factorize MODEL into OUT; prints before/after quality, size, memory and speed."""
    from slmkit.compress.pipeline import CompressOptions
    from slmkit.compress.pipeline import compress as run_compress

    options = CompressOptions(
        group_size=group_size,
        outliers=outliers,
        sparsity=sparsity,
        heads_keep=heads_keep,
        ffn_keep=ffn_keep,
        drop_layers=drop_layers,
        energy=energy,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
    )
    result = run_compress(model, method, out, data=data, options=options, measure=measure, eval_windows=eval_windows)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    table = Table(title=f"{method}: {model} -> {out}  ({result.seconds:.1f} s)")
    columns = ("", "perplexity", "bits/byte", "file MB", "tensors MB", "peak RSS MB", "load+decode MB", "decode tok/s")
    for col in columns:
        table.add_column(col, justify="right")
    for name, m in (("before", result.before), ("after", result.after)):
        table.add_row(
            name,
            fmt(m.perplexity, ".3f"),
            fmt(m.bits_per_byte, ".4f"),
            f"{m.size_bytes / 1e6:.2f}",
            fmt(m.weights_memory_mb, ".2f"),
            fmt(m.peak_memory_mb, ".0f"),
            fmt(m.model_memory_mb, ".1f"),
            fmt(m.decode_tokens_per_second, ".1f"),
        )
    _console().print(table)
    b, a = result.before, result.after
    notes = [f"size {b.size_bytes / max(a.size_bytes, 1):.2f}x smaller"]
    if b.perplexity and a.perplexity:
        notes.append(f"perplexity {100 * (a.perplexity / b.perplexity - 1):+.2f}%")
    _console().print("; ".join(notes))


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher model dir (or run dir).")],
    student: Annotated[str, typer.Option(help="Student model dir (e.g. a pruned model) or a preset name.")],
    data: Annotated[Path, typer.Option("--data", help="Data dir tokenized with the teacher's tokenizer.")],
    out: Annotated[Path, typer.Option("--out", help="Run dir: checkpoints/, metrics.jsonl, final/.")],
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the KL term; 1 - alpha goes to the LM loss.")] = 0.5,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget: optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: training tokens.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget: wall-clock minutes.")] = None,
    save_interval: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (student init and data order).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
) -> None:
    """Distil TEACHER into STUDENT on DATA (KL on temperature-softened logits, mixed with the LM loss)."""
    from slmkit.compress.distill import distill as run_distill
    from slmkit.train.config import TrainConfig

    options = {
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "warmup_steps": warmup_steps,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_minutes": max_minutes,
        "save_interval": save_interval,
        "seed": seed,
        "device": device,
    }
    given = {k: v for k, v in options.items() if v is not None}
    budgets = {k: given[k] for k in ("max_steps", "max_tokens", "max_minutes") if k in given}
    cfg = None if resume else TrainConfig.from_dict(given)
    result = run_distill(teacher, student, data, out, cfg, temperature, alpha, resume=resume, budget_overrides=budgets)
    where = result.final_dir or result.run_dir
    line = f"stopped ({result.stop_reason}) at step {result.step}, {result.tokens:,} tokens, {result.seconds:.0f} s"
    if result.val_loss is not None and result.teacher_val_loss is not None:
        line += f"; val loss student {result.val_loss:.4f}, teacher {result.teacher_val_loss:.4f}"
    _console().print(f"{line}; saved to {where}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where to write data and the run.")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Training budget in wall-clock minutes.")] = 5.0,
    preset: Annotated[str, typer.Option(help="Model preset.")] = "micro",
) -> None:
    """The main job: prepare builtin:pystdlib, train a small model, evaluate it, generate samples."""
    from slmkit.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, preset=preset, console=_console())


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
