"""Quantized CPU decode vs float, side by side in one run, printed as ratios.

    python benchmarks/quant_decode.py                                   # presets base (~60M) and 124m, 2 threads
    python benchmarks/quant_decode.py --presets base --threads 1,2 --ppl-minutes 0   # speed only
    python benchmarks/quant_decode.py --presets "" --ppl-minutes 0 --shapes --threads 1   # per-matrix kernels

Shapes (--shapes): milliseconds per matmul of each candidate for the block and head matrices of `base` and `124m`
at 1 row (decode) and 16-512 rows (prefill); weights rotated through copies larger than the L3 cache, as a
model's layers are; min and median of the calls in ~0.4 s. This is what the per-case choice in
`slmkit.models.quantized` rests on.

Speed: batch-1 greedy decode tokens/s (decode steps only, prefill excluded; best of --repeats runs, the variants
interleaved so that load changes on a shared machine hit all alike) of a random-init model of each preset in
float32, int8 weight-only and int4 group-wise (round-to-nearest, default group sizes; embeddings and the tied
head int8 rows, as `slm compress` writes them), through the decode core users run. `int8 widen` is int8 with the
CPU kernels off (`dequantized_matmuls()`: each layer widens its int8 weight for F.linear, the path before the
kernels). The 1-minute load average is printed next to each figure: the machine may be shared.

Quality: a `micro` model trained for --ppl-minutes on held-out-split text (../shared/corpus/seed-papers.jsonl
when present, else builtin:pystdlib), quantized to int8 and int4, and scored on its val split with the kernels
and with the dequantized reference; `int8 kernel` scores with the int8 kernel on every matmul (it normally takes
only decode-sized inputs, so scoring windows would otherwise never reach it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.models import build_model, quantized  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "seed-papers.jsonl"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def random_model(name: str) -> torch.nn.Module:
    cfg = preset(name, eos_token_id=None)  # no early stop: every run makes n tokens
    model = build_model(cfg)
    model.init_weights(0)
    return model.eval()


def quantize_in_memory(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """What `slm compress --method int8|int4` writes, loaded as `load_model` loads it, without the disk trip."""
    from slmkit.compress.quantize import QuantOptions, quantize_model

    state, spec = quantize_model(model, QuantOptions(bits=bits), None)
    config = model.config.replace(extra={**model.config.extra, quantized.SPEC_KEY: spec})
    return quantized.load_compressed(Path("<memory>"), config, state, "cpu", None)


def decode_rate(model: torch.nn.Module, prompt: list[int], new_tokens: int, reference: bool) -> float:
    from slmkit.infer.core import decode_greedy

    if reference:
        with quantized.dequantized_matmuls():
            _, stats = decode_greedy(model, [prompt], new_tokens)
    else:
        _, stats = decode_greedy(model, [prompt], new_tokens)
    return stats.decode_forwards / stats.decode_seconds


def section_speed(args: argparse.Namespace) -> None:
    threads = [int(t) for t in args.threads.split(",")]
    for name in args.presets.split(","):
        t0 = time.perf_counter()
        fp32 = random_model(name)
        variants = {
            "float32": (fp32, False),
            "int8": (quantize_in_memory(fp32, 8), False),
            "int8 widen": None,
            "int4": (quantize_in_memory(fp32, 4), False),
        }
        variants["int8 widen"] = (variants["int8"][0], True)
        params = sum(p.numel() for p in fp32.parameters())
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, fp32.config.vocab_size, (args.prompt_len,), generator=gen)
        built = time.perf_counter() - t0
        print(f"\n## {name} ({params / 1e6:.1f}M parameters), batch 1, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, best of {args.repeats} (models built in {built:.0f} s)")  # fmt: skip
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for model, reference in variants.values():  # warm-up (first-call allocations)
                decode_rate(model, prompt.tolist(), 4, reference)
            rates: dict[str, list[float]] = {key: [] for key in variants}
            loads: list[float] = []
            for _ in range(args.repeats):
                for key, (model, reference) in variants.items():
                    rates[key].append(decode_rate(model, prompt.tolist(), args.new_tokens, reference))
                    loads.append(os.getloadavg()[0])
            best = {key: max(values) for key, values in rates.items()}
            print(f"threads {n_threads} (1-min load {min(loads):.1f}-{max(loads):.1f}):")
            for key, rate in best.items():
                runs = " / ".join(f"{r:.1f}" for r in rates[key])
                print(f"  {key:11s} {rate:8.1f} tokens/s  {rate / best['float32']:5.2f}x float32   (runs {runs})")


def _shape_row(x: torch.Tensor, layers: list, timing, slow: bool) -> list[str]:
    """One row count's timings: float32 | int8 widen, kernel fp32, kernel bf16, W8A8 | int4 fp32, bf16, unpack.
    The kernels' fp32 versions (scalar loops, 25-120 ms a call at 16 rows) only where `slow`."""
    import torch.nn.functional as F

    int8s = [m for _, m, _, _ in layers]
    int4s = [m for _, _, m, _ in layers]
    out = [timing([lambda w=w: F.linear(x, w) for w, *_ in layers])]
    with torch.no_grad():
        with quantized.dequantized_matmuls():
            out.append(timing([lambda m=m: m(x) for m in int8s]))
        int8_mm = torch.ops.aten._weight_int8pack_mm
        fp32 = [lambda m=m: int8_mm(x, m.qweight, m.scales) for m in int8s]
        out.append(timing(fp32) if slow else "-")
        out.append(timing([lambda m=m: m._kernel_matmul(x) for m in int8s]))
        out.append(timing([lambda m=m: m(x) for *_, m in layers]))
        int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        fp32 = [lambda m=m: int4_mm(x, m.qweight, m.group_size, m.scales_and_zeros) for m in int4s]
        out.append(timing(fp32) if slow else "-")
        out.append(timing([lambda m=m: m(x) for m in int4s]))
        with quantized.dequantized_matmuls():
            out.append(timing([lambda m=m: m(x) for m in int4s]) if x.shape[0] > 1 else "-")
    return out


