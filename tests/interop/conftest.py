"""Fixtures for the interop tests: tiny random transformers models saved per family."""

from __future__ import annotations

from pathlib import Path

import pytest
from _interop_models import CASES, make_hf_model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every CASES model saved with save_pretrained (lazily, once per session)."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("hf")

    class Lazy(dict):
        def __missing__(self, case: str) -> Path:
            model_type, overrides = CASES[case]
            model = make_hf_model(model_type, **overrides)
            out = root / case
            model.save_pretrained(out)
            cache[case] = out
            self[case] = out
            return out

    return Lazy()
