"""Generation speed, side by side, printed as ratios.

    python benchmarks/generate_throughput.py                      # all sections that need no model dir
    python benchmarks/generate_throughput.py --sections spec --target runs/py/final --draft runs/pytiny/final \\
        --code-data /tmp/pystd --english /work/shared/corpus/seed-papers.jsonl

Sections:
- hf:      batch-1 greedy decode, slmkit's engine vs transformers' `generate` on the same (random) weights;
           outputs are checked to be identical before rates are reported.
- batch:   batched greedy throughput (new tokens / wall second, prefill included) at batch 1, 8 and 32.
- spec:    speculative decoding (prompt lookup, and a draft model if given) vs plain greedy on code
           continuation (a data dir's val split) and English (a .jsonl corpus); identical output checked.
- json:    tokens/s with and without a JSON schema constraint (grammar mask cost per step).
- gpu:     (CUDA only) decode tokens/s in bf16 with torch.compile(mode="reduce-overhead") on and off.
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
from _common import hardware, timed  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.infer.engine import Engine, EngineStats  # noqa: E402
from slmkit.interop.checkpoint import save_model  # noqa: E402
from slmkit.models import build_model  # noqa: E402


def random_model(name: str, vocab_size: int) -> torch.nn.Module:
    cfg = preset(name, vocab_size=vocab_size, eos_token_id=None)  # no early stop: every run makes n tokens
    model = build_model(cfg)
    model.init_weights(0)
    with torch.no_grad():  # sharper weights than init so greedy paths are not degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return model.eval()


def section_hf(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    ours = random_model(args.preset, args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp).eval()
    engine = Engine(ours, tokenizer=None)
    compiled = Engine(ours, tokenizer=None, compile=True)  # inductor C++ kernels for the decode step
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run_ours() -> list[int]:
        return engine.generate_ids([prompt[0].tolist()], max_new_tokens=n)[0].token_ids

    def run_compiled() -> list[int]:
        return compiled.generate_ids([prompt[0].tolist()], max_new_tokens=n)[0].token_ids

    def run_theirs() -> list[int]:
        with torch.no_grad():
            out = theirs.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
            )
        return out[0, args.prompt_len :].tolist()

    a, b = run_ours(), run_theirs()
    start = time.perf_counter()
    c = run_compiled()  # the first call compiles
    compile_seconds = time.perf_counter() - start
    same = a == b == c
    ours_rates, compiled_rates, theirs_rates = [], [], []
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all alike
        ours_rates.append(n / timed(run_ours))
        compiled_rates.append(n / timed(run_compiled))
        theirs_rates.append(n / timed(run_theirs))
    ours_tps, compiled_tps, theirs_tps = max(ours_rates), max(compiled_rates), max(theirs_rates)
    print(f"\n## batch-1 greedy decode vs transformers generate (preset {args.preset}, fp32)")
    print(f"prompt {args.prompt_len}, {n} new tokens; best of {args.repeats}; identical outputs: {same}")
    print(f"slmkit engine, eager     {ours_tps:8.1f} tokens/s (prefill included)")
    first = f"first call {compile_seconds:.1f} s"
    print(f"slmkit engine, compiled  {compiled_tps:8.1f} tokens/s (prefill included; {first})")
    print(f"transformers generate    {theirs_tps:8.1f} tokens/s (prefill included)")
    print(f"ratio eager / transformers:    {ours_tps / theirs_tps:.2f}x")
    print(f"ratio compiled / transformers: {compiled_tps / theirs_tps:.2f}x")


def section_batch(args: argparse.Namespace) -> None:
    model = random_model(args.preset, args.vocab_size)
    engine = Engine(model, tokenizer=None)
    gen = torch.Generator().manual_seed(1)
    print(f"\n## batched greedy throughput (preset {args.preset}, fp32, prompts of 16..{args.prompt_len} tokens)")
    base = None
    for batch in (1, 8, 32):
        lengths = torch.randint(16, args.prompt_len + 1, (batch,), generator=gen).tolist()
        prompts = [torch.randint(1, args.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        rates = []
        for _ in range(args.repeats):
            stats = EngineStats()
            start = time.perf_counter()
            outs = engine.generate_ids(prompts, max_new_tokens=args.new_tokens, stats=stats)
            rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
        rate = max(rates)
        base = base or rate
        print(f"batch {batch:3d}: {rate:9.1f} new tokens/s  ({rate / base:5.2f}x batch 1)")


def _prompts_from_data_dir(data_dir: Path, count: int, prompt_len: int) -> list[list[int]]:
    from slmkit.data.shards import load_data_dir

    val = load_data_dir(data_dir).val
    stride = max((len(val) - prompt_len) // count, 1)
    return [val[i * stride : i * stride + prompt_len].astype("int64").tolist() for i in range(count)]


def _prompts_from_jsonl(path: Path, tokenizer, count: int, prompt_len: int) -> list[list[int]]:
    prompts = []
    with path.open() as fh:
        for line in fh:
            record = json.loads(line)
            ids = tokenizer.encode(record.get("abstract") or record.get("text") or "").ids
            if len(ids) >= prompt_len:
                prompts.append(ids[:prompt_len])
            if len(prompts) == count:
                break
    return prompts


def _spec_rows(engine: Engine, name: str, prompts: list[list[int]], args: argparse.Namespace) -> None:
    modes = [("lookup", "lookup")] + ([("draft", "draft")] if engine.draft is not None else [])
    totals: dict[str, list[float]] = {"plain": [], **{m: [] for m, _ in modes}}
    accept: dict[str, list[int]] = {m: [0, 0] for m, _ in modes}
    identical = True
    new_tokens = 0
    for prompt in prompts:
        for _ in range(args.repeats):  # interleaved: plain, lookup, draft for each prompt
            start = time.perf_counter()
            [plain] = engine.generate_ids([prompt], max_new_tokens=args.new_tokens)
            totals["plain"].append(time.perf_counter() - start)
            for mode, speculate in modes:
                stats = EngineStats()
                start = time.perf_counter()
                [spec] = engine.generate_ids(
                    [prompt], max_new_tokens=args.new_tokens, speculate=speculate, speculate_k=args.k, stats=stats
                )
                totals[mode].append(time.perf_counter() - start)
                identical &= spec.token_ids == plain.token_ids
                accept[mode][0] += stats.accepted
                accept[mode][1] += stats.drafted
        new_tokens += len(plain.token_ids)
    plain_seconds = sum(totals["plain"])
    print(f"{name}: {len(prompts)} prompts x {args.new_tokens} new tokens, identical output: {identical}")
    print(f"  plain greedy      {new_tokens * args.repeats / plain_seconds:8.1f} tokens/s")
    for mode, _ in modes:
        seconds = sum(totals[mode])
        acc, drafted = accept[mode]
        rate = acc / drafted if drafted else 0.0
        print(
            f"  {mode:<6} k={args.k or 'default':<7} {new_tokens * args.repeats / seconds:8.1f} tokens/s  "
            f"speedup {plain_seconds / seconds:5.2f}x  acceptance {rate:.0%} ({acc}/{drafted})"
        )


def section_spec(args: argparse.Namespace) -> None:
    if args.target is None:
        print("\n## speculative decoding: skipped (give --target MODEL_DIR, and optionally --draft)")
        return
    engine = Engine.load(args.target, draft=args.draft, device="cpu")
    print(f"\n## speculative decoding (target {args.target}, draft {args.draft or 'none'}, greedy, fp32)")
    if args.code_data:
        _spec_rows(engine, "code (val split)", _prompts_from_data_dir(Path(args.code_data), args.count, 128), args)
    if args.english:
        prompts = _prompts_from_jsonl(Path(args.english), engine.tokenizer, args.count, 128)
        _spec_rows(engine, "english", prompts, args)


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "open_access": {"type": "boolean"},
    },
    "required": ["title", "year", "keywords", "open_access"],
}


def section_json(args: argparse.Namespace) -> None:
    from slmkit.infer.constrained import Constraint
    from slmkit.infer.sampling import SamplingParams

    if args.target is None:
        print("\n## constrained decoding: skipped (give --target MODEL_DIR; it needs a tokenizer)")
        return
    engine = Engine.load(args.target, device="cpu")
    constraint = Constraint.json_schema(SCHEMA)
    sampling = SamplingParams(temperature=1.0, seed=0)
    free_rates, json_rates, mask_share, valid = [], [], [], 0
    runs = 0
    n = max(args.new_tokens, 160)  # room for the whole object, so outputs end by the grammar, not the limit
    for i in range(args.repeats * 3):
        sampling = SamplingParams(temperature=1.0, seed=i)
        free, constrained = EngineStats(), EngineStats()
        engine.generate("A paper:", max_new_tokens=n, sampling=sampling, stats=free)
        [out] = engine.generate(
            "A paper:", max_new_tokens=n, sampling=sampling, constraint=constraint, stats=constrained
        )
        runs += 1
        try:
            json.loads(out.text)
            valid += 1
        except json.JSONDecodeError:
            pass
        free_rates.append(free.decode_tokens_per_second)
        json_rates.append(constrained.decode_tokens_per_second)
        mask_share.append(constrained.mask_seconds / constrained.decode_seconds)
    f, c = statistics.median(free_rates), statistics.median(json_rates)
    print(f"\n## constrained decoding (target {args.target}, JSON schema, sampled)")
    print(f"unconstrained {f:8.1f} tokens/s; with JSON schema {c:8.1f} tokens/s; ratio {c / f:.2f}x")
    print(f"grammar mask time: {statistics.median(mask_share):.1%} of decode time (median); valid JSON {valid}/{runs}")


def section_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\n## GPU: skipped (no CUDA device)")
        return
    model = random_model(args.preset, args.vocab_size).cuda().to(torch.bfloat16)
    prompt = torch.randint(1, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    print(f"\n## GPU decode, bf16 (preset {args.preset}, {torch.cuda.get_device_name()})")
    for batch in (1, 8):
        rates = {}
        for compile in (False, True):
            engine = Engine(model, tokenizer=None, compile=compile, static_cache=True)
            engine.generate_ids([prompt.tolist()] * batch, max_new_tokens=args.new_tokens)  # warm-up / compile
            stats = EngineStats()
            engine.generate_ids([prompt.tolist()] * batch, max_new_tokens=args.new_tokens, stats=stats)
            rates[compile] = stats.decode_tokens_per_second
        print(
            f"batch {batch}: eager {rates[False]:9.1f} tokens/s; compiled (reduce-overhead) {rates[True]:9.1f} "
            f"tokens/s; ratio {rates[True] / rates[False]:.2f}x"
        )


SECTIONS = {"hf": section_hf, "batch": section_batch, "spec": section_spec, "json": section_json, "gpu": section_gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="hf,batch,spec,json,gpu")
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", help="model dir for the spec and json sections")
    parser.add_argument("--draft", help="draft model dir (same tokenizer) for the spec section")
    parser.add_argument("--k", type=int, default=None, help="speculate-k (default: 8 lookup, 4 draft)")
    parser.add_argument("--count", type=int, default=4, help="prompts per corpus in the spec section")
    parser.add_argument("--code-data", help="data dir whose val split gives code prompts (e.g. builtin:pystdlib)")
    parser.add_argument("--english", help=".jsonl corpus of English prompts (field abstract or text)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}")
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
