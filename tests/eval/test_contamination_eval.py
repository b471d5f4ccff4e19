"""`slm eval --contamination-data`: each task's n-gram overlap with the training data beside its scores, in the
JSON, the table, report.html and the model card."""

from __future__ import annotations

import json
import random
import shutil

from evalfixtures import one_thread, run_slm, write_jsonl  # noqa: F401

from slmkit.data.prepare import is_val_document


def test_eval_and_card_show_the_contamination_rate(tmp_path, tiny_model_dir, data_dir, corpus_file, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    texts = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    train = [t for t in texts if not is_val_document(t, 0.1)]  # data_dir was prepared with val_fraction 0.1
    rng = random.Random(0)
    planted = [{"context": " ".join(t.split()[:20]), "choices": [" yes", " no"], "answer": 0} for t in train[:2]]
    fresh = [
        {"context": " ".join(f"qq{rng.randint(0, 10**6)}" for _ in range(20)), "choices": [" yes", " no"], "answer": 1}
        for _ in range(3)
    ]
    task = write_jsonl(tmp_path / "leaky.jsonl", planted + fresh)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    r = run_slm(
        "eval", model, "--tasks", task, "--template", "plain", "--contamination-data", data_dir,
        "--report", tmp_path / "rep", "--json", "--threads", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [result] = json.loads(r.stdout)["tasks"]
    assert result["task"] == "leaky" and "acc" in result["metrics"]
    assert result["contamination"] == {
        "task": "leaky", "items": 5, "contaminated": 2, "rate": 0.4, "n": 13, "data": str(data_dir),
    }  # fmt: skip
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "contaminated" in html and "2/5 (40.0%)" in html
    # --limit: only the scored items are checked
    r = run_slm("eval", model, "--tasks", task, "--template", "plain", "--contamination-data", data_dir,
                "--limit", "1", "--json", "--threads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"][0]["contamination"]["items"] == 1

    r = run_slm("card", model, "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    card = (model / "README.md").read_text()
    header = next(line for line in card.splitlines() if line.startswith("| task |"))
    assert header.endswith("contaminated |")
    rows = [line for line in card.splitlines() if line.startswith("| leaky |")]
    assert rows and all(line.endswith("2/5 (40.0%) |") for line in rows)
    assert "13-gram" in card


def test_eval_contamination_table_and_refusals(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table on one line per row
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "alpha beta", "target": "gamma"}] * 2)
    r = run_slm("eval", tiny_model_dir, "--tasks", task, "--template", "plain", "--contamination-data", data_dir,
                "--threads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "contaminated" in r.stdout and "0/2 (0.0%)" in r.stdout
    for args, fragment in (
        (["--data", data_dir, "--contamination-data", data_dir], "needs tasks"),
        (["--tasks", task, "--contamination-data", tmp_path / "nowhere"], "does not exist"),
        (["--tasks", task, "--contamination-data", data_dir, "--contamination-n", "0"], "--contamination-n"),
    ):
        result = run_slm("eval", tiny_model_dir, *args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
