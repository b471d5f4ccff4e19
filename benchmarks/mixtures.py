"""Val bits per byte on a held-out target domain at equal compute: natural vs uniform vs `mix-search`'s mixture.

    python benchmarks/mixtures.py [--work DIR] [--proxies 16] [--proxy-steps 60] [--steps 300] [--seeds 2]
        [--size 64x4] [--threads 1] [--papers shared/corpus/seed-papers.jsonl]

The corpus is built from files on this machine, one folder per domain:

* code     -- Python standard library modules (email, json, http, asyncio, logging, unittest, importlib);
* papers   -- the shared seed-papers.jsonl (titles and abstracts), when present;
* readmes  -- lm-eval-harness task READMEs (markdown: task descriptions, citations, commands) in site-packages;
* docs     -- slmkit's own docs/*.md: the target, held out of training (`--domains code,papers,readmes`).

`slm data mix-search` runs on tiny proxies (32x2, `--proxy-steps` each), then one larger model (`--size`) is trained
for the same number of steps (so the same tokens and FLOPs) on the natural mixture (train tokens of the three
domains), the uniform one and the chosen one, with `--seeds` seeds each; the score is the val bits per byte of the
docs domain (every val window). Prints a table and writes `--work/mixtures.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STDLIB_PACKAGES = ("email", "json", "http", "asyncio", "logging", "unittest", "importlib")
TRAIN_DOMAINS = ["code", "papers", "readmes"]
TARGET = "docs"


def build_corpus(work: Path, seed: Path) -> list[str]:
    sources = work / "sources"
    shutil.rmtree(sources, ignore_errors=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = sources / "code"
    for package in STDLIB_PACKAGES:
        for path in sorted((stdlib / package).glob("*.py")):
            target = code / package / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
    papers = sources / "papers.jsonl"
    if not seed.is_file():
        raise SystemExit(f"{seed} is missing: the papers domain needs it (--papers)")
    with papers.open("w") as fh:
        for line in seed.read_text().splitlines():
            record = json.loads(line)
            fh.write(json.dumps({"text": f"{record['title']}\n\n{record['abstract']}"}) + "\n")
    readmes = sources / "readmes"
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    for path in sorted(tasks.rglob("README.md")):
        target = readmes / (path.parent.relative_to(tasks).as_posix().replace("/", "__") + ".md")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
    docs = sources / "docs"
    docs.mkdir(parents=True)
    for path in sorted((ROOT / "docs").glob("*.md")):
        (docs / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return [str(code), str(papers), str(readmes), str(docs)]


def train_on(data_dir: Path, out: Path, mix: dict[str, float], args: argparse.Namespace, seed: int) -> dict:
    from slmkit.data.shards import load_data_dir
    from slmkit.scaling.shapes import shape_overrides
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import LogReporter, train

    width, depth = (int(v) for v in args.size.split("x"))
    data = load_data_dir(data_dir)
    val_tokens = data.domain(TARGET).ranges["val"][1]
    windows = math.ceil(val_tokens / args.seq_len)
    cfg = TrainConfig(
        preset="tiny",
        model=shape_overrides(width, depth, args.seq_len),
        seq_len=args.seq_len,
        batch_size=16,
        lr=3e-3,
        warmup_steps=max(1, args.steps // 10),
        schedule="cosine",
        max_steps=args.steps,
        eval_interval=10**9,
        eval_batches=math.ceil(windows / 16),  # every val window of the target
        save_interval=10**9,
        seed=seed,
        device="cpu",
        threads=args.threads,
        mix=mix,
    )
    state_file = out / "final" / "trainer_state.json"
    saved = json.loads(state_file.read_text()) if state_file.is_file() else None
    if saved is not None and saved["train_config"] == cfg.to_dict():  # an earlier invocation ran it: reuse it
        val, seconds, tokens, flops = saved["val"], saved["elapsed"], saved["tokens"], saved["flops"]
    else:
        result = train(cfg, data_dir, out, reporter=LogReporter(every=10**9), overwrite=True)
        val, seconds, tokens, flops = result.val, result.seconds, result.tokens, result.flops
    return {
        "val_bits_per_byte": val[f"val_bits_per_byte/{TARGET}"],
        "val_loss": val[f"val_loss/{TARGET}"],
        "seconds": seconds,
        "tokens": tokens,
        "flops": flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-mixtures"))
    parser.add_argument("--proxies", type=int, default=16)
    parser.add_argument("--proxy-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300, help="Steps of each compared run (same for all).")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", default="64x4", help="Shape of the compared runs, WIDTHxDEPTH.")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--papers", type=Path, default=ROOT.parent / "shared" / "corpus" / "seed-papers.jsonl", help="seed-papers.jsonl"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.scaling.mixsearch import MixSearchSettings, run_mix_search

    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = args.work / "data"
    if not (data_dir / "meta.json").is_file():
        prepare(build_corpus(args.work, args.papers), data_dir, vocab_size=2048, val_fraction=0.1, chunk_chars=2000)
    data = load_data_dir(data_dir)
    print(f"# {hardware()}")
    for d in data.domains:
        print(f"domain {d.name}: {d.ranges['train'][1]:,} train tokens, {d.ranges['val'][1]:,} val tokens")

    started = time.perf_counter()
    search = run_mix_search(
        data_dir,
        args.work / "search",
        TARGET,
        proxies=args.proxies,
        steps=args.proxy_steps,
        domains=TRAIN_DOMAINS,
        settings=MixSearchSettings(size="32x2", seq_len=args.seq_len, batch_size=16, threads=args.threads),
    )
    search_seconds = time.perf_counter() - started
    assert search.result is not None
    chosen = search.result["best"]["mix"]
    natural = search.result["natural"]["mix"]
    mixtures = {"natural": natural, "uniform": dict.fromkeys(TRAIN_DOMAINS, 1.0), "mix-search": chosen}
    print(f"mix-search ({search_seconds:.0f} s, {args.proxies} proxies x {args.proxy_steps} steps): {chosen}")
    print(f"  law {search.result['fit']['law']}, LOO RMSE {search.result['fit']['loo_rmse']:.4f}")

    runs: dict[str, list[dict]] = {name: [] for name in mixtures}
    for seed in range(args.seeds):
        for name, mix in mixtures.items():  # interleaved, so drift in machine load hits every mixture alike
            record = train_on(data_dir, args.work / "runs" / f"{name}-{seed}", mix, args, 1000 + seed)
            runs[name].append(record)
            print(f"  {name:10s} seed {seed}: {TARGET} val bpb {record['val_bits_per_byte']:.4f}")

    print(f"\n{TARGET} val bits/byte after {args.steps} steps of {args.size} (same tokens and FLOPs each):")
    print("| mixture | shares (code/papers/readmes) | val bpb, mean of seeds | per seed | mix-search minus this |")
    print("|---|---|---|---|---|")
    summary = {}
    chosen_values = [r["val_bits_per_byte"] for r in runs["mix-search"]]
    for name, mix in mixtures.items():
        total = sum(mix.values())
        shares = "/".join(f"{mix.get(d, 0) / total:.2f}" for d in TRAIN_DOMAINS)
        values = [r["val_bits_per_byte"] for r in runs[name]]
        mean = statistics.fmean(values)
        paired = [c - v for c, v in zip(chosen_values, values, strict=True)]  # same seed: same init and data order
        summary[name] = {"mix": mix, "val_bits_per_byte": values, "mean": mean, "mix_search_minus": paired}
        per_seed = ", ".join(f"{v:.4f}" for v in values)
        diffs = ", ".join(f"{d:+.4f}" for d in paired) if name != "mix-search" else "-"
        print(f"| {name} | {shares} | {mean:.4f} | {per_seed} | {diffs} |")
    report = {
        "hardware": hardware(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "search": search.result,
        "search_seconds": search_seconds,
        "runs": runs,
        "summary": summary,
    }
    (args.work / "mixtures.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.work / 'mixtures.json'}")


if __name__ == "__main__":
    main()
