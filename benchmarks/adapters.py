"""Adapters: trainable parameters and the time of one training step (forward + backward) for full fine-tuning,
LoRA and NOLA on one preset, fp32, batch x seq tokens of random ids.

    PYTHONPATH=src python benchmarks/adapters.py [--preset small] [--batch 4] [--seq 256]

Prints one row per setup; wall-clock times are the best of a few steps on this machine (named in the header).
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import hardware
from slmkit.config import PRESETS, ModelConfig
from slmkit.models import build_model
from slmkit.models.lora import LoRASpec, add_adapters, trainable_parameter_count

SETUPS: dict[str, LoRASpec | None] = {
    "full fine-tuning": None,
    "LoRA r=8, q_proj,v_proj": LoRASpec(r=8, target_modules=("q_proj", "v_proj")),
    "LoRA r=8, all-linear": LoRASpec(r=8, target_modules="all-linear"),
    "NOLA r=8, all-linear, 64 bases": LoRASpec(r=8, kind="nola", nola_bases=64, target_modules="all-linear"),
}


def step_seconds(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, steps: int = 3) -> float:
    model.train()
    model.loss(idx, targets).backward()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.loss(idx, targets).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    config = ModelConfig(**PRESETS[args.preset])
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    print(f"# {hardware()}; preset {args.preset}, batch {args.batch} x {args.seq} tokens, fp32")
    print("| setup | trainable | step |\n|---|---|---|")
    for name, spec in SETUPS.items():
        model = build_model(config)
        model.init_weights(seed=0)
        trainable = sum(p.numel() for p in model.parameters())
        if spec is not None:
            add_adapters(model, spec)
            trainable = trainable_parameter_count(model)
        print(f"| {name} | {trainable:,} | {step_seconds(model, idx, targets):.2f} s |")


if __name__ == "__main__":
    main()
