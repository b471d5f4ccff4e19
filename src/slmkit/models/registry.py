"""Which module each config value builds: mixers (sequence mixing: attention, mamba, mamba2, gla, based) and MLPs.

A mixer is a module ``Mixer(config, layer_idx)`` with ``forward(x, ctx, state) -> y`` (x, y: (B, T, C); ctx: the
pass's `slmkit.models.attention.Context`; state: its own `LayerState` or None when training) and
``new_state(batch_size, max_len, device, dtype)`` returning its `LayerState` (or None if it keeps nothing). An MLP
is ``MLP(config)`` with ``forward(x)``. A new part is one module and one `register_*` call; nothing in infer/,
serve/ or train/ names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slmkit.errors import UserError

MIXERS: dict[str, Callable[[Any, int], nn.Module]] = {}
MLPS: dict[str, Callable[[Any], nn.Module]] = {}


def register_mixer(
    name: str,
    factory: Callable[[Any, int], nn.Module],
    params: Callable[[Any], tuple[int, int]] | None = None,
    flops: Callable[[Any, int], float] | None = None,
) -> None:
    """Make ``factory`` the mixer called ``name`` in configs.

    ``params(config)`` gives one layer's (parameters, of which in weight matrices) and ``flops(config, context)``
    its forward FLOPs per token beyond those matrices, for `ModelConfig.num_params` and `flops_per_token`.
    Built-in mixers are counted in `slmkit.config`; for others, omitted ``params`` are measured by building the
    mixer on the meta device (no memory), and omitted ``flops`` count its weight matrices only.
    """
    from slmkit.config import BUILTIN_MIXER_KINDS, PLUGIN_MIXER_COUNTS

    MIXERS[name] = factory
    if name in BUILTIN_MIXER_KINDS:
        return

    def measured(config: Any) -> tuple[int, int]:
        with torch.device("meta"):
            module = factory(config, 0)
        sizes = [(p.numel(), p.ndim >= 2) for p in module.parameters()]
        return sum(n for n, _ in sizes), sum(n for n, matrix in sizes if matrix)

    PLUGIN_MIXER_COUNTS[name] = (params or measured, flops or (lambda config, context: 0.0))


def register_mlp(name: str, factory: Callable[[Any], nn.Module]) -> None:
    MLPS[name] = factory


def build_mixer(name: str, config: Any, layer_idx: int) -> nn.Module:
    if name not in MIXERS:
        raise UserError(f"model config: unknown mixer {name!r} at layer {layer_idx} (registered: {', '.join(MIXERS)})")
    return MIXERS[name](config, layer_idx)


def build_mlp(name: str, config: Any) -> nn.Module:
    if name not in MLPS:
        raise UserError(f"model config: unknown mlp {name!r} (registered: {', '.join(MLPS)})")
    return MLPS[name](config)


def _register_builtins() -> None:
    from slmkit.models.attention import Attention
    from slmkit.models.linear_attention import BasedAttention, GatedLinearAttention
    from slmkit.models.mamba import MambaMixer
    from slmkit.models.mamba2 import Mamba2Mixer
    from slmkit.models.memory import ProductKeyMemory
    from slmkit.models.mlp import MLP, PlainMLP
    from slmkit.models.moe import MoE

    register_mixer("attention", Attention)
    register_mixer("mamba", MambaMixer)
    register_mixer("mamba2", Mamba2Mixer)
    register_mixer("gla", GatedLinearAttention)
    register_mixer("based", BasedAttention)
    register_mlp("gated", MLP)
    register_mlp("plain", PlainMLP)
    register_mlp("moe", MoE)
    register_mlp("memory", ProductKeyMemory)


_register_builtins()
