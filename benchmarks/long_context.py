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

`--suite methods` compares the ways past the trained length instead: vanilla (full cache), window + sinks, the
InfLLM-style block memory and YaRN (factor 8, no training), by passkey retrieval (accuracy by length 1x-8x and depth)
and by perplexity at 1x, 4x, 8x. It trains its own model at `--train-len` (default 256 there) on corpus text where
every sequence hides a passkey line ("The pass key is 12345. Remember it.") at a random depth and ends with the
question ("What is the pass key? The pass key is") and the key, the key's tokens weighted up in the loss so the small
model learns to copy it in a few minutes:

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/long_context.py --suite methods [--steps 400]

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


def load_average() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


# ---- --suite methods: vanilla vs window + sinks vs block memory vs YaRN, by passkey and perplexity ----------------
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.1, 0.5, 0.9)


class Passkeys:
    """Sequences of `length` tokens: filler text with a passkey line at a depth, then the question and the key."""

    def __init__(self, tokenizer, filler: np.ndarray, seed: int) -> None:
        self.tokenizer, self.filler, self.rng = tokenizer, filler, np.random.default_rng(seed)
        self.question = self.encode(QUESTION)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def one(self, length: int, depth: float | None) -> tuple[list[int], int]:
        """Token ids and the number of answer tokens at their end (depth None: random)."""
        key = str(self.rng.integers(10000, 100000))
        needle, answer = self.encode(NEEDLE.format(key=key)), self.encode(f" {key}")
        body = length - len(self.question) - len(answer)
        start = int(self.rng.integers(0, len(self.filler) - body))
        filler = self.filler[start : start + body - len(needle)].tolist()
        at = int(round((self.rng.random() if depth is None else depth) * len(filler)))
        return filler[:at] + needle + filler[at:] + self.question + answer, len(answer)

    def batch(self, rows: int, length: int, depth: float | None) -> tuple[torch.Tensor, list[int]]:
        seqs = [self.one(length, depth) for _ in range(rows)]
        return torch.tensor([s for s, _ in seqs]), [n for _, n in seqs]


def train_passkey_model(args, data, tokenizer):
    """A `--preset` model trained `--steps` steps of 16 x train-len tokens of passkey sequences (train split)."""
    import torch.nn.functional as F

    from slmkit.config import preset
    from slmkit.models import build_model

    length = args.train_len
    model = build_model(preset(args.preset, vocab_size=data.vocab_size, max_seq_len=length))
    model.init_weights(0)
    sampler = Passkeys(tokenizer, np.asarray(data.train), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20
    begin = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / args.steps)) / 2)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, answers = sampler.batch(16, length + 1, None)
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L)
        weight = torch.ones_like(nll)
        for row, n in enumerate(answers):
            weight[row, -n:] += args.answer_weight * length / (2 * n)  # the key: a third of the row's loss
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            key_nll = float(sum(nll[r, -n:].detach().mean() for r, n in enumerate(answers)) / len(answers))
            print(f"  step {step + 1}: loss {float(nll.detach().mean()):.3f}, on the keys {key_nll:.3f} "
                  f"({time.perf_counter() - begin:.0f} s)")  # fmt: skip
    return model.eval(), time.perf_counter() - begin


@torch.no_grad()
def answer_correct(model, ids: torch.Tensor, answers: list[int], spec, chunk: int = 32) -> list[bool]:
    """Whether each row's key tokens are all the greedy (argmax) prediction, fed through a state in calls of
    `chunk` tokens as generation feeds a prompt (prefill in chunks, the key teacher-forced)."""
    b, length = ids.shape
    state = model.new_state(b, length, **({"cache": spec} if spec is not None else {}))
    predicted = []
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = model(ids[:, start:stop], state=state, pos=torch.arange(start, stop))
        predicted.append(logits.argmax(-1))
    guess = torch.cat(predicted, dim=1)  # (B, L - 1): guess of token p + 1
    return [bool((guess[r, length - 1 - n :] == ids[r, length - n :]).all()) for r, n in enumerate(answers)]


