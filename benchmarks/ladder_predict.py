"""How well a build-sized scaling ladder predicts the run the build then trains (issue #22's interval goal).

`slm build --budget 10m` spends 15% of its budget on a ladder (about 2.4e12 FLOPs on the 2-core EPYC) and plans a
model ~100x larger in compute from it. This harness runs candidate ladder designs at that FLOP budget on the
build's corpus (`builtin:pystdlib`, 4096-token BPE, 5% val split), fits the law on each (`scaling.fit.analyse`) and
predicts runs whose loss was measured with the ladder's recipe (seq 128, batch 16, lr 3e-3, cosine, Muon, warmup
100, 64 val windows):

- 96x4 on 6.53M tokens: 2.7295 (the `--max-latency quickstart` build of docs/build.md, 3188 steps);
- 80x6 on 5.73M tokens: 2.8512 (the build without a target, 2796 steps);
- extra points given with --truth NAME:WIDTHxDEPTH:TOKENS:LOSS, or trained here with --train WIDTHxDEPTH:TOKENS
  (the same recipe, warmup 100 and a cosine schedule over the tokens, one thread; kept in --work/truth).

Ladders are FLOP-budgeted, so their losses do not depend on the machine's load; each design's ladder is kept in
--work and reused by a later call (finished rungs are skipped).

    PYTHONPATH=src python benchmarks/ladder_predict.py --data DATA --work /tmp/lp --threads 1 [--designs a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

GROUND_TRUTH = [("96x4", 96, 4, 6_529_024, 2.7295), ("80x6", 80, 6, 5_726_208, 2.8512)]
BUDGET_FLOPS = 2.45e12  # the 10-minute builds' ladders got 2.39e12 and 2.59e12

# name -> (sizes, LadderSettings overrides)
DESIGNS: dict[str, tuple[str, dict[str, Any]]] = {
    "build": ("32x2,64x2,64x4,96x4", {}),  # what `slm build --budget 10m` ran before this harness
    "two-sizes": ("32x2,96x4", {}),
    "levels3-r4": ("32x2,64x2,64x4,96x4", {"levels": 3, "level_ratio": 4.0}),
    "min30": ("32x2,64x2,64x4,96x4", {"min_steps": 30}),
    "batch8": ("32x2,64x2,64x4,96x4", {"batch_size": 8}),
    "batch4": ("32x2,64x2,64x4,96x4", {"batch_size": 4}),
    "batch4-min30": ("32x2,64x2,64x4,96x4", {"batch_size": 4, "min_steps": 30}),  # the build's ladder now
    "batch4-min50": ("32x2,64x2,64x4,96x4", {"batch_size": 4, "min_steps": 50}),
    "batch4-min30-seed2": ("32x2,64x2,64x4,96x4", {"batch_size": 4, "min_steps": 30, "seed": 2}),
    "batch4-min30-3sizes": ("32x2,64x2,96x4", {"batch_size": 4, "min_steps": 30}),
    "batch4-min50-seed2": ("32x2,64x2,64x4,96x4", {"batch_size": 4, "min_steps": 50, "seed": 2}),
    "batch16-min30-seed2": ("32x2,64x2,64x4,96x4", {"min_steps": 30, "seed": 2}),
    "batch8-min30": ("32x2,64x2,64x4,96x4", {"batch_size": 8, "min_steps": 30}),
}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_truth(data: Path, work: Path, width: int, depth: int, tokens: int, threads: int) -> tuple[int, float]:
    """A run with the build's recipe at batch 16 (what the ladder's law must predict); (tokens, val loss) on the
    ladder's 64 val windows. Reused when already trained."""
    from slmkit.data.shards import load_data_dir
    from slmkit.scaling.ladder import LadderSettings, evaluate_rung, rung_lr
    from slmkit.scaling.shapes import shape_overrides
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    out = work / "truth" / f"{width}x{depth}-{tokens}"
    record = out / "truth.json"
    if not record.is_file():
        cfg = TrainConfig(
            preset="tiny",
            model=shape_overrides(width, depth, 128, "attention"),
            batch_size=16,
            seq_len=128,
            lr=rung_lr(3e-3, width),
            warmup_steps=100,
            schedule="cosine",
            max_tokens=tokens,
            eval_interval=10**9,
            eval_batches=1,
            save_interval=10**9,
            keep_checkpoints=1,
            seed=1337,
            device="cpu",
            threads=threads,
            optimizer="muon",
        )
        result = train(cfg, data, out, overwrite=True)
        loss, _, _ = evaluate_rung(out / "final", load_data_dir(data), LadderSettings(val_windows=64))
        record.write_text(json.dumps({"tokens": result.tokens, "val_loss": loss}))
    saved = json.loads(record.read_text())
    return int(saved["tokens"]), float(saved["val_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the prepared builtin:pystdlib data dir")
    parser.add_argument("--work", type=Path, required=True, help="one ladder dir per design goes here")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated names of DESIGNS")
    parser.add_argument("--budget-flops", type=float, default=BUDGET_FLOPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=50)
    parser.add_argument("--truth", action="append", default=[], help="NAME:WIDTHxDEPTH:TOKENS:LOSS, another target")
    parser.add_argument("--train", action="append", default=[], help="WIDTHxDEPTH:TOKENS, a target trained here")
    parser.add_argument("--ladder", action="append", default=[], help="also fit this existing ladder dir")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from slmkit.data.shards import load_data_dir
    from slmkit.scaling.fit import analyse, load_rungs
    from slmkit.scaling.ladder import LadderSettings, run_ladder
    from slmkit.scaling.shapes import Shape, parse_sizes

    truths = list(GROUND_TRUTH)
    for spec in args.truth:
        name, shape, tokens, loss = spec.split(":")
        width, depth = (int(x) for x in shape.split("x"))
        truths.append((name, width, depth, int(float(tokens)), float(loss)))
    for spec in args.train:
        shape, tokens = spec.split(":")
        width, depth = (int(x) for x in shape.split("x"))
        trained, loss = train_truth(args.data, args.work, width, depth, int(float(tokens)), args.threads)
        print(f"# trained {shape} on {trained:,} tokens at batch 16: val loss {loss:.4f}, load {load()}", flush=True)
        truths.append((f"{shape}@{trained / 1e6:.2f}M", width, depth, trained, loss))
    vocab = load_data_dir(args.data).vocab_size
    targets = []
    for name, width, depth, tokens, loss in truths:
        cfg = Shape(width, depth).config(vocab, 128)
        targets.append((name, cfg.num_params(False), tokens, cfg.flops_per_token(128), loss))

    base = {"seq_len": 128, "batch_size": 16, "lr": 3e-3, "levels": 4, "min_steps": 10, "val_windows": 64}
    runs: list[tuple[str, Path]] = [(Path(p).name, Path(p)) for p in args.ladder]
    for name in [d for d in args.designs.split(",") if d]:
        sizes, overrides = DESIGNS[name]
        settings = LadderSettings(**{**base, **overrides}, threads=args.threads)
        out = args.work / name
        started = time.perf_counter()
        run_ladder(args.data, out, budget_flops=args.budget_flops, sizes=parse_sizes(sizes), settings=settings)
        print(f"# {name}: ladder {time.perf_counter() - started:.0f} s, load {load()}", flush=True)
        runs.append((name, out))

    rows = []
    for name, out in runs:
        rungs = load_rungs(out)
        fit = analyse(rungs, bootstrap=args.bootstrap, holdout=True, extrapolation=True)
        steps = [r["steps"] for r in rungs.records]
        row: dict[str, Any] = {
            "design": name,
            "rungs": len(rungs),
            "steps": [min(steps), max(steps)],
            "val_loss": [float(rungs.loss.min()), float(rungs.loss.max())],
            "law": fit.law.to_dict(),
            "holdout_relative_error": fit.holdout["relative_error"] if fit.holdout else None,
            "extrapolation": fit.extrapolation,
            "targets": {},
        }
        for tname, params, tokens, fpt, loss in targets:
            predicted, low, high = fit.predict(params, tokens)
            entry = {"measured": loss, "predicted": predicted, "bootstrap": [low, high]}
            entry["interval"] = list(fit.predict_far(params, tokens, tokens * fpt)[1:])  # what the planner reports
            row["targets"][tname] = entry
        rows.append(row)
        parts = []
        for tname, entry in row["targets"].items():
            err = (entry["predicted"] - entry["measured"]) / entry["measured"]
            low, high = entry["bootstrap"]
            text = f"{tname} {entry['predicted']:.3f} ({err:+.1%}) boot [{low:.2f},{high:.2f}]"
            if "interval" in entry:
                text += f" int [{entry['interval'][0]:.2f},{entry['interval'][1]:.2f}]"
            parts.append(text)
        held = row["holdout_relative_error"]
        print(
            f"{name:>14} {row['rungs']:>2} rungs, steps {row['steps'][0]}-{row['steps'][1]}, val "
            f"{row['val_loss'][0]:.2f}-{row['val_loss'][1]:.2f}, E={fit.law.E:.3g} alpha={fit.law.alpha:.3f} "
            f"beta={fit.law.beta:.3f}, holdout {held if held is None else f'{held:+.1%}'} | " + " | ".join(parts),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
