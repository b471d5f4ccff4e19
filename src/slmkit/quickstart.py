"""`slm quickstart`: the main job, end to end on the embedded corpus (the Python standard library)."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

VAL_FRACTION = 0.05
SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n")


def compressor_bits_per_byte(text: bytes) -> dict[str, float]:
    """gzip -9 and xz -9e bits per byte of `text`: the baselines a language model must beat."""
    return {
        "gzip -9": 8 * len(gzip.compress(text, compresslevel=9)) / len(text),
        "xz -9e": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text),
    }


def run_quickstart(
    out: Path,
    minutes: float = 5.0,
    preset: str = "micro",
    console: Console | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
) -> dict[str, Any]:
    import numpy as np

    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import load_tokenizer
    from slmkit.eval.perplexity import evaluate_text
    from slmkit.infer.generate import generate
    from slmkit.infer.sampling import SamplingParams
    from slmkit.loading import load
    from slmkit.train.loop import train
    from slmkit.ui import RichReporter

    console = console or Console(highlight=False)
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    started = time.perf_counter()

    console.rule("[bold]1/4 data: builtin:pystdlib")
    meta_path = data_dir / "meta.json"
    wanted = {"sources": ["builtin:pystdlib"], "requested_vocab_size": vocab_size, "val_fraction": VAL_FRACTION}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if all(meta.get(k) == v for k, v in wanted.items()):
        console.print(f"reusing {data_dir} (delete it to prepare again)")
    else:
        prepare(["builtin:pystdlib"], data_dir, vocab_size=vocab_size, val_fraction=VAL_FRACTION, progress=True)
    data = load_data_dir(data_dir)
    splits = data.meta["splits"]
    console.print(
        f"train {splits['train']['tokens']:,} tokens / val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['bytes'] / max(splits['val']['tokens'], 1):.2f} bytes per token)"
    )

    console.rule(f"[bold]2/4 train: preset {preset}, {minutes:g} minutes")
    if run_dir.exists():
        previous = out / "run.previous"
        shutil.rmtree(previous, ignore_errors=True)
        run_dir.rename(previous)
        console.print(f"moved the earlier run to {previous}")
    cfg = quickstart_config(minutes, preset, seq_len)
    result = train(cfg, data_dir, run_dir, reporter=RichReporter(console))

    console.rule("[bold]3/4 evaluate on the val split")
    lm = load(run_dir)
    score = evaluate_text(lm, data_dir, split="val", seq_len=seq_len, batch_size=16)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    eot = data.eot_token_id
    val_ids = np.asarray(data.val, dtype=np.int64)
    val_text = tokenizer.decode([int(t) for t in val_ids if t != eot]).encode("utf-8")
    baselines = compressor_bits_per_byte(val_text)
    table = Table(title=f"val split of builtin:pystdlib: {len(val_text):,} bytes")
    table.add_column("compressor")
    table.add_column("bits per byte", justify="right")
    table.add_row(f"slmkit {preset} ({result.step} steps)", f"{score.bits_per_byte:.3f}")
    for name, bpb in baselines.items():
        table.add_row(name, f"{bpb:.3f}")
    console.print(table)
    console.print(f"val loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f}")
    verdict = "beats" if score.bits_per_byte < baselines["gzip -9"] else "does NOT beat"
    console.print(f"the model {verdict} gzip -9 on held-out code")

    console.rule("[bold]4/4 samples (temperature 0.8, top-k 40)")
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        text = generate(
            lm.model,
            lm.tokenizer,
            prompt,
            max_new_tokens=80,
            sampling=SamplingParams(temperature=0.8, top_k=40, seed=i),
        )
        console.print(Text(prompt, style="bold cyan") + Text(text))
        console.print("-" * 40)

    summary = {
        "data_dir": str(data_dir),
        "run_dir": str(run_dir),
        "model_dir": str(lm.directory),
        "steps": result.step,
        "tokens": result.tokens,
        "train_seconds": result.seconds,
        "val": score.to_dict(),
        "baselines_bits_per_byte": baselines,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"done in {summary['total_seconds'] / 60:.1f} min; model at {lm.directory}; summary in {out / 'summary.json'}"
    )
    console.print(f"next: slm generate {run_dir} --prompt 'def '   |   slm eval {run_dir} --data {data_dir}")
    return summary


def quickstart_config(minutes: float, preset: str = "micro", seq_len: int = 256, model: dict[str, Any] | None = None):
    """The quickstart's training recipe (a TrainConfig) for `minutes` of training; `model` adds ModelConfig
    overrides (benchmarks/shape_vs_quickstart.py trains other shapes with this recipe)."""
    from slmkit.train.config import TrainConfig

    return TrainConfig(
        preset=preset,
        seq_len=seq_len,
        batch_size=16,
        lr=3e-3,
        warmup_steps=30,
        schedule="wsd",
        decay_fraction=0.3,
        # the recipe that won on this benchmark's data (docs/training.md): Muon (the default optimizer), an untied
        # head at 10x the lr with the embedding table, and 100 steps of sequence-length warm-up from 64 tokens
        model={**(model or {}), "tie_embeddings": False},
        embed_lr_scale=10.0,
        seq_len_warmup_steps=100,
        seq_len_warmup_start=min(64, seq_len),
        max_minutes=minutes,
        eval_interval=100,
        eval_batches=4,
        save_interval=250,
        seed=1337,
    )
