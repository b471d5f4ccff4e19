"""Dense MLPs: gated (SwiGLU with silu, Llama) and plain (GPT-2). An MLP keeps no inference state.

Sparse ones live beside them: `slmkit.models.moe` (mixture of experts)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.models.decode_layout import decode_linear, decode_product, fused_call, fused_weight

GATE_UP = ("gate_proj", "up_proj")

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (So et al., Primer; the modded-nanogpt speedrun)
}


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)); width `d_ff` unless given (a MoE's shared expert has its own)."""

    # forward runs these through decode_linear (slmkit.models.decode_layout): gate/up when they are not fused
    DECODE_ROUTED = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or config.d_ff
        self.act = ACTIVATIONS[config.activation]
        self.gate_proj = nn.Linear(config.d_model, d_ff, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_weight(self, GATE_UP)  # CPU decoding: gate and up as one product (slmkit.models.decode_layout)
        gate_up = decode_product(x, fused) if fused is not None else fused_call(self, x)
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=-1)
            return decode_linear(self.down_proj, self.act(gate) * up)
        gate, up = decode_linear(self.gate_proj, x), decode_linear(self.up_proj, x)
        return decode_linear(self.down_proj, self.act(gate) * up)


class PlainMLP(nn.Module):
    """Ungated: down(act(up(x)))."""

    DECODE_ROUTED = ("up_proj", "down_proj")  # forward runs them through decode_linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(self.down_proj, self.act(decode_linear(self.up_proj, x)))