def section_shapes(args: argparse.Namespace) -> None:
    import statistics
    import warnings

    from slmkit.compress.quantize import int4_rtn, int8_quantize

    def timing(calls: list) -> str:
        for call in calls[:2]:
            call()
        times, i, end = [], 0, time.perf_counter() + 0.4
        while time.perf_counter() < end or len(times) < 6:
            start = time.perf_counter()
            calls[i % len(calls)]()
            times.append(time.perf_counter() - start)
            i += 1
        return f"{1e3 * min(times):.3f}/{1e3 * statistics.median(times):.3f}"

    shapes = [(640, 640), (1728, 640), (640, 1728), (8192, 640), (768, 768), (2048, 768), (768, 2048), (50304, 768)]
    rows_list = [int(r) for r in args.shape_rows.split(",")]
    for n_threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n_threads)
        print(f"\n## per matrix, ms min/median, {n_threads} thread(s) ({load()})")
        print("rows N x K: float32 | int8: widen, kernel fp32 in (old opt-in), kernel bf16 in (now), W8A8 dynamic | "
              "int4: kernel fp32 in (before), kernel bf16 in (now), unpack+F.linear")  # fmt: skip
        for n, k in shapes:
            copies = max(1, math.ceil(80e6 / (n * k * 4)))
            layers = []
            for c in range(copies):
                gen = torch.Generator().manual_seed(c)
                w = torch.randn(n, k, generator=gen) * 0.02
                l8 = quantized.Int8Linear(k, n)
                codes, scales = int8_quantize(w)
                l8.load_state_dict({"qweight": codes, "scales": scales}, assign=True)
                group = 128 if k % 128 == 0 else 64
                l4 = quantized.Int4Linear(k, n, group)
                c4, s4, z4 = int4_rtn(w, group)
                l4.load_state_dict({"qweight": quantized.pack_int4(c4), "scales": s4.half(), "zeros": z4.half()})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dyn = quantized.Int8Linear(k, n)
                    dyn.load_state_dict({"qweight": codes, "scales": scales}, assign=True)
                    dyn.prepack_dynamic()
                layers.append((w, l8, l4, dyn))
            for rows in rows_list:
                if n > 10_000 and rows > 1:
                    continue  # the head scores the last position only
                out = _shape_row(torch.randn(rows, k), layers, timing, slow=rows == 1 and n < 10_000)
                print(f"{rows:4d} {n:5d} x {k:4d}: {out[0]} | {', '.join(out[1:5])} | {', '.join(out[5:])}", flush=True)


