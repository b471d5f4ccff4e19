"""Sequence mixers side by side: quality at equal training FLOPs, associative recall, and decode cost vs context.

    python benchmarks/mixers.py --sections decode                        # ms/token and state bytes vs context
    python benchmarks/mixers.py --sections recall                        # MQAR-style associative recall
    python benchmarks/mixers.py --sections quality --flops 3e12          # val bits/byte at equal training FLOPs
    python benchmarks/mixers.py --sections hf                            # training tokens/s vs transformers' Mamba2

The equal-FLOPs goal's one recipe (docs/architectures.md: x10 embedding lr with residual dropout 0.2), per size:

    python benchmarks/mixers.py --sections quality --presets micro micro-hybrid --flops 3e12 --seeds 1337 1 \
        --train-set embed_lr_scale=10 'model={"dropout": 0.2}'
    python benchmarks/mixers.py --sections quality --presets small small-hybrid --flops 3e13 \
        --train-set embed_lr_scale=10 'model={"dropout": 0.2}'

Every section compares the same list of presets (``--presets``; default: the `micro` transformer, Mamba-2,
BASED, GLA and the Mamba-2/attention hybrid). FLOPs are `ModelConfig.flops_per_token`, which counts each
layer's own mixer. Figures go to stdout as tables (plain text when stdout is not a terminal) and, with
``--json``, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware, training_rate  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.errors import UserError  # noqa: E402
from slmkit.models import build_model  # noqa: E402

DEFAULT_PRESETS = ["micro", "micro-mamba2", "micro-based", "micro-gla", "micro-hybrid"]
SEED_PAPERS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "seed-papers.jsonl"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print(
            "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )


def state_bytes(state: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in state.buffers())


def memory_bytes(state: torch.nn.Module, window: int | None = None) -> int:
    """Bytes of what the model remembers of its context: a KV cache's keys and values, a recurrent layer's carry
    (its conv window and state matrix). Not counted: the copies a recurrent state keeps only so speculation can take
    tokens back (prev_*, ck_*, the ring of raw inputs) and integer bookkeeping (lengths, positions). A BASED layer's
    window cache counts `window` of its positions (it holds the whole context when that is short, but attends to
    the last `window` only). This is the "state size" of the Zoology/BASED recall comparisons; `state_bytes` is
    what the engine allocates."""
    total = 0.0
    for path, module in state.named_modules():
        carry = getattr(module, "carry_names", None)
        if carry is not None:
            total += sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in carry)
            continue
        own = sum(
            b.numel() * b.element_size()
            for _, b in module.named_buffers(recurse=False)
            if b.dtype not in (torch.int64, torch.int32, torch.bool)
        )
        slots = getattr(module, "slots", None)
        if own and window is not None and path.endswith(".window") and slots and slots > window:
            own = own * window / slots
        total += own
    return int(total)


# ---------------------------------------------------------------- decode cost vs context
@torch.inference_mode()
def decode_section(presets: list[str], contexts: list[int], steps: int, vocab: int) -> list[dict]:
    """Batch-1 greedy decode after a context of n tokens: ms per token and the inference state's bytes."""
    results = []
    for name in presets:
        torch.manual_seed(0)
        cfg = preset(name, vocab_size=vocab, max_seq_len=max(contexts) + steps + 8)
        model = build_model(cfg).eval()
        model.init_weights(seed=0)
        for n in contexts:
            state = model.new_state(1, n + steps + 1)
            ids = torch.randint(0, vocab, (1, n))
            for start in range(0, n, 512):  # prefill in chunks: the state, not a (n, n) score matrix
                chunk = ids[:, start : start + 512]
                pos = torch.arange(start, start + chunk.shape[1])
                logits = model(chunk, state=state, pos=pos, last_only=True)
            token = logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                logits = model(token, state=state, pos=torch.tensor([n + i]), last_only=True)
                token = logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
            times.sort()
            results.append(
                {
                    "preset": name,
                    "context": n,
                    "ms_per_token": 1000 * times[len(times) // 2],
                    "state_bytes": state_bytes(state),
                    "params": sum(p.numel() for p in model.parameters()),
                }
            )
            print(f"  {name} @ {n}: {results[-1]['ms_per_token']:.2f} ms/token", file=sys.stderr)
    rows = [
        [r["preset"], str(r["context"]), f"{r['ms_per_token']:.2f}", f"{r['state_bytes'] / 2**20:.2f}"] for r in results
    ]
    table("decode (batch 1, median of steps)", ["preset", "context", "ms/token", "state MiB"], rows)
    return results


# ---------------------------------------------------------------- associative recall
def mqar_batch(g: torch.Generator, batch: int, pairs: int, queries: int, n_keys: int, n_values: int):
    """Multi-query associative recall: `pairs` key-value pairs, then `queries` keys seen before; the target after
    each queried key is its value. Keys are tokens [0, n_keys), values [n_keys, n_keys + n_values)."""
    keys = torch.stack([torch.randperm(n_keys, generator=g)[:pairs] for _ in range(batch)])
    values = torch.randint(n_keys, n_keys + n_values, (batch, pairs), generator=g)
    context = torch.stack((keys, values), dim=2).reshape(batch, 2 * pairs)
    pick = torch.stack([torch.randperm(pairs, generator=g)[:queries] for _ in range(batch)])
    q_keys, q_values = keys.gather(1, pick), values.gather(1, pick)
    query = torch.stack((q_keys, q_values), dim=2).reshape(batch, 2 * queries)
    x = torch.cat((context, query), dim=1)
    y = torch.full_like(x, -100)
    y[:, 2 * pairs : -1 : 2] = x[:, 2 * pairs + 1 :: 2]  # predict the value after each queried key
    return x, y


def recall_section(
    presets: list[str],
    steps: int,
    pairs: int,
    d_model: int,
    batch: int,
    lrs: list[float] | None = None,
    overrides: dict | None = None,
    inits: list[float] | None = None,
    equal_memory: str | None = None,
) -> list[dict]:
    """Train each mixer on MQAR from scratch and score held-out sequences. Every pair is queried, and the batch is
    large: with 4 queries of 8 pairs at batch 32 (128 labels a step) even attention stayed at 0.15 after 5,000
    steps; at 8 queries and batch 128 (2 layers) it jumps from chance to 1.0 near step 1,100 (the induction-head
    transition); at 16 pairs it was still at 0.23 after 2,400 steps, beyond a CPU benchmark's budget.

    `lrs`: the same AdamW learning rates for every preset (default 3e-3 alone); each preset is trained once per rate
    and its best accuracy is reported, so no mixer is judged at a rate that suits only another. `overrides`: config
    fields set on every preset's recall model (e.g. rope_fraction=1.0), named in the table's title. `inits`: the
    same initializer_range values for every preset (default: each preset's own), swept with the rates the same way:
    at 2,000 steps the scale decides which mixers make the induction-head jump (docs/architectures.md).
    `equal_memory`: a preset (attention) whose memory of the sequence (`memory_bytes`) every other preset is fitted
    to, with `fit_memory`'s knobs, as the Zoology/BASED comparisons do; the fitted fields are named in the table."""
    n_keys, n_values = 64, 64
    results = []
    target = None
    if equal_memory:
        target = memory_bytes(
            _recall_model(equal_memory, pairs, d_model, dict(overrides or {})).new_state(1, 4 * pairs)
        )
    for name in presets:
        fitted = {}
        if target is not None and name != equal_memory:
            fitted = fit_memory(name, pairs, d_model, dict(overrides or {}), target)
        for init in inits or [None]:
            fields = dict(overrides or {}) | fitted | ({} if init is None else {"initializer_range": init})
            for lr in lrs or [3e-3]:
                results.append(_recall_one(name, lr, steps, pairs, d_model, batch, n_keys, n_values, fields))
                results[-1]["init"] = fields.get("initializer_range")  # from --recall-inits or --recall-set
                results[-1]["fitted"] = fitted
    best = {}
    for r in results:
        if r["preset"] not in best or r["accuracy"] > best[r["preset"]]["accuracy"]:
            best[r["preset"]] = r
    sweep = len(lrs or [3e-3]) * len(inits or [None]) > 1
    rows = [
        [
            r["preset"],
            f"{r['lr']:g}",
            "preset" if r["init"] is None else f"{r['init']:g}",
            f"{r['accuracy']:.3f}" + (" *" if sweep and best[r["preset"]] is r else ""),
            f"{r['memory_bytes'] / 1024:.1f}",
            f"{r['state_bytes'] / 1024:.1f}",
            " ".join(f"{k}={v}" for k, v in r["fitted"].items()) or "-",
            f"{r['seconds']:.0f}",
        ]
        for r in results
    ]
    table(
        f"associative recall ({pairs} pairs, all queried, d_model {d_model}, batch {batch}, {steps} steps"
        + "".join(f", {k}={v}" for k, v in (overrides or {}).items())
        + (f", memory fitted to {equal_memory}'s {target / 1024:.1f} KiB" if target is not None else "")
        + (", * the best rate and init of each preset)" if sweep else ")"),
        ["preset", "lr", "init", "accuracy", "memory KiB", "state KiB", "fitted", "seconds"],
        rows,
    )
    return results


def _recall_one(
    name: str,
    lr: float,
    steps: int,
    pairs: int,
    d_model: int,
    batch: int,
    n_keys: int,
    n_values: int,
    overrides: dict,
) -> dict:
    """One preset trained on MQAR at one learning rate (`recall_section`)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _recall_model(name, pairs, d_model, overrides, n_keys + n_values)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for step in range(steps):
        x, y = mqar_batch(g, batch, pairs, pairs, n_keys, n_values)
        for group in opt.param_groups:  # constant after warm-up: a decay can stall it before the jump
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.inference_mode():
        x, y = mqar_batch(torch.Generator().manual_seed(99), 256, pairs, pairs, n_keys, n_values)
        pred = model(x).argmax(-1)
        mask = y != -100
        accuracy = (pred[mask] == y[mask]).float().mean().item()
        state = model.new_state(1, x.shape[1])
    memory = memory_bytes(state, model.config.linear_window)
    init = f", init {overrides['initializer_range']:g}" if "initializer_range" in overrides else ""
    print(f"  {name} @ lr {lr:g}{init}: recall {accuracy:.3f}", file=sys.stderr)
    return {
        "preset": name,
        "lr": lr,
        "accuracy": accuracy,
        "state_bytes": state_bytes(state),
        "memory_bytes": memory,
        "seconds": time.perf_counter() - started,
    }


def _recall_model(name: str, pairs: int, d_model: int, overrides: dict, vocab: int = 128) -> torch.nn.Module:
    """The recall benchmark's model of a preset: 2 layers of width d_model (a hybrid keeps its last two kinds)."""
    base = preset(name)
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=2,  # the fewest that can form an induction head (attention learns recall fastest)
        n_heads=4,
        n_kv_heads=2,
        d_ff=2 * d_model,
        max_seq_len=4 * pairs,
        bos_token_id=None,
        eos_token_id=None,
        **({"layer_pattern": base.layer_pattern[-2:]} if base.layer_pattern else {}),  # hybrid: M, A
    )
    return build_model(preset(name, **(fields | overrides)))


