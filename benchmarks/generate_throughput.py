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
- roofline: batch-1 greedy decode per preset (--presets, random weights, the preset's own vocabulary): slmkit
           eager and compiled, slmkit int8 and int4 (the same weights through `slm compress`'s round-to-nearest
           quantizer, default options, loaded as `load_model` loads them), transformers' `generate` (eager) and
           llama.cpp (xllamacpp's llama-server, f32, q8_0 and q4_k_m GGUF exports of the same weights), as decode
           tokens/s and as a fraction of this machine's memory-bandwidth roofline: bandwidth (best of a few 256 MB
           reductions and copies) / bytes each token must read (the weights as stored: f32, the int8/int4 model's
           own buffers, or the GGUF file; tied embeddings once; + the KV cache at the mean context length). K-quant
           files need rows that are multiples of 256: on other widths tensors fall back as llama.cpp's do (q4_k ->
           q5_0, q6_k -> q8_0); the tensor types each file holds are printed under the preset.

    python benchmarks/generate_throughput.py --sections roofline --presets micro,medium,base,124m --threads 2
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


def memory_bandwidth(threads: int) -> float:
    """Bytes/s this machine streams from memory: the best of a few reductions and copies of a 256 MB tensor (the
    copy counts its reads and writes), with `threads` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(64 * 1024 * 1024)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        best = max(best, a.numel() * 4 / timed(a.sum), 2 * a.numel() * 4 / timed(lambda: b.copy_(a)))
    torch.set_num_threads(saved)
    return best


def kv_bytes_per_token(cfg, context: float, bytes_per_value: int = 4) -> float:
    """Bytes of keys and values one decode step reads at `context` positions (attention layers only)."""
    attention_layers = sum(cfg.mixer_at(i) == "attention" for i in range(cfg.n_layers))
    return 2 * attention_layers * cfg.n_kv_heads * cfg.dim_per_head * bytes_per_value * context


def _tiny_tokenizer_dir(root: Path) -> Path:
    """A small byte-level BPE (the GGUF export carries the tokenizer; the model's vocabulary pads past it)."""
    from slmkit.data.tokenizer import save_tokenizer, train_tokenizer

    text = "small language models decode one token at a time, reading every weight once per token. " * 40
    save_tokenizer(train_tokenizer([text], 300), root / "tok")
    return root / "tok"


def _decode_rate(engine: Engine, prompt: list[int], n: int, repeats: int) -> float:
    """Best decode tokens/s (prefill excluded, as the engine times it) of `repeats` greedy runs."""
    best = 0.0
    for _ in range(repeats):
        stats = EngineStats()
        engine.generate_ids([prompt], max_new_tokens=n, stats=stats)
        best = max(best, stats.decode_tokens_per_second)
    return best


def _hf_decode_rate(model: torch.nn.Module, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    """transformers' greedy `generate` (eager): decode tokens/s as (n - 1) / (time of n tokens - time of 1 token,
    i.e. prefill and the first token), best times of `repeats`; and its tokens."""
    ids = torch.tensor([prompt])

    def run(k: int) -> tuple[float, list[int]]:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, out[0, len(prompt) :].tolist()

    one = min(run(1)[0] for _ in range(repeats))
    full, tokens = min(run(n) for _ in range(repeats))
    return (n - 1) / max(full - one, 1e-9), tokens


def _stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads as the model stores them (quantized codes, scales), shared tensors
    once. An int4 layer keeps its scales and zeros twice, f32 and the bf16 copy its kernel reads: only the copy
    in use counts."""
    seen: dict[int, int] = {}
    for module in model.modules():
        skip = "scales_and_zeros" if getattr(module, "kernel_scales_and_zeros", None) is not None else None
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in tensors:
            if t is not None and name != skip:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _gguf_types(path: Path) -> str:
    """The tensor types a GGUF file holds, with counts (e.g. `Q4_K x10, Q5_0 x4, Q6_K x1`), matrices only."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(counts.items()))


def section_roofline(args: argparse.Namespace) -> None:
    import os

    from slmkit.config import preset as make_preset
    from slmkit.infer.core import single_threaded

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from llamacpp_peer import available, llama_server_greedy
    from quant_decode import quantize_in_memory

    threads = args.threads or 2
    torch.set_num_threads(threads)
    bandwidth = memory_bandwidth(threads)
    load = os.getloadavg()
    n, prompt_len = args.new_tokens, args.prompt_len
    print(f"\n## batch-1 greedy decode vs the memory-bandwidth roofline ({threads} threads)")
    print(f"memory bandwidth {bandwidth / 1e9:.2f} GB/s (best of 5 reductions/copies of 256 MB); prompt {prompt_len}, "
          f"{n} new tokens; decode tokens/s (prefill excluded), best of {args.repeats}; load average at start "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print("roofline = bandwidth / (weight bytes + KV bytes at the mean context); fraction = tokens/s / roofline")
    header = f"{'preset':<8} {'params':>8} {'path':<22} {'tokens/s':>9} {'roofline':>9} {'fraction':>8} {'vs HF':>7}"
    print(header + f" {'vs llama.cpp f32':>16}")
    for name in args.presets.split(","):
        cfg = make_preset(name, eos_token_id=None)
        model = random_model(name, cfg.vocab_size)
        params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
        kv = kv_bytes_per_token(cfg, prompt_len + n / 2)
        f32_bytes = params * 4 + kv
        prompt = torch.randint(1, 300, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        rows: list[tuple[str, float, float, int]] = []  # path, tokens/s, bytes per token, threads

        ours_threads = 1 if single_threaded(model) else threads
        eager = Engine(model, tokenizer=None)
        reference = eager.generate_ids([prompt], max_new_tokens=n)[0].token_ids
        rows.append(("slmkit eager", _decode_rate(eager, prompt, n, args.repeats), f32_bytes, ours_threads))
        compiled = Engine(model, tokenizer=None, compile=True)
        start = time.perf_counter()
        same = compiled.generate_ids([prompt], max_new_tokens=n)[0].token_ids == reference
        first = time.perf_counter() - start
        label = f"slmkit compiled{'' if same else ' (DIFFERS)'}"
        rows.append((label, _decode_rate(compiled, prompt, n, args.repeats), f32_bytes, ours_threads))
        del compiled
        for bits in (8, 4):  # quantized: greedy tokens may differ from f32 (their error), as llama.cpp's q8_0 may
            qmodel = quantize_in_memory(model, bits)
            q_threads = 1 if single_threaded(qmodel) else threads
            q_engine = Engine(qmodel, tokenizer=None)
            q_engine.generate_ids([prompt], max_new_tokens=4)  # warm-up (first-call allocations, prepacking)
            q_rate = _decode_rate(q_engine, prompt, n, args.repeats)
            rows.append((f"slmkit int{bits}", q_rate, _stored_bytes(qmodel) + kv, q_threads))
            del qmodel, q_engine
        gguf_types: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            from transformers import AutoModelForCausalLM

            from slmkit.interop.gguf import export_gguf

            save_model(model, Path(tmp) / "m", tokenizer_dir=_tiny_tokenizer_dir(Path(tmp)))
            theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m").eval()
            hf_threads = ours_threads  # the thread count our core picks for this model (fair at small sizes)
            torch.set_num_threads(hf_threads)
            hf_rate, hf_tokens = _hf_decode_rate(theirs, prompt, n, args.repeats)
            torch.set_num_threads(threads)
            hf_note = "" if hf_tokens == reference else " (DIFFERS)"
            rows.append((f"transformers eager{hf_note}", hf_rate, f32_bytes, hf_threads))
            del theirs
            if available():
                for dtype in args.gguf:
                    path = export_gguf(Path(tmp) / "m", Path(tmp) / f"m-{dtype}.gguf", dtype)
                    runs = [llama_server_greedy(path, prompt, n, cfg.max_seq_len, threads) for _ in range(args.repeats)]
                    tokens, rate = max(runs, key=lambda r: r[1])
                    note = "" if dtype != "f32" or tokens == reference else " (DIFFERS)"
                    weight_bytes = path.stat().st_size  # the file: every tensor once, in its stored type
                    rows.append((f"llama.cpp {dtype}{note}", rate, weight_bytes + kv, threads))
                    if dtype.startswith("q") and "_k" in dtype:  # K-quants: which tensors fell back, and to what
                        gguf_types.append(f"{dtype}: {_gguf_types(path)}")
        by_path = {path.split(" (")[0]: rate for path, rate, _, _ in rows}
        hf_rate, llama_rate = by_path.get("transformers eager"), by_path.get("llama.cpp f32")
        for path, rate, nbytes, used in rows:
            roof = bandwidth / nbytes
            vs_hf = f"{rate / hf_rate:6.2f}x" if hf_rate else "    n/a"
            vs_llama = f"{rate / llama_rate:15.2f}x" if llama_rate else "            n/a"
            print(f"{name:<8} {params / 1e6:7.1f}M {path + f' [{used}t]':<22} {rate:9.1f} {roof:9.1f} "
                  f"{rate / roof:8.2f} {vs_hf} {vs_llama}")  # fmt: skip
        for line in gguf_types:
            print(f"{name:<8} llama.cpp {line}")
        print(f"{name:<8} compiling the decode step took {first:.1f} s (first call); load average now "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip


SECTIONS = {
    "hf": section_hf,
    "batch": section_batch,
    "spec": section_spec,
    "json": section_json,
    "gpu": section_gpu,
    "roofline": section_roofline,
}


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
    parser.add_argument("--presets", default="micro,medium,base,124m", help="roofline: presets to measure")
    parser.add_argument("--gguf", nargs="+", default=["f32", "q8_0", "q4_k_m"], help="roofline: llama.cpp GGUF dtypes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}")
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
