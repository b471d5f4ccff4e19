"""slmkit: build small language models end to end.

The public functions live in `slmkit.api` (the CLI and the server call the same ones):

    from slmkit.api import evaluate, generate, load, prepare, train

`load`, `generate`, `evaluate` and `prepare` are also reachable as `slmkit.load` etc.; `slmkit.train` and
`slmkit.compress` are the subpackages of those names, so their functions are taken from `slmkit.api`.
Everything heavy (torch, transformers, tokenizers) is imported on first use, so `import slmkit` and
`slm --help` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "generate", "evaluate", "prepare", "distill", "ModelConfig", "TrainConfig", "UserError"]


def __getattr__(name: str) -> Any:
    if name in ("load", "generate", "evaluate", "prepare", "distill"):
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
