"""Compression: weight-only quantization (int8, int4 RTN / GPTQ / AWQ), pruning (magnitude, Wanda, 2:4,
structured), low-rank factorization and distillation. See docs/compression.md."""

from __future__ import annotations

from typing import Any


def compress(*args: Any, **kwargs: Any):
    """Compress a model directory; see `slmkit.compress.pipeline.compress`."""
    from slmkit.compress.pipeline import compress as _compress

    return _compress(*args, **kwargs)


def distill(*args: Any, **kwargs: Any):
    """Distil a teacher into a student; see `slmkit.compress.distill.distill`."""
    from slmkit.compress.distill import distill as _distill

    return _distill(*args, **kwargs)
