"""Other model shapes trained with the quickstart's recipe for the same seconds, against the quickstart's model.

The question behind issue #22's 10-minute goal ("better bits per byte at equal or lower latency"): is there a shape
near the quickstart's decode latency that the quickstart's recipe trains to a better model in the time a build has
for training? Each SHAPE (WIDTHxDEPTH, the planner's shape family: `scaling.shapes.shape_overrides`) trains with
`quickstart.quickstart_config` (micro's recipe: Muon, wsd, untied head at 10x lr, sequence-length warm-up, batch
16 x 256) for `--seconds` of optimizer steps on a prepared data dir, alone on the machine; then it and the
quickstart's model (`--quickstart RUN_DIR`) are scored the same way as `benchmarks/build_vs_quickstart.py` scores:
bits per byte on the whole val split at 256 tokens, and batch-1 decode ms/token as the median of three fresh
processes (`eval.efficiency.measure_in_subprocess`).

    PYTHONPATH=src python benchmarks/shape_vs_quickstart.py --data W/quickstart/data \\
        --quickstart W/quickstart/run --shapes 160x3 --seconds 540 --threads 2 --work /tmp/svq

Training is timed by the wall clock: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from _common import hardware

LATENCY_PROCESSES = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared data dir (the quickstart's)")
    parser.add_argument("--quickstart", type=Path, required=True, help="the quickstart's run dir, scored alongside")
    parser.add_argument("--shapes", nargs="+", required=True, help="WIDTHxDEPTH shapes to train")
    parser.add_argument("--seconds", type=float, default=540.0, help="seconds of training per shape")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from slmkit.eval.efficiency import measure_in_subprocess
    from slmkit.eval.perplexity import evaluate_text
    from slmkit.loading import load
    from slmkit.quickstart import quickstart_config
    from slmkit.scaling.shapes import shape_overrides
    from slmkit.train.loop import train

    print(f"hardware: {hardware()}")
    efficiency = {"prompt_tokens": 32, "new_tokens": 64, "batch_size": 1, "repeats": 3}
    if args.threads:
        efficiency["threads"] = args.threads

    def score(run_dir: Path) -> dict[str, float]:
        lm = load(run_dir)
        seq_len = json.loads((run_dir / "train_config.json").read_text())["seq_len"]
        bpb = evaluate_text(lm, args.data, split="val", seq_len=seq_len, batch_size=16).bits_per_byte
        runs = [measure_in_subprocess(run_dir, **efficiency) for _ in range(LATENCY_PROCESSES)]
        return {"bits_per_byte": bpb, "decode_ms": statistics.median(r["decode_ms_per_token"] for r in runs)}

    rows = {}
    for name in args.shapes:
        width, depth = (int(v) for v in name.split("x"))
        out = args.work / name
        cfg = quickstart_config(args.seconds / 60, model=shape_overrides(width, depth, 256))
        result = train(cfg, args.data, out)
        rows[name] = {"tokens": result.tokens, "seconds": result.seconds, **score(out)}
    quick = json.loads((args.quickstart / "train_config.json").read_text())
    rows["quickstart"] = {"tokens": None, "seconds": quick.get("max_minutes", 0) * 60, **score(args.quickstart)}

    base = rows["quickstart"]
    print("| model | trained s | tokens | val bits/byte | vs quickstart | decode ms/token | vs quickstart |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        tokens = f"{r['tokens']:,}" if r["tokens"] else ""
        print(
            f"| {name} | {r['seconds']:.0f} | {tokens} | {r['bits_per_byte']:.4f} | "
            f"{r['bits_per_byte'] / base['bits_per_byte']:.3f} | {r['decode_ms']:.3f} | "
            f"{r['decode_ms'] / base['decode_ms']:.2f} |"
        )
    (args.work / "result.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
