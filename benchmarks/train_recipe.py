"""The training recipe, one switch at a time: time to reach the val bits per byte today's recipe reaches.

Every arm trains the same preset on the same prepared data (`builtin:pystdlib` unless --data is given) for the
same wall-clock budget (--minutes, the loop's own step time: evaluations are not counted), from the same seed
and data order, and is scored every --eval-interval steps on the same validation windows. The baseline is
today's recipe (AdamW, SwiGLU, scaled random init, tied head); its final val bpb is the target. Each other arm
changes one thing (Muon; ReLU^2; zero-initialised output projections; logit soft-capping; an untied head; q/k
norm; sequence-length warm-up) or all of them together ("combined"). Printed per arm: final val bpb, optimizer
steps, the seconds and steps to first reach the target, and the speed-up in seconds over the baseline. With
--steps every arm trains the same number of steps instead: steps to the target then do not depend on the load.

The peer arm is transformers' LlamaForCausalLM (the baseline's architecture, loaded from its saved config) with
AdamW at the best of a small learning-rate sweep (--hf-lrs), the same batches, schedule, wall time and scoring.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/train_recipe.py --minutes 5 --threads 2
    PYTHONPATH=src python benchmarks/train_recipe.py --minutes 1 --arms adamw,muon --hf-lrs 3e-3  # a quick check
    PYTHONPATH=src python benchmarks/train_recipe.py --steps 200 --preset tiny  # equal steps: quality, not speed

Wall-clock arms are only comparable on an otherwise idle machine: the load averages are printed with the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import hardware

# each arm: (TrainConfig changes, ModelConfig changes) on top of the baseline; family slmkit where a switch has no
# Hugging Face family (it changes nothing in the forward pass)
ARMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # the "today": AdamW in fp32, pinned (the config's defaults have since become Muon and, on CPUs with
    # bf16 units, bf16 autocast)
    "adamw (today)": ({"optimizer": "adamw", "dtype": "float32"}, {}),
    "muon": ({"optimizer": "muon"}, {}),
    "relu2": ({}, {"activation": "relu2"}),
    "zero_init_proj": ({}, {"zero_init_proj": True}),
    "logit_softcap 30": ({}, {"logit_softcap": 30.0, "family": "slmkit"}),
    "untied head": ({}, {"tie_embeddings": False}),
    "qk_norm": ({}, {"qk_norm": True, "family": "slmkit"}),
    "seq_len warm-up": ({"seq_len_warmup_steps": 100, "seq_len_warmup_start": 64}, {}),
    "value embeds 2": ({}, {"value_embeds": 2, "family": "slmkit"}),
    "skip connections": ({}, {"skip_connections": True, "family": "slmkit"}),
    "late untie 0.5": ({"untie_head_at": 0.5}, {}),
    "batch warm-up": ({"batch_warmup_steps": 100, "batch_warmup_start": 4}, {}),
    # not techniques but the recipe's knobs, for sweeps of the winning combination (--steps keeps them load-proof;
    # for another batch size run again with --batch-size and the steps that give the same tokens); not in "all"
    "lr 6e-3": ({"lr": 6e-3}, {}),
    "lr 1e-2": ({"lr": 1e-2}, {}),
    "wsd": ({"schedule": "wsd"}, {}),
    "bf16": ({"dtype": "bfloat16"}, {}),
    "compile": ({"compile": True}, {}),
    "embed lr x3": ({"embed_lr_scale": 3.0}, {}),
    "embed lr x10": ({"embed_lr_scale": 10.0}, {}),
    "embed lr x30": ({"embed_lr_scale": 30.0}, {}),
}
KNOBS = ("lr 6e-3", "lr 1e-2", "wsd", "bf16", "compile", "embed lr x3", "embed lr x10", "embed lr x30")
ARMS["combined"] = (
    {
        k: v
        for name, (changes, _) in ARMS.items()
        if name != "late untie 0.5" and name not in KNOBS
        for k, v in changes.items()
    },
    {k: v for _, changes in ARMS.values() for k, v in changes.items()},  # late untie: the untied head is in
)
SHORT = {
    "adamw": "adamw (today)",
    "softcap": "logit_softcap 30",
    "untied": "untied head",
    "warmup": "seq_len warm-up",
    "ve": "value embeds 2",
    "skips": "skip connections",
    "late-untie": "late untie 0.5",
    "batch-warmup": "batch warm-up",
    "lr6e-3": "lr 6e-3",
    "lr1e-2": "lr 1e-2",
    "embed3": "embed lr x3",
    "embed10": "embed lr x10",
    "embed30": "embed lr x30",
}


Curve = list[tuple[float, int, float]]  # (elapsed training seconds, step, val bpb) at every evaluation


def val_curve(run_dir: Path) -> Curve:
    elapsed, curve = 0.0, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "elapsed" in record:
            elapsed = record["elapsed"]
        if "val_bits_per_byte" in record:
            curve.append((elapsed, record["step"], record["val_bits_per_byte"]))
    return curve


def reach(curve: Curve, target: float) -> tuple[float, int] | None:
    """(seconds, steps) when the curve first reaches `target` bpb, if it does."""
    return next(((t, step) for t, step, bpb in curve if bpb <= target), None)


class _Logits(torch.nn.Module):
    """transformers' model as slmkit's scorer calls it: logits of input ids."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x).logits


