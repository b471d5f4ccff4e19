"""`slm build --budget M` against the quickstart recipe given the same M minutes, on `builtin:pystdlib`.

Both arms use one prepared corpus (the quickstart's: 4096-token BPE, 5% val split). The build arm runs the whole
`slmkit.build.pipeline.build` (measure, ladder, plan, train, compress when a target asks, verify, ship) within M
minutes of wall time; the quickstart arm trains its `micro` preset for M minutes of training time (its recipe:
AdamW, wsd schedule, lr 3e-3, batch 16 x 256), which is more training time than the build gets, since the build
spends part of its budget on planning and checking. Then, in this one run, both models are scored the same way:

- held-out bits per byte on the whole val split (`eval.perplexity.evaluate_text`), each model at the sequence length
  it trained at (its run's train_config.json; not its config's max_seq_len: `micro` allows 512 positions but the
  quickstart trains at 256, and scored at 512 it is 6% worse), and both at the shorter of the two;
- decode latency at batch 1 (`eval.efficiency.measure_in_subprocess`: the median of three fresh processes per
  model, same settings; one process's figure varies by ~5% run to run);
- for the build: the planner's predicted val loss and interval against the loss measured after training.

    PYTHONPATH=src python benchmarks/build_vs_quickstart.py --minutes 10 --threads 2   # the issue's benchmark
    PYTHONPATH=src python benchmarks/build_vs_quickstart.py --minutes 10 --threads 2 --max-latency quickstart
    PYTHONPATH=src python benchmarks/build_vs_quickstart.py --minutes 2 --threads 1    # a short check
    PYTHONPATH=src python benchmarks/build_vs_quickstart.py --minutes 10 --threads 2 --max-latency quickstart \
        --mixer auto   # the build plans the transformer, the hybrid and the mixture of experts

`--fit LADDER` plans on an `slm ladder` run beforehand (on the quickstart's data dir: `--reuse-quickstart` keeps it)
instead of a ladder inside the build's budget; its cost is not in the build's wall time, so say so with a figure.

`--max-latency quickstart` gives the build the quickstart model's own decode latency, measured in this run with
the instrument of the table below, as its target: the goal's "better bpb at equal or lower latency" asked of the
planner directly.

Wall-clock figures are only comparable on an otherwise idle machine: load averages are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import hardware

LATENCY_PROCESSES = 3


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="budget of each arm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both arms")
    parser.add_argument(
        "--max-latency",
        default=None,
        help="the build's --max-latency (e.g. 5ms), or 'quickstart': the quickstart model's decode latency here",
    )
    parser.add_argument("--max-size", default=None, help="the build's --max-size (e.g. 2MB)")
    parser.add_argument("--mixer", default="attention", help="the build's --mixer (e.g. auto: attention, hybrid, moe)")
    parser.add_argument(
        "--fit",
        type=Path,
        nargs="+",
        default=None,
        help="the build's --fit: plan on these `slm ladder` dirs (run beforehand on the quickstart's data dir) "
        "instead of a ladder within the budget",
    )
    parser.add_argument(
        "--reuse-quickstart",
        action="store_true",
        help="with --work: reuse the quickstart arm a stopped run of this benchmark finished there (its summary.json)",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="with --work: train nothing; score the two arms a finished run of this benchmark left there",
    )
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console

    from slmkit.build.options import BuildRequest, parse_latency, parse_size
    from slmkit.build.pipeline import build, summary_lines
    from slmkit.eval.efficiency import measure_in_subprocess
    from slmkit.eval.perplexity import evaluate_text
    from slmkit.loading import load as load_model
    from slmkit.quickstart import run_quickstart

    work = args.work or Path(tempfile.mkdtemp(prefix="build-vs-quickstart-"))
    console = Console(stderr=True, highlight=False)
    print(f"hardware: {hardware()}; work dir {work}")
    print(f"load average at start: {load()}")

    # quickstart first: it prepares the shared corpus into work/quickstart/data
    start = time.perf_counter()
    summary = work / "quickstart" / "summary.json"
    if args.score_only and not (summary.is_file() and (work / "build" / "build.json").is_file()):
        raise SystemExit(f"error: --score-only needs a finished run of this benchmark in --work {work}")
    if (args.reuse_quickstart or args.score_only) and summary.is_file():
        quick = json.loads(summary.read_text())
        quick_wall = quick["total_seconds"]
        print(f"quickstart arm reused from {summary} (trained {quick['train_seconds'] / 60:.2f} min)")
    else:
        quick = run_quickstart(work / "quickstart", minutes=args.minutes, console=console)
        quick_wall = time.perf_counter() - start
    load_after_quick = load()
    data_dir = Path(quick["data_dir"])

    efficiency = {"prompt_tokens": 32, "new_tokens": 64, "batch_size": 1, "repeats": 3}
    if args.threads:
        efficiency["threads"] = args.threads

    def decode_ms(directory: Path, first: dict | None = None) -> float:
        """Batch-1 decode ms/token: the median of LATENCY_PROCESSES fresh processes (one varies by ~5%)."""
        runs = [first] if first else []
        runs += [measure_in_subprocess(directory, **efficiency) for _ in range(LATENCY_PROCESSES - len(runs))]
        return statistics.median(r["decode_ms_per_token"] for r in runs)

    max_latency = None
    if args.score_only:
        pass  # the rescored run's target is in its build.json
    elif args.max_latency == "quickstart":
        max_latency = decode_ms(Path(quick["model_dir"]))
        print(
            f"build target: --max-latency {max_latency:.3f}ms (the quickstart model's decode latency here, the median "
            f"of {LATENCY_PROCESSES} fresh processes)"
        )
    elif args.max_latency:
        max_latency = parse_latency(args.max_latency)

    request = BuildRequest(
        data=[str(data_dir)],
        budget_seconds=args.minutes * 60,
        max_latency_ms=max_latency,
        max_size_bytes=parse_size(args.max_size) if args.max_size else None,
        threads=args.threads,
        fit=[str(p) for p in args.fit or []],
        mixer=args.mixer,
    )
    start = time.perf_counter()
    if args.score_only:
        state = json.loads((work / "build" / "build.json").read_text())
        max_latency = state["request"].get("max_latency_ms")
        build_wall = sum(v["seconds"] for v in state["stages"].values())  # its spend clock (not the wall)
    else:
        state = build(request, work / "build", overwrite=True, console=console)
        build_wall = time.perf_counter() - start
    load_after_build = load()
    for line in summary_lines(state):
        print(line)

    arms = (
        ("slm build", work / "build" / "model", work / "build" / "work" / "run"),
        ("quickstart", Path(quick["model_dir"]), Path(quick["run_dir"])),
    )
    trained_len = {name: json.loads((run / "train_config.json").read_text())["seq_len"] for name, _, run in arms}
    common = min(trained_len.values())
    rows = {}
    for name, directory, _ in arms:
        lm = load_model(directory)
        score = evaluate_text(lm, data_dir, split="val", seq_len=trained_len[name], batch_size=16)
        at_common = evaluate_text(lm, data_dir, split="val", seq_len=common, batch_size=16)
        eff = measure_in_subprocess(directory, **efficiency)
        eff["decode_ms_per_token"] = decode_ms(directory, eff)
        rows[name] = {
            "seq_len": trained_len[name],
            "bits_per_byte": score.bits_per_byte,
            "bits_per_byte_common": at_common.bits_per_byte,
            "decode_ms_per_token": eff["decode_ms_per_token"],
            "params": eff["params"],
            "weights_bytes": eff["weights_bytes"],
            "context": lm.config.max_seq_len,
        }
    load_at_end = load()

    plan = state["plan"]
    trained = state["stages"]["train"]["steps"]
    low, high = plan["loss_interval"]
    actual = trained["evaluate"]["val_loss"]
    print()
    print(
        f"| arm ({args.minutes:g} min each) | trained at | val bits/byte there | val bits/byte at {common} | "
        "decode ms/token (batch 1) | parameters | weights MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['seq_len']} | {r['bits_per_byte']:.4f} | {r['bits_per_byte_common']:.4f} | "
            f"{r['decode_ms_per_token']:.2f} | {r['params']:,} | {r['weights_bytes'] / 1e6:.2f} |"
        )
    b, q = rows["slm build"], rows["quickstart"]
    print(
        f"ratios build / quickstart: bits/byte {b['bits_per_byte'] / q['bits_per_byte']:.3f} (each at its trained "
        f"length), {b['bits_per_byte_common'] / q['bits_per_byte_common']:.3f} (both at {common}); "
        f"decode latency {b['decode_ms_per_token'] / q['decode_ms_per_token']:.2f}"
    )
    print(
        f"planner: predicted val loss {plan['predicted_loss']:.4f} ({plan['ci_level']:.0%} interval {low:.4f}-"
        f"{high:.4f}), measured {actual:.4f}: {'inside' if low <= actual <= high else 'OUTSIDE'} the interval"
    )
    for family in plan.get("families") or []:
        low_f, high_f = family["loss_interval"]
        print(
            f"family {family['mixer']}: {family['width']}x{family['depth']} ({family['params']:,} non-embedding "
            f"parameters), {family['tokens']:,} tokens, predicted {family['predicted_loss']:.4f} "
            f"[{low_f:.4f}-{high_f:.4f}]"
        )
    print(
        f"wall time: build {build_wall / 60:.2f} min for a {args.minutes:g} min budget "
        f"({build_wall / (args.minutes * 60):.0%}); quickstart {quick_wall / 60:.2f} min "
        f"(training {args.minutes:g} min + data + evaluation + samples)"
    )
    print(f"load averages: after quickstart {load_after_quick}; after build {load_after_build}; end {load_at_end}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "minutes": args.minutes,
                    "threads": args.threads,
                    "max_latency_ms": max_latency,
                    "arms": rows,
                    "plan": {"predicted_loss": plan["predicted_loss"], "interval": [low, high], "actual": actual},
                    "build_wall_seconds": build_wall,
                    "build_stage_seconds": {k: v["seconds"] for k, v in state["stages"].items()},
                    "load": [load_after_quick, load_after_build, load_at_end],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
