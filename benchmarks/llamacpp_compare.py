"""The same model in slmkit and in llama.cpp (the prebuilt xllamacpp wheel, on our GGUF export).

    python benchmarks/llamacpp_compare.py --model runs/quickstart --text data/val.txt [--dtypes f32 q8_0 q4_k_m]
    python benchmarks/llamacpp_compare.py --preset 124m --text some.txt --dtypes f32 --before --threads 1

For each GGUF dtype: batch-1 greedy decode tokens/s (llama.cpp's in-process llama-server, its own
`predicted_per_second` timing, vs slmkit fp32) and the perplexity of each on the same token windows of --text
(llama.cpp's logits through libllama's C API, f32 KV cache; tests/llamacpp_peer.py). Printed ratios: ours /
theirs. --preset NAME: a preset with random weights (as generate_throughput.py's roofline section makes them, with
a small byte-level tokenizer) instead of --model. --before: slmkit's decode also as it ran before issue #24
(weights as nn.Linear stores them, and a core of one row on --threads threads), alternating with the current path,
each the best of --repeats runs; slmkit's decode tokens/s then exclude the prefill (the engine's own timing, as
llama.cpp's does). Needs xllamacpp (`make install` pins it; `pip install xllamacpp`, a prebuilt wheel, no build); exits
with a message otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # llamacpp_peer: the same peer the tests use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="slmkit / Hugging Face model dir with tokenizer.json")
    parser.add_argument("--preset", help="instead of --model: this preset with random weights")
    parser.add_argument("--before", action="store_true", help="also slmkit's decode as before issue #24")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text", required=True, help="text file for perplexity")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["f32", "q8_0", "q4_k_m"],
        help="GGUF dtypes to export and run (any of `slm export --dtype`: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, "
        "q5_1, q4_k, q5_k, q6_k, q4_k_m, q5_k_m; K-quants need rows that are multiples of 256 and fall back as "
        "llama.cpp's do otherwise)",
    )
    parser.add_argument("--prompt", default="The model")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from llamacpp_peer import LlamaCppLogits, available, llama_server_greedy

    if not available():
        print(
            "xllamacpp is not installed: this benchmark compares against llama.cpp through its prebuilt wheel.\n"
            "Install it with `pip install xllamacpp` (the Makefile pins the version the tests use), then run again.",
            file=sys.stderr,
        )
        sys.exit(2)

    import numpy as np
    import torch

    from _common import hardware
    from slmkit.api import load
    from slmkit.infer.generate import generate_ids
    from slmkit.interop.gguf import export_gguf

    torch.set_num_threads(args.threads)
    if (args.model is None) == (args.preset is None):
        sys.exit("give one of --model and --preset")
    keep = tempfile.TemporaryDirectory()
    if args.preset:
        from generate_throughput import _tiny_tokenizer_dir, random_model
        from slmkit.config import preset as make_preset
        from slmkit.interop.checkpoint import save_model

        cfg = make_preset(args.preset, eos_token_id=None)
        args.model = save_model(
            random_model(args.preset, cfg.vocab_size), Path(keep.name) / args.preset,
            tokenizer_dir=_tiny_tokenizer_dir(Path(keep.name)),
        )  # fmt: skip
    lm = load(args.model)
    window = min(args.window, lm.config.max_seq_len)
    ids = lm.tokenizer.encode(Path(args.text).read_text()).ids
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)][: args.max_windows]
    if not windows:
        sys.exit(f"{args.text} is shorter than one window of {window} tokens")
    prompt = lm.tokenizer.encode(args.prompt).ids
    n_new = min(args.new_tokens, lm.config.max_seq_len - len(prompt))

    def nll(logits: np.ndarray, tokens: list[int]) -> float:
        logits = logits[:-1].astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float((log_z - logits[np.arange(len(tokens) - 1), tokens[1:]]).sum())

    def ours_ppl() -> float:
        with torch.no_grad():
            total = sum(nll(lm.model(torch.tensor([w]))[0].numpy(), w) for w in windows)
        return math.exp(total / sum(len(w) - 1 for w in windows))

    def ours_decode() -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = list(generate_ids(lm.model, prompt, n_new))
        return n_new / (time.perf_counter() - start), out

    def ours_engine(before: bool) -> tuple[float, list[int]]:
        """Decode tokens/s (prefill excluded) through the engine, as now or as before issue #24."""
        from slmkit.infer import core
        from slmkit.infer.engine import Engine, EngineStats
        from slmkit.models.decode_layout import use_decode_layout

        saved = core.DECODE_LAYOUT, core.SINGLE_THREAD_ROWS
        if before:
            core.DECODE_LAYOUT, core.SINGLE_THREAD_ROWS = False, 0
        use_decode_layout(lm.model, not before)
        try:
            stats = EngineStats()
            engine = Engine(lm.model, tokenizer=None, compile=False)
            out = engine.generate_ids([prompt], max_new_tokens=n_new, stats=stats)
            return stats.decode_tokens_per_second, out[0].token_ids
        finally:
            core.DECODE_LAYOUT, core.SINGLE_THREAD_ROWS = saved

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {dtype: export_gguf(lm.directory, Path(tmp) / f"model-{dtype}.gguf", dtype) for dtype in args.dtypes}
        # decode runs alternate between every path (slmkit before and now, each llama.cpp dtype), so load on the
        # machine falls on each alike; each path's best run counts
        decode: dict[str, list[tuple[float, list[int]]]] = {}
        for _ in range(args.repeats):
            if args.before:
                decode.setdefault("before", []).append(ours_engine(True))
                decode.setdefault("now", []).append(ours_engine(False))
            else:
                decode.setdefault("now", []).append(ours_decode())
            for dtype, path in paths.items():
                tokens, tps = llama_server_greedy(path, prompt, n_new, lm.config.max_seq_len, args.threads)
                decode.setdefault(dtype, []).append((tps, tokens))
        best = {key: max(runs, key=lambda r: r[0]) for key, runs in decode.items()}
        ours_tps, ours_tokens = best["now"]
        ours_perplexity = ours_ppl()
        print(f"hardware: {hardware()} (shared machine: numbers are noisy); load average at start "
              f"{' '.join(f'{x:.1f}' for x in load_before)}")  # fmt: skip
        print(f"model: {args.model} ({lm.config.num_params():,} params, {lm.config.family}); text: {args.text}, "
              f"{len(windows)} windows x {window} tokens; decode: prompt {len(prompt)}, {n_new} new, greedy, "
              f"batch 1, {args.threads} threads, best of {args.repeats} alternating runs")  # fmt: skip
        if args.before:
            before_tps, before_tokens = best["before"]
            print(f"slmkit fp32 before   decode {before_tps:8.1f} tokens/s   (stored layout, a one-row core on "
                  f"{args.threads} threads; same greedy tokens as now: {before_tokens == ours_tokens})")  # fmt: skip
        print(f"slmkit fp32          decode {ours_tps:8.1f} tokens/s   perplexity {ours_perplexity:.4f}")
        for dtype, path in paths.items():
            llm = LlamaCppLogits(path, n_ctx=lm.config.max_seq_len, threads=args.threads)
            total = sum(nll(llm.logits(w), w) for w in windows)
            theirs_perplexity = math.exp(total / sum(len(w) - 1 for w in windows))
            llm.close()
            theirs_tps, theirs_tokens = best[dtype]
            same = theirs_tokens == ours_tokens
            print(
                f"llama.cpp {dtype:<6}     decode {theirs_tps:8.1f} tokens/s   perplexity {theirs_perplexity:.4f}   "
                f"same greedy tokens as slmkit: {same}"
            )
            print(
                f"  ratio slmkit / llama.cpp {dtype}: decode {ours_tps / theirs_tps:.2f}x, "
                f"perplexity {ours_perplexity / theirs_perplexity:.4f}x"
            )
            if args.before:
                print(f"  ratio slmkit before / llama.cpp {dtype}: decode {before_tps / theirs_tps:.2f}x")
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    keep.cleanup()


if __name__ == "__main__":
    main()
