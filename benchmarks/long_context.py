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
and by perplexity at 1x, 4x, 8x against the in-length perplexity of the same tokens (each long sequence cut into
trained-length pieces, each scored from scratch: `slmkit.eval.kv_cache.piecewise_token_nll`), as a ratio with a
bootstrap interval over sequences. It trains its own model at `--train-len` (default 256 there), or takes one
trained by this suite (`--save DIR` then `--model DIR`), on corpus text where every sequence hides a passkey line
("The pass key is 12345. Remember it.") at a random depth and ends with the question ("What is the pass key? The pass
key is") and the key, the key's tokens weighted up in the loss. A 2-layer model learns to copy the key in about a
thousand Muon steps at 64 tokens (`--short-steps`), then trains on at the full length:

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/long_context.py --suite methods [--steps 3400] \
        [--short-steps 3000 --short-len 64] --train-only --save /tmp/passkey-tiny --corpus PAPERS.jsonl
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/long_context.py --suite methods --model /tmp/passkey-tiny \
        --trials 12 --sequences 16 --corpus PAPERS.jsonl

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
    """A `--preset` model trained `--steps` steps of `--rows` x train-len tokens of passkey sequences (train split),
    the first `--short-steps` of them at `--short-len` tokens (copying is learnt where steps are cheap), with
    `--optimizer` (muon: Muon on the hidden matrices, AdamW on the rest, as the trainer's default). Prints the loss
    on the key tokens (mean over each `--log-every` steps) and the share of training keys predicted whole."""
    import torch.nn.functional as F

    from slmkit.config import preset
    from slmkit.models import build_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.optim import make_optimizer

    length = args.train_len
    overrides = {k: v for k, v in (("d_model", args.width), ("n_layers", args.layers)) if v is not None}
    model = build_model(preset(args.preset, vocab_size=data.vocab_size, max_seq_len=length, **overrides))
    model.init_weights(0)
    params = sum(p.numel() for p in model.parameters())
    print(f"  {args.preset} {overrides or ''}: d_model {model.config.d_model}, {model.config.n_layers} layers, "
          f"{params / 1e6:.2f}M parameters, optimizer {args.optimizer}")  # fmt: skip
    sampler = Passkeys(tokenizer, np.asarray(data.train), seed=0)
    recipe = TrainConfig(preset=args.preset, lr=args.lr, max_steps=args.steps, optimizer=args.optimizer)
    opt = make_optimizer(model, recipe, torch.device("cpu"))
    warmup = 20
    begin = time.perf_counter()
    key_nll, key_hits, rows_seen = 0.0, 0, 0
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / args.steps)) / 2)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        seq = args.short_len if step < args.short_steps else length
        ids, answers = sampler.batch(args.rows, seq + 1, None)
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L)
        weight = torch.ones_like(nll)
        for row, n in enumerate(answers):
            weight[row, -n:] += args.answer_weight * seq / (2 * n)  # weight 1: the key is a third of the row's loss
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            guess = logits.argmax(-1)
            for row, n in enumerate(answers):
                key_nll += float(nll[row, -n:].mean())
                key_hits += bool((guess[row, -n:] == ids[row, -n:]).all())
            rows_seen += len(answers)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - begin
            print(f"  step {step + 1} (at {seq} tokens): loss {float(nll.detach().mean()):.3f}, on the keys "
                  f"{key_nll / rows_seen:.3f} nats, keys whole {key_hits / rows_seen:.2f} ({elapsed:.0f} s)",
                  flush=True)  # fmt: skip
            key_nll, key_hits, rows_seen = 0.0, 0, 0
        if args.max_minutes and time.perf_counter() - begin > 60 * args.max_minutes:
            print(f"  stopped at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break
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


def bootstrap_ratio(method: np.ndarray, reference: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    """95% interval of exp(mean method nll - mean reference nll) over sequences drawn with replacement (rows of
    (sequences, tokens) nll arrays: the same tokens in both)."""
    rng = np.random.default_rng(0)
    gap = method.mean(axis=1) - reference.mean(axis=1)  # per sequence; every row has as many tokens
    picks = rng.integers(0, len(gap), size=(draws, len(gap)))
    low, high = np.percentile(np.exp(gap[picks].mean(axis=1)), [2.5, 97.5])
    return float(low), float(high)


def run_methods(args) -> None:
    from tokenizers import Tokenizer

    from slmkit.config import extend_context
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.eval.kv_cache import cached_token_nll, piecewise_token_nll
    from slmkit.models import build_model
    from slmkit.models.state import KVCacheSpec

    print(f"hardware: {hardware()}; {load_average()}")
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        corpus = args.corpus or SHARED
        # a model given by --model keeps its own tokenizer; 0.2 of the documents held out (the val split must
        # hold 16 sequences of 8 x 256 tokens), the same split as the run that trained it with --save
        vocab = {"tokenizer": args.model, "vocab_size": None} if args.model else {"vocab_size": 2048}
        if corpus.is_file():
            print(f"corpus: {corpus} (abstracts)")
            prepare([str(corpus)], data_dir, text_field="abstract", val_fraction=0.2, **vocab)
        else:
            print("corpus: builtin:pystdlib (no shared papers file)")
            prepare(["builtin:pystdlib"], data_dir, val_fraction=0.2, **vocab)
        data = load_data_dir(data_dir)
        tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
        if args.model:
            from slmkit.loading import load

            model = load(args.model).model.float().eval()
            length = model.config.max_seq_len
            print(f"model: {args.model} (trained length {length}, d_model {model.config.d_model}, "
                  f"{model.config.n_layers} layers)")  # fmt: skip
        else:
            length = args.train_len
            print(f"training {args.preset} at {length} tokens on passkey sequences ({load_average()})")
            model, seconds = train_passkey_model(args, data, tokenizer)
            print(f"trained in {seconds:.0f} s ({load_average()})")
            if args.save:
                from slmkit.interop.checkpoint import save_model

                save_model(model, args.save, tokenizer_dir=data.tokenizer_path)
                print(f"saved {args.save}")
        if args.train_only:
            return
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
        if args.trials:
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
                    print(f"{name:<58} {depth:>6.1f} " + " ".join(f"{a:>6.2f}" for a in row), flush=True)
            print(f"{'mean over depths':<58} {'':>6}")
            for name, _, _ in methods:
                print(f"  {name:<56} {'':>6} " + " ".join(f"{np.mean(totals[name, f]):>6.2f}" for f in factors))
        print(f"\nperplexity on the val split ({args.sequences} sequences per length, calls of 32 tokens; "
              f"{load_average()}). in-length: the same tokens, each predicted by the model from scratch on at most "
              f"the {length} tokens before it (the sequence cut into {length}-token pieces); ratio: method / "
              f"in-length with its bootstrap 95% interval over sequences and the per-sequence min..max; last L: "
              f"the last {length} tokens (in-length: the last piece alone)")  # fmt: skip
        header = f"{'length':>6} {'method':<58}"
        for part in ("all", "last L"):
            header += f" {'ppl ' + part:>11} {'in-length':>9} {'ratio':>6} {'95% CI':>13} {'seq min..max':>13}"
        print(header)
        for factor in (1, 4, 8):
            ids = windows(val, factor * length, args.sequences)
            reference = piecewise_token_nll(model, ids, length).double().numpy()
            for name, net, spec in methods:
                nll = cached_token_nll(net, ids, spec).double().numpy()
                line = f"{factor * length:>6} {name:<58}"
                for cut in (slice(None), slice(-length, None)):
                    got, ref = nll[:, cut], reference[:, cut]
                    low, high = bootstrap_ratio(got, ref)
                    per_seq = np.exp(got.mean(axis=1) - ref.mean(axis=1))
                    line += (f" {math.exp(got.mean()):>11.2f} {math.exp(ref.mean()):>9.2f} "
                             f"{math.exp(got.mean() - ref.mean()):>6.3f} {f'{low:.3f}-{high:.3f}':>13} "
                             f"{f'{per_seq.min():.2f}..{per_seq.max():.2f}':>13}")  # fmt: skip
                print(line, flush=True)
        print(f"\ndone in {time.perf_counter() - begin:.0f} s ({load_average()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("kv", "methods"), default="kv")
    parser.add_argument("--model", type=Path, default=None, help="a model dir (default: train one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 400 (methods: 3400)")
    parser.add_argument("--train-len", type=int, default=None, help="default: 128 (kv), 256 (methods)")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=None, help="val sequences per length (8; methods: 16)")
    parser.add_argument("--trials", type=int, default=8, help="methods: passkeys per length and depth")
    parser.add_argument("--block", type=int, default=16, help="methods: block memory's block size")
    parser.add_argument("--lr", type=float, default=3e-3, help="methods: peak learning rate")
    parser.add_argument("--corpus", type=Path, default=None, help="methods: a papers .jsonl (default: shared's)")
    parser.add_argument("--answer-weight", type=float, default=1.0, help="methods: extra loss weight on the keys")
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default="muon", help="methods: training optimizer")
    parser.add_argument("--rows", type=int, default=16, help="methods: sequences per training step")
    parser.add_argument("--short-steps", type=int, default=None, help="methods: first steps at --short-len (3000)")
    parser.add_argument("--short-len", type=int, default=64, help="methods: sequence length of the short steps")
    parser.add_argument("--width", type=int, default=None, help="methods: d_model instead of the preset's")
    parser.add_argument("--layers", type=int, default=None, help="methods: layers instead of the preset's")
    parser.add_argument("--log-every", type=int, default=50, help="methods: steps between training log lines")
    parser.add_argument("--max-minutes", type=float, default=None, help="methods: stop training after this long")
    parser.add_argument("--save", type=Path, default=None, help="methods: save the trained model here")
    parser.add_argument("--train-only", action="store_true", help="methods: train (and --save), measure nothing")
    args = parser.parse_args()
    if args.suite == "methods":
        if args.save is not None and args.save.exists():
            parser.error(f"--save {args.save} exists; choose a new directory")
        if args.model is not None and not (args.model / "config.json").is_file():
            parser.error(f"--model {args.model} is not a model directory (no config.json)")
        args.steps = args.steps or 3400
        args.short_steps = 3000 if args.short_steps is None else args.short_steps
        args.train_len = args.train_len or 256
        args.sequences = args.sequences or 16
        if args.short_steps and not 48 <= args.short_len <= args.train_len:
            parser.error(f"--short-len must be 48..{args.train_len} (the passkey lines take about 40 tokens)")
        run_methods(args)
        return
    args.steps = args.steps or 400
    args.train_len = args.train_len or 128
    args.sequences = args.sequences or 8

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