def section_quality(args: argparse.Namespace) -> None:
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import load_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train
    from slmkit.train.validation import token_nats

    work = Path(args.work or tempfile.mkdtemp(prefix="quant_decode_"))
    data_dir = work / "data"
    if not (data_dir / "meta.json").exists():
        source = str(CORPUS) if CORPUS.is_file() else "builtin:pystdlib"
        field = "abstract" if CORPUS.is_file() else "text"  # seed-papers.jsonl: title + abstract per line
        prepare([source], data_dir, vocab_size=4096, val_fraction=0.1, text_field=field)
    data = load_data_dir(data_dir)
    run = work / "run"
    if not (run / "final").exists():
        cfg = TrainConfig(
            preset="micro", seq_len=128, batch_size=16, lr=3e-3, warmup_steps=20, max_minutes=args.ppl_minutes,
            eval_interval=10_000, save_interval=100_000, device="cpu", threads=max(1, torch.get_num_threads()),
        )  # fmt: skip
        result = train(cfg, data_dir, run, overwrite=True)
        print(f"\n(micro trained: {result.step} steps, {result.tokens:,} tokens, val loss {result.val_loss})")
    dirs = {"float32": run / "final"}
    for method in ("int8", "int4"):
        dirs[method] = work / method
        if not dirs[method].exists():
            compress(run / "final", method, dirs[method], options=CompressOptions(), measure=False)
    source_name = CORPUS.name if CORPUS.is_file() else "builtin:pystdlib"
    print(f"\n## perplexity, micro trained {args.ppl_minutes} min on {source_name}: val split, "
          f"{len(data.val):,} tokens, windows of 128 ({load()})")  # fmt: skip

    def ppl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            nats, count = token_nats(model, data.val, 128, 8, None)
        return math.exp(nats / count)

    base = ppl(load_model(dirs["float32"]))
    rows = [("float32", base)]
    for method in ("int8", "int4"):
        model = load_model(dirs[method])
        with quantized.dequantized_matmuls():
            rows.append((f"{method} dequantized (reference)", ppl(model)))
        saved = quantized.INT8_KERNEL_MAX_ROWS, quantized.NATIVE_INT8_MAX_ROWS
        # every matmul through the int8 kernel (the native one where it is built, else torch's)
        quantized.INT8_KERNEL_MAX_ROWS = quantized.NATIVE_INT8_MAX_ROWS = 1 << 30
        try:
            rows.append((f"{method} kernel", ppl(model)))
        finally:
            quantized.INT8_KERNEL_MAX_ROWS, quantized.NATIVE_INT8_MAX_ROWS = saved
    for label, value in rows:
        change = "" if label == "float32" else f"  {100 * (value / base - 1):+.3f}% vs float32"
        print(f"  {label:28s} {value:9.4f}{change}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="base,124m")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-minutes", type=float, default=2.0, help="training budget of the micro model; 0: skip")
    parser.add_argument("--shapes", action="store_true", help="per-matrix timings of every candidate kernel")
    parser.add_argument("--shape-rows", default="1,16,64,256,512")
    parser.add_argument("--work", default=None, help="dir for the data, the trained model and its compressions")
    args = parser.parse_args()
    print(f"# quantized decode vs float ({hardware()}); {load()}")
    if args.shapes:
        section_shapes(args)
    if args.presets:
        section_speed(args)
    if args.ppl_minutes > 0:
        section_quality(args)
    print(f"\n({load()} at the end)")


if __name__ == "__main__":
    main()
