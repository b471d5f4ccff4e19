"""The same model in slmkit and in llama.cpp (the prebuilt xllamacpp wheel, on our GGUF export).

    python benchmarks/llamacpp_compare.py --model runs/quickstart --text data/val.txt [--dtypes f32 q8_0 q4_k_m]

For each GGUF dtype: batch-1 greedy decode tokens/s (llama.cpp's in-process llama-server, its own
`predicted_per_second` timing, vs slmkit fp32) and the perplexity of each on the same token windows of --text
(llama.cpp's logits through libllama's C API, f32 KV cache; tests/llamacpp_peer.py). Printed ratios: ours /
theirs. Needs xllamacpp (`make install` pins it; `pip install xllamacpp`, a prebuilt wheel, no build); exits
with a message otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # llamacpp_peer: the same peer the tests use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="slmkit / Hugging Face model dir with tokenizer.json")
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

    ours_tps, ours_tokens = max((ours_decode() for _ in range(2)), key=lambda r: r[0])
    ours_perplexity = ours_ppl()
    print(f"hardware: {hardware()} (shared machine: numbers are noisy)")
    print(f"model: {args.model} ({lm.config.num_params():,} params, {lm.config.family}); text: {args.text}, "
          f"{len(windows)} windows x {window} tokens; decode: prompt {len(prompt)}, {n_new} new, greedy, batch 1, "
          f"{args.threads} threads")  # fmt: skip
    print(f"slmkit fp32          decode {ours_tps:8.1f} tokens/s   perplexity {ours_perplexity:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            path = export_gguf(lm.directory, Path(tmp) / f"model-{dtype}.gguf", dtype)
            llm = LlamaCppLogits(path, n_ctx=lm.config.max_seq_len, threads=args.threads)
            total = sum(nll(llm.logits(w), w) for w in windows)
            theirs_perplexity = math.exp(total / sum(len(w) - 1 for w in windows))
            llm.close()
            runs = [llama_server_greedy(path, prompt, n_new, lm.config.max_seq_len, args.threads) for _ in range(2)]
            theirs_tokens, theirs_tps = max(runs, key=lambda r: r[1])
            same = theirs_tokens == ours_tokens
            print(
                f"llama.cpp {dtype:<6}     decode {theirs_tps:8.1f} tokens/s   perplexity {theirs_perplexity:.4f}   "
                f"same greedy tokens as slmkit: {same}"
            )
            print(
                f"  ratio slmkit / llama.cpp {dtype}: decode {ours_tps / theirs_tps:.2f}x, "
                f"perplexity {ours_perplexity / theirs_perplexity:.4f}x"
            )


if __name__ == "__main__":
    main()
