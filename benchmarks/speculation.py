"""Training-free speculation on code: plain greedy vs prompt lookup vs token recycling (linear drafts and draft
trees), side by side in one run.

    PYTHONPATH=src python benchmarks/speculation.py                      # trains a micro model on stdlib code first
    PYTHONPATH=src python benchmarks/speculation.py --model runs/code/final --count 8 --new-tokens 96

Without --model it trains a `micro` model briefly (--minutes, default 6, one thread, batch 8 x 128 tokens) on
Python source files of this interpreter's standard library (real code, present on every machine: no download),
holding out every tenth file for the prompts. Prompts are --count windows of --prompt-len tokens from the
held-out files. Every mode generates the same greedy continuations (checked identical to plain greedy); per mode
it prints new tokens/s (decode, the engine's figure), the ratio to plain, the acceptance rate (accepted / drafted
tokens; for a tree, drafted = the tree's depth, the most one pass can accept), accepted tokens per verification
pass and tokens per target forward pass. `tree:W` rows run `--speculate tree` with the tree template W (children
per node at each depth; --tree-widths, repeatable); the batcher rows leave trees out (the batcher runs a tree
pass only while one request runs alone). Modes run
interleaved per prompt and repeat (--repeats), so load drifts hit each alike. Engine rows run one sequence at a
time (how the engine speculates); the batcher rows run every prompt together in one continuous batch. The
recycling matrix is learnt as the run goes (each recycle / tree row keeps its own, so no row drafts from another
row's passes over the same prompt): the first prompts draft from an emptier matrix than the last. The load
average (uptime) is printed next to the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest  # noqa: E402
from slmkit.infer.engine import Engine, EngineStats  # noqa: E402

BATCHER_MODES = ("off", "lookup", "recycle")
DEFAULT_TREES = ("4,2,1,1,1,1", "2,2,1,1,1,1,1,1")


def split_mode(mode: str) -> tuple[str, str | None]:
    """Mode "tree:4,2,1" -> ("tree", "4,2,1"); other modes as they are."""
    name, _, widths = mode.partition(":")
    return name, widths or None


def stdlib_code(limit_bytes: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): .py files of the standard library, every tenth held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    train, held = [], []
    total = 0
    for i, path in enumerate(files):
        text = path.read_text(errors="replace")
        (held if i % 10 == 0 else train).append(text)
        total += len(text)
        if total > limit_bytes:
            break
    return train, held


def train_model(work: Path, minutes: float, texts: list[str]) -> Path:
    import json

    from slmkit.data.prepare import prepare
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    corpus = work / "code.jsonl"
    with corpus.open("w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare([str(corpus)], data, vocab_size=4096, val_fraction=0.02)
    cfg = TrainConfig(
        preset="micro", seq_len=128, batch_size=8, max_minutes=minutes, lr=4e-3, warmup_steps=20,
        eval_interval=10**9, save_interval=10**9, device="cpu", threads=1,
    )  # fmt: skip
    result = train(cfg, data, work / "run", overwrite=True)
    print(
        f"trained micro on {len(texts)} stdlib files: {result.step} steps, {result.tokens} tokens, "
        f"{result.seconds:.0f} s, final train loss {result.train_loss}"
    )
    assert result.final_dir is not None
    return result.final_dir


def prompts_from(texts: list[str], tokenizer, count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        if len(ids) > length + 64:
            start = rng.randrange(0, len(ids) - length)
            prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    return prompts


def engine_rows(engine: Engine, prompts: list[list[int]], args: argparse.Namespace) -> None:
    modes = ["off", "lookup", "recycle", *(f"tree:{w}" for w in (args.tree_widths or DEFAULT_TREES))]
    totals = {m: {"tokens": 0, "seconds": 0.0, "forwards": 0, "drafted": 0, "accepted": 0, "rounds": 0} for m in modes}
    outputs: dict[str, list[list[int]]] = {m: [] for m in modes}
    recyclers: dict[str, object] = {}  # one recycling matrix per mode: a later mode must not learn this prompt's
    # continuation from an earlier mode's passes over it
    for prompt in prompts:
        for _ in range(args.repeats):
            for mode in modes:  # interleaved per prompt; fresh stats per call (a call's own speculation rule)
                stats = EngineStats()
                engine.recycler = recyclers.get(mode)  # each mode learns only from its own passes
                name, widths = split_mode(mode)
                tree = {"tree_widths": widths} if widths else {}
                [out] = engine.generate_ids(
                    [prompt], max_new_tokens=args.new_tokens, speculate=name, speculate_k=args.k,
                    min_acceptance=args.min_acceptance, min_speedup=args.min_speedup, stats=stats, **tree,
                )  # fmt: skip
                outputs[mode].append(out.token_ids)
                if engine.recycler is not None:
                    recyclers[mode] = engine.recycler
                t = totals[mode]
                t["tokens"] += max(stats.new_tokens - stats.sequences, 0)  # the first token comes from prefill
                t["seconds"] += stats.decode_seconds
                t["forwards"] += stats.decode_forwards
                t["drafted"] += stats.drafted
                t["accepted"] += stats.accepted
                t["rounds"] += stats.rounds
    identical = all(outputs[m] == outputs["off"] for m in modes)
    print(f"engine (one sequence at a time), {len(prompts)} prompts x {args.new_tokens} new tokens x {args.repeats}; "
          f"identical greedy output: {identical}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    base = totals["off"]["tokens"] / totals["off"]["seconds"]
    for mode in modes:
        t = totals[mode]
        rate = t["tokens"] / t["seconds"]
        spec = ""
        if mode != "off":
            share = t["accepted"] / t["drafted"] if t["drafted"] else 0.0
            per_pass = t["accepted"] / t["rounds"] if t["rounds"] else 0.0
            spec = f"  acceptance {share:5.1%} ({t['accepted']}/{t['drafted']})  {per_pass:4.2f} accepted/pass"
        print(
            f"  {mode:<22} {rate:8.1f} decode tokens/s  {rate / base:5.2f}x plain  "
            f"{t['tokens'] / t['forwards']:5.2f} tokens/forward{spec}"
        )


def batcher_rows(engine: Engine, prompts: list[list[int]], args: argparse.Namespace) -> None:
    results = {}
    outputs = {}
    for mode in BATCHER_MODES:
        batcher = ContinuousBatcher(
            engine.model,
            engine.tokenizer,
            max_batch=len(prompts),
            speculate=mode,
            speculate_k=args.k or 8,
            min_acceptance=args.min_acceptance,
        )
        requests = [GenerationRequest(p, args.new_tokens, detokenize=False) for p in prompts]
        start = time.perf_counter()
        seqs = batcher.run(requests)
        wall = time.perf_counter() - start
        outputs[mode] = [s.out for s in seqs]
        results[mode] = (sum(len(s.out) for s in seqs) / wall, batcher.stats)
    identical = all(outputs[m] == outputs["off"] for m in BATCHER_MODES)
    print(f"batcher ({len(prompts)} rows in one continuous batch, prefill included); identical greedy output: "
          f"{identical}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    base = results["off"][0]
    for mode in BATCHER_MODES:
        rate, s = results[mode]
        spec = "" if mode == "off" else f"  acceptance {s.acceptance_rate:5.1%} ({s.accepted}/{s.drafted})"
        print(
            f"  {mode:<8} {rate:8.1f} new tokens/s  {rate / base:5.2f}x plain  "
            f"{s.tokens_per_forward:5.2f} tokens/forward{spec}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a model dir (default: train a micro model on stdlib code first)")
    parser.add_argument("--minutes", type=float, default=6, help="training time of the micro model")
    parser.add_argument("--count", type=int, default=6, help="prompts")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--k", type=int, default=None, help="tokens drafted per verification (default 8)")
    parser.add_argument("--no-batcher", action="store_true")
    parser.add_argument(
        "--tree-widths", action="append",
        help=f"a tree template for a tree:W row (repeatable; default {' and '.join(DEFAULT_TREES)})",
    )  # fmt: skip
    parser.add_argument(
        "--min-acceptance", type=float, default=0.3, help="a sequence stops drafting below this (engine default 0.3)"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=0.0,
        help="a sequence stops drafting once its rounds are slower than this times plain steps (engine rows; "
        "`slm generate` uses 1.0; default 0 here: measure speculation itself)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1, as generate_throughput.py: on a loaded machine the verification's small "
        "ops outside the core's one-thread step stall on a second thread)",
    )  # fmt: skip
    parser.add_argument("--work", help="keep the trained model here (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}; load average {os.getloadavg()[0]:.1f}")
    train_texts, held = stdlib_code(limit_bytes=3_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = Path(args.model) if args.model else train_model(work, args.minutes, train_texts)
        engine = Engine.load(model, device="cpu", compile=False)
        prompts = prompts_from(held, engine.tokenizer, args.count, args.prompt_len)
        print(f"model {args.model or 'micro trained on stdlib code'}; {len(prompts)} held-out code prompts")
        engine_rows(engine, prompts, args)
        if not args.no_batcher:
            batcher_rows(engine, prompts, args)


if __name__ == "__main__":
    main()
