"""Training tokens/s on 1 and 2 processes (`slm train` alone vs under torchrun, DDP and FSDP), same global batch.

    python benchmarks/train_scaling.py --data DATA_DIR [--preset micro] [--global-batch 16] [--seq-len 256]
        [--steps 12] [--rounds 2] [--device cpu]

Runs the real command lines (printed) and reads tokens_per_second from each run's metrics.jsonl (median
over the steps after the first two). Configurations are interleaved round by round so drift in machine
load hits them alike; the best round is kept. Ratios are against one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def run(name: str, command: list[str], threads: int, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = str(threads)
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    rates = [
        r["tokens_per_second"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "tokens_per_second" in r
    ]
    return statistics.median(rates[2:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--global-batch", type=int, default=16, help="Sequences per optimizer step, all ranks.")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Threads of the 1-process run.")
    args = parser.parse_args()

    common = ["train", "--data", args.data, "--preset", args.preset, "--seq-len", str(args.seq_len)]
    common += ["--max-steps", str(args.steps), "--eval-interval", "100000", "--save-interval", "100000"]
    common += ["--device", args.device, "--warmup-steps", "2"]
    per_rank = str(args.global_batch // 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "slmkit"]
    single = [sys.executable, "-m", "slmkit"]
    whole = [*single, *common, "--batch-size", str(args.global_batch)]
    configs = [
        ("1 process, 1 thread", whole, 1),
        (f"1 process, {args.threads} threads", whole, args.threads),
        ("2 processes DDP, 1 thread each", [*torchrun, *common, "--batch-size", per_rank, "--strategy", "ddp"], 1),
        ("2 processes FSDP, 1 thread each", [*torchrun, *common, "--batch-size", per_rank, "--strategy", "fsdp"], 1),
    ]
    best = {name: 0.0 for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, command, threads in configs:
                best[name] = max(best[name], run(name, command, threads, Path(tmp) / "run"))
    print(f"hardware: {hardware()}")
    print(
        f"config: preset {args.preset}, global batch {args.global_batch} x seq {args.seq_len}, {args.device}; "
        f"median of steps 3-{args.steps}, best of {args.rounds} interleaved rounds"
    )
    base = best[configs[0][0]]
    for name, command, threads in configs:
        shown = " ".join(command[1:]).replace(str(SRC), "src")
        print(f"{name:34s} {best[name]:9.0f} tokens/s  x{best[name] / base:.2f}   OMP_NUM_THREADS={threads} {shown}")


if __name__ == "__main__":
    main()
