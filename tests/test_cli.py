"""The `slm` command end to end: each command works, and user errors end with one message and exit code 2."""

import json
import time

import pytest

from slmkit_testing import SRC, run_slm


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    result = run_slm("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    for command in ("data", "train", "generate", "eval", "quickstart"):
        assert command in result.stdout
    assert elapsed < 10  # generous: a cold interpreter on a loaded CI machine; the point is no torch import
    probe = run_slm("--help")
    assert probe.returncode == 0


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, slmkit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "False", out.stderr


def test_prepare_train_generate_eval(tmp_path, corpus_file):
    data = tmp_path / "data"
    r = run_slm("data", "prepare", corpus_file, "--out", data, "--vocab-size", 400, "--val-fraction", 0.1)
    assert r.returncode == 0, r.stderr
    assert (data / "train.bin").is_file() and "train" in r.stdout
    r = run_slm(
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--seq-len",
        32,
        "--batch-size",
        4,
        "--max-steps",
        6,
        "--save-interval",
        3,
        "--set",
        "max_seq_len=64",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-3").is_dir()
    r = run_slm(
        "generate",
        tmp_path / "run",
        "--prompt",
        "Language models",
        "--max-new-tokens",
        8,
        "--temperature",
        0,
        "--verbose",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Language models")
    r = run_slm("eval", tmp_path / "run", "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
    assert result["bits_per_byte"] > 0
    # the same model on a plain text file
    text = tmp_path / "doc.txt"
    text.write_text("Scaling laws for small language models. " * 20)
    r = run_slm("eval", tmp_path / "run", "--data", text, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == len(text.read_text().encode())


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["data", "prepare", "/no/such/file.txt", "--out", "{tmp}/d"], ["/no/such/file.txt"]),
        (["generate", "{tmp}/missing", "--prompt", "x"], ["no such model"]),
        (["eval", "{tmp}/missing", "--data", "{tmp}"], ["no such model"]),
        (["train", "--data", "{tmp}/nodata", "--out", "{tmp}/r", "--max-steps", "1"], ["nodata"]),
    ],
)
def test_user_errors_exit_2(tmp_path, args, fragments):
    r = run_slm(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_user_error(r, *fragments)


def test_train_errors(tmp_path, data_dir):
    r = run_slm("train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "gigantic", "--max-steps", "1")
    assert_user_error(r, "unknown preset 'gigantic'")
    r = run_slm("train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "tiny")
    assert_user_error(r, "no training budget")
    r = run_slm(
        "train",
        "--data",
        data_dir,
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "--max-steps",
        "1",
        "--set",
        "n_heads=3",
    )
    assert_user_error(r, "n_heads")
    r = run_slm("train", "--data", data_dir, "--out", tmp_path / "r2", "--resume", "--max-steps", "1")
    assert_user_error(r, "nothing to resume")


def test_generate_errors(tiny_model_dir):
    r = run_slm("generate", tiny_model_dir, "--prompt", "")
    assert_user_error(r, "empty prompt")
    r = run_slm("generate", tiny_model_dir, "--prompt", "word " * 200, "--max-new-tokens", "10")
    assert_user_error(r, "exceeds the model's context")
    r = run_slm("generate", tiny_model_dir, "--prompt", "x", "--temperature", "-1")
    assert_user_error(r, "temperature")
    r = run_slm("generate", tiny_model_dir, "--prompt", "x", "--top-p", "1.5")
    assert_user_error(r, "top-p")


def test_corrupt_weights_via_cli(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = run_slm("generate", broken, "--prompt", "x")
    assert_user_error(r, "corrupt or truncated")


def test_run_dir_without_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    r = run_slm("eval", tmp_path / "run", "--data", tmp_path)
    assert_user_error(r, "no checkpoint yet")


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "100000",
        "--set",
        "max_seq_len=64",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmkit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert steps and steps[-1] >= 3
    r = run_slm("train", "--data", data_dir, "--out", run, "--resume", "--max-steps", steps[-1] + 2)
    assert r.returncode == 0, r.stderr
    assert (run / "final" / "model.safetensors").is_file()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss" in json.loads(x)]
    assert logged == list(range(1, steps[-1] + 3))
