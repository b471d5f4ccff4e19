"""Adapters per request (`slm serve --lora`): the continuous batcher's decode step with no adapters, and with two LoRA
adapters selected per row (every row the base; rows mixing the base and both adapters), on one preset, fp32.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_lora.py [--preset micro] [--rows 8] [--steps 300]

Prints ms per decode step (best and median of 5 runs of `--steps` steps over `--rows` rows) and each setup's ratio
to the no-adapter batcher on this machine (named in the header).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import hardware
from slmkit.config import PRESETS, ModelConfig
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.models import build_model
from slmkit.models.lora import LoRASpec, add_adapters


def ms_per_step(model: torch.nn.Module, adapters: list[int] | None, rows: int, steps: int) -> tuple[float, float]:
    """adapters: each row's adapter index (None: a batcher without per-row adapters)."""
    times = []
    for _ in range(5):
        batcher = ContinuousBatcher(model, None, max_batch=rows, compile=False, per_row_adapters=adapters is not None)
        for i in range(rows):
            adapter = adapters[i] if adapters is not None else None
            batcher.submit(
                GenerationRequest([1 + i, 2, 3, 4], steps + 1, ignore_eos=True, detokenize=False, adapter=adapter)
            )
        batcher.step()  # the prefill (and the first decode step)
        start, n = time.perf_counter(), 0
        while batcher.has_work:
            batcher.step()
            n += 1
        times.append((time.perf_counter() - start) / n * 1e3)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    config = ModelConfig(**{**PRESETS[args.preset], "max_seq_len": args.steps + 16})
    model = build_model(config)
    model.init_weights(seed=0)
    model.eval()
    print(f"# {hardware()}; preset {args.preset}, {args.rows} rows x {args.steps} decode steps, fp32, eager")
    print("| setup | ms/step (best) | ms/step (median) | best / no adapters |\n|---|---|---|---|")
    base_best, base_median = ms_per_step(model, None, args.rows, args.steps)
    print(f"| no adapters | {base_best:.3f} | {base_median:.3f} | 1.00 |")
    for name in ("a", "b"):
        add_adapters(model, LoRASpec(r=8, target_modules=("q_proj", "v_proj")), name=name)
    for label, rows in (
        ("2 adapters (q,v r=8) loaded, every row the base", [-1] * args.rows),
        ("2 adapters (q,v r=8), rows mixing base / a / b", [i % 3 - 1 for i in range(args.rows)]),
    ):
        best, median = ms_per_step(model, rows, args.rows, args.steps)
        print(f"| {label} | {best:.3f} | {median:.3f} | {best / base_best:.2f} |")


if __name__ == "__main__":
    main()
