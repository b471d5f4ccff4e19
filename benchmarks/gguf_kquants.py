"""GGUF file types side by side in llama.cpp: size, bits per weight, perplexity and logit error against the f32 file.

    python benchmarks/gguf_kquants.py --model runs/x/final --data data/ [--dtypes f32 q8_0 q4_0 q4_k_m q5_k_m]

Each dtype is exported with `slmkit.interop.gguf.export_gguf` and run by llama.cpp (the prebuilt xllamacpp wheel,
libllama's logits through tests/llamacpp_peer.py, f32 KV cache) on the same token windows of the data dir's
held-out split (val.bin): perplexity, and the RMS and max gap of its logits to llama.cpp's on the f32 file. Also
printed: slmkit's own fp32 perplexity on those windows, each file's tensor types and the relative RMS error of the
layers' matrices as written (the output head and embedding aside, whose type differs between file types). Quality
figures only, no timings. Needs xllamacpp; exits with code 2 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # llamacpp_peer: the same peer the tests use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model dir with tokenizer.json")
    parser.add_argument("--data", required=True, help="data dir of `slm data prepare` (its val.bin is scored)")
    parser.add_argument("--dtypes", nargs="+", default=["f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m"])
    parser.add_argument("--window", type=int, default=128, help="tokens per perplexity window")
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from llamacpp_peer import LlamaCppLogits, available

    if not available():
        print("xllamacpp is not installed (`pip install xllamacpp`; the Makefile pins it)", file=sys.stderr)
        sys.exit(2)

    import gguf
    import numpy as np
    import torch

    from slmkit.interop.checkpoint import load_model
    from slmkit.interop.gguf import export_gguf, gguf_tensors

    torch.set_num_threads(args.threads)
    logging.getLogger("slmkit.interop.gguf").setLevel(logging.ERROR)  # the per-tensor fallback notes
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    ids = np.fromfile(Path(args.data) / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    w = args.window
    windows = [ids[i : i + w].tolist() for i in range(0, len(ids) - w + 1, w)][: args.max_windows]
    model = load_model(args.model).eval()
    n_params = sum(p.numel() for p in model.parameters())
    weights = {n: t.numpy() for n, t in gguf_tensors(model).items() if n.startswith("blk.") and t.dim() >= 2}

    def nll(logits: np.ndarray, window: list[int]) -> float:
        logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
        return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()

    with torch.no_grad():
        ours = [model(torch.tensor([x]))[0].double().numpy() for x in windows]
    tokens = sum(len(x) - 1 for x in windows)
    ppl_ours = math.exp(sum(nll(lo, x) for lo, x in zip(ours, windows, strict=True)) / tokens)
    print(f"model {args.model}: {n_params:,} parameters; {len(windows)} windows x {w} tokens of {args.data}/val.bin")
    print(f"slmkit fp32 perplexity {ppl_ours:.4f}")
    print(f"{'dtype':8} {'file MB':>8} {'bits/param':>10} {'llama.cpp ppl':>13} {'vs f32 file':>11} "
          f"{'logit RMS gap':>13} {'max gap':>8} {'blk weight err':>14}  tensor types")  # fmt: skip
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            path = export_gguf(args.model, Path(tmp) / f"{dtype}.gguf", dtype)
            reader = gguf.GGUFReader(path)
            counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
            # relative RMS error of the blocks' matrices (the head and embedding aside): sqrt(sum err^2 / sum w^2)
            err = sum(
                float(((gguf.quants.dequantize(t.data, t.tensor_type) - weights[t.name]) ** 2).sum())
                for t in reader.tensors
                if t.name in weights
            )
            rel = math.sqrt(err / sum(float((w**2).sum()) for w in weights.values()))
            llm = LlamaCppLogits(path, n_ctx=w, threads=args.threads)
            logits = [llm.logits(x) for x in windows]
            llm.close()
            ppl = math.exp(sum(nll(lo, x) for lo, x in zip(logits, windows, strict=True)) / tokens)
            if reference is None:
                reference = (logits, ppl)
            gaps = np.concatenate([(a - b).ravel() for a, b in zip(logits, reference[0], strict=True)])
            size = path.stat().st_size
            kinds = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
            print(
                f"{dtype:8} {size / 1e6:8.3f} {size * 8 / n_params:10.2f} {ppl:13.4f} {ppl / reference[1] - 1:+10.3%} "
                f"{np.sqrt((gaps**2).mean()):13.4f} {np.abs(gaps).max():8.4f} {rel:14.5f}  {kinds}"
            )
    print(f"(gaps and 'vs f32 file' are against the first dtype, {args.dtypes[0]}; blk weight err: relative RMS error")
    print(" of the layers' matrices, sqrt(sum err^2 / sum w^2), the head and embedding aside)")


if __name__ == "__main__":
    main()
