"""Fine-tuning gain on a task the base model fails: write a function's docstring from its signature line.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/finetune_task.py [--base MODEL_DIR] [--work DIR]
        [--pretrain-steps 300] [--epochs 16] [--rank 16] [--test-fraction 0.15] [--threads 1]

The task is built at run time from the Python standard library (no download): every public function and method
with a docstring in a fixed list of modules (`MODULES`, walked in sorted order), as a pair

    prompt:      def name(args):\\n          (the signature line, from inspect.signature)
    completion:  First sentence of its docstring.

Duplicate signature lines are dropped (the first in walking order stays), then functions are split by a hash of
their qualified name into train (SFT samples) and held-out test; a test function whose sentence is also a train
sentence is dropped, so the test measures writing a docstring for an unseen function, not recalling one. The
split depends on the Python version's standard library (recorded in the output).

Without `--base`, the base model is trained with slmkit first, as a user would (`slm data prepare` on the paper
abstracts of ../shared/corpus/seed-papers.jsonl, then `slm train --preset micro` for `--pretrain-steps`): it has
never seen code. It is then fine-tuned twice with `slm finetune` (full, and `--lora` over all linear layers) for
the same number of epochs, and the three models are scored on the held-out functions:

- multiple choice (slmkit's task format, `slmkit.eval.tasks.evaluate_task`, the `plain` template, which is the
  fine-tuning format): the context is the signature line, the choices its docstring sentence and those of three
  other held-out functions; `acc` and `acc_norm` (per byte) with bootstrap 95% CIs. Chance is 0.25. The task file
  is written to WORK/docstring_mc.jsonl, so `slm eval MODEL --tasks WORK/docstring_mc.jsonl` reproduces it (for
  a model directory; the LoRA row needs the adapter loaded, done here in Python);
- masked loss: nats of the answer's tokens (its sentence and the end-of-text token that closes it, encoded exactly
  as `slm finetune` trains) per UTF-8 byte of the sentence, with a bootstrap 95% CI over functions (the ratio of
  sums is resampled).

A last column scores the same multiple-choice task on as many *train* functions (seen in fine-tuning): it shows
whether fine-tuning learned the mapping at all, apart from whether it generalises to unseen functions.

Results are printed as a table (and written to WORK/results.json). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# ../shared/corpus of the main checkout (a worktree under /work/wt has it two levels up)
CORPORA = [p / "shared" / "corpus" / "seed-papers.jsonl" for p in (ROOT.parent, ROOT.parent.parent)]

# Pure-Python standard-library modules (their functions have signatures inspect can read); the order is fixed.
MODULES = (
    "argparse",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bdb",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "concurrent.futures._base",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.feedparser",
    "email.header",
    "email.message",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.cookiejar",
    "imaplib",
    "importlib.metadata",
    "inspect",
    "ipaddress",
    "json",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing.pool",
    "netrc",
    "ntpath",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "pstats",
    "pyclbr",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "reprlib",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "wsgiref.handlers",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xmlrpc.client",
    "zipapp",
    "zipfile",
)
MAX_PROMPT_CHARS = 160
MIN_TARGET_CHARS, MAX_TARGET_CHARS = 12, 160


@dataclass(frozen=True)
class Item:
    """One function: where it lives, its signature line (the prompt) and its docstring's first sentence."""

    qualname: str  # module:Class.name
    prompt: str
    target: str


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None when there is none of a usable size."""
    if not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    match = re.search(r"^(.+?[.!?])(?=\s+[A-Z]|$)", text)  # not at "e.g. the"
    sentence = match.group(1) if match else text
    if not (MIN_TARGET_CHARS <= len(sentence) <= MAX_TARGET_CHARS) or ">>>" in sentence:
        return None
    return sentence


def _item(qualname: str, name: str, func: Any) -> Item | None:
    if name.startswith("_"):
        return None
    target = first_sentence(func.__doc__)
    if target is None:
        return None
    try:
        signature = str(inspect.signature(func))
    except (TypeError, ValueError):
        return None
    signature = re.sub(r" at 0x[0-9a-f]+", "", signature)  # default values' reprs hold their address
    prompt = f"def {name}{signature}:\n"
    if len(prompt) > MAX_PROMPT_CHARS or "\n" in prompt[:-1]:
        return None
    return Item(qualname, prompt, target)


def stdlib_functions(modules: tuple[str, ...] = MODULES) -> list[Item]:
    """Every public function and method with a usable docstring sentence defined in `modules`, in a fixed order
    (modules as listed, names sorted), one per distinct signature line.

    The modules are walked in a fresh interpreter: libraries loaded here may patch the standard library (importing
    torch replaces inspect.getfile and logging.shutdown), which would change the list."""
    listing = subprocess.run(
        [sys.executable, __file__, "--list-functions", ",".join(modules)], capture_output=True, text=True, check=True
    )
    return [Item(**row) for row in json.loads(listing.stdout)]


def walk_modules(modules: tuple[str, ...]) -> list[Item]:
    items: list[Item] = []
    seen: set[str] = set()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this Python lacks (recorded by the count of items)
            continue
        found: list[Item | None] = []
        for name, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                found.append(_item(f"{module_name}:{name}", name, obj))
            elif inspect.isclass(obj) and not name.startswith("_"):
                for method_name, method in sorted(vars(obj).items()):
                    if inspect.isfunction(method):
                        found.append(_item(f"{module_name}:{name}.{method_name}", method_name, method))
        for item in found:
            if item is not None and item.prompt not in seen:
                seen.add(item.prompt)
                items.append(item)
    return items


def is_test(qualname: str, test_fraction: float) -> bool:
    """Whether a function is held out: a hash of its name, so the split never depends on the walking order."""
    digest = int.from_bytes(hashlib.sha256(qualname.encode()).digest()[:8], "big")
    return digest / 2**64 < test_fraction


def split_items(items: list[Item], test_fraction: float) -> tuple[list[Item], list[Item]]:
    """(train, test) by function; test functions whose sentence is a train sentence are dropped."""
    train = [i for i in items if not is_test(i.qualname, test_fraction)]
    train_targets = {i.target for i in train}
    test = [i for i in items if is_test(i.qualname, test_fraction) and i.target not in train_targets]
    return train, test


def mc_examples(test: list[Item], seed: int = 0, distractors: int = 3) -> list[dict[str, Any]]:
    """slmkit multiple-choice examples: the signature line, its sentence and `distractors` sentences of other held-out
    functions (all different), the answer at a seeded position."""
    rng = np.random.default_rng(seed)
    examples = []
    for index, item in enumerate(test):
        others: list[str] = []
        for j in rng.permutation(len(test)):
            candidate = test[int(j)].target
            if int(j) != index and candidate != item.target and candidate not in others:
                others.append(candidate)
            if len(others) == distractors:
                break
        answer = int(rng.integers(0, len(others) + 1))
        choices = others[:answer] + [item.target] + others[answer:]
        examples.append({"context": item.prompt, "choices": choices, "answer": answer})
    return examples


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- the runs ------------------------------------------------------------------------------------------------


def slm(*args: object, env: dict[str, str]) -> None:
    """Run the CLI as a user would; its output goes to our stderr, so the table stays readable on stdout."""
    command = [sys.executable, "-m", "slmkit", *map(str, args)]
    print("$ slm " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env, stdout=sys.stderr)


def pretrain(work: Path, corpus: Path, steps: int, preset: str, env: dict[str, str]) -> Path:
    data, run = work / "abstracts", work / "base"
    if not (data / "meta.json").is_file():
        slm("data", "prepare", corpus, "--out", data, "--text-field", "abstract", "--vocab-size", 4096, env=env)
    if not (run / "final").is_dir():
        slm(
            "train", "--preset", preset, "--data", data, "--out", run, "--max-steps", steps,
            "--seq-len", 256, "--batch-size", 16, "--lr", 3e-3, "--warmup-steps", 30, "--schedule", "wsd",
            "--eval-interval", 100, "--overwrite", env=env,
        )  # fmt: skip
    return run / "final"


def steps_for(base: Path, train_file: Path, epochs: float, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(optimizer steps for `epochs` passes over the packed train rows, number of rows), as slm finetune packs them
    (its default 5% validation share included)."""
    from slmkit.data.chat import SFTData

    data = SFTData(train_file, base, seq_len, val_fraction=0.05)
    rows = len(data.train_rows)
    return max(1, math.ceil(epochs * rows / batch_size)), rows


