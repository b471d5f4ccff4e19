"""Shared data and helpers of the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit_testing import SRC, run_slm  # noqa: F401 - used by the eval test modules

MC_EXAMPLES = [
    {
        "context": "Language models are trained on",
        "choices": [" text", " rocks", " a very long answer about water"],
        "answer": 0,
    },
    {"context": "Scaling laws predict the", "choices": [" loss", " banana"], "answer": 0},
    {"context": "The transformer uses", "choices": [" attention", " glue", " paint", " x"], "answer": 2},
    {"context": "We train small", "choices": [" models", " elephants", " tokens"], "answer": 1},
    {"context": "Compute budgets limit", "choices": [" training", " nothing"], "answer": 0},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Fixtures (imported by the test modules; a tests/eval/conftest.py would shadow tests/conftest.py, whose
# `run_slm` the CLI tests import). Torch's default of one thread per core makes small forward passes
# crawl when other processes compete for the cores (a shared CI machine); these tests check
# correctness, not speed, so they run on one thread.


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
