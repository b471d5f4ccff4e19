"""bf16 autocast against fp32 on this CPU: matmul rates and a training step (forward + backward) per model width.

    PYTHONPATH=src python benchmarks/cpu_bf16.py [--threads 2] [--widths 32,64,96,128,256]

The evidence behind `dtype: auto` on a CPU (`slmkit.train.loop.autocast_dtype`): bf16 autocast where the CPU has
native bf16 dot products (`cpu_native_bf16`: avx512_bf16 / amx_bf16) and the model is at least
`CPU_BF16_MIN_WIDTH` wide. The two dtypes alternate within each row (best of `--repeats`), so a row's ratio holds
on a busy machine even when its milliseconds do not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.models import build_model  # noqa: E402
from slmkit.train.loop import CPU_BF16_MIN_WIDTH, cpu_native_bf16  # noqa: E402
from slmkit.train.losses import next_token_cross_entropy  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rows(repeats: int) -> None:
    print("| matmul (m x k x n) | fp32 GFLOP/s | bf16 autocast GFLOP/s | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for m, k, n in [(2048, 128, 512), (2048, 128, 4096), (4096, 256, 1024), (4096, 768, 768)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates = {}
        for amp in (False, True, False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                seconds = best_of(lambda a=a, b=b: a @ b, repeats)
            rates[amp] = max(rates.get(amp, 0.0), 2 * m * k * n / seconds / 1e9)
        print(f"| {m} x {k} x {n} | {rates[False]:.0f} | {rates[True]:.0f} | {rates[True] / rates[False]:.2f}x |")


def step_rows(widths: list[int], batch: int, seq: int, vocab: int, repeats: int) -> None:
    print(f"\n| model (batch {batch} x {seq}, vocab {vocab}) | fp32 step ms | bf16 autocast step ms | speed-up |")
    print("|---|---:|---:|---:|")
    for width in widths:
        heads = max(1, width // 32)
        cfg = preset(
            "micro",
            vocab_size=vocab,
            d_model=width,
            n_layers=4,
            n_heads=heads,
            n_kv_heads=max(1, heads // 2),
            d_ff=int(width * 2.75) // 8 * 8,
            max_seq_len=seq,
        )
        model = build_model(cfg)
        model.init_weights(seed=0)
        x = torch.randint(0, vocab, (batch, seq + 1))

        def step(amp: bool, model=model, x=x) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = next_token_cross_entropy(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            model.zero_grad(set_to_none=True)

        times: dict[bool, float] = {}
        for amp in (False, True, False, True):
            times[amp] = min(times.get(amp, float("inf")), best_of(lambda amp=amp: step(amp), repeats))
        ratio = times[False] / times[True]
        print(f"| {width}x4 | {times[False] * 1e3:.0f} | {times[True] * 1e3:.0f} | {ratio:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", default="32,64,96,128,256")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}; {args.threads} threads; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"native bf16 here: {cpu_native_bf16()}; dtype auto trains in bf16 from width {CPU_BF16_MIN_WIDTH}\n")
    gemm_rows(args.repeats)
    step_rows([int(w) for w in args.widths.split(",")], args.batch_size, args.seq_len, args.vocab, args.repeats)
    print(f"\nload at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