def hf_run(base: Any, data: Any, model_dir: Path, lr: float) -> tuple[Curve, int]:
    """LlamaForCausalLM from `model_dir` (the baseline's initial weights) trained with AdamW at `lr` by a plain
    loop with the baseline's batches, schedule, clipping and wall-clock budget; its val bpb curve and steps."""
    from transformers import AutoModelForCausalLM

    from slmkit.train.batches import WindowSampler
    from slmkit.train.optim import lr_at, param_groups
    from slmkit.train.validation import token_nats

    cfg = dataclasses.replace(base, lr=lr)
    torch.manual_seed(cfg.seed)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    model = _Logits(hf)
    groups = param_groups(hf, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    sampler = WindowSampler(data.train, cfg.seq_len, cfg.seed)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    bytes_per_token = data.bytes_per_token("val")
    elapsed, step, curve = 0.0, 0, []
    steps = cfg.max_steps or math.inf

    def done() -> bool:
        return elapsed >= budget or step >= steps

    while not done():
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, step / steps if cfg.max_steps else elapsed / budget)
        x, y = sampler.next_batch(cfg.batch_size)[:2]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        step += 1
        if step % cfg.eval_interval == 0 or done():
            windows = cfg.eval_batches * cfg.batch_size
            nats, count = token_nats(model, data.val, cfg.seq_len, cfg.batch_size, windows)
            curve.append((elapsed, step, nats / count / math.log(2) / bytes_per_token))
    return curve, step


