"""How linear weights lie in memory for decoding on a CPU (issue #24).

A decode step at batch 1 is a chain of matrix-vector products that each read a whole weight from memory once.
On a CPU, torch's fp32 `F.linear(x, W)` with W stored (out, in) row-major (nn.Linear's layout) runs MKL's
matrix-vector product as dot products along rows of length `in`; the same product over the same values stored
(in, out) row-major (`x @ W.t().contiguous()`) runs along rows of length `out`. MKL streams the longer rows
faster: measured on the 2-core AMD EPYC VM, quiet, one thread, weights read from memory (every layer in turn,
the method of `benchmarks/decode_layout.py`): the 124m preset's 768x50304 head 13 -> 25 GB/s, its 768->2048 MLP
projections 13 -> 19 GB/s, its 768x768 attention projections 12 -> 14 GB/s, while the 2048->768 down projection
was faster as stored (18 vs 15 GB/s). So a weight with at least as many outputs as inputs is kept with `in` as
its slow dimension, and the others as they are.

A decode step also reads attention's q, k and v projections of one input, and a gated MLP's gate and up
projections: `use_decode_layout` lays each group out as the column blocks of one (in, sum of outs) row-major
matrix, each weight a view of its block, and the eager forward without gradients runs the group as one product
(`fused_weight`: longer rows, fewer calls; on 124m 1.38x (q/k/v) and 1.13x (gate/up) over the parts transposed,
loaded machine). Compiled, training and adapted (LoRA hooks) forwards run the linears one by one over the same
memory.

`use_decode_layout(model)` re-lays those weights in place: each stays the same Parameter with the same shape
(out, in) and the same values, only its strides change (`W.t().contiguous().t()`), so `F.linear` (and everything
else: the forward, training, `state_dict`, saving, export) is unchanged, memory is not doubled, and tied
embeddings stay tied. The new storage is made outside inference mode, so a model laid out for decoding inside
`torch.inference_mode` still trains. Only plain `nn.Linear` fp32 weights on a CPU are touched (quantized, LoRA
factor and GPU weights are left alone). `use_decode_layout(model, False)` restores the row-major layout.
"""

from __future__ import annotations

import weakref

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


# modules whose projections of one input are fused for decoding: (module attribute names of the linears)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# module -> (fused (in, sum of outs) matrix, its weights' data_ptrs); weak and outside the module, so a deep copy
# or a pickle of the model does not carry a spare copy of the fused matrix, and a dropped module frees it
_FUSED: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook changes what the linear computes (a LoRA adapter adds its update through one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable(linears: list[nn.Module]) -> bool:
    return (
        all(type(m) is nn.Linear and m.bias is None and not _hooked(m) for m in linears)
        and len({(m.in_features, m.weight.dtype, m.weight.device.type) for m in linears}) == 1
        and linears[0].weight.dtype == torch.float32
        and linears[0].weight.device.type == "cpu"
        and len({id(m.weight) for m in linears}) == len(linears)
    )


def fused_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """The (in, sum of outs) matrix whose column blocks are the weights of `module`'s linears `names`, when the
    decode layout fused them and they still are (the same plain linears over the same memory), in an eager
    forward without gradients; else None (the caller runs its linears one by one)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training and compiled steps: no lookup at all
        return None
    entry = _FUSED.get(module)
    if entry is None:
        return None
    fused, pointers = entry
    for name, pointer in zip(names, pointers, strict=True):
        linear = module._modules[name]
        if type(linear) is not nn.Linear or linear.weight.data_ptr() != pointer:
            _FUSED.pop(module, None)  # the weights moved (.to(), a new tensor): the fused matrix is stale, free it
            return None
        if _hooked(linear):
            return None
    return fused


def _fuse(module: nn.Module, names: tuple[str, ...]) -> bool | None:
    """Lay the linears `names` of `module` as column blocks of one (in, sum of outs) row-major matrix (each weight
    a view of it: same Parameter, shape and values): True, or False when they are already; None when they cannot
    be (absent, biases, other types, ties)."""
    linears = [module._modules.get(name) for name in names]
    if any(m is None for m in linears) or not _fusable(linears):  # type: ignore[arg-type]
        return None
    if fused_weight(module, names) is not None:
        return False
    fused = torch.empty(linears[0].in_features, sum(m.out_features for m in linears))  # type: ignore[union-attr]
    column = 0
    for m in linears:
        out = m.out_features  # type: ignore[union-attr]
        fused[:, column : column + out].copy_(m.weight.t())  # type: ignore[union-attr]
        m.weight.data = fused[:, column : column + out].t()  # type: ignore[union-attr]
        column += out
    _FUSED[module] = (fused, tuple(m.weight.data_ptr() for m in linears))  # type: ignore[union-attr]
    return True


def use_decode_layout(model: nn.Module, enable: bool = True) -> int:
    """Lay out the model's fp32 linear weights on a CPU for decoding (enable), or back as nn.Linear stores them (not
    enable), in place; returns how many weights (or fused groups) changed. Attention's q/k/v and a gated MLP's
    gate/up projections become column blocks of one (in, sum of outs) row-major matrix each (`fused_weight`: one
    product instead of three or two, with longer rows); other weights `prefers_transposed` picks are re-laid
    (in, out). Values, shapes and Parameter objects stay the same, so optimizers, tied weights and saved files
    are unaffected; the fused products run only in eager forwards without gradients."""
    changed = 0
    seen: set[int] = set()
    # outside inference mode even when called inside it (an engine under torch.inference_mode): an inference
    # tensor as a parameter's data would break training the model afterwards
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if enable:
                for names in FUSED_GROUPS:
                    fused = _fuse(module, names)
                    if fused is not None:
                        changed += fused
                        seen.update(id(module._modules[name].weight) for name in names)  # type: ignore[union-attr]
            elif _FUSED.pop(module, None) is not None:
                changed += 1
        for module in model.modules():
            if type(module) is not nn.Linear or id(module.weight) in seen:
                continue
            weight = module.weight
            seen.add(id(weight))
            if enable and prefers_transposed(module) and not is_transposed(weight):
                weight.data = weight.data.t().contiguous().t()
                changed += 1
            elif not enable and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
                changed += 1
    return changed