def run_methods(args) -> None:
    from tokenizers import Tokenizer

    from slmkit.config import extend_context
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.eval.kv_cache import cached_token_nll
    from slmkit.models import build_model
    from slmkit.models.state import KVCacheSpec

    print(f"hardware: {hardware()}; {load_average()}")
    length = args.train_len
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        corpus = args.corpus or SHARED
        if corpus.is_file():
            print(f"corpus: {corpus} (abstracts)")
            prepare([str(corpus)], data_dir, vocab_size=2048, text_field="abstract", val_fraction=0.1)
        else:
            print("corpus: builtin:pystdlib (no shared papers file)")
            prepare(["builtin:pystdlib"], data_dir, vocab_size=2048, val_fraction=0.1)
        data = load_data_dir(data_dir)
        tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
        print(f"training {args.preset} at {length} tokens on passkey sequences ({load_average()})")
        model, seconds = train_passkey_model(args, data, tokenizer)
        print(f"trained {args.steps} steps of 16 x {length} tokens in {seconds:.0f} s ({load_average()})")
        yarn = build_model(extend_context(model.config, 8 * length, "yarn")).eval()
        yarn.load_state_dict(model.state_dict())
        half = length // 2
        methods = [
            ("vanilla (full cache)", model, None),
            (f"window {length - args.sinks} + {args.sinks} sinks", model, KVCacheSpec(window=length - args.sinks,
                                                                                    sinks=args.sinks)),
            (
                f"memory: {args.sinks} sinks + window {half} + top {half // args.block} of blocks of {args.block}",
                model,
                KVCacheSpec(window=half, sinks=args.sinks, topk=half // args.block, block_size=args.block),
            ),
            ("yarn x8 (no training)", yarn, None),
        ]  # fmt: skip
        val = np.asarray(data.val)
        factors = (1, 2, 4, 8)
        print(f"\npasskey accuracy ({args.trials} keys per cell, val-split filler; {load_average()})")
        print(f"{'method':<58} {'depth':>6} " + " ".join(f"{f * length:>6}" for f in factors))
        totals = {}
        for name, net, spec in methods:
            sampler = Passkeys(tokenizer, val, seed=1)  # the same sequences for every method
            for depth in DEPTHS:
                row = []
                for factor in factors:
                    ids, answers = sampler.batch(args.trials, factor * length, depth)
                    hits = answer_correct(net, ids, answers, spec)
                    row.append(sum(hits) / len(hits))
                    totals.setdefault((name, factor), []).append(row[-1])
                print(f"{name:<58} {depth:>6.1f} " + " ".join(f"{a:>6.2f}" for a in row))
        print(f"{'mean over depths':<58} {'':>6}")
        for name, _, _ in methods:
            print(f"  {name:<56} {'':>6} " + " ".join(f"{np.mean(totals[name, f]):>6.2f}" for f in factors))
        print(f"\nperplexity on the val split ({args.sequences} sequences per length, calls of 32 tokens; "
              f"{load_average()})")  # fmt: skip
        print(f"{'length':>7} {'method':<58} {'ppl (all)':>10} {'ppl (last L)':>13}")
        for factor in (1, 4, 8):
            ids = windows(val[len(val) // 2 :], factor * length, args.sequences)  # not the passkey filler
            for name, net, spec in methods:
                nll = cached_token_nll(net, ids, spec)
                every, tail = math.exp(float(nll.mean())), math.exp(float(nll[:, -length:].mean()))
                print(f"{factor * length:>7} {name:<58} {every:>10.2f} {tail:>13.2f}")
        print(f"\ndone ({load_average()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("kv", "methods"), default="kv")
    parser.add_argument("--model", type=Path, default=None, help="a model dir (default: train one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 400")
    parser.add_argument("--train-len", type=int, default=None, help="default: 128 (kv), 256 (methods)")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=8, help="val sequences per length")
    parser.add_argument("--trials", type=int, default=8, help="methods: passkeys per length and depth")
    parser.add_argument("--block", type=int, default=16, help="methods: block memory's block size")
    parser.add_argument("--lr", type=float, default=3e-3, help="methods: peak learning rate")
    parser.add_argument("--corpus", type=Path, default=None, help="methods: a papers .jsonl (default: shared's)")
    parser.add_argument("--answer-weight", type=float, default=1.0, help="methods: extra loss weight on the keys")
    args = parser.parse_args()
    if args.suite == "methods":
        args.steps = args.steps or 400
        args.train_len = args.train_len or 256
        run_methods(args)
        return
    args.steps = args.steps or 400
    args.train_len = args.train_len or 128

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