# ---- scoring -------------------------------------------------------------------------------------------------


def ratio_ci(nats: np.ndarray, nbytes: np.ndarray, seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of sum(nats) / sum(bytes), resampling functions."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nats), size=(resamples, len(nats)))
    lo, hi = np.percentile(nats[picks].sum(1) / nbytes[picks].sum(1), [2.5, 97.5])
    return float(lo), float(hi)


def answer_loss(lm: Any, test: list[Item], batch_size: int = 32) -> dict[str, Any]:
    """Nats per answer byte on the held-out pairs, each encoded as `slm finetune` encodes a sample."""
    import torch
    import torch.nn.functional as F

    from slmkit.data.chat import DEFAULT_CHAT_TEMPLATE, IGNORE, SampleEncoder, pack
    from slmkit.data.tokenizer import eot_token_id

    encoder = SampleEncoder(lm.tokenizer, DEFAULT_CHAT_TEMPLATE)
    encoded = [encoder.encode({"prompt": i.prompt, "completion": i.target}) for i in test]
    rows = pack(encoded, max(len(e.ids) for e in encoded), eot_token_id(lm.tokenizer), packed=False)
    assert len(rows) == len(test)  # one row per function, none dropped
    nats = np.zeros(len(test))
    lm.model.eval()
    with torch.inference_mode():
        for start in range(0, len(test), batch_size):
            x = torch.from_numpy(rows.inputs[start : start + batch_size])
            y = torch.from_numpy(rows.targets[start : start + batch_size])
            logits = lm.model(x)
            flat = logits.float().reshape(-1, logits.size(-1))
            per_token = F.cross_entropy(flat, y.reshape(-1), reduction="none", ignore_index=IGNORE).reshape(y.shape)
            nats[start : start + len(x)] = (per_token * (y != IGNORE)).sum(1).double().numpy()
    nbytes = np.asarray([len(i.target.encode("utf-8")) for i in test], dtype=np.float64)
    return {"value": float(nats.sum() / nbytes.sum()), "ci95": list(ratio_ci(nats, nbytes))}


def score(lm: Any, mc_file: Path, test: list[Item], seen_file: Path) -> dict[str, Any]:
    from slmkit.eval.tasks import evaluate_task, load_task

    def mc(path: Path) -> dict[str, Any]:
        result = evaluate_task(lm, load_task(path), templates=["plain"], batch_size=16)
        return {k: {"value": v["mean"], "ci95": v["ci95"]} for k, v in result["metrics"].items()}

    seen = mc(seen_file)["acc_norm"]
    return {**mc(mc_file), "nats_per_byte": answer_loss(lm, test), "seen_acc_norm": seen}


def load_variant(base: Path, run: Path | None, adapter: bool) -> Any:
    from slmkit.loading import load

    if run is None:
        return load(base)
    if not adapter:
        return load(run / "final")
    from slmkit.interop.adapters import load_adapter

    lm = load(base)
    load_adapter(lm.model, run / "final")
    return lm


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--list-functions":  # stdlib_functions' fresh interpreter
        print(json.dumps([asdict(i) for i in walk_modules(tuple(sys.argv[2].split(",")))]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="Model dir to fine-tune (default: pretrain one on the abstracts).")
    parser.add_argument("--work", type=Path, default=Path("runs/ft-bench-task"), help="Where data and runs go.")
    default_corpus = next((p for p in CORPORA if p.is_file()), CORPORA[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus, help="JSONL of papers (`abstract` field).")
    parser.add_argument("--preset", default="micro", help="Preset of the pretrained base (without --base).")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="Optimizer steps of 16 x 256 tokens.")
    parser.add_argument("--epochs", type=float, default=16.0, help="Passes over the train rows, each fine-tuning.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in every slm command.")
    parser.add_argument("--rerun", action="store_true", help="Fine-tune again even if the runs exist.")
    args = parser.parse_args()

    import torch

    from _common import hardware

    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train, test = split_items(stdlib_functions(), args.test_fraction)
    train_file, mc_file = work / "docstrings_train.jsonl", work / "docstring_mc.jsonl"
    write_jsonl([{"prompt": i.prompt, "completion": i.target} for i in train], train_file)
    write_jsonl(mc_examples(test), mc_file)
    # a check that fine-tuning learned the mapping at all: the same task on as many *train* functions
    seen_file = work / "docstring_mc_seen.jsonl"
    write_jsonl(mc_examples(train[:: max(1, len(train) // len(test))][: len(test)]), seen_file)
    write_jsonl([asdict(i) for i in test], work / "docstrings_test.jsonl")
    print(f"# {hardware()}")
    print(f"# Python {platform.python_version()} stdlib: {len(train)} train / {len(test)} held-out functions")

    base = args.base if args.base is not None else pretrain(work, args.corpus, args.pretrain_steps, args.preset, env)
    steps, rows = steps_for(base, train_file, args.epochs, args.batch_size, args.seq_len)
    common = [
        "--data", train_file, "--max-steps", steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
        "--warmup-steps", max(1, steps // 10), "--eval-interval", max(1, steps // 4), "--save-interval", 10**6,
        "--overwrite",
    ]  # fmt: skip
    runs = {
        "full": (work / "full", ["--lr", args.full_lr]),
        "lora": (work / "lora", ["--lora", "--rank", args.rank, "--alpha", 2 * args.rank,
                                 "--target-modules", "all-linear", "--lr", args.lora_lr]),
    }  # fmt: skip
    for run, extra in runs.values():
        if args.rerun or not (run / "final").is_dir():
            slm("finetune", base, "--out", run, *common, *extra, env=env)
    variants = {
        "base": (None, False),
        "full FT": (runs["full"][0], False),
        f"LoRA r={args.rank}": (runs["lora"][0], True),
    }
    results = {
        name: score(load_variant(base, run, adapter), mc_file, test, seen_file)
        for name, (run, adapter) in variants.items()
    }

    print(f"# base {base}; fine-tuning: {steps} steps x {args.batch_size} rows of {args.seq_len} tokens "
          f"({args.epochs:g} epochs of {rows} packed rows); LoRA all-linear, alpha = 2r")  # fmt: skip
    print(f"# held-out: {len(test)} functions; multiple choice with 4 choices (chance 0.25), bootstrap 95% CIs")
    print("| model | MC acc | MC acc_norm | answer nats/byte | MC acc_norm, train functions |\n|---|---|---|---|---|")
    for name, r in results.items():
        keys = ("acc", "acc_norm", "nats_per_byte", "seen_acc_norm")
        cells = [f"{r[k]['value']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"# {time.perf_counter() - started:.0f} s in all")
    summary = {"python": platform.python_version(), "train": len(train), "test": len(test), "steps": steps}
    (work / "results.json").write_text(json.dumps({**summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
