"""Optional dependencies: packages only some features need, imported where they are used.

``pip install slmkit`` installs what every command needs; the features below need one more package each, named
by an extra of the package metadata (``pip install '.[constrained]'``). :func:`require` imports such a package
and, when it is missing, raises :class:`slmkit.errors.MissingDependency` whose message names the feature and the
exact pip command, so the CLI ends with one ``error:`` line (exit code 2) and the server answers a 400.

The requirement strings here are the extras of ``pyproject.toml`` (tests/test_packaging.py keeps them equal).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from slmkit.errors import MissingDependency


@dataclass(frozen=True)
class Extra:
    """An optional feature: the extra that installs it, what it needs, and what to tell a user who lacks it."""

    name: str  # the extra of the package metadata, e.g. "constrained"
    feature: str  # what needs it, for the error message
    requirement: str  # the pip requirement of its package
    note: str = ""  # said after the command, e.g. a way to install it without GPU-only dependencies

    @property
    def install(self) -> str:
        """The pip command that installs it (the requirement quoted for a POSIX shell)."""
        return f"pip install '{self.requirement}'"


EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra(
            "constrained",
            "grammar-constrained decoding (JSON schema, regex, EBNF grammar; response_format in the server)",
            "xgrammar>=0.2.8,<0.3",
            # xgrammar's triton requirement serves GPUs only; without it a CPU install is a small download
            note="on a CPU-only machine `pip install --no-deps 'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11'` "
            "skips its GPU-only triton",
        ),
        Extra("lm-eval", "the lm-evaluation-harness adapter (slmkit.eval.lm_eval_adapter)", "lm-eval>=0.4.13,<0.5"),
        Extra("clean", "near-duplicate removal in `slm data clean` (MinHash LSH)", "datasketch>=1.6"),
    )
}


def require(module: str, extra: str) -> ModuleType:
    """Import `module` (e.g. ``"xgrammar"``, ``"lm_eval.api.model"``), which the extra `extra` installs.

    A missing package (or one that fails to import: a missing dependency of its own, a broken binary) is a
    :class:`MissingDependency` naming the feature and the pip command of that extra.
    """
    spec = EXTRAS[extra]  # a KeyError here is a bug: every extra the code names is listed above
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing is not None and missing.partition(".")[0] == package:
            reason = "which is not installed"
        else:  # installed, but it does not import (one of its own dependencies is missing, a broken binary)
            reason = f"which is installed but does not import ({exc})"
        note = f" ({spec.note})" if spec.note else ""
        message = f"{spec.feature} needs {package}, {reason}: {spec.install}{note}"
        raise MissingDependency(message, module=package, install=spec.install) from exc
