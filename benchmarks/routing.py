"""Routing between a small and a larger slmkit model trained on the same data: learned router vs random and cascade,
and token-level routing vs the larger model alone.

Both models train on `builtin:pystdlib` (its train split; the built-in tasks are built from the held-out val split)
for a short fixed wall-clock budget each, then:

1. prompt routing on the built-in tasks (pystdlib-nextline, pystdlib-cloze): `slm route train` (logistic regression
   on the weak model's hidden states, fitted on 60% of the items) and `slm route eval` on the other 40%: APGR with
   bootstrap CIs for random, cascade (the weak model's probability of its pick), learned and oracle, and the paired
   APGR differences learned - random and learned - cascade. Goal (issue 21): learned beats random and cascade beyond
   the CI.
2. token-level routing: teacher-forced next-token accuracy on val-split windows of the routed prediction (small
   argmax unless its top probability is below the threshold, then large) against the large model alone, for a range
   of thresholds; at the cheapest threshold within 2% (relative) of the large model's accuracy, greedy generation
   speed of the token router vs the large model alone on the same prompts, one run, side by side. Goal: >= 1.5x at
   <= 2% quality loss.

    PYTHONPATH=src python benchmarks/routing.py [--work DIR] [--weak-minutes 1.5] [--strong-minutes 3]

With --work the data and models are kept there and reused by the next run (only the evaluation reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import hardware

WEAK = {"preset": "micro"}
# a wider and deeper micro: ~3.4x its non-embedding parameters, the same tokenizer and data
STRONG = {"preset": "micro", "model": {"d_model": 192, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "d_ff": 512}}


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare_data(work: Path) -> Path:
    from slmkit.data.prepare import prepare

    data = work / "data"
    if not (data / "meta.json").is_file():
        # val_fraction 0.01: the split the built-in tasks are built from, so task items are never trained on
        prepare(["builtin:pystdlib"], data, vocab_size=4096, val_fraction=0.01)
    return data


def train_model(work: Path, data: Path, name: str, spec: dict, minutes: float, seed: int, threads: int) -> Path:
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    run = work / name
    if (run / "final" / "config.json").is_file():
        return run / "final"
    model = {"max_seq_len": 256, **spec.get("model", {})}
    cfg = TrainConfig(
        preset=spec["preset"], model=model, seq_len=256, batch_size=8, lr=3e-3, warmup_steps=20,
        max_minutes=minutes, eval_interval=100_000, eval_batches=4, save_interval=100_000, device="cpu", seed=seed,
        threads=threads,
    )  # fmt: skip
    result = train(cfg, data, run)
    assert result.final_dir is not None
    return result.final_dir


def val_windows(data: Path, count: int, length: int, seed: int) -> list[list[int]]:
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"]))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length - 1, size=count)
    return [tokens[s : s + length].astype(np.int64).tolist() for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="keep data and models here (reused when present)")
    parser.add_argument("--weak-minutes", type=float, default=1.5)
    parser.add_argument("--strong-minutes", type=float, default=3.0)
    parser.add_argument("--suite-size", type=int, default=300, help="items per built-in task")
    parser.add_argument("--target-strong-share", type=float, default=0.5)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=6, help="prompts for the token-router speed comparison")
    parser.add_argument("--new-tokens", type=int, default=64)
    # one thread: on a shared, loaded 2-core machine two threads contend and run many times slower
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    args = parser.parse_args()

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}; {load_average()}")
    data = prepare_data(work)
    weak = train_model(work, data, "weak", WEAK, args.weak_minutes, seed=1, threads=args.threads)
    strong = train_model(work, data, "strong", STRONG, args.strong_minutes, seed=2, threads=args.threads)
    print(f"trained: weak {weak} ({args.weak_minutes} min), strong {strong} ({args.strong_minutes} min)")
    print(load_average())

    from slmkit.loading import load
    from slmkit.route.token import compare_with_large, routed_next_token_accuracy
    from slmkit.route.train import evaluate_routing, train_router

    tasks = ["pystdlib-nextline", "pystdlib-cloze"]
    router = work / "router"
    meta = train_router(
        weak, strong, tasks, router, target_strong_share=args.target_strong_share, suite_size=args.suite_size,
        overwrite=True, on_status=lambda m: print("  " + m, flush=True),
    )  # fmt: skip
    held = meta["held_out"]
    print(
        f"router: threshold {meta['threshold']:.4f}, fitted on {meta['trained']['fit_items']} items "
        f"({meta['trained']['positive_fit_items']} need the strong model); held out: strong share "
        f"{held['strong_share']:.3f}, ranking AUC {held['ranking_auc']:.3f}"
    )
    result = evaluate_routing(weak, strong, tasks, router, resamples=args.resamples)
    print(f"\nprompt routing on {result['items']} held-out items ({', '.join(tasks)}); {load_average()}")
    for name, t in result["tasks"].items():
        print(f"  {name}: {t['items']} items, weak {t['weak']:.3f}, strong {t['strong']:.3f}")
    print(f"  quality: weak {result['weak']:.3f}, strong {result['strong']:.3f}")

    def fmt(entry: dict) -> str:
        if entry["value"] is None:
            return "n/a"
        lo, hi = entry["ci95"] or (float("nan"), float("nan"))
        return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"

    print(f"  {'router':<8} {'APGR [95% CI]':<24} {'CPT(50%)':<24} {'CPT(80%)':<24}")
    for name, r in result["routers"].items():
        print(f"  {name:<8} {fmt(r['apgr']):<24} {fmt(r['cpt50']):<24} {fmt(r['cpt80']):<24}")
    for d in result["apgr_differences"]:
        print(f"  paired APGR {d['router']} - {d['baseline']}: {fmt(d)}")
    point = result["learned_operating_point"]
    print(f"  learned at its threshold: strong share {point['strong_share']:.3f}, quality {point['quality']:.3f}")

    small, large = load(weak), load(strong)
    thresholds = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]
    windows = val_windows(data, 48, 128, seed=0)
    accuracy = routed_next_token_accuracy(small.model, large.model, windows, thresholds)
    print(
        f"\ntoken routing, teacher-forced next-token accuracy on {accuracy['positions']} val positions: "
        f"small {accuracy['small_accuracy']:.4f}, large {accuracy['large_accuracy']:.4f}"
    )
    print(f"  {'threshold':>9} {'accuracy':>9} {'vs large':>9} {'to large':>9}")
    for row in accuracy["thresholds"]:
        relative = row["accuracy"] / accuracy["large_accuracy"] - 1
        print(f"  {row['threshold']:>9.2f} {row['accuracy']:>9.4f} {relative:>+9.2%} {row['large_share']:>9.2%}")
    within = [r for r in accuracy["thresholds"] if r["accuracy"] >= 0.98 * accuracy["large_accuracy"]]
    chosen = min(within, key=lambda r: r["large_share"])["threshold"]
    prompt_windows = val_windows(data, args.prompts, 48, seed=1)
    prompts = [small.tokenizer.decode(w) for w in prompt_windows]
    for threshold in sorted({chosen, 0.5}):
        c = compare_with_large(small, large, prompts, args.new_tokens, threshold)
        r = c["routed"]
        print(
            f"  generation at threshold {threshold:.2f} ({c['prompts']} prompts x {args.new_tokens} tokens; "
            f"{load_average()}): token router {r['tokens_per_second']:.1f} tok/s, large alone "
            f"{c['large_alone']['tokens_per_second']:.1f} tok/s: {c['speedup']:.2f}x; {r['large_share']:.1%} of "
            f"tokens from the large model, forwards small {r['small_forwards']} / large {r['large_forwards']}; "
            f"repeats {c['same_as_large_prefix_share']:.1%} of the large model's tokens before the first difference"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {load_average()}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