def step_costs(preset_name: str, vocab_size: int, batch_size: int, seq_len: int) -> dict[str, float]:
    """Best of 8 interleaved timings (seconds) of one forward + backward and of each optimizer's step on the
    same gradients: what Muon adds per step, measured apart from the arms so that load swings between arms do
    not hide it."""
    from slmkit.config import preset
    from slmkit.models import build_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.optim import make_optimizer

    model = build_model(preset(preset_name, vocab_size=vocab_size, max_seq_len=max(seq_len, 256)))
    model.init_weights(0)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    opts = {
        kind: make_optimizer(model, TrainConfig(preset=preset_name, optimizer=kind, max_steps=1), torch.device("cpu"))
        for kind in ("adamw", "muon")
    }
    best = dict.fromkeys(("forward+backward", *opts), math.inf)
    for _ in range(8):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), tokens[:, 1:].reshape(-1)).backward()
        best["forward+backward"] = min(best["forward+backward"], time.perf_counter() - t0)
        for kind, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            best[kind] = min(best[kind], time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall time of every arm")
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of --minutes (load-proof)")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr of every slmkit arm (AdamW and Muon alike)")
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--arms", default="all", help="comma-separated arm names (adamw, muon, relu2, ...) or all")
    parser.add_argument(
        "--stack",
        default="",
        help="arm names whose changes go on top of every arm but the baseline (e.g. muon: each arm is muon + X); "
        "an arm of several names joined by + stacks them too (muon+untied+warmup)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="today's val bpb from an earlier baseline run on this machine (the baseline is then not run again)",
    )
    parser.add_argument(
        "--target-seconds", type=float, default=300.0, help="with --target: the baseline's seconds to reach it"
    )
    parser.add_argument(
        "--arm-minutes",
        type=float,
        default=None,
        help="wall time of every arm but the baseline (default --minutes): with half the baseline's, an arm whose "
        "final val bpb reaches the target is 2x faster with its own, shorter schedule",
    )
    parser.add_argument("--hf-lrs", default="1e-3,3e-3,1e-2", help="AdamW lrs of the LlamaForCausalLM sweep; '' skips")
    parser.add_argument("--data", type=Path, default=None, help="a prepared data dir (default: builtin:pystdlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    names = [n for n in ARMS if n not in KNOBS] if args.arms == "all" else [a.strip() for a in args.arms.split(",")]
    stack = [SHORT.get(a.strip(), a.strip()) for a in args.stack.split(",") if a.strip()]
    arms = {}
    for name in names:
        parts = [SHORT.get(part, part) for part in name.split("+")]
        if name == "adamw" or parts == ["adamw (today)"]:
            arms["adamw (today)"] = ARMS["adamw (today)"]
            continue
        unknown = [p for p in parts + stack if p not in ARMS]
        if unknown:
            raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)} (short: {list(SHORT)})")
        label = " + ".join(dict.fromkeys(stack + parts))
        arms[label] = (
            {k: v for p in dict.fromkeys(stack + parts) for k, v in ARMS[p][0].items()},
            {k: v for p in dict.fromkeys(stack + parts) for k, v in ARMS[p][1].items()},
        )
    names = list(arms)
    if args.target is not None:  # today's figure from an earlier run of the baseline on this machine
        names = [n for n in names if n != "adamw (today)"]
    elif "adamw (today)" not in names:
        names.insert(0, "adamw (today)")  # the target comes from it
        arms["adamw (today)"] = ARMS["adamw (today)"]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            data_dir = Path(tmp) / "data"
            t0 = time.perf_counter()
            prepare(["builtin:pystdlib"], data_dir, vocab_size=4096, val_fraction=0.02)
            print(f"prepared builtin:pystdlib in {time.perf_counter() - t0:.0f} s")
        data = load_data_dir(data_dir)
        costs = step_costs(args.preset, data.vocab_size, args.batch_size, args.seq_len)
        print("step cost (best of 8): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in costs.items()), flush=True)
        base = TrainConfig(
            preset=args.preset,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            max_minutes=None if args.steps else args.minutes,
            max_steps=args.steps,
            eval_interval=args.eval_interval,
            eval_batches=args.eval_batches,
            save_interval=10**9,
            keep_checkpoints=1,
            device="cpu",
            threads=args.threads,
        )
        results: dict[str, tuple[Curve, int]] = {}
        for name in names:
            train_changes, model_changes = arms[name]
            cfg = dataclasses.replace(base, **train_changes, model=dict(model_changes))
            if args.arm_minutes and name != "adamw (today)" and not args.steps:
                cfg = dataclasses.replace(cfg, max_minutes=args.arm_minutes)
            run = Path(tmp) / f"run{len(results)}"
            result = train(cfg, data_dir, run)
            results[name] = (val_curve(run), result.step)
            print(f"  {name}: {result.step} steps, val bpb {results[name][0][-1][2]:.4f}", flush=True)
        hf_lrs = [float(x) for x in args.hf_lrs.split(",") if x.strip()]
        if hf_lrs:
            model_cfg = base.model_config(data.vocab_size).replace(
                bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id
            )
            torch.manual_seed(base.seed)
            model = build_model(model_cfg)
            model.init_weights(seed=base.seed)
            save_model(model, Path(tmp) / "init", tokenizer_dir=data_dir)
            sweep = {}
            for lr in hf_lrs:
                peer = (
                    base
                    if not args.arm_minutes or args.steps
                    else dataclasses.replace(base, max_minutes=args.arm_minutes)
                )
                sweep[lr] = hf_run(peer, data, Path(tmp) / "init", lr)  # the recipe arms' wall time
                print(f"  LlamaForCausalLM lr {lr:g}: {sweep[lr][1]} steps, val bpb {sweep[lr][0][-1][2]:.4f}")
            best = min(sweep, key=lambda lr: sweep[lr][0][-1][2])
            results[f"HF Llama AdamW lr {best:g}"] = sweep[best]

    if args.target is not None:
        target, base_reach = args.target, (args.target_seconds, 0)
    else:
        target = results["adamw (today)"][0][-1][2]
        base_reach = reach(results["adamw (today)"][0], target)
    load = os.getloadavg()
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    if args.arm_minutes and not args.steps:
        budget = f"baseline {args.minutes:g} min, other arms {args.arm_minutes:g} min"
    print(f"hardware: {hardware()}")
    print(f"load averages (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"{args.preset}, batch {args.batch_size} x {args.seq_len}, lr {args.lr:g}, {budget} per arm, "
        f"target: today's final val bpb {target:.4f}"
    )
    header = ("arm", "val bpb", "steps", "s to target", "steps to it", "speed-up")
    print("| {:<28} | {:>8} | {:>6} | {:>11} | {:>11} | {:>8} |".format(*header))
    print(f"|{'-' * 30}|{'-' * 9}:|{'-' * 7}:|{'-' * 12}:|{'-' * 12}:|{'-' * 9}:|")
    for name, (curve, steps) in results.items():
        got = reach(curve, target)
        seconds = f"{got[0]:.1f}" if got else "not reached"
        to_step = f"{got[1]}" if got else "-"
        speedup = f"{base_reach[0] / got[0]:.2f}x" if got and base_reach else "-"
        print(f"| {name:<28} | {curve[-1][2]:>8.4f} | {steps:>6} | {seconds:>11} | {to_step:>11} | {speedup:>8} |")


if __name__ == "__main__":
    main()
