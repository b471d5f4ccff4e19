"""Context extension of a small model: validation loss at 1x, 2x and 4x its trained length with each RoPE scaling,
without training and after a short fine-tune at 4x (`slm train --init DIR --context N --rope ...`).

A preset is trained at `--train-len` tokens (its max_seq_len too). It is then scored (nats per predicted token over
the same first val tokens at every length, cut into non-overlapping windows seen without earlier context) with:
none (plain rotary, positions past the trained length extrapolated), linear (positions divided by length / trained
length), dynamic (transformers' dynamic NTK: the base grows past the trained length), yarn (`extend_context`: factor
= length / trained length, original window = the trained length). Then three copies are fine-tuned for
`--ft-steps` steps at 4x the length, at the same tokens per step as the base run: with yarn, with linear, and with
no scaling (the same weights given a 4x max_seq_len), and scored again.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/rope_extension.py [--preset micro] [--steps 300]

The corpus is the shared papers file when present (../shared/corpus/seed-papers.jsonl), else the Python standard
library (`builtin:pystdlib`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import hardware

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "seed-papers.jsonl"


def val_loss(model, tokens, length: int, tokens_scored: int) -> float:
    """Mean nats per predicted token over the first `tokens_scored` val tokens cut into windows of `length`: the
    same text at every length, so the columns compare."""
    from slmkit.train.validation import token_nats

    nats, count = token_nats(model, tokens[:tokens_scored], length, batch_size=4, max_windows=tokens_scored // length)
    return nats / count


def scaled(model, config):
    """`model` with another config (its rope tables follow the config)."""
    model.config = config
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--windows", type=int, default=16, help="val windows of the longest length scored")
    args = parser.parse_args()

    import torch

    from slmkit.config import RopeScaling, extend_context
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import load_model, save_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    print(f"hardware: {hardware()}")
    short = args.train_len
    lengths = [short, 2 * short, 4 * short]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if SHARED.is_file():
            prepare([str(SHARED)], data, vocab_size=4096, text_field="abstract", val_fraction=0.05)
        else:
            prepare(["builtin:pystdlib"], data, vocab_size=4096, val_fraction=0.05)
        val = load_data_dir(data).val
        common = dict(lr=1e-3, warmup_steps=20, eval_interval=10**9, save_interval=10**9, device="cpu", seed=0)
        base_cfg = TrainConfig(
            preset=args.preset, model={"max_seq_len": short}, seq_len=short, batch_size=args.batch_size,
            max_steps=args.steps, **common,
        )  # fmt: skip
        base = train(base_cfg, data, Path(tmp) / "base").final_dir
        assert base is not None
        scored = args.windows * lengths[-1]
        print(f"{args.preset} trained {args.steps} steps of {args.batch_size} x {short} tokens; the first {scored:,} "
              f"tokens of the val split ({len(val):,}) scored at every length")  # fmt: skip

        rows: dict[str, list[float]] = {}
        with torch.no_grad():
            model = load_model(base)
            config = model.config
            rows["none"] = [val_loss(scaled(model, config), val, n, scored) for n in lengths]
            for rope in ("linear", "yarn"):
                stretched = [extend_context(config, n, rope) if n > short else config for n in lengths]
                pairs = zip(stretched, lengths, strict=True)
                rows[rope] = [val_loss(scaled(model, c), val, n, scored) for c, n in pairs]
            rows["dynamic"] = [
                val_loss(scaled(model, config.replace(rope_scaling=RopeScaling("dynamic", n / short))), val, n,
                         scored)
                for n in lengths
            ]  # fmt: skip

        long = lengths[-1]
        plain_dir = Path(tmp) / "plain-long"  # the same weights with a 4x window and no scaling
        model = load_model(base)
        model.config = model.config.replace(max_seq_len=long)
        save_model(model, plain_dir)
        for tokenizer_file in base.glob("tokenizer*.json"):
            shutil.copy(tokenizer_file, plain_dir / tokenizer_file.name)
        ft_batch = max(1, args.batch_size * short // long)
        for name, init, rope in (("yarn", base, "yarn"), ("linear", base, "linear"), ("none", plain_dir, None)):
            extension = dict(context=long, rope=rope) if rope else {}
            cfg = TrainConfig(
                init=str(init), seq_len=long, batch_size=ft_batch, max_steps=args.ft_steps, **extension, **common
            )
            tuned = train(cfg, data, Path(tmp) / f"ft-{name}").final_dir
            assert tuned is not None
            with torch.no_grad():
                model = load_model(tuned)
                rows[f"{name} + ft"] = [val_loss(model, val, n, scored) for n in lengths]

        print(f"fine-tuning: {args.ft_steps} steps of {ft_batch} x {long} tokens at 4x the trained length")
        print(f"{'scaling':<14}" + "".join(f"{f'{n} ({n // short}x)':>14}" for n in lengths))
        for name, losses in rows.items():
            print(f"{name:<14}" + "".join(f"{loss:>14.4f}" for loss in losses))


if __name__ == "__main__":
    main()
