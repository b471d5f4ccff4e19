"""Every compression method on one model: quality, size, memory and speed, with a Pareto plot.

    python benchmarks/compress_sweep.py --model runs/quickstart --data runs/quickstart/data --out sweep/

For each method it runs `slmkit.compress.compress` (the same function as `slm compress`), which scores
the val split before and after and measures peak resident memory and decode tokens/s in a fresh process.
The peer for int8 is PyTorch's own dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic`,
in memory only: it has no file format), scored and timed in this process beside our int8 model.
Writes OUT/report.json, OUT/report.md and OUT/pareto.png (val perplexity against size on disk).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402
from slmkit.compress.pipeline import METHODS, CompressOptions, compress  # noqa: E402

SETTINGS = {
    "prune-structured": {"ffn_keep": 0.75},
    "lowrank": {"energy": 0.9},
}
# extra rows: a method with options (pass their names in --methods, or --variants to add them all)
VARIANTS = {
    "int8-dynamic": ("int8", {"activations": "dynamic"}),
    "int4-emb4": ("int4", {"embeddings": "int4"}),
    "gptq-int4-emb4": ("gptq-int4", {"embeddings": "int4"}),
}


def decode_rate(model: torch.nn.Module, new_tokens: int = 64, repeats: int = 3) -> float:
    from slmkit.infer.generate import generate_ids

    prompt = [0] * 8
    list(generate_ids(model, prompt, 4))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = len(list(generate_ids(model, prompt, new_tokens)))
        best = max(best, n / (time.perf_counter() - start))
    return best


def side_by_side(model_dir: Path, sweep_dir: Path, data_dir: Path, seq_len: int, windows: int | None) -> dict:
    """Float32, our int8 / int4 (GPTQ) and torch.ao dynamic int8, scored and timed in this one process."""
    import math

    from slmkit.checkpoint import load_model
    from slmkit.data.shards import load_data_dir
    from slmkit.eval.perplexity import token_nats

    data = load_data_dir(data_dir)
    models = {"float32": load_model(model_dir)}
    for name in ("int8", "int8-dynamic", "gptq-int4"):
        if (sweep_dir / name).is_dir():
            models[f"slmkit {name}"] = load_model(sweep_dir / name)
    models["torch.ao dynamic int8"] = torch.ao.quantization.quantize_dynamic(
        load_model(model_dir), {torch.nn.Linear}, dtype=torch.qint8
    )
    out: dict = {}
    for name, model in models.items():
        nats, count = token_nats(model, data.val, seq_len, 8, windows)
        out[name] = {"perplexity": math.exp(nats / count), "decode_tokens_per_second": decode_rate(model)}
    reference = out["torch.ao dynamic int8"]["decode_tokens_per_second"]
    for name in models:
        out[name]["decode_ratio_vs_torch_ao_int8"] = out[name]["decode_tokens_per_second"] / reference
    return out


def pareto_plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("float32", base["size_bytes"], base["perplexity"])]
    points += [(r["method"], r["after"]["size_bytes"], r["after"]["perplexity"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    frontier, best = [], float("inf")
    for _name, size, ppl in sorted(points, key=lambda p: (p[1], p[2])):
        if ppl < best:
            frontier.append((size, ppl))
            best = ppl
    for name, size, ppl in points:
        on = (size, ppl) in frontier
        ax.scatter(size / 1e6, ppl, color="tab:red" if on else "tab:blue", zorder=3)
        ax.annotate(name, (size / 1e6, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.step([s / 1e6 for s, _ in frontier], [p for _, p in frontier], where="post", color="tab:red", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log)")
    ax.set_ylabel("val perplexity")
    ax.set_title("compression methods: quality vs size (red: Pareto front)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def model_context(model: Path) -> int:
    from slmkit.checkpoint import resolve_model_dir
    from slmkit.config import ModelConfig

    return min(256, ModelConfig.load(resolve_model_dir(model) / "config.json").max_seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", action="store_true", help=f"also run {', '.join(VARIANTS)}")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=None, help="val windows scored (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--side-by-side-only", action="store_true", help="only re-time models already in --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side_by_side_only:
        peer = side_by_side(args.model, args.out, args.data, model_context(args.model), args.eval_windows)
        print(json.dumps(peer, indent=1))
        (args.out / "side_by_side.json").write_text(json.dumps(peer, indent=2) + "\n")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    base = None
    names = args.methods.split(",") + (list(VARIANTS) if args.variants else [])
    for name in names:
        method, extra = VARIANTS.get(name, (name, {}))
        options = CompressOptions(calib_samples=args.calib_samples, **SETTINGS.get(method, {}), **extra)
        target = args.out / name.replace(":", "_")
        result = compress(args.model, method, target, data=args.data, options=options, eval_windows=args.eval_windows)
        d = result.to_dict()
        d["method"] = name
        base = base or d["before"]
        b, a = d["before"], d["after"]
        d["perplexity_increase_percent"] = 100 * (a["perplexity"] / b["perplexity"] - 1)
        d["size_ratio"] = b["size_bytes"] / a["size_bytes"]
        rows.append(d)
        change = d["perplexity_increase_percent"]
        print(
            f"{name:18s} ppl {b['perplexity']:.3f} -> {a['perplexity']:.3f} ({change:+.2f}%)"
            f"  size {d['size_ratio']:.2f}x smaller"
            f"  tensors {b['weights_memory_mb']:.2f} -> {a['weights_memory_mb']:.2f} MB"
            f"  peak RSS {b['peak_memory_mb']:.0f} -> {a['peak_memory_mb']:.0f} MB"
            f"  decode {b['decode_tokens_per_second']:.0f} -> {a['decode_tokens_per_second']:.0f} tok/s",
            flush=True,
        )
    peer = side_by_side(args.model, args.out, args.data, model_context(args.model), args.eval_windows)
    print("side by side (one process):", json.dumps(peer, indent=1))
    report = {"hardware": hardware(), "model": str(args.model), "data": str(args.data), "methods": rows, "peer": peer}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"model {args.model}, val split of {args.data}; {hardware()}",
        "",
        "| method | val ppl | ppl change | bits/byte | file MB | file ratio | tensors MB | peak RSS MB "
        "| load+decode RSS MB | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    assert base is not None
    lines.append(
        f"| float32 | {base['perplexity']:.3f} | | {base['bits_per_byte']:.4f} | "
        f"{base['size_bytes'] / 1e6:.2f} | 1.00x | {base['weights_memory_mb']:.2f} | {base['peak_memory_mb']:.0f} "
        f"| {base['model_memory_mb']:.1f} | {base['decode_tokens_per_second']:.0f} |"
    )
    for d in rows:
        a = d["after"]
        lines.append(
            f"| {d['method']} | {a['perplexity']:.3f} | {d['perplexity_increase_percent']:+.2f}% | "
            f"{a['bits_per_byte']:.4f} | {a['size_bytes'] / 1e6:.2f} | {d['size_ratio']:.2f}x | "
            f"{a['weights_memory_mb']:.2f} | {a['peak_memory_mb']:.0f} | {a['model_memory_mb']:.1f} | "
            f"{a['decode_tokens_per_second']:.0f} |"
        )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    pareto_plot(rows, base, args.out / "pareto.png")
    print(f"wrote {args.out / 'report.md'}, report.json, pareto.png")


if __name__ == "__main__":
    main()
