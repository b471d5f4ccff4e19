"""Long context on a small budget: perplexity past the trained length (full cache vs window + sinks), and what
int8 / int4 KV and key-channel pruning cost in perplexity, KV bytes and decode speed.

A tiny model is trained at `--train-len` tokens (or `--model DIR` is used), then scored on the val split through
an inference state, as generation feeds tokens (calls of 32 tokens: `slmkit.eval.kv_cache`):

- perplexity at 1x, 4x, 8x the trained length: the full cache (vanilla, rotary positions past the training) against
  a window of train-len - sinks positions + `--sinks` sinks (StreamingLLM); printed for every token and for the
  last train-len tokens of each sequence (where the length hurts);
- decode tokens/s streaming 8x the trained length, full cache vs window + sinks, and the state's bytes;
- at 1x: KV bytes per token (measured from the state's storage), decode tokens/s (batch 4, the decode core) and the
  perplexity change of int8 / int4 KV and of pruning 25% / 50% of key channels.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/long_context.py [--steps 400] [--train-len 128]

The corpus is the shared papers file when present (../shared/corpus/seed-papers.jsonl), else the Python standard
library (`builtin:pystdlib`). Timings are of this machine as it is (say so when it is shared).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import hardware

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "seed-papers.jsonl"


def windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    n = min(count, len(tokens) // length)
    return torch.from_numpy(np.asarray(tokens[: n * length], dtype=np.int64)).view(n, length)


def decode_rate(model, prompt: list[int], spec, new_tokens: int = 64, batch: int = 4, repeats: int = 3) -> float:
    from slmkit.infer.core import decode_greedy

    best = 0.0
    for _ in range(repeats):
        _, stats = decode_greedy(model, [prompt] * batch, new_tokens, kv_cache=spec)
        best = max(best, batch * (new_tokens - 1) / stats.decode_seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a model dir (default: train one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-len", type=int, default=128)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=8, help="val sequences per length")
    args = parser.parse_args()

    from slmkit.api import load
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.eval.kv_cache import cached_token_nll
    from slmkit.models.state import KVCacheSpec
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    print(f"hardware: {hardware()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if SHARED.is_file():
            prepare([str(SHARED)], data, vocab_size=2048, text_field="abstract", val_fraction=0.1)
        else:
            prepare(["builtin:pystdlib"], data, vocab_size=2048, val_fraction=0.1)
        model_dir = args.model
        if model_dir is None:
            cfg = TrainConfig(
                preset=args.preset, model={"max_seq_len": args.train_len}, seq_len=args.train_len, batch_size=16,
                max_steps=args.steps, lr=3e-3, warmup_steps=20, eval_interval=10**9, save_interval=10**9,
                device="cpu",
            )  # fmt: skip
            begin = time.perf_counter()
            result = train(cfg, data, Path(tmp) / "run")
            model_dir = result.final_dir
            print(f"trained {args.preset} for {args.steps} steps of 16 x {args.train_len} tokens "
                  f"({time.perf_counter() - begin:.0f} s)")  # fmt: skip
        lm = load(model_dir)
        model, length = lm.model, lm.config.max_seq_len
        val = load_data_dir(data).val
        window = KVCacheSpec(window=length - args.sinks, sinks=args.sinks)
        print(f"\nperplexity on the val split, trained length {length}; window+sinks = {window.describe()}")
        print(f"{'length':>8} {'seqs':>5} {'cache':<28} {'ppl (all)':>10} {'ppl (last L)':>13}")
        base = None
        for factor in (1, 4, 8):
            ids = windows(val, factor * length, args.sequences)
            for name, spec in (("full (vanilla)", None), ("window + sinks", window)):
                nll = cached_token_nll(model, ids, spec)
                every, tail = math.exp(float(nll.mean())), math.exp(float(nll[:, -length:].mean()))
                base = base or every
                print(f"{factor * length:>8} {ids.shape[0]:>5} {name:<28} {every:>10.2f} {tail:>13.2f}")
        print(f"\nstreaming {8 * length} new tokens after a {length // 4}-token prompt (batch 1, best of 2)")
        prompt = windows(val, length // 4, 1)[0].tolist()
        for name, spec in (("full (vanilla)", None), ("window + sinks", window)):
            rate = decode_rate(model, prompt, spec, new_tokens=8 * length, batch=1, repeats=2)
            state = model.new_state(1, len(prompt) + 8 * length, **({"cache": spec} if spec else {}))
            print(f"  {name:<16} {rate:>8.0f} tokens/s, KV state {state.storage_bytes() / 1e3:.0f} kB")
        print(f"\nat {length} tokens: KV bytes, decode tokens/s (batch 4, 64 new tokens, best of 3), perplexity")
        ids = windows(val, length, args.sequences)
        prompt = ids[0, : length // 2].tolist()
        full_nll = float(cached_token_nll(model, ids).double().mean())
        full_bytes = model.new_state(1, length).bytes_per_token()
        print(f"{'cache':<44} {'KV B/token':>10} {'vs full':>8} {'decode tok/s':>12} {'ppl':>8} {'change':>8}")
        specs = [
            None, KVCacheSpec(dtype="int8"), KVCacheSpec(dtype="int4"), KVCacheSpec(prune_keys=0.25),
            KVCacheSpec(prune_keys=0.5), KVCacheSpec(dtype="int8", prune_keys=0.25),
        ]  # fmt: skip
        for spec in specs:
            nll = float(cached_token_nll(model, ids, spec).double().mean())
            per_token = model.new_state(1, length, **({"cache": spec} if spec else {})).bytes_per_token()
            rate = decode_rate(model, prompt, spec)
            name = spec.describe() if spec else KVCacheSpec().describe()
            change = (math.exp(nll - full_nll) - 1) * 100
            print(
                f"{name:<44} {per_token:>10.0f} {per_token / full_bytes:>8.2f} {rate:>12.0f} {math.exp(nll):>8.2f} "
                f"{change:>+7.2f}%"
            )


if __name__ == "__main__":
    main()
