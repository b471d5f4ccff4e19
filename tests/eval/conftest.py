"""Fixtures for the evaluation tests: small task files and one thread per test process.

Torch's default of one thread per core makes small forward passes crawl when other processes compete
for the cores (as on a shared CI machine); these tests measure correctness, not speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from evalfixtures import MC_EXAMPLES, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mc_task_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES)
