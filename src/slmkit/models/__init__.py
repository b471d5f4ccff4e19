"""Models: `build_model(config)` is the one constructor; the config's per-layer fields pick each part."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmkit.config import ModelConfig
    from slmkit.models.transformer import Transformer


def build_model(config: ModelConfig) -> Transformer:
    """The model a config describes, with uninitialised (random) weights; call `init_weights` or load a state dict.

    Built on the current default device, so `with torch.device("meta"): build_model(cfg)` allocates nothing.
    """
    from slmkit.models.transformer import Transformer

    return Transformer(config)
