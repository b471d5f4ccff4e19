"""Dataset Decomposition vs random windows: validation loss against training time at equal tokens.

Both runs train the same preset on the same prepared data for the same number of tokens (same seed, same
learning-rate schedule over steps), one with `curriculum: decomposition`, one with random windows; both are
scored at every evaluation on the same validation windows (full `seq_len` windows of the val split, which do cross
documents: the usual metric). Printed per run: final val loss, wall-clock training seconds, and the seconds each
run needed to first reach the baseline's final val loss (the paper's "time to equal loss"), with the ratio.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/curriculum.py [--preset micro] [--steps 300] [--seq-len 512]

The corpus is the shared papers file when present (../shared/corpus/seed-papers.jsonl), else the Python standard
library (`builtin:pystdlib`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import hardware

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "seed-papers.jsonl"


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, val loss) at every evaluation of a run."""
    elapsed, curve = 0.0, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "elapsed" in record:
            elapsed = record["elapsed"]
        if "val_loss" in record:
            curve.append((elapsed, record["val_loss"]))
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-interval", type=int, default=25)
    args = parser.parse_args()

    from slmkit.data.prepare import prepare
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    print(f"hardware: {hardware()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if SHARED.is_file():
            prepare([str(SHARED)], data, vocab_size=4096, text_field="abstract", val_fraction=0.05)
        else:
            prepare(["builtin:pystdlib"], data, vocab_size=4096, val_fraction=0.05)
        results = {}
        for curriculum in ("none", "decomposition"):
            cfg = TrainConfig(
                preset=args.preset,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                max_steps=args.steps,
                eval_interval=args.eval_interval,
                eval_batches=8,
                save_interval=10**9,
                curriculum=curriculum,
                device="cpu",
            )
            run = Path(tmp) / curriculum
            result = train(cfg, data, run)
            results[curriculum] = (result, val_curve(run))
        base_result, base_curve = results["none"]
        target = base_curve[-1][1]
        shape = f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens"
        print(f"{args.preset}, {shape}, target val loss {target:.4f}")
        print(f"{'run':<15} {'val loss':>9} {'train s':>8} {'s to target':>12}")
        for name, (result, curve) in results.items():
            reach = time_to(curve, target)
            shown = f"{reach:.1f}" if reach is not None else "not reached"
            print(f"{name:<15} {curve[-1][1]:>9.4f} {result.seconds:>8.1f} {shown:>12}")
        reach = time_to(results["decomposition"][1], target)
        if reach:
            print(f"time to the baseline's loss: {base_result.seconds / reach:.2f}x faster with decomposition")


if __name__ == "__main__":
    main()
