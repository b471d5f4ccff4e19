"""`slm compress` and `slm distill` as a user runs them."""

from __future__ import annotations

import json

import pytest


def test_compress_cli_end_to_end(float_model_dir, data_dir, tmp_path, slm):
    out = tmp_path / "q8"
    r = slm(
        "compress", float_model_dir, "--method", "int8", "--out", out, "--data", data_dir,
        "--eval-windows", "4", "--calib-seq-len", "32", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    before, after = result["before"], result["after"]
    assert before["size_bytes"] / after["size_bytes"] > 3.5
    for m in (before, after):
        assert m["peak_memory_mb"] > 0 and m["decode_tokens_per_second"] > 0 and m["perplexity"] > 1
    assert after["model_memory_mb"] is not None
    r = slm("generate", out, "--prompt", "the model", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the model")
    from slmkit.api import evaluate

    score = evaluate(out, data_dir, seq_len=32)  # what `slm eval` runs
    assert score.perplexity == pytest.approx(after["perplexity"], rel=0.2)


def test_compress_cli_table_and_errors(float_model_dir, data_dir, tmp_path, slm):
    r = slm("compress", float_model_dir, "--method", "int3", "--out", tmp_path / "x")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown compression method 'int3'")
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    r = slm(
        "compress", float_model_dir, "--method", "lowrank", "--out", tmp_path / "lr", "--energy", "0.5", "--no-measure",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "before" in r.stdout and "after" in r.stdout and "smaller" in r.stdout


def test_distill_cli(float_model_dir, data_dir, tmp_path, slm):
    args = ("distill", "--teacher", float_model_dir, "--student", "tiny", "--data", data_dir, "--out", tmp_path / "d")
    r = slm(*args, "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--alpha", "0.7")
    assert r.returncode == 0, r.stderr
    assert "saved to" in r.stdout and (tmp_path / "d" / "final" / "model.safetensors").is_file()
    r = slm(*args, "--resume", "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout
