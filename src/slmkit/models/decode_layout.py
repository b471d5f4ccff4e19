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

With slmkit's native kernels built (`slmkit.models.native`, the system C compiler at first use) the layout is
another: one weight row at a time over nn.Linear's own row-major layout streams faster still (measured the same
way, every 124m product: 25.7 GB/s against MKL's 21.1 transposed and 13.7 row-major), so the fused groups become
the row blocks of one row-major (sum of outs, in) matrix, the linears a module class lists in `DECODE_ROUTED`
(attention's o, the gated MLP's down, the head: the forwards run them through `decode_linear`) stay row-major,
and `decode_product` sends decode-sized products (up to `NATIVE_F32_MAX_ROWS` rows, eager, no gradients) to the
native kernel. Other linears are laid out for MKL as above.

`use_decode_layout(model)` re-lays those weights in place: each stays the same Parameter with the same shape
(out, in) and the same values, only its strides change (`W.t().contiguous().t()`), so `F.linear` (and everything
else: the forward, training, `state_dict`, saving, export) is unchanged, memory is not doubled, and tied
embeddings stay tied. The new storage is made outside inference mode, so a model laid out for decoding inside
`torch.inference_mode` still trains. Only plain `nn.Linear` fp32 weights on a CPU are touched (quantized, LoRA
factor and GPU weights are left alone). `use_decode_layout(model, False)` restores the row-major layout.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.models import native


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
# input rows up to which an fp32 decode product takes the native kernel (slmkit.models.native): measured over every
# 124m product, one thread, quiet: 1.31x MKL's best layout at 1 row, 1.6x at 2, 2.3x at 4, level at 8, slower at 16
NATIVE_F32_MAX_ROWS = 4
# (A module class lists in DECODE_ROUTED the linears its forward runs through `decode_linear`: with the native
# kernel those stay row-major, the layout it streams fastest; the others are laid out for MKL as before.)
# module -> (fused (sum of outs, in) weight, its weights' data_ptrs); weak and outside the module, so a deep copy
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


# whether the last decode layout was the native kernel's: what a compiled step reads (a plain flag dynamo can guard
# on; the eager path asks native.f32_available() itself)
_COMPILED_NATIVE = [False]


def _native_rows(x: torch.Tensor) -> bool:
    """Whether an input may take the native fp32 kernel (the weight is checked by the callers)."""
    if torch.compiler.is_compiling():  # a compiled decode step calls the kernel as a torch op
        return (
            _COMPILED_NATIVE[0]
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype is torch.float32
            and x.numel() <= NATIVE_F32_MAX_ROWS * x.shape[-1]
        )
    return (
        x.dtype is torch.float32
        and x.numel() <= NATIVE_F32_MAX_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and native.f32_available()
    )


def _native_weight(weight: torch.Tensor) -> bool:
    return weight.dtype is torch.float32 and weight.is_contiguous() and weight.device.type == "cpu"


def _native_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    if torch.compiler.is_compiling():
        y = torch.ops.slmkit.f32_linear(x.reshape(-1, k).contiguous(), weight)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    x2 = x.view(-1, k) if x.is_contiguous() else x.reshape(-1, k).contiguous()
    y = native.f32_linear(x2, weight, None if bias is None else bias.detach().contiguous())
    return y.view(*x.shape[:-1], weight.shape[0])


def decode_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the native fp32 kernel where it applies (an eager forward without
    gradients, fp32 on a CPU, a row-major weight, at most NATIVE_F32_MAX_ROWS rows), else through torch."""
    if _native_rows(x) and _native_weight(weight) and (bias is None or bias.dtype is torch.float32):
        return _native_product(x, weight, bias)
    return F.linear(x, weight, bias)


def decode_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x); a plain nn.Linear without hooks takes `decode_product` (the native kernel for decode-sized fp32
    inputs on a CPU). For the linears a module lists in DECODE_ROUTED."""
    if type(linear) is nn.Linear and _native_rows(x) and not _hooked(linear):
        weight, bias = linear.weight, linear.bias
        if _native_weight(weight) and (bias is None or bias.dtype is torch.float32):
            return _native_product(x, weight, bias)
    return linear(x)


# module -> a callable computing its FUSED_GROUPS linears in one product (the quantized loader registers these for
# its tiled layers, slmkit.models.quantized); the callable returns None where it does not apply
_FUSED_CALLS: weakref.WeakKeyDictionary[nn.Module, Callable[[torch.Tensor], torch.Tensor | None]] = (
    weakref.WeakKeyDictionary()
)


