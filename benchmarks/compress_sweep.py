"""Every compression method on one model: quality, size, memory and speed, with a Pareto plot.

    python benchmarks/compress_sweep.py --model runs/quickstart --data runs/quickstart/data --out sweep/

For each method it runs `slmkit.compress.compress` (the same function as `slm compress`), which scores
the val split before and after and measures peak resident memory and decode tokens/s in a fresh process.
The peer for int8 is PyTorch's own dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic`,
in memory only: it has no file format), scored and timed in this process beside our int8 model.
Writes OUT/report.json, OUT/report.md and OUT/pareto.png (val perplexity against size on disk).

Two more measurements, each on its own:
- `--gguf-only`: GGUF files of the float model (every quantized type) and of the compressed models already in
  OUT (int8 -> q8_0, int4 methods -> q4_1 with their own codes), read back with gguf.GGUFReader, dequantized,
  loaded into an slmkit float model and scored on val: file size and perplexity per file (OUT/gguf.json).
- `--speed-preset medium`: a random-init preset (no data needed), compressed with int8, int8 with dynamic
  activations, int4 and int4 with int4 embeddings; decode tokens/s of each in this one process (best of 5
  runs of 64 tokens) beside torch.ao dynamic int8, and a fresh-process `probe` per model (peak resident
  memory, decode rate). Writes OUT/speed.json.
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

    from slmkit.data.shards import load_data_dir
    from slmkit.eval.perplexity import token_nats
    from slmkit.interop.checkpoint import load_model

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


def gguf_state(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized tensors of a GGUF file written by slmkit, back under our names and in our layout.

    The exporter's layout (`slmkit.interop.gguf._layout`) only moves rows, so mapping a state of element numbers
    through it says where each of our weights went; the GGUF values are scattered back from there."""
    import gguf
    import numpy as np

    from slmkit.interop.gguf import _layout

    state = model.state_dict()
    ids, start = {}, 0
    for key, tensor in state.items():
        ids[key] = torch.arange(start, start + tensor.numel(), dtype=torch.float64).view(tensor.shape)
        start += tensor.numel()
    where = _layout(model.config, ids)
    flat = torch.full((start,), float("nan"), dtype=torch.float64)
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "rope_freqs.weight":  # computed from the config, not a weight
            continue
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
        flat[where[t.name].reshape(-1).long()] = torch.from_numpy(values).reshape(-1)
    out, start = {}, 0
    for key, tensor in state.items():
        out[key] = flat[start : start + tensor.numel()].view(tensor.shape).float()
        start += tensor.numel()
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    missing = [k for k, v in out.items() if bool(v.isnan().any())]
    assert not missing, f"{path}: no values for {missing[:4]}"
    return out


def gguf_sweep(model_dir: Path, sweep_dir: Path, data_dir: Path, seq_len: int, windows: int | None) -> list[dict]:
    import math

    from slmkit.data.shards import load_data_dir
    from slmkit.eval.perplexity import token_nats
    from slmkit.interop.checkpoint import load_model
    from slmkit.interop.gguf import GGUF_DTYPES, export_gguf

    data = load_data_dir(data_dir)

    def perplexity(model: torch.nn.Module) -> float:
        nats, count = token_nats(model, data.val, seq_len, 8, windows)
        return math.exp(nats / count)

    jobs = [("float32", model_dir, dtype) for dtype in GGUF_DTYPES]
    for name in sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()):
        if name.startswith("int8"):
            jobs.append((name, sweep_dir / name, "q8_0"))
        elif "int4" in name:
            jobs += [(name, sweep_dir / name, "q4_1"), (name, sweep_dir / name, "q5_1")]
    rows = []
    gguf_dir = sweep_dir / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    for label, source, dtype in jobs:
        path = export_gguf(source, gguf_dir / f"{label}-{dtype}.gguf", dtype, overwrite=True)
        model = load_model(model_dir)
        model.load_state_dict(gguf_state(path, model))
        row = {"source": label, "dtype": dtype, "file_mb": path.stat().st_size / 1e6, "perplexity": perplexity(model)}
        row["source_perplexity"] = perplexity(load_model(source))
        rows.append(row)
        print(
            f"gguf {label:16s} {dtype:5s} {row['file_mb']:6.2f} MB  ppl {row['perplexity']:.3f}"
            f" (source {row['source_perplexity']:.3f})",
            flush=True,
        )
    return rows


def speed_sweep(preset_name: str, out: Path, vocab_size: int, tokenizer_dir: Path | None) -> dict:
    from slmkit.compress.pipeline import directory_size, probe
    from slmkit.config import preset
    from slmkit.interop.checkpoint import load_model, save_model
    from slmkit.models import build_model

    out.mkdir(parents=True, exist_ok=True)
    source = out / "float32"
    if not source.exists():
        model = build_model(preset(preset_name, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0))
        model.init_weights(seed=0)
        save_model(model, source, tokenizer_dir=tokenizer_dir)
    runs = {
        "int8": ("int8", {}),
        "int8-dynamic": ("int8", {"activations": "dynamic"}),
        "int4": ("int4", {}),
        "int4-emb4": ("int4", {"embeddings": "int4"}),
    }
    for name, (method, extra) in runs.items():
        if not (out / name).exists():
            compress(source, method, out / name, options=CompressOptions(**extra), measure=False, overwrite=True)
    dirs = {"float32": source, **{name: out / name for name in runs}}
    models = {name: load_model(d) for name, d in dirs.items()}
    models["torch.ao dynamic int8"] = torch.ao.quantization.quantize_dynamic(
        load_model(source), {torch.nn.Linear}, dtype=torch.qint8
    )
    result = {}
    for name, model in models.items():
        row: dict = {"decode_tokens_per_second": decode_rate(model, 64, 5)}
        if name in dirs:
            row["file_mb"] = directory_size(dirs[name]) / 1e6
            row.update({f"probe_{k}": v for k, v in probe(dirs[name]).items()})
        result[name] = row
        print(name, json.dumps(row), flush=True)
    return result


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
    from slmkit.interop.checkpoint import resolve_model_dir
    from slmkit.interop.hf import load_config

    return min(256, load_config(resolve_model_dir(model) / "config.json").max_seq_len)


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
    parser.add_argument("--gguf-only", action="store_true", help="GGUF files of the model and of --out's models")
    parser.add_argument("--speed-preset", default=None, help="time a random-init preset instead (e.g. medium)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed_preset:
        from slmkit.interop.checkpoint import resolve_model_dir
        from slmkit.interop.hf import load_config

        source = resolve_model_dir(args.model)  # its tokenizer and vocabulary size are reused
        vocab = load_config(source / "config.json").vocab_size
        speed = speed_sweep(args.speed_preset, args.out, vocab, source)
        (args.out / "speed.json").write_text(json.dumps({"hardware": hardware(), "models": speed}, indent=2) + "\n")
        return
    if args.gguf_only:
        rows = gguf_sweep(args.model, args.out, args.data, model_context(args.model), args.eval_windows)
        (args.out / "gguf.json").write_text(json.dumps({"hardware": hardware(), "files": rows}, indent=2) + "\n")
        return
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
        result = compress(
            args.model, method, target, data=args.data, options=options, eval_windows=args.eval_windows, overwrite=True
        )
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
