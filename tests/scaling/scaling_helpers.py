"""Settings of the tiny test ladder."""

from __future__ import annotations

import pytest

from slmkit_testing import run_slm  # noqa: F401 - used by the scaling test modules

TINY_SIZES = "32x1,64x4"
TINY_BUDGET = 1e10  # FLOPs: seven rungs of 3 to 150 steps


def tiny_settings(**changes):
    from slmkit.scaling.ladder import LadderSettings

    base = dict(seq_len=32, batch_size=4, levels=4, min_steps=3, val_windows=16, threads=1, lr=1e-2)
    return LadderSettings(**{**base, **changes})


_LADDERS: dict[str, object] = {}


@pytest.fixture(scope="session", name="tiny_ladder")
def tiny_ladder_fixture(tmp_path_factory, data_dir):
    """A tiny ladder (seconds): two sizes a decade apart, four compute levels. Built once per session even
    though several modules import this fixture (no conftest.py here: it would shadow tests/conftest.py)."""
    from slmkit.scaling.ladder import run_ladder
    from slmkit.scaling.shapes import parse_sizes

    key = str(data_dir)
    if key not in _LADDERS:
        out = tmp_path_factory.mktemp("ladder") / "tiny"
        result = run_ladder(
            data_dir, out, budget_flops=TINY_BUDGET, sizes=parse_sizes(TINY_SIZES), settings=tiny_settings()
        )
        assert not result.interrupted
        _LADDERS[key] = out
    return _LADDERS[key]