def register_fused_call(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    _FUSED_CALLS[module] = fn


def fused_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The module's fused group (q/k/v or gate/up) as one product through a registered callable, in an eager forward
    without gradients; None (run the linears one by one) where none is registered or it does not apply."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    fn = _FUSED_CALLS.get(module)
    return None if fn is None else fn(x)


def native_layout() -> bool:
    """Whether the decode layout is the native kernel's (fused groups as row blocks, routed linears row-major)
    rather than MKL's (fused groups as column blocks, wide weights transposed)."""
    return native.f32_available()


def fused_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """The (sum of outs, in) weight whose row blocks are the weights of `module`'s linears `names` (for
    `decode_product`), when the decode layout fused them and they still are (the same plain linears over the same
    memory), in an eager forward without gradients; else None (the caller runs its linears one by one). In memory
    it is one row-major matrix with the native kernel, else the transpose of one (in, sum of outs) row-major
    matrix (the layout MKL streams fastest)."""
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
    """Lay the linears `names` of `module` as the row blocks of one (sum of outs, in) weight (each weight a view
    of it: same Parameter, shape and values), in memory one row-major matrix (the native kernel's layout) or the
    transpose of one (MKL's): True, or False when they are already; None when they cannot be (absent, biases,
    other types, ties)."""
    linears = [module._modules.get(name) for name in names]
    if any(m is None for m in linears) or not _fusable(linears):  # type: ignore[arg-type]
        return None
    if fused_weight(module, names) is not None:
        return False
    total = sum(m.out_features for m in linears)  # type: ignore[union-attr]
    rows = native_layout()
    fused = torch.empty(total, linears[0].in_features) if rows else torch.empty(linears[0].in_features, total).t()  # type: ignore[union-attr]
    start = 0
    for m in linears:
        out = m.out_features  # type: ignore[union-attr]
        fused[start : start + out].copy_(m.weight)  # type: ignore[union-attr]
        m.weight.data = fused[start : start + out]  # type: ignore[union-attr]
        start += out
    _FUSED[module] = (fused, tuple(m.weight.data_ptr() for m in linears))  # type: ignore[union-attr]
    return True


# model -> the huge-page arenas its decode weights were moved into (`_place_in_huge_pages`)
_ARENAS: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()


def _in_arena(model: nn.Module, t: torch.Tensor) -> bool:
    ptr = t.data_ptr()
    return any(a.data_ptr() <= ptr < a.data_ptr() + a.numel() * a.element_size() for a in _ARENAS.get(model, ()))


def _place_in_huge_pages(model: nn.Module, routed: set[int]) -> None:
    """Move the native kernel's decode weights (the fused groups' matrices and the routed weights) into one new
    allocation backed by huge pages (`native.huge_slots`), unit by unit, each weight a view of it as before (the
    same Parameters, shapes, values and ties; the old memory is freed as each unit moves)."""
    units: list[tuple[str, object]] = []  # ("fused", module) or ("weight", Parameter): no old tensor held here
    likes: list[tuple[torch.Size, torch.dtype]] = []
    for module in model.modules():
        entry = _FUSED.get(module)
        if entry is not None and entry[0].is_contiguous() and not _in_arena(model, entry[0]):
            units.append(("fused", module))
            likes.append((entry[0].shape, entry[0].dtype))
    placed = set()
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) in routed and id(module.weight) not in placed:
            placed.add(id(module.weight))
            if module.weight.is_contiguous() and not _in_arena(model, module.weight):
                units.append(("weight", module.weight))
                likes.append((module.weight.shape, module.weight.dtype))
    if not units:
        return
    arena, slots = native.huge_slots(likes)
    _ARENAS.setdefault(model, []).append(arena)
    for (kind, owner), slot in zip(units, slots, strict=True):
        if kind == "weight":
            slot.copy_(owner.data)  # type: ignore[attr-defined]
            owner.data = slot  # type: ignore[attr-defined]
            continue
        slot.copy_(_FUSED[owner][0])  # type: ignore[index]
        names = next(group for group in FUSED_GROUPS if all(n in owner._modules for n in group))  # type: ignore[attr-defined]
        start = 0
        for name in names:
            linear = owner._modules[name]  # type: ignore[attr-defined]
            linear.weight.data = slot[start : start + linear.out_features]
            start += linear.out_features
        _FUSED[owner] = (slot, tuple(owner._modules[n].weight.data_ptr() for n in names))  # type: ignore[attr-defined,index]


def fused_matrix(module: nn.Module) -> torch.Tensor | None:
    """The matrix the decode layout fused `module`'s group into (q/k/v or gate/up, as row blocks or the transpose of
    column blocks), whether or not it is still current (callers check the linears' pointers: `fused_pointers`)."""
    entry = _FUSED.get(module)
    return None if entry is None else entry[0]


def fused_pointers(module: nn.Module) -> tuple[int, ...] | None:
    """The data_ptrs of the group's weights when `module`'s group was fused (None: not fused)."""
    entry = _FUSED.get(module)
    return None if entry is None else entry[1]


def _group(module: nn.Module) -> list[nn.Module]:
    """The linears of the fused group a module in _FUSED holds."""
    names = next(group for group in FUSED_GROUPS if all(n in module._modules for n in group))
    return [module._modules[n] for n in names]  # type: ignore[misc]


def use_decode_layout(model: nn.Module, enable: bool = True) -> int:
    """Lay out the model's fp32 linear weights on a CPU for decoding (enable), or back as nn.Linear stores them (not
    enable), in place; returns how many weights (or fused groups) changed. Attention's q/k/v and a gated MLP's
    gate/up projections become column blocks of one (in, sum of outs) row-major matrix each (`fused_weight`: one
    product instead of three or two, with longer rows); other weights `prefers_transposed` picks are re-laid
    (in, out). Values, shapes and Parameter objects stay the same, so optimizers, tied weights and saved files
    are unaffected; the fused products run only in eager forwards without gradients."""
    changed = 0
    seen: set[int] = set()
    routed = set()  # weights the forward runs through decode_linear: row-major for the native kernel
    if native_layout():
        for module in model.modules():
            for name in getattr(type(module), "DECODE_ROUTED", ()):
                linear = module._modules.get(name)
                if type(linear) is nn.Linear:
                    routed.add(id(linear.weight))
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
            if enable and id(weight) in routed:
                if not weight.is_contiguous():
                    weight.data = weight.data.contiguous()
                    changed += 1
            elif enable and prefers_transposed(module) and not is_transposed(weight):
                weight.data = weight.data.t().contiguous().t()
                changed += 1
            elif not enable and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
                changed += 1
        if enable and native_layout():
            fused_parts = {id(m.weight) for module in model.modules() if module in _FUSED for m in _group(module)}
            _place_in_huge_pages(model, routed - fused_parts)  # a fused group moves as one matrix
    _COMPILED_NATIVE[0] = enable and native_layout()
    return changed
