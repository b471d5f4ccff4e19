"""`slm compress` and `slm distill` through the CLI entry point `main()` (exit codes, messages, output)."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import main
from slmkit.interop.checkpoint import load_model


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args) -> (exit code, stdout, stderr) of `slm ARGS`, run in this process."""

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["slm", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_compress_cli_end_to_end(float_model_dir, data_dir, tmp_path, cli):
    out = tmp_path / "q8"
    code, text, err = cli(
        "compress", float_model_dir, "--method", "int8", "--out", out, "--data", data_dir,
        "--eval-windows", "4", "--calib-seq-len", "32", "--json", "--no-measure",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(text)
    before, after = result["before"], result["after"]
    assert before["size_bytes"] / after["size_bytes"] > 3.5
    assert before["weights_memory_mb"] / after["weights_memory_mb"] > 3.5  # packed in memory too
    assert after["perplexity"] > 1 and after["peak_memory_mb"] is None
    code, text, err = cli("generate", out, "--prompt", "the model", "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, err
    assert text.startswith("the model")
    from slmkit.api import evaluate

    score = evaluate(out, data_dir, seq_len=32)  # what `slm eval` runs
    assert score.perplexity == pytest.approx(after["perplexity"], rel=0.2)


def test_compress_cli_table_and_errors(float_model_dir, data_dir, tmp_path, cli):
    code, _out, err = cli("compress", float_model_dir, "--method", "int3", "--out", tmp_path / "x")
    assert code == 2
    assert err.strip().startswith("error: unknown compression method 'int3'")
    assert not (tmp_path / "x").exists()
    code, _out, err = cli("compress", float_model_dir, "--method", "gptq-int4", "--out", tmp_path / "x")
    assert code == 2 and "calibration data" in err
    args = ("compress", float_model_dir, "--method", "int4", "--out", tmp_path / "q4", "--no-measure")
    code, out, err = cli(*args, "--group-size", "48")
    assert code == 2 and "--group-size 48 does not divide" in err and not (tmp_path / "q4").exists()
    code, out, err = cli(*args, "--data", data_dir, "--eval-windows", "2", "--calib-seq-len", "32")
    assert code == 0, err
    assert "before" in out and "after" in out and "x smaller" in out and "perplexity" in out
    code, _out, err = cli("compress", tmp_path / "q4", "--method", "int8", "--out", tmp_path / "again")
    assert code == 2 and "already compressed" in err and not (tmp_path / "again").exists()


def test_distill_cli(float_model_dir, data_dir, tmp_path, cli):
    args = ("distill", "--teacher", float_model_dir, "--student", "tiny", "--data", data_dir, "--out", tmp_path / "d")
    code, out, err = cli(*args, "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--alpha", "0.7")
    assert code == 0, err
    assert "saved to" in out and (tmp_path / "d" / "final" / "model.safetensors").is_file()
    code, _out, err = cli(*args, "--max-steps", "2")
    assert code == 2 and "--resume" in err
    code, out, err = cli(*args, "--resume", "--max-steps", "3")
    assert code == 0, err
    assert "step 3" in out
    code, _out, err = cli(*args[:7], "--out", tmp_path / "e", "--alpha", "2", "--max-steps", "1")
    assert code == 2 and "--alpha" in err


def test_memory_and_speed_probe(float_model_dir, tmp_path):
    """The fresh-process probe behind the before/after table (one subprocess: slow on a shared machine)."""
    from slmkit.compress.pipeline import probe

    m = probe(float_model_dir, new_tokens=8)
    assert m["peak_memory_mb"] > m["model_memory_mb"] > 0
    assert m["decode_tokens_per_second"] > 0


def test_distill_cli_student_config(float_model_dir, data_dir, tmp_path, cli):
    config = tmp_path / "hybrid.yaml"
    config.write_text("layer_pattern: [mamba2, attention]\n")
    args = ("distill", "--teacher", float_model_dir, "--student-config", config, "--data", data_dir)
    code, out, err = cli(*args, "--out", tmp_path / "d", "--align-steps", "2", "--max-steps", "3", "--seq-len", "32")
    assert code == 0, err
    assert "transfer: copied" in out and "saved to" in out
    metrics = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "align_mse" in m or "distill_kl" in m]
    assert [("align_mse" in m) for m in steps] == [True, True, False]
    saved = json.loads((tmp_path / "d" / "distill_config.json").read_text())
    assert saved["align_steps"] == 2 and "embed_tokens.weight" in saved["transfer"]["copied"]
    student = load_model(tmp_path / "d" / "final")
    assert student.config.layer_pattern == ("mamba2", "attention")
    config.write_text("vocab_size: 7\n")
    code, _out, err = cli(*args, "--out", tmp_path / "e", "--max-steps", "1")
    assert code == 2 and err.count("error:") == 1 and "vocab_size 7 differs" in err