# the fields that set a recurrent mixer's memory, and the values `fit_memory` tries (the preset's own included)
MEMORY_KNOBS = {
    "mamba2": {"ssm_state_size": [1, 2, 4, 8, 16, 32, 64, 128]},
    "mamba": {"ssm_state_size": [1, 2, 4, 8, 16, 32, 64]},
    "based": {"linear_feature_dim": [1, 2, 4, 8, 16], "linear_window": [2, 4, 8, 16, 32, 64]},
    "gla": {"n_heads": [1, 2, 4, 8, 16]},  # state per layer: (d_model / 2) x d_model / heads
}


def fit_memory(name: str, pairs: int, d_model: int, overrides: dict, target: int) -> dict:
    """The knob values (MEMORY_KNOBS of the preset's recurrent mixers) whose model remembers the most without
    exceeding `target` bytes at the recall sequence's length; ties go to the larger first knob (BASED: feature
    dimension before window). Attention layers keep their cache (a hybrid's is part of its memory)."""
    import itertools

    kinds = set(preset(name).layer_pattern[-2:] if preset(name).layer_pattern else [preset(name).mixer])
    knobs: dict[str, list] = {}
    for kind in sorted(kinds):
        knobs |= MEMORY_KNOBS.get(kind, {})
    if not knobs:
        return {}
    best, best_key = None, None
    for values in itertools.product(*knobs.values()):
        fields = dict(zip(knobs, values, strict=True))
        if "n_heads" in fields:
            fields["n_kv_heads"] = min(fields["n_heads"], overrides.get("n_kv_heads", 2))
        try:
            model = _recall_model(name, pairs, d_model, overrides | fields)
        except UserError:  # a combination the config refuses (heads that do not divide the width)
            continue
        size = memory_bytes(model.new_state(1, 4 * pairs), model.config.linear_window)
        key = (size, *values)
        if size <= target and (best_key is None or key > best_key):
            best, best_key = fields, key
    if best is None:
        raise SystemExit(f"error: no setting of {', '.join(knobs)} fits {name} into {target} bytes of memory")
    return best


