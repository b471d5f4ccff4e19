"""How linear weights lie in memory for decoding on a CPU (issue #24).

A decode step at batch 1 is a chain of matrix-vector products that each read a whole weight from memory once.
On a CPU, torch's fp32 `F.linear(x, W)` with W stored (out, in) row-major (nn.Linear's layout) runs MKL's
matrix-vector product as dot products along rows of length `in`; the same product over the same values stored
(in, out) row-major (`x @ W.t().contiguous()`) runs along rows of length `out`. MKL streams the longer rows
faster: measured on the 2-core AMD EPYC VM, one thread, weights read from memory (every layer in turn),
`benchmarks/decode_layout.py`: the 124m preset's 768x50304 head 13 -> 25 GB/s, its 768->2048 MLP projections
13 -> 19 GB/s, its 768x768 attention projections 12 -> 14 GB/s, while the 2048->768 down projection was faster
as stored (18 vs 15 GB/s). So a weight with at least as many outputs as inputs is kept with `in` as its slow
dimension, and the others as they are.

`use_decode_layout(model)` re-lays those weights in place: each stays the same Parameter with the same shape
(out, in) and the same values, only its strides change (`W.t().contiguous().t()`), so `F.linear` (and everything
else: the forward, training, `state_dict`, saving, export) is unchanged, memory is not doubled, and tied
embeddings stay tied. The new storage is made outside inference mode, so a model laid out for decoding inside
`torch.inference_mode` still trains. Only plain `nn.Linear` fp32 weights on a CPU are touched (quantized, LoRA
factor and GPU weights are left alone). `use_decode_layout(model, False)` restores the row-major layout.
"""

from __future__ import annotations

import torch
from torch import nn


def prefers_transposed(module: nn.Module) -> bool:
    """Whether a decode-time matrix-vector product through this layer streams faster from the (in, out) layout."""
    if type(module) is not nn.Linear:  # subclasses (quantized, adapters) keep their own kernels and layouts
        return False
    weight = module.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and module.out_features >= module.in_features
    )


def is_transposed(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight lies (in, out) row-major (its first dimension the fast one)."""
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0]) and weight.shape[0] > 1


def use_decode_layout(model: nn.Module, enable: bool = True) -> int:
    """Re-lay the weights `prefers_transposed` picks as (in, out) row-major (enable) or back to row-major (out, in)
    (not enable), in place; returns how many weights changed. Values, shapes and Parameter objects stay the same,
    so optimizers, tied weights and saved files are unaffected."""
    changed = 0
    seen: set[int] = set()
    # outside inference mode even when called inside it (an engine under torch.inference_mode): an inference
    # tensor as a parameter's data would break training the model afterwards
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if not prefers_transposed(module):
                continue
            weight = module.weight
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            if enable and not is_transposed(weight):
                weight.data = weight.data.t().contiguous().t()
                changed += 1
            elif not enable and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
                changed += 1
    return changed
