"""`slm eval` (several models, tasks, efficiency, report) and `slm card` as a user runs them."""

from __future__ import annotations

import json
import shutil

import pytest
from evalfixtures import MC_EXAMPLES, one_thread, run_slm, write_jsonl  # noqa: F401


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def env_one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_eval_two_models_tasks_efficiency_report(tmp_path, tiny_model_dir, env_one_thread):
    other = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, other)
    task = write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES)
    text = tmp_path / "doc.txt"
    text.write_text("Scaling laws for small language models. " * 10)
    r = run_slm(
        "eval", tiny_model_dir, other, "--data", text, "--tasks", task, "--template", "qa",
        "--efficiency", "--report", tmp_path / "rep", "--threads", "1", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [m["path"] for m in out["models"]] == [str(tiny_model_dir), str(other)]
    a, b = out["models"]
    # the same weights give the same quality; efficiency ran in its own process with one thread
    assert a["tasks"][0]["metrics"] == b["tasks"][0]["metrics"] and a["text"]["loss"] == b["text"]["loss"]
    assert a["efficiency"]["threads"] == 1 and a["efficiency"]["peak_rss_bytes"] > 0
    assert a["tasks"][0]["templates"] == ["qa"]
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["models"][0]["tasks"] == a["tasks"]
    assert (tmp_path / "rep" / "report.html").read_text().count("data:image/png;base64,") == 3

    # the card picks this model's results out of the report
    r = run_slm("card", other, "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    readme = (other / "README.md").read_text()
    assert readme.startswith("---\n") and "model-index" in readme and "qa" not in readme.split("---")[1]


def test_eval_one_model_keeps_the_old_json_keys(tmp_path, tiny_model_dir, env_one_thread):
    task = write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES)
    text = tmp_path / "doc.txt"
    text.write_text("Scaling laws for small language models. " * 10)
    r = run_slm("eval", tiny_model_dir, "--data", text, "--tasks", task, "--num-fewshot", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "tasks"} <= set(out)
    assert out["tasks"][0]["num_fewshot"] == 1 and out["tasks"][0]["templates"] == ["plain", "instruct", "qa"]
    r = run_slm("eval", tiny_model_dir, "--tasks", task)  # the table, no JSON
    assert r.returncode == 0, r.stderr
    assert "acc_norm" in r.stdout and "mc" in r.stdout


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "{oops"], ["bad.jsonl:2", "malformed JSON"]),
        (['{"context": "a", "choices": ["x", "y"], "answer": 3}'], ["bad.jsonl:1", "answer index 3 is out of range"]),
        ([""], ["empty task file"]),
    ],
)
def test_bad_task_file_exit_2(tmp_path, tiny_model_dir, lines, fragments):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert_user_error(run_slm("eval", tiny_model_dir, "--tasks", bad), *fragments)


def test_eval_user_errors(tmp_path, tiny_model_dir):
    assert_user_error(run_slm("eval", tiny_model_dir, "--tasks", "hellaswag"), "unknown task 'hellaswag'")
    assert_user_error(run_slm("eval", tiny_model_dir), "nothing to evaluate")
    assert_user_error(run_slm("eval", tiny_model_dir, "--suite", "big"), "unknown suite 'big'")
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert_user_error(run_slm("eval", no_tokenizer, "--suite", "builtin"), "no tokenizer.json")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert_user_error(run_slm("eval", tiny_model_dir, no_weights, "--suite", "builtin"), "weights file not found")
    assert_user_error(run_slm("card", tmp_path / "missing"), "no such model")
