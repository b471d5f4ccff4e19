"""slmkit: build small language models end to end.

The public API is imported lazily so `import slmkit` (and `slm --help`) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "generate", "evaluate", "prepare", "train", "ModelConfig", "TrainConfig", "UserError"]


def __getattr__(name: str) -> Any:
    if name in ("load", "generate", "evaluate", "prepare", "train"):
        from slmkit import api

        return getattr(api, name)
    if name == "ModelConfig":
        from slmkit.config import ModelConfig

        return ModelConfig
    if name == "TrainConfig":
        from slmkit.train.config import TrainConfig

        return TrainConfig
    if name == "UserError":
        from slmkit.errors import UserError

        return UserError
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
