"""Helpers shared by test modules in every folder (importable as `slmkit_testing`: pyproject puts tests/ on
pytest's pythonpath). Fixtures live in tests/conftest.py; importing `conftest` by name is ambiguous once
subfolders have their own conftest.py, so plain helpers live here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_slm(*args: object, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`python -m slmkit ...`, the same entry point as `slm`), on this tree's src."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "slmkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
    )
