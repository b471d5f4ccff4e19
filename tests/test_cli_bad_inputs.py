"""Every `slm` command, given bad input, ends in one `error:` line on stderr and exit code 2, no traceback.

The command list comes from the typer app itself: a new command without rows here fails
`test_every_command_has_rows`. Rows about output paths (--out, --overwrite) live with those features.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer.main

from slmkit.cli import app, run

MIN_ROWS = 2

# argv templates; {name} is replaced with a path from the `paths` fixture
ROWS: dict[str, list[list[str]]] = {
    "train": [
        ["train", "--data", "{missing}", "--out", "{tmp}/r1", "--max-steps", "1"],
        ["train", "--data", "{data}", "--out", "{tmp}/r2", "--config", "{seed_abc_yaml}"],
        ["train", "--data", "{data}", "--out", "{tmp}/r3", "--config", "{nan_warmup_yaml}"],
        ["train", "--data", "{data}", "--out", "{tmp}/r4", "--max-steps", "1", "--device", "tpu"],
        ["train", "--data", "{data}", "--out", "{tmp}/r5", "--max-steps", "1", "--set", "n_layers=5000"],
        ["train", "--data", "{data}", "--out", "{tmp}/r6", "--max-steps", "-1"],
        ["train", "--data", "{data}", "--out", "{tmp}/r8", "--max-steps", "1", "--optimizer", "sgd"],
        ["train", "--data", "{data}", "--out", "{corrupt_run}", "--resume"],
        ["train", "--data", "{data}", "--out", "{tmp}/r7", "--bogus-option"],
    ],
    "generate": [
        ["generate", "{missing}", "--prompt", "hi"],
        ["generate", "{corrupt_model}", "--prompt", "hi"],
        ["generate", "{huge_context_model}", "--prompt", "hi"],
        ["generate", "{model}", "--prompt", "caf\udce9"],  # argv that was not UTF-8 (surrogate escapes)
        ["generate", "{model}", "--prompts-file", "{binary}"],
        ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "-1"],
        ["generate", "{model}", "--prompt", "hi", "--device", "tpu"],
        ["generate", "{model}", "--prompt", "hi", "--speculate", "tree", "--tree-widths", "4,x"],
        ["generate", "{model}", "--prompt", "hi", "--speculate", "recycle", "--tree-widths", "4,2"],
        ["generate", "{model}", "--prompt", "hi", "--lookup", "--min-speedup", "-1"],
        ["generate"],
    ],
    "eval": [
        ["eval", "{model}", "--data", "{data}", "--seq-len", "0"],
        ["eval", "{model}", "--data", "{data}", "--batch-size", "-3"],
        ["eval", "{missing}", "--data", "{data}"],
        ["eval", "{corrupt_model}", "--data", "{data}"],
        ["eval", "{model}", "--data", "{data}", "--seq-len", "abc"],
    ],
    "card": [
        ["card", "{missing}"],
        ["card", "{corrupt_model}"],
        ["card", "{model}", "--report", "{binary}"],
    ],
    "compress": [
        ["compress", "{missing}", "--method", "int8", "--out", "{tmp}/c1"],
        ["compress", "{model}", "--method", "bogus", "--out", "{tmp}/c2"],
        ["compress", "{model}", "--method", "prune-magnitude", "--sparsity", "-0.5", "--out", "{tmp}/c3"],
        ["compress", "{huge_context_model}", "--method", "int8", "--out", "{tmp}/c4"],
    ],
    "upcycle": [
        ["upcycle", "{missing}", "--out", "{tmp}/u1"],
        ["upcycle", "{corrupt_model}", "--out", "{tmp}/u2"],
        ["upcycle", "{model}", "--out", "{tmp}/u3", "--experts", "2", "--top-k", "3"],
        ["upcycle", "{model}", "--out", "{tmp}/u4", "--noise", "-1"],
    ],
    "finetune": [
        ["finetune", "{missing}", "--data", "{binary}", "--out", "{tmp}/f1", "--max-steps", "1"],
        ["finetune", "{model}", "--data", "{binary}", "--out", "{tmp}/f2", "--max-steps", "1"],
        ["finetune", "{model}", "--data", "{missing}", "--out", "{tmp}/f3", "--max-steps", "1"],
        ["finetune", "{model}", "--data", "{binary}", "--out", "{tmp}/f4", "--lora", "--rank", "0"],
        ["finetune", "{model}", "--out", "{tmp}/f5", "--resume"],
        ["finetune", "{corrupt_model}", "--data", "{binary}", "--out", "{tmp}/f6", "--max-steps", "1"],
    ],
    "merge-adapter": [
        ["merge-adapter", "{missing}", "{missing}", "--out", "{tmp}/m1"],
        ["merge-adapter", "{corrupt_model}", "{model}", "--out", "{tmp}/m2"],
        ["merge-adapter", "{model}", "{model}", "--out", "{tmp}/m3"],  # a model dir is not an adapter dir
        ["merge-adapter", "{model}", "{binary}", "--out", "{tmp}/m4"],
    ],
    "merge": [
        ["merge", "{missing}", "--out", "{tmp}/mg1"],
        ["merge", "{binary}", "--out", "{tmp}/mg2"],
        ["merge", "{seed_abc_yaml}", "--out", "{tmp}/mg3"],  # a YAML file, not a merge config
        ["merge", "{seed_abc_yaml}", "--out", "{tmp}/mg4", "--seed", "-1"],
    ],
    "distill": [
        ["distill", "--teacher", "{missing}", "--student", "tiny", "--data", "{data}", "--out", "{tmp}/d1"],
        [
            "distill",
            "--teacher",
            "{model}",
            "--student",
            "tiny",
            "--data",
            "{data}",
            "--out",
            "{tmp}/d2",
            "--max-steps",
            "1",
            "--alpha",
            "-1",
        ],  # fmt: skip
        [
            "distill",
            "--teacher",
            "{model}",
            "--student",
            "tiny",
            "--data",
            "{data}",
            "--out",
            "{tmp}/d3",
            "--max-steps",
            "1",
            "--device",
            "tpu",
        ],  # fmt: skip
        [
            "distill",
            "--teacher",
            "{corrupt_model}",
            "--student",
            "tiny",
            "--data",
            "{data}",
            "--out",
            "{tmp}/d4",
            "--max-steps",
            "1",
        ],  # fmt: skip
    ],
    "quickstart": [
        ["quickstart", "--out", "{tmp}/q1", "--minutes", "0"],
        ["quickstart", "--out", "{tmp}/q2", "--minutes", "nan"],
        ["quickstart", "--out", "{tmp}/q3", "--minutes", "-5"],
    ],
    "export": [
        ["export", "{missing}", "--format", "hf", "--out", "{tmp}/e1"],
        ["export", "{model}", "--format", "bogus", "--out", "{tmp}/e2"],
        ["export", "{corrupt_model}", "--format", "gguf", "--out", "{tmp}/e3.gguf"],
    ],
    "ladder": [
        ["ladder", "--data", "{missing}", "--out", "{tmp}/l1", "--budget-flops", "1e10"],
        ["ladder", "--data", "{data}", "--out", "{tmp}/l2", "--budget-minutes", "-10"],
        ["ladder", "--data", "{data}", "--out", "{tmp}/l3", "--budget-minutes", "1", "--device", "tpu"],
        ["ladder", "--data", "{data}", "--out", "{tmp}/l4", "--budget-flops", "1e10", "--seq-len", "0"],
    ],
    "plan": [
        ["plan", "--ladder", "{missing}", "--budget-flops", "1e15"],
        ["plan", "--ladder", "{binary_ladder}", "--budget-flops", "1e15"],
        ["plan", "--ladder", "{binary_ladder}", "--budget-flops", "-1"],
    ],
    "serve": [
        ["serve", "{missing}"],
        ["serve", "{model}", "--port", "-1"],
        ["serve", "{model}", "--max-batch", "0"],
        ["serve", "{model}", "--prefix-cache-mb", "0"],
    ],
    "build": [
        ["build", "--data", "{missing}", "--budget", "10m", "--out", "{tmp}/b1"],
        ["build", "--data", "{data}", "--budget", "soon", "--out", "{tmp}/b2"],
        ["build", "--data", "{data}", "--budget", "10m", "--max-size", "-3MB", "--out", "{tmp}/b3"],
    ],
    "route train": [
        [
            "route",
            "train",
            "--weak",
            "{missing}",
            "--strong",
            "{model}",
            "--tasks",
            "pystdlib-nextline",
            "--out",
            "{tmp}/rt1",
        ],
        ["route", "train", "--weak", "{model}", "--strong", "{model}", "--tasks", "{missing}", "--out", "{tmp}/rt2"],
        [
            "route",
            "train",
            "--weak",
            "{model}",
            "--strong",
            "{model}",
            "--tasks",
            "x.jsonl",
            "--out",
            "{tmp}/rt3",
            "--target-strong-share",
            "1.5",
        ],
    ],
    "route eval": [
        ["route", "eval", "--weak", "{corrupt_model}", "--strong", "{model}", "--tasks", "pystdlib-nextline"],
        ["route", "eval", "--weak", "{model}", "--strong", "{model}", "--tasks", "x.jsonl", "--router", "{missing}"],
    ],
    "route generate": [
        ["route", "generate", "--small", "{missing}", "--large", "{model}", "--prompt", "hi"],
        ["route", "generate", "--small", "{model}", "--large", "{model}", "--prompt", "hi", "--max-new-tokens", "-1"],
    ],
    "data prepare": [
        ["data", "prepare", "{missing}", "--out", "{tmp}/p1"],
        ["data", "prepare", "{small_text}", "--out", "{tmp}/p2"],
        ["data", "prepare", "{small_text}", "--out", "{tmp}/p3", "--vocab-size", "1000000000"],
        ["data", "prepare", "{small_text}", "--out", "{tmp}/p4", "--val-fraction", "-0.1"],
        ["data", "prepare", "{small_text}", "--out", "{tmp}/p5", "--chunk-chars", "-1"],
    ],
    "data mix-search": [
        ["data", "mix-search", "{missing}", "--target", "papers", "--steps", "2", "--out", "{tmp}/x1"],
        ["data", "mix-search", "{data}", "--target", "poetry", "--steps", "2", "--out", "{tmp}/x2"],
        ["data", "mix-search", "{data}", "--target", "papers", "--steps", "2", "--out", "{tmp}/x3"],  # one domain
        ["data", "mix-search", "{data}", "--target", "papers", "--steps", "2", "--bootstrap", "-1"],
    ],
    "data clean": [
        ["data", "clean", "{missing}", "--out", "{tmp}/dc1"],
        ["data", "clean", "{small_text}", "--out", "{tmp}/dc2", "--near-dup-threshold", "1.5"],
        ["data", "clean", "{small_text}", "--out", "{tmp}/dc3", "--threshold", "nope=1"],
    ],
    "data contamination": [
        ["data", "contamination", "{missing}", "--tasks", "{binary}"],
        ["data", "contamination", "{data}"],
        ["data", "contamination", "{data}", "--tasks", "{binary}"],
        ["data", "contamination", "{data}", "--tasks", "{missing}", "--n", "0"],
    ],
    "scaling fit": [
        ["scaling", "fit", "{missing}"],
        ["scaling", "fit", "{binary}"],
        ["scaling", "fit", "{binary_ladder}", "--bootstrap", "-1"],
    ],
}


def command_names() -> list[str]:
    def walk(command, prefix: tuple[str, ...]):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, (*prefix, name))
        else:
            yield " ".join(prefix)

    return sorted(walk(typer.main.get_command(app), ()))


def test_every_command_has_rows():
    names = command_names()
    assert len(names) >= 13
    missing = [n for n in names if len(ROWS.get(n, [])) < MIN_ROWS]
    assert not missing, f"add at least {MIN_ROWS} bad-input rows for: {missing}"
    assert not sorted(set(ROWS) - set(names)), "rows for commands the app no longer has"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir: Path, data_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    binary = root / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    corrupt = root / "corrupt-model"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "config.json").write_bytes(b"\x00\xff{not json")
    huge = root / "huge-context-model"
    shutil.copytree(tiny_model_dir, huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2**40}))
    run = root / "corrupt-run"
    shutil.copytree(tiny_model_dir.parent, run)
    (run / "train_config.json").write_text('{"seq_len": 6')
    seed_abc = root / "seed.yaml"
    seed_abc.write_text('max_steps: 1\nseed: "abc"\n')
    nan_warmup = root / "warmup.yaml"
    nan_warmup.write_text("max_steps: 1\nwarmup_steps: .nan\n")
    ladder = root / "binary-ladder"
    ladder.mkdir()
    shutil.copyfile(binary, ladder / "ladder.jsonl")
    shutil.copyfile(binary, ladder / "ladder.json")
    small = root / "input.txt"
    small.write_text("one short document\n")
    return {
        "tmp": str(root / "out"),
        "missing": str(root / "does-not-exist"),
        "model": str(tiny_model_dir),
        "data": str(data_dir),
        "binary": str(binary),
        "corrupt_model": str(corrupt),
        "huge_context_model": str(huge),
        "corrupt_run": str(run),
        "seed_abc_yaml": str(seed_abc),
        "nan_warmup_yaml": str(nan_warmup),
        "binary_ladder": str(ladder),
        "small_text": str(small),
    }


CASES = [(name, argv) for name, rows in ROWS.items() for argv in rows]


@pytest.mark.parametrize(("command", "argv"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line(command: str, argv: list[str], paths: dict[str, str], capsys) -> None:
    code = run([arg.format(**paths) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err


def test_messages_name_the_problem(paths: dict[str, str], capsys) -> None:
    expected = {
        ("train", "--data", "{data}", "--out", "{tmp}/m1", "--max-steps", "1", "--device", "tpu"): "auto, cpu, cuda",
        ("train", "--data", "{data}", "--out", "{tmp}/m2", "--config", "{seed_abc_yaml}"): "seed must be an integer",
        ("train", "--data", "{data}", "--out", "{tmp}/m3", "--config", "{nan_warmup_yaml}"): "warmup_steps",
        ("train", "--data", "{data}", "--out", "{corrupt_run}", "--resume"): "train_config.json",
        ("train", "--data", "{data}", "--out", "{tmp}/m8", "--max-steps", "1", "--optimizer", "sgd"): "adamw or muon",
        ("generate", "{corrupt_model}", "--prompt", "hi"): "config.json",
        ("generate", "{huge_context_model}", "--prompt", "hi"): "limit of 1,048,576",
        ("generate", "{model}", "--prompt", "caf\udce9"): "--prompt is not UTF-8",
        ("eval", "{model}", "--data", "{data}", "--seq-len", "0"): "--seq-len must be >= 1",
        ("data", "prepare", "{small_text}", "--out", "{tmp}/m4", "--vocab-size", "1000000000"): "at most 1,048,576",
        ("data", "prepare", "{small_text}", "--out", "{tmp}/m5"): "--val-fraction 0",
        ("scaling", "fit", "{binary}"): "binary or not UTF-8",
        ("train", "--data", "{data}", "--out", "{tmp}/m6", "--bogus-option"): "No such option: --bogus-option",
    }
    for argv, needle in expected.items():
        assert run([arg.format(**paths) for arg in argv]) == 2
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