# ---------------------------------------------------------------- quality at equal FLOPs
def _corpus_label(corpus: str) -> str:
    """A table's name for a --corpora item: a file's stem (without its #FIELD), a builtin as given."""
    return Path(corpus.partition("#")[0]).stem if "/" in corpus else corpus


def quality_section(
    presets: list[str],
    corpora: list[str],
    flops: float,
    vocab: int,
    work: Path,
    dtype: str = "auto",
    seeds: tuple[int, ...] = (1337,),
    train_set: dict | None = None,
) -> list[dict]:
    """Val bits per byte of each preset after `flops` training FLOPs on each corpus, for each seed (the model's
    init and the data order); `train_set` overrides TrainConfig fields for every arm (e.g. embed_lr_scale)."""
    from slmkit.data.prepare import prepare
    from slmkit.eval.perplexity import evaluate_text
    from slmkit.loading import load
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    results = []
    for corpus in corpora:
        data_dir = work / f"data-{abs(hash(corpus))}"
        source, _, field = corpus.partition("#")  # PATH#FIELD: the .jsonl field holding the text
        prepare([source], data_dir, vocab_size=vocab, val_fraction=0.05, text_field=field or "text")
        for name, seed in ((n, s) for n in presets for s in seeds):
            cfg = TrainConfig(
                preset=name,
                seq_len=256,
                batch_size=16,
                lr=3e-3,
                warmup_steps=30,
                schedule="wsd",
                decay_fraction=0.3,
                max_flops=flops,
                eval_interval=10**9,
                save_interval=10**9,
                seed=seed,
                dtype=dtype,
                **(train_set or {}),
            )
            run_dir = work / f"run-{abs(hash(corpus))}-{name}-{seed}"
            started = time.perf_counter()
            result = train(cfg, data_dir, run_dir, overwrite=True)  # a re-run measures again
            seconds = time.perf_counter() - started
            score = evaluate_text(load(run_dir), data_dir, split="val", seq_len=256, batch_size=16)
            results.append(
                {
                    "corpus": corpus,
                    "preset": name,
                    "seed": seed,
                    "bits_per_byte": score.bits_per_byte,
                    "tokens": result.tokens,
                    "flops": result.flops,
                    "seconds": seconds,
                }
            )
            print(f"  {corpus} {name} seed {seed}: {score.bits_per_byte:.4f} bpb", file=sys.stderr)
    rows = []
    for r in results:  # each seed against the first preset at the same seed
        ref = next(
            (q for q in results if q["corpus"] == r["corpus"] and q["preset"] == presets[0] and q["seed"] == r["seed"]),
            r,
        )
        rows.append(
            [
                _corpus_label(r["corpus"]),
                r["preset"],
                str(r["seed"]),
                f"{r['bits_per_byte']:.4f}",
                f"{r['bits_per_byte'] / ref['bits_per_byte']:.3f}",
                f"{r['tokens'] / 1e6:.2f}",
                f"{r['seconds']:.0f}",
            ]
        )
    if len(seeds) > 1:  # the mean over seeds, and its ratio to the first preset's mean
        for corpus in corpora:
            base = statistics.mean(
                r["bits_per_byte"] for r in results if r["corpus"] == corpus and r["preset"] == presets[0]
            )
            for name in presets:
                values = [r["bits_per_byte"] for r in results if r["corpus"] == corpus and r["preset"] == name]
                mean = statistics.mean(values)
                rows.append(
                    [
                        _corpus_label(corpus),
                        name,
                        f"mean of {len(values)} (sd {statistics.stdev(values):.4f})",
                        f"{mean:.4f}",
                        f"{mean / base:.3f}",
                        "",
                        "",
                    ]
                )
    table(
        f"quality at equal training FLOPs ({flops:.2g} each)",
        ["corpus", "preset", "seed", "val bpb", f"vs {presets[0]}", "Mtokens", "seconds"],
        rows,
    )
    return results


# ---------------------------------------------------------------- training speed vs transformers' Mamba2
def hf_section(name: str, batch: int, seq_len: int, steps: int, vocab: int) -> dict:
    import torch.nn.functional as F
    import transformers

    from slmkit.interop.checkpoint import save_model

    cfg = preset(name, vocab_size=vocab, max_seq_len=seq_len)
    ours = build_model(cfg)
    ours.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights through the family spec's export
        save_model(ours, Path(tmp) / "m")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m")
    x = torch.randint(0, vocab, (batch, seq_len))

    def rate(model, logits_of) -> float:
        return training_rate(
            model, lambda: F.cross_entropy(logits_of(model).flatten(0, 1)[:-1], x.flatten()[1:]), x.numel(), steps
        )

    ours_rate = rate(ours, lambda m: m(x))
    theirs_rate = rate(theirs, lambda m: m(input_ids=x).logits)
    table(
        f"training tokens/s, {name}, batch {batch} x {seq_len}",
        ["model", "tokens/s", "ratio"],
        [
            ["slmkit", f"{ours_rate:,.0f}", f"{ours_rate / theirs_rate:.2f}x"],
            [type(theirs).__name__, f"{theirs_rate:,.0f}", "1.00x"],
        ],
    )
    return {"preset": name, "slmkit": ours_rate, "transformers": theirs_rate}


