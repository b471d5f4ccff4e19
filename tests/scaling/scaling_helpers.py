"""Settings of the tiny test ladder."""

from __future__ import annotations

TINY_SIZES = "32x1,64x4"
TINY_BUDGET = 1e10  # FLOPs: seven rungs of 3 to 150 steps


def tiny_settings(**changes):
    from slmkit.scaling.ladder import LadderSettings

    base = dict(seq_len=32, batch_size=4, levels=4, min_steps=3, val_windows=16, threads=1, lr=1e-2)
    return LadderSettings(**{**base, **changes})


def _root_conftest():
    # tests/scaling has its own conftest.py, so `from conftest import run_slm` would find that one
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_slmkit_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_slm = _root_conftest().run_slm
