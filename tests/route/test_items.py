"""Per-item scores agree with `slm eval`'s own per-item results (the same tasks machinery)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmkit.eval.tasks import evaluate_task, load_task
from slmkit.route.items import score_items, task_items


@pytest.fixture(scope="module")
def strong(strong_dir):
    from slmkit.api import load

    return load(strong_dir)


def test_multiple_choice_items_match_slm_eval(strong, mc_task):
    task = load_task(mc_task)
    scores = score_items(strong, task_items([task], "plain"))
    reference = evaluate_task(strong, task, ["plain"])["items"]
    assert scores.answers == reference["answers"]["plain"]
    np.testing.assert_array_equal(scores.quality, reference["correct"]["plain"])
    assert ((0 < scores.confidence) & (scores.confidence <= 1)).all()


def test_generation_items_match_slm_eval(strong, tmp_path):
    path = tmp_path / "gen.jsonl"
    rows = [{"prompt": f"The {w} of the model", "target": t} for w, t in [("size", "is"), ("data", "x"), ("loss", "y")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(path)
    scores = score_items(strong, task_items([task], "plain"), max_new_tokens=8)
    reference = evaluate_task(strong, task, ["plain"], max_new_tokens=8)["items"]
    assert scores.answers == reference["answers"]["plain"]
    np.testing.assert_array_equal(scores.quality, reference["correct"]["plain"])
    assert (scores.confidence <= 0).all()  # mean token log-probabilities