def _key_values(items: list[str], option: str = "--recall-set") -> dict:
    """`KEY=VALUE` pairs from the command line; a value that is not JSON is kept as a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {option} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections", nargs="+", default=["decode", "recall"], choices=["decode", "recall", "quality", "hf"]
    )
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 4096, 16384])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--recall-steps", type=int, default=2000)
    parser.add_argument(
        "--recall-inits", nargs="+", type=float, default=None,
        help="initializer_range values tried for every preset (best kept with the rates); default: each preset's",
    )  # fmt: skip
    parser.add_argument("--recall-pairs", type=int, default=8)
    parser.add_argument(
        "--recall-equal-memory", metavar="PRESET", default=None,
        help="fit every other preset's state size (MEMORY_KNOBS) to this preset's memory of the sequence",
    )  # fmt: skip
    parser.add_argument("--recall-batch", type=int, default=128)
    parser.add_argument("--recall-width", type=int, default=64)
    parser.add_argument(
        "--recall-lrs", nargs="+", type=float, default=[3e-3], help="AdamW rates tried for every preset (best kept)"
    )
    parser.add_argument(
        "--recall-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config fields for every recall model, e.g. rope_fraction=1.0 (values parsed as JSON)",
    )
    parser.add_argument("--flops", type=float, default=3e12, help="training FLOPs per model (quality)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337], help="seeds of each quality arm (init, data)")
    parser.add_argument(
        "--train-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig fields for every quality arm, e.g. embed_lr_scale=10 (values parsed as JSON)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="training dtype (quality); float32 compares with rows measured before bf16 became auto on CPUs",
    )
    parser.add_argument("--corpora", nargs="+", default=["builtin:pystdlib", f"{SEED_PAPERS}#abstract"])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hf-preset", default="micro-mamba2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {hardware()}")
    report: dict = {"hardware": hardware()}
    if "decode" in args.sections:
        report["decode"] = decode_section(args.presets, args.contexts, args.decode_steps, args.vocab_size)
    if "recall" in args.sections:
        report["recall"] = recall_section(
            args.presets,
            args.recall_steps,
            args.recall_pairs,
            args.recall_width,
            args.recall_batch,
            args.recall_lrs,
            _key_values(args.recall_set),
            args.recall_inits,
            args.recall_equal_memory,
        )
    if "quality" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            report["quality"] = quality_section(
                args.presets,
                args.corpora,
                args.flops,
                args.vocab_size,
                Path(tmp),
                args.dtype,
                tuple(args.seeds),
                _key_values(args.train_set, "--train-set"),
            )
    if "hf" in args.sections:
        report["hf"] = hf_section(args.hf_preset, 8, 256, 4, args.vocab_size)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
