"""The task builder of benchmarks/finetune_task.py: a deterministic, non-empty split with no function on both sides,
and multiple-choice examples slmkit's task loader accepts (the benchmark itself is run by hand, never here)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def task():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("finetune_task")
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("finetune_task", None)


@pytest.fixture(scope="module")
def items(task):
    return task.stdlib_functions()


def test_split_is_deterministic_disjoint_and_non_empty(task, items):
    train, test = task.split_items(items, 0.15)
    assert len(train) > 500 and len(test) > 100
    assert {i.qualname for i in train}.isdisjoint(i.qualname for i in test)
    assert {i.prompt for i in train}.isdisjoint(i.prompt for i in test)
    assert {i.target for i in train}.isdisjoint(i.target for i in test)
    # the same list in another interpreter, whatever this one has imported (torch patches inspect.getfile)
    again_train, again_test = task.split_items(task.stdlib_functions(), 0.15)
    assert again_train == train and again_test == test
    for item in train[:50] + test[:50]:
        assert item.prompt.startswith("def ") and item.prompt.endswith(":\n") and item.prompt.count("\n") == 1
        assert "\n" not in item.target and item.target


def test_first_sentence(task):
    assert task.first_sentence("Return the sum of a and b.  More text.\n\nDetails.") == "Return the sum of a and b."
    assert task.first_sentence("Spread over\n    two lines. Then more.") == "Spread over two lines."
    assert task.first_sentence("short.") is None  # too short to be a task
    assert task.first_sentence(None) is None


def test_mc_examples_load_as_an_slmkit_task(task, items, tmp_path):
    from slmkit.eval.tasks import load_task

    _, test = task.split_items(items, 0.15)
    examples = task.mc_examples(test)
    assert examples == task.mc_examples(test)  # seeded
    path = tmp_path / "mc.jsonl"
    task.write_jsonl(examples, path)
    loaded = load_task(path)
    assert loaded.kind == "multiple_choice" and len(loaded.examples) == len(test)
    for item, ex in zip(test, loaded.examples, strict=True):
        assert ex["context"] == item.prompt and ex["choices"][ex["answer"]] == item.target
        assert len(set(ex["choices"])) == 4
