"""A CPU decode step of one token per row through every layer in one native call (issue #24).

At batch 1 on a CPU a decode step is a chain of matrix-vector products (memory-bound: the weights' bytes set the
time) separated by ~40 small torch ops per layer (norms, splits, rotary, the cache write, attention, residuals,
the activation) and the Python around them. Those cost about 0.3 ms per layer on one core of the 2-core AMD EPYC
this was written on: for the 60M `base` preset a third of what its 12 layers' products take. `slm_decode_layers`
(`native_kernels.c`) runs the whole step instead, calling the same product kernels the layers use (fp32 over the
decode layout's row-major and fused weights, the int8 and int4 tiles), so one step is one ctypes call plus the
embedding lookup and the head.

`decode(model, idx, state, pos, upto)` is what `Transformer.forward` tries first for an eager forward without
gradients of one token for each of up to 8 rows (16 for small models; batch 1 above all; rows may sit at different
positions) or of up to that many consecutive tokens of one row; it returns the final-normed hidden states, or None
where the step does not apply and the layers run as before. It applies to models whose every block is RMSNorm,
attention (rotary; q/k norm and a sliding window allowed; no value embeddings) and a dense MLP or a mixture of
experts (gated experts of one width, any k up to 64, renormalised or not, no shared expert: Mixtral, OLMoE; each row
runs its own k experts), with plain fp32 `KVState` caches, and linears that are plain fp32 `nn.Linear`s, or tiled
`Int8Linear` / `Int4Linear` (the native kernels' layouts), without forward hooks (a LoRA adapter's hook keeps the
layers' own path). Everything it reads is checked against the pointers it was planned on at every step, so a weight
moved or replaced since (`.to()`, a new layout, a load) replans it.
`ENABLED[0] = False` (or `SLMKIT_NATIVE_KERNELS=0`) turns it off.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from slmkit.models import native
from slmkit.models.quantized import kernels_enabled

ENABLED = [True]
# rows (or tokens of one row) up to which a call runs natively: for models of at least SMALL_PARAMS parameters 8
# (measured on `base`, one thread: the native call was 1.3x the layers' path at 4-9 tokens of one row, level at 12,
# 0.88x at 16: MKL's products win there), for smaller ones 16 (`micro`: 2x the layers' path at 12-16 tokens)
MAX_ROWS = 16
LARGE_MODEL_ROWS = 8
SMALL_PARAMS = 20_000_000
STEPS = [0]  # decode steps run natively (what tests and benchmarks read to know the path was taken)
LIN_NONE, LIN_F32, LIN_Q8, LIN_Q4 = -1, 0, 1, 2
LIN_FIELDS, LINS = 7, 7  # as native_kernels.c: (kind, weight, aux, bias, n, k, group) x (q, k, v, o, gate, up, down)
# + input norm, post-attention norm, key cache, value cache, q norm, k norm, their kind, sliding window, and a mixture
# of experts' description (0: a dense MLP), its number of experts, k and flags (MOE_*)
LAYER_FIELDS = LINS * LIN_FIELDS + 12
NO_LINEAR = [LIN_NONE] + [0] * (LIN_FIELDS - 1)  # an absent linear's fields
MOE_NORMALIZE, MOE_UNIT = 1, 2
MAX_TOP_K = 64  # the kernel's bound on the experts a token uses
QK_NONE, QK_HEAD, QK_PROJECTION = 0, 1, 2
N_DIMS = 9
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}
ROPE_TABLE_TYPES = (None, "linear", "yarn", "llama3")  # scalings whose angles are one table of every position


class _Unsupported(Exception):
    """Why a model cannot take the native step; `lasting`: for good (its architecture), else until it changes (a
    hook, a layer not yet tiled, another dtype)."""

    def __init__(self, why: str, lasting: bool = False) -> None:
        super().__init__(why)
        self.lasting = lasting


def _linear_fields(linear: nn.Module | None, sources: list) -> list[int]:
    """The kernel's description of one linear (and the tensors it reads, appended to `sources` for the checks)."""
    from slmkit.models.quantized import Int4Linear, Int8Linear

    if linear is None:
        return list(NO_LINEAR)
    if linear._forward_hooks or linear._forward_pre_hooks:
        raise _Unsupported("a forward hook (an adapter)")
    bias = getattr(linear, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise _Unsupported("a bias that is not contiguous fp32")
    bias_ptr = 0 if bias is None else bias.data_ptr()
    n, k = linear.out_features, linear.in_features  # type: ignore[union-attr]
    if type(linear) is nn.Linear:
        w = linear.weight
        if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
            raise _Unsupported("an fp32 weight not in row-major CPU memory")
        sources.append((linear._parameters, "weight"))
        fields = [LIN_F32, w.data_ptr(), 0, bias_ptr, n, k, 0]
    elif type(linear) is Int8Linear and linear.tiled and native.int8_available():
        b = linear._buffers
        sources.extend([(b, "qweight"), (b, "scales")])
        if not kernels_enabled():
            raise _Unsupported("quantized kernels off (dequantized_matmuls)")
        sources.append(QUANTIZED)
        fields = [LIN_Q8, b["qweight"].data_ptr(), b["scales"].data_ptr(), bias_ptr, n, k, 0]  # type: ignore[union-attr]
    elif type(linear) is Int4Linear and linear.tiled and linear.outlier_index is None and native.int4_available():
        sz = linear.native_sz
        assert sz is not None
        sources.extend([(linear._buffers, "qweight"), (linear.__dict__, "native_sz")])
        if not kernels_enabled():
            raise _Unsupported("quantized kernels off (dequantized_matmuls)")
        sources.append(QUANTIZED)
        fields = [LIN_Q4, linear.qweight.data_ptr(), sz.data_ptr(), bias_ptr, n, k, linear.group_size]
    else:
        raise _Unsupported(f"a {type(linear).__name__} the kernels do not run")
    if bias is not None:
        sources.append((linear._parameters if "bias" in linear._parameters else linear._buffers, "bias"))
    return fields


QUANTIZED = (None, "")  # a marker among a plan's sources: it runs int8/int4 kernels


class Plan:
    """One model's description for `slm_decode_layers`: per-layer fields (int64), dimensions, and what to check."""

    def __init__(self, model: nn.Module) -> None:
        from slmkit.models.attention import Attention, RMSNorm
        from slmkit.models.decode_layout import fused_matrix, fused_pointers
        from slmkit.models.mlp import MLP, PlainMLP
        from slmkit.models.moe import MoE

        self.moe_descriptions: list[torch.Tensor] = []  # kept alive: the kernel reads them by pointer
        self.n_experts = 0
        if not all(hasattr(model, name) for name in ("config", "layers", "embed_tokens", "norm", "rope_table")):
            raise _Unsupported("not a slmkit Transformer", lasting=True)
        lib = native.library()
        if lib is None or lib.slm_decode_fields() != LAYER_FIELDS * 100 + N_DIMS:
            raise _Unsupported("the kernel library's layer description differs from this module's", lasting=True)
        cfg = model.config  # type: ignore[attr-defined]
        if cfg.positions != "rope" or cfg.value_embeds or cfg.skip_connections:
            raise _Unsupported("positions other than rotary, value embeddings or skips", lasting=True)
        if (cfg.rope_scaling.type if cfg.rope_scaling is not None else None) not in ROPE_TABLE_TYPES:
            raise _Unsupported("a rope scaling that changes with the sequence", lasting=True)
        if cfg.activation not in ACTIVATIONS or cfg.rope_dim % 2:
            raise _Unsupported("an activation or rotary width the kernel lacks", lasting=True)
        self.sources: list[tuple[dict, str]] = []  # (dict, key): the tensors read, checked by pointer each step
        self.modules: list[nn.Module] = []  # checked for hooks each step
        rows: list[list[int]] = []
        d_ff = None
        for block in model.layers:  # type: ignore[attr-defined]
            attn, mlp = block._modules.get("self_attn"), block._modules.get("mlp")
            ln1, ln2 = block._modules.get("input_layernorm"), block._modules.get("post_attention_layernorm")
            if type(attn) is not Attention:
                raise _Unsupported("a mixer other than attention", lasting=True)
            if hasattr(attn, "value_lambdas") or type(ln1) is not RMSNorm or type(ln2) is not RMSNorm:
                raise _Unsupported("value embeddings or a norm other than RMSNorm", lasting=True)
            moe = type(mlp) is MoE
            if moe:
                if "shared_expert" in mlp._modules or mlp.top_k > MAX_TOP_K:  # type: ignore[union-attr]
                    raise _Unsupported("a shared expert, or more chosen experts than the kernel holds", lasting=True)
                width = mlp.experts[0].down_proj.in_features  # type: ignore[union-attr, index]
            elif type(mlp) not in (MLP, PlainMLP):
                raise _Unsupported("an MLP other than the dense ones and a mixture of experts", lasting=True)
            else:
                width = mlp.down_proj.in_features  # type: ignore[union-attr]
            if d_ff not in (None, width):
                raise _Unsupported("MLP widths that differ between layers", lasting=True)
            d_ff = width
            row: list[int] = []
            fused = fused_matrix(attn)
            if fused is not None and fused.is_contiguous():  # the decode layout's q/k/v as one row-major matrix
                row += self._fused_fields(attn, ("q_proj", "k_proj", "v_proj"), fused, fused_pointers(attn))
                row += NO_LINEAR * 2
            else:
                for name in ("q_proj", "k_proj", "v_proj"):
                    row += _linear_fields(attn._modules[name], self.sources)
            row += _linear_fields(attn.o_proj, self.sources)
            if moe:  # the experts' linears are in the layer's mixture-of-experts description
                row += NO_LINEAR * 3
            elif type(mlp) is PlainMLP:
                row += NO_LINEAR + _linear_fields(mlp.up_proj, self.sources)
                row += _linear_fields(mlp.down_proj, self.sources)
            else:
                row += self._gated_fields(mlp)
            for norm in (ln1, ln2):
                w = norm.weight  # type: ignore[union-attr]
                if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
                    raise _Unsupported("a norm weight not contiguous fp32")
                self.sources.append((norm._parameters, "weight"))
                row.append(w.data_ptr())
            row += [0, 0]  # the caches: filled per state
            if hasattr(attn, "q_norm"):  # q/k norm (Qwen3 per head, OLMoE over the projection), before rotary
                for norm in (attn.q_norm, attn.k_norm):
                    w = norm.weight
                    if type(norm) is not RMSNorm or w.dtype != torch.float32 or not w.is_contiguous():
                        raise _Unsupported("a q/k norm that is not an fp32 RMSNorm")
                    self.sources.append((norm._parameters, "weight"))
                    row.append(w.data_ptr())
                row.append(QK_PROJECTION if attn.qk_norm_heads else QK_HEAD)
            else:
                row += [0, 0, QK_NONE]
            row.append(attn.window or 0)
            row += self._moe_fields(mlp, width) if moe else [0, 0, 0, 0]
            rows.append(row)
            self.modules += [m for m in (attn, mlp, ln1, ln2, block) if m is not None]
            self.modules += [*attn.children(), *(m for m in mlp.modules() if m is not mlp)]  # type: ignore[union-attr]
            if len(row) != LAYER_FIELDS:
                raise AssertionError(f"a layer description of {len(row)} fields, not {LAYER_FIELDS}")
        final = model.norm  # type: ignore[attr-defined]
        if type(final) is not RMSNorm:
            raise _Unsupported("a final norm other than RMSNorm", lasting=True)
        if final.weight.dtype != torch.float32 or not final.weight.is_contiguous():
            raise _Unsupported("a final norm weight not contiguous fp32")
        self.sources.append((final._parameters, "weight"))
        self.modules.append(final)
        self.final = final
        self.eps = float(final.eps)
        if any(m.eps != self.eps for m in self.modules if type(m) is RMSNorm):
            raise _Unsupported("norms with different eps", lasting=True)
        self.layers = torch.tensor(rows, dtype=torch.int64)
        self.config = cfg
        self.rope_scaling = cfg.rope_scaling
        self.max_rows = MAX_ROWS if cfg.num_params() < SMALL_PARAMS else LARGE_MODEL_ROWS
        self.n_layers = len(rows)
        self.d_ff = d_ff or 0
        self.quantized = QUANTIZED in self.sources
        self.sources = [source for source in self.sources if source is not QUANTIZED]
        self.pointers = self._pointers()
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ModelState -> (layers, dims, ...)

    def _moe_fields(self, mlp: nn.Module, width: int) -> list[int]:
        """A mixture of experts' layer fields: its description (the router's linear, then each expert's gate, up and
        down), the number of experts, k and the flags."""
        from slmkit.models.mlp import MLP

        fields = _linear_fields(mlp.gate, self.sources)  # type: ignore[arg-type]
        for expert in mlp.experts:  # type: ignore[union-attr]
            if type(expert) is not MLP or expert.down_proj.in_features != width:
                raise _Unsupported("experts that are not gated MLPs of one width", lasting=True)
            fields += self._gated_fields(expert)
        description = torch.tensor(fields, dtype=torch.int64)
        self.moe_descriptions.append(description)
        self.n_experts = max(self.n_experts, int(mlp.n_experts))  # type: ignore[arg-type]
        flags = (MOE_NORMALIZE if mlp.normalize else 0) | (MOE_UNIT if mlp.unit else 0)
        return [description.data_ptr(), int(mlp.n_experts), int(mlp.top_k), flags]  # type: ignore[arg-type]

    def _gated_fields(self, mlp: nn.Module) -> list[int]:
        """A gated MLP's gate, up and down fields: gate and up as the decode layout's one fused matrix when it has
        one (up then absent: gate's product covers it), else each linear."""
        from slmkit.models.decode_layout import fused_matrix, fused_pointers

        fused = fused_matrix(mlp)
        if fused is not None and fused.is_contiguous():
            fields = self._fused_fields(mlp, ("gate_proj", "up_proj"), fused, fused_pointers(mlp)) + NO_LINEAR
        else:
            fields = _linear_fields(mlp.gate_proj, self.sources) + _linear_fields(mlp.up_proj, self.sources)
        return fields + _linear_fields(mlp.down_proj, self.sources)

    def _fused_fields(self, module: nn.Module, names: tuple[str, ...], matrix: torch.Tensor, pointers) -> list[int]:
        linears = [module._modules[name] for name in names]
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            raise _Unsupported("fused linears that are not plain")
        if tuple(m.weight.data_ptr() for m in linears) != pointers:  # type: ignore[union-attr]
            raise _Unsupported("a stale fused matrix")
        for m in linears:
            self.sources.append((m._parameters, "weight"))
        return [LIN_F32, matrix.data_ptr(), 0, 0, matrix.shape[0], matrix.shape[1], 0]

    def _pointers(self) -> tuple[int, ...]:
        return tuple(d[key].data_ptr() for d, key in self.sources)

    def valid(self) -> bool:
        """Whether every tensor is where it was planned and no module has gained a hook."""
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.modules):
            return False
        return self._pointers() == self.pointers

    def for_state(self, state: nn.Module, model: nn.Module) -> tuple | None:
        """(layer fields with this state's caches, dims but the table's rows, scratch, the caches) or None where the
        state is not one the kernel runs (plain fp32 KV caches of at most `max_rows` rows, every layer)."""
        from slmkit.models.state import KVState

        entry = self.states.get(state)
        if entry is not None:
            caches = entry[-1]
            if all(c.data_ptr() == p for c, p in caches):
                return entry
        if getattr(state, "rotary_slots", None) is not None:
            return None
        layers = self.layers.clone()
        caches = []
        slots = None
        for i in range(self.n_layers):
            s = state.layer(i)  # type: ignore[operator]
            if type(s) is not KVState:
                return None
            k, v = s.k, s.v
            if (
                k.shape[0] > self.max_rows
                or k.dtype != torch.float32
                or v.dtype != torch.float32
                or not (k.is_contiguous() and v.is_contiguous())
                or k.device.type != "cpu"
            ):
                return None
            if slots not in (None, k.shape[2]):
                return None
            slots = k.shape[2]
            layers[i, LINS * LIN_FIELDS + 2] = k.data_ptr()
            layers[i, LINS * LIN_FIELDS + 3] = v.data_ptr()
            caches += [(k, k.data_ptr()), (v, v.data_ptr())]
        cfg = self.config
        hd = cfg.dim_per_head
        dims = [cfg.d_model, cfg.n_heads, cfg.n_kv_heads, hd, self.d_ff, slots, cfg.rope_dim]
        dims.append(ACTIVATIONS[cfg.activation])
        per_row = 2 * cfg.d_model + (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * hd + 3 * self.d_ff
        scratch = torch.empty(MAX_ROWS * per_row + slots + MAX_ROWS * self.n_experts)  # + the router's logits
        entry = (layers, dims, scratch, caches)
        self.states[state] = entry
        return entry


# model -> its Plan, or why it has none: LASTING (its architecture) or [the `_signature` it failed with, countdown]
_PLANS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
LASTING = "lasting"


def _signature(model: nn.Module) -> tuple:
    """What a failed plan may have failed on that can change: module types, tiling, hooks, dtypes, devices."""
    mods = tuple(
        (type(m), getattr(m, "tiled", None), bool(m._forward_hooks or m._forward_pre_hooks)) for m in model.modules()
    )
    param = next(model.parameters(), None)
    return mods, None if param is None else (param.dtype, param.device), kernels_enabled()


# a model that could not be planned for a passing reason is looked at again after this many calls (its signature
# costs 0.1-0.3 ms to take, as much as a whole `micro` step); until then its steps take the layers' path
RECHECK_CALLS = 256


def _plan(model: nn.Module) -> Plan | None:
    plan = _PLANS.get(model)
    if isinstance(plan, Plan):
        if plan.quantized and not kernels_enabled():
            return None  # inside dequantized_matmuls(): the layers widen their weights
        if plan.valid():
            return plan
    elif plan is LASTING:
        return None
    elif plan is not None:  # [signature, calls left before it is taken again]
        plan[1] -= 1
        if plan[1] > 0 or plan[0] == _signature(model):
            plan[1] = plan[1] if plan[1] > 0 else RECHECK_CALLS
            return None
    try:
        plan = Plan(model)
    except _Unsupported as why:
        _PLANS[model] = LASTING if why.lasting else [_signature(model), RECHECK_CALLS]
        return None
    _PLANS[model] = plan
    return plan


def applies(model: nn.Module) -> bool:
    """Whether the native step runs this model's decode steps now: its architecture, layers and hooks (the state and
    the row count are checked per call)."""
    return ENABLED[0] and native.f32_available() and _plan(model) is not None


def decode(
    model: nn.Module, idx: torch.Tensor, state: nn.Module, pos: torch.Tensor | None, upto: int | None
) -> torch.Tensor | None:
    """The final-normed hidden states (B, T, C) after every layer for tokens idx (B, T), with the caches in `state`
    updated; None (nothing touched) where the native step does not apply. Either one token per row (T = 1, B rows of
    the state, B <= the plan's `max_rows`: 8, or 16 under SMALL_PARAMS; pos (1,) or (1, 1): every row at one
    position, or (B, 1): each its own), or up to `max_rows` consecutive tokens of one row (B = 1: a speculative
    verification, a short prefill; pos their T positions), each attending causally."""
    b, t = idx.shape
    rows = b * t
    if not ENABLED[0] or pos is None or idx.device.type != "cpu" or rows > MAX_ROWS or not native.f32_available():
        return None
    if pos.dtype != torch.int64 or not pos.is_contiguous() or pos.numel() not in ((1, b) if t == 1 else (t,)):
        return None
    plan = _plan(model)
    if plan is None or rows > plan.max_rows:
        return None
    entry = plan.for_state(state, model)
    if entry is None:
        return None
    layers, dims, scratch, _ = entry
    if state.layer(0).k.shape[0] != b:  # type: ignore[operator]
        return None
    cfg = plan.config
    if cfg.rope_scaling is not plan.rope_scaling or cfg.rope_dim != dims[6]:
        _PLANS.pop(model, None)  # the config's rotary changed (a context extension): plan again next step
        return None
    cos, sin = model.rope_table(dims[5], idx.device)  # type: ignore[operator]
    if cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    x = model.embed_tokens(idx)  # type: ignore[operator]
    if x.dtype != torch.float32 or not x.is_contiguous():
        return None
    out = torch.empty_like(x)
    lib = native.library()
    assert lib is not None
    dims_now = torch.tensor([*dims, cos.shape[0]], dtype=torch.int64)
    per_row = 1 if pos.numel() > 1 else 0  # one position per row (or token), or one for every row
    cache_stride = 1 if t == 1 else 0  # rows of the state, or tokens of its one row
    rc = lib.slm_decode_layers(
        x.data_ptr(), layers.data_ptr(), plan.n_layers, dims_now.data_ptr(), plan.eps, cos.data_ptr(), sin.data_ptr(),
        pos.data_ptr(), per_row, rows, cache_stride, -1 if upto is None else upto, plan.final.weight.data_ptr(),
        out.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    if rc == -2:
        return None  # a position outside the cache: nothing written; the layers' path raises its own error
    if rc:
        raise MemoryError(f"slm_decode_layers failed ({rc})")
    STEPS[0] += 1
    return out
