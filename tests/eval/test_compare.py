"""`slm eval MODEL --compare BASE`: answer flips (MUSCLE) next to the accuracy delta."""

from __future__ import annotations

import json

import pytest
import torch
from evalfixtures import MC_EXAMPLES, one_thread, run_slm, write_jsonl  # noqa: F401

from slmkit.eval.compare import compare_tasks


def _entry(answers, correct, metric_mean, kind="acc_norm"):
    return {
        "tasks": [
            {
                "task": "t",
                "examples": len(answers),
                "primary_metric": kind,
                "metrics": {kind: {"mean": metric_mean}},
                "items": {"answers": {"plain": answers}, "correct": {"plain": correct}},
            }
        ]
    }


def test_flips_hide_behind_an_unchanged_accuracy():
    base = _entry([0, 1, 2, 0], [1.0, 1.0, 0.0, 0.0], 0.5)
    model = _entry([0, 2, 0, 1], [1.0, 0.0, 1.0, 0.0], 0.5)  # one right->wrong, one wrong->right, one wrong->wrong
    [row] = compare_tasks(base, model)
    assert row["delta"] == 0.0
    assert row["flips"] == 0.75 and row["negative_flips"] == 0.25 and row["positive_flips"] == 0.25
    assert compare_tasks(base, base)[0]["flips"] == 0.0


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir, tmp_path_factory):
    from slmkit.interop.checkpoint import load_model, save_model

    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_model(model, tmp_path_factory.mktemp("cmp") / "perturbed", tokenizer_dir=tiny_model_dir)


def test_slm_eval_compare(tmp_path, tiny_model_dir, perturbed):
    """Flips equal what the two models' own answers give; the base against itself flips nothing."""
    from slmkit.api import load
    from slmkit.eval.tasks import evaluate_task, load_task

    task = write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES * 4)
    r = run_slm("eval", perturbed, "--tasks", task, "--compare", tiny_model_dir, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)  # two models: the whole report, base first
    assert [m["path"] for m in report["models"]] == [str(tiny_model_dir), str(perturbed)]
    [row] = report["models"][1]["compare"]["tasks"]
    loaded = load_task(task)
    base = evaluate_task(load(tiny_model_dir), loaded)
    ours = evaluate_task(load(perturbed), loaded)
    changed = [
        a != b
        for t in base["items"]["answers"]
        for a, b in zip(base["items"]["answers"][t], ours["items"]["answers"][t], strict=True)
    ]
    assert row["flips"] == pytest.approx(sum(changed) / len(changed))
    assert row["delta"] == pytest.approx(ours["metrics"]["acc_norm"]["mean"] - base["metrics"]["acc_norm"]["mean"])
    assert row["negative_flips"] - row["positive_flips"] == pytest.approx(-row["delta"])
    assert row["flips"] > 0  # the perturbation changes some answers

    table = run_slm("eval", perturbed, tiny_model_dir, "--tasks", task, "--compare", tiny_model_dir)
    assert table.returncode == 0 and "flips" in table.stdout and "gained" in table.stdout

    bad = run_slm("eval", perturbed, "--data", task, "--compare", tiny_model_dir)
    assert bad.returncode == 2 and "--compare" in bad.stderr and bad.stderr.count("error:") == 1
