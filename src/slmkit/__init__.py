"""slmkit: build small language models end to end.

    import slmkit
    slmkit.prepare(["builtin:pystdlib"], "data/pystd", vocab_size=4096)
    slmkit.train(slmkit.TrainConfig(preset="micro", max_minutes=5), "data/pystd", "runs/micro")
    lm = slmkit.load("runs/micro")

Everything heavy (torch, transformers, tokenizers) is imported on first use, so `import slmkit` and
`slm --help` stay fast.
"""

from __future__ import annotations

from typing import Any

# `train` and `compress` are both subpackages and public functions. Import the (light) subpackages first,
# then bind the functions: a submodule sets its parent's attribute only when it is first imported, so the
# functions stay bound however often `slmkit.train.loop` or `slmkit.compress.quantize` are imported later.
import slmkit.compress as _compress_package  # noqa: F401
import slmkit.train as _train_package  # noqa: F401
from slmkit.api import compress, distill, evaluate, generate, load, prepare, train
from slmkit.errors import UserError

__version__ = "0.1.0"
__all__ = [
    "load",
    "generate",
    "evaluate",
    "prepare",
    "train",
    "compress",
    "distill",
    "ModelConfig",
    "TrainConfig",
    "UserError",
]


def __getattr__(name: str) -> Any:
    if name == "ModelConfig":
        from slmkit.config import ModelConfig

        return ModelConfig
    if name == "TrainConfig":
        from slmkit.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
