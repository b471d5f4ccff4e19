"""Fixtures of the scaling tests (helpers live in scaling_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scaling_helpers import TINY_BUDGET, TINY_SIZES, tiny_settings


@pytest.fixture(scope="session")
def tiny_ladder(tmp_path_factory, data_dir) -> Path:
    """A tiny ladder (seconds): two sizes a decade apart, four compute levels."""
    from slmkit.scaling.ladder import run_ladder
    from slmkit.scaling.shapes import parse_sizes

    out = tmp_path_factory.mktemp("ladder") / "tiny"
    result = run_ladder(
        data_dir, out, budget_flops=TINY_BUDGET, sizes=parse_sizes(TINY_SIZES), settings=tiny_settings()
    )
    assert not result.interrupted
    return out
