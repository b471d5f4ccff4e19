"""Low-rank adapters on a model's linear layers: LoRA, rsLoRA, NOLA, and QLoRA (the same on a compressed base).

An adapted linear layer computes ``y = base(x) + scale * B @ A @ dropout(x)`` with A (r, in) and B (out, r):

- LoRA (Hu et al.): A and B are trained; ``scale = alpha / r``. Initialised as peft does by default: A
  kaiming-uniform (bound 1/sqrt(in)), B zeros, so the adapted model starts equal to the base.
- rsLoRA (Kalajdzievski): ``scale = alpha / sqrt(r)``, which keeps the update's size steady as r grows.
- NOLA (Koohpayegani et al.): ``A = sum_i a_i A_i`` and ``B = sum_j b_j B_j`` over `nola_bases` random bases
  regenerated from a seed (never stored, never trained); only the coefficients a, b train, so the trainable count
  per layer is 2 x nola_bases whatever r is. a starts uniform, b at zero (the update starts at zero).
- QLoRA (Dettmers et al.): the base layer is one of slmkit's compressed linears (`Int8Linear`, `Int4Linear`
  from `slm compress`); the adapter is the same float A, B on top, and gradients reach only A and B.

The base model is left as it is: the adapted module keeps its place and its state-dict keys, the adapter's
factors are registered on it (``layers.0.self_attn.q_proj.lora_A.<adapter>.weight`` and ``lora_B``, peft's own
in-memory names, ``<adapter>`` being the adapter's name, "default" unless given), and a forward hook adds the
update. So ``base_state_dict(model)`` loads into a plain model, and removing the adapters gives back the base.

Several named adapters can sit on one model at once (serving a different adapter per request). With no row
selection every adapter the model holds is added to every row (with one adapter: the adapted model). After
``set_active_adapters(model, rows)`` row i of each batch uses only adapter ``adapter_names(model)[rows[i]]``
(-1: the base alone): the factors of all adapters are stacked per layer (zero-padded to the largest rank, the
scale folded into B) and gathered per row, so one batch mixes adapters without a device sync or a loop over
adapters, and row i equals the model with adapter rows[i] merged. Mixture-of-experts expert layers see
tokens regrouped by expert, not by row, so per-row selection refuses adapters on them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import check_field_types
from slmkit.errors import UserError
from slmkit.models.quantized import Int4Linear, Int8Linear, LowRankLinear

AdapterKind = Literal["lora", "nola"]
ALL_LINEAR = "all-linear"  # peft's value: every linear layer but the output head
ADAPTER_PARTS = ("lora_A", "lora_B")
DEFAULT_ADAPTER = "default"  # peft's name for an unnamed adapter
# the layers an adapter can sit on: float linears, and compressed ones (QLoRA)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Int8Linear, Int4Linear, LowRankLinear)
_CONTEXT = "lora_context"  # attribute of the model and of each adapted module: the shared `AdapterContext`


@dataclass
class LoRASpec:
    """One adapter's shape and initialisation (what `slm finetune --lora/--nola` and adapter_config.json hold).

    target_modules: module names or name endings (``q_proj`` matches every ``...q_proj``; a full name such as
    ``layers.0.mlp.down_proj`` matches that layer only), a comma-separated string of them, or "all-linear" (every
    linear layer but ``lm_head``, as peft means it). Each name must match at least one linear layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    kind: AdapterKind = "lora"
    nola_bases: int = 64  # NOLA: random bases for A and as many for B
    nola_seed: int = 0  # NOLA: the seed the bases are regenerated from (saved with the adapter)
    seed: int = 0  # the initial A (LoRA) or coefficients (NOLA)

    def __post_init__(self) -> None:
        where = "adapter spec"
        check_field_types(self, where)
        if self.r <= 0:
            raise UserError(f"{where}: r (the rank) must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"{where}: alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.kind not in ("lora", "nola"):
            raise UserError(f"{where}: kind must be 'lora' or 'nola', got {self.kind!r}")
        if self.kind == "nola" and (isinstance(self.nola_bases, bool) or self.nola_bases <= 0):
            raise UserError(f"{where}: nola_bases must be a positive integer, got {self.nola_bases}")
        targets: Any = self.target_modules
        if isinstance(targets, str) and targets != ALL_LINEAR:
            targets = tuple(t.strip() for t in targets.split(","))
        elif isinstance(targets, list | tuple):
            targets = tuple(targets)
        if not isinstance(targets, str):
            if not targets or not all(isinstance(t, str) and t and t.strip() == t for t in targets):
                raise UserError(
                    f"{where}: target_modules must be layer names such as q_proj,v_proj (or {ALL_LINEAR!r}), "
                    f"got {self.target_modules!r}"
                )
        self.target_modules = targets

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class AdapterContext:
    """What every adapted layer of one model shares: the adapters by name (in load order, which `rows` index)
    and the current per-row selection."""

    specs: dict[str, LoRASpec] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # (B,) adapter index per batch row, -1 = none; None: every adapter, every row
    expert_layer: str | None = None  # an adapted MoE expert layer, if any (per-row selection cannot reach it)


# ---- the factors ----------------------------------------------------------------------------------
def _seed_for(seed: int, module: str, part: str) -> int:
    """A per-layer seed that depends on names only (not on the order layers are visited; crc32, not Python's
    salted hash, so it is the same in every process)."""
    return zlib.crc32(f"{seed}:{module}:{part}".encode()) & 0x7FFF_FFFF


def _uniform(shape: tuple[int, ...], bound: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # on the CPU always, so every device gets the same numbers
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class NOLAFactor(nn.Module):
    """A (rows, cols) factor as a combination of `n` fixed random bases: weight = sum_i coefficients[i] * bases[i].

    The bases are a non-persistent buffer regenerated from `seed` (not in the state dict, not trained)."""

    def __init__(self, rows: int, cols: int, n: int, seed: int, bound: float) -> None:
        super().__init__()
        self.rows, self.cols, self.n, self.seed, self.bound = rows, cols, n, seed, bound
        self.coefficients = nn.Parameter(torch.zeros(n))
        self.register_buffer("bases", self.regenerate(), persistent=False)

    def regenerate(self) -> torch.Tensor:
        """The (n, rows * cols) bases, from the seed alone."""
        return _uniform((self.n, self.rows * self.cols), self.bound, self.seed)

    @property
    def weight(self) -> torch.Tensor:
        return (self.coefficients.to(self.bases.dtype) @ self.bases).view(self.rows, self.cols)


def _make_factors(
    module: nn.Module, name: str, spec: LoRASpec, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    k, n, r = module.in_features, module.out_features, spec.r
    if spec.kind == "lora":
        lora_a = nn.Linear(k, r, bias=False, device="meta")
        lora_b = nn.Linear(r, n, bias=False, device="meta")
        # peft's default: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero
        lora_a.weight = nn.Parameter(_uniform((r, k), 1 / math.sqrt(k), _seed_for(spec.seed, name, "A")))
        lora_b.weight = nn.Parameter(torch.zeros(n, r))
    else:
        bases = spec.nola_bases
        lora_a = NOLAFactor(r, k, bases, _seed_for(spec.nola_seed, name, "A"), 1 / math.sqrt(k))
        lora_b = NOLAFactor(n, r, bases, _seed_for(spec.nola_seed, name, "B"), 1 / math.sqrt(r))
        # A = sum a_i A_i has the variance of one basis when Var(a) = 1/bases: a ~ U(-sqrt(3/bases), sqrt(3/bases))
        with torch.no_grad():
            lora_a.coefficients.copy_(_uniform((bases,), math.sqrt(3 / bases), _seed_for(spec.seed, name, "a")))
    return lora_a.to(device=device, dtype=dtype), lora_b.to(device=device, dtype=dtype)


def _factor_dtype(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """fp32 adapters on a half-precision or compressed base (as peft's autocast_adapter_dtype), else the base's."""
    weight = getattr(module, "weight", None)
    tensor = next(iter(module.buffers()), None) if weight is None else weight
    device = tensor.device if tensor is not None else torch.device("cpu")
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype, device
    return torch.float32, device


# ---- the forward ----------------------------------------------------------------------------------
def _lora_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer: the base's output plus the adapters' updates."""
    x = args[0]
    context: AdapterContext = getattr(module, _CONTEXT)
    factors_a, factors_b = module.lora_A, module.lora_B
    if context.rows is None:
        for name, lora_a in factors_a.items():
            spec = context.specs[name]
            a = lora_a.weight  # (r, in); a NOLA factor builds it from its coefficients
            h = x.to(a.dtype)
            if spec.dropout and module.training:
                h = F.dropout(h, spec.dropout, training=True)
            update = F.linear(F.linear(h, a), factors_b[name].weight) * spec.scale
            output = output + update.to(output.dtype)
        return output
    return output + _per_row_update(module, x, context).to(output.dtype)


def _stacked(module: nn.Module, context: AdapterContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, r_max, in) A's and (N, out, r_max) scale * B's of the model's N adapters (zeros where this layer has
    none), cached while no factor changes (in-place updates bump the tensors' version counters)."""
    factors_a, factors_b = module.lora_A, module.lora_B
    present = [n for n in context.specs if n in factors_a]
    params = [p for n in present for p in (*factors_a[n].parameters(), *factors_b[n].parameters())]
    key = (tuple(context.specs), tuple(present), tuple((p._version, p.data_ptr()) for p in params))
    cached = module.__dict__.get("_lora_stack")
    if cached is not None and cached[0] == key and not torch.is_grad_enabled():
        return cached[1]
    weights = [(n, factors_a[n].weight, factors_b[n].weight) for n in present]
    r_max = max(a.shape[0] for _, a, _ in weights)
    ref = weights[0][1]
    stack_a = ref.new_zeros(len(context.specs), r_max, module.in_features)
    stack_b = ref.new_zeros(len(context.specs), module.out_features, r_max)
    names = list(context.specs)
    for name, a, b in weights:
        i, r = names.index(name), a.shape[0]
        stack_a[i, :r] = a
        stack_b[i, :, :r] = b * context.specs[name].scale
    if not torch.is_grad_enabled():
        module.__dict__["_lora_stack"] = (key, (stack_a, stack_b))
    return stack_a, stack_b


def _per_row_update(module: nn.Module, x: torch.Tensor, context: AdapterContext) -> torch.Tensor:
    rows = context.rows
    assert rows is not None
    b = rows.shape[0]
    if x.shape[0] != b:  # (B*T, C): a layer fed the flattened tokens (a MoE router), row b's tokens contiguous
        if x.dim() != 2 or x.shape[0] % b:
            raise RuntimeError(f"{module.lora_name}: input {tuple(x.shape)} does not split into {b} rows")
        x3 = x.view(b, -1, x.shape[-1])
    else:
        x3 = x.reshape(b, -1, x.shape[-1])  # (B, L, in)
    stack_a, stack_b = _stacked(module, context)
    chosen = rows.clamp(min=0)
    keep = (rows >= 0).to(stack_b.dtype)[:, None, None]
    h = x3.to(stack_a.dtype)
    if module.training:  # one dropout per adapter: per row, that of the row's adapter
        p = torch.tensor([s.dropout for s in context.specs.values()], device=h.device)[chosen]
        if bool((p > 0).any()):
            mask = (torch.rand_like(h) >= p[:, None, None]).to(h.dtype) / (1 - p)[:, None, None]
            h = h * mask
    h = torch.bmm(h, stack_a[chosen].transpose(1, 2))  # (B, L, r_max)
    update = torch.bmm(h, (stack_b[chosen] * keep).transpose(1, 2))  # (B, L, out)
    return update.reshape(*x.shape[:-1], module.out_features)


# ---- adding, selecting, merging, removing ----------------------------------------------------------
def context_of(model: nn.Module) -> AdapterContext | None:
    return getattr(model, _CONTEXT, None)


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters in the order they were added (what `set_active_adapters` indexes)."""
    context = context_of(model)
    return list(context.specs) if context is not None else []


def adapter_spec(model: nn.Module, name: str = DEFAULT_ADAPTER) -> LoRASpec:
    context = context_of(model)
    if context is None or name not in context.specs:
        raise UserError(f"the model has no adapter {name!r} (it has: {', '.join(adapter_names(model)) or 'none'})")
    return context.specs[name]


def adapted_modules(model: nn.Module, name: str | None = None) -> list[str]:
    """Names of the layers carrying adapter `name` (any adapter when None), in module order."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and (name is None or name in m.lora_A)]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def match_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """The linear layers `targets` names (see `LoRASpec.target_modules`); UserError for a name matching no layer
    or matching a layer that is not linear."""
    linears = [
        n
        for n, m in model.named_modules()
        if _is_linear(m) and not any(p in n.split(".") for p in ADAPTER_PARTS)  # not an adapter's own factors
    ]
    if targets == ALL_LINEAR:
        found = [n for n in linears if n != "lm_head"]
        if not found:
            raise UserError(f"target_modules {ALL_LINEAR!r}: the model has no linear layer besides lm_head")
        return found
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for target in targets:
        hits = [n for n in modules if (n == target or n.endswith("." + target)) and n]
        hits = [n for n in hits if not any(p in n.split(".") for p in ADAPTER_PARTS)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(
                f"target_modules: {target!r} matches no layer of this model; its linear layers are {', '.join(short)}"
            )
        other = [n for n in hits if n not in linears]
        if other:
            raise UserError(
                f"target_modules: {target!r} matches {other[0]} ({type(modules[other[0]]).__name__}); adapters go on "
                "linear layers only"
            )
        chosen.update(hits)
    return [n for n in linears if n in chosen]


def add_adapters(model: nn.Module, spec: LoRASpec, name: str = DEFAULT_ADAPTER, freeze_base: bool = True) -> list[str]:
    """Put adapter `name` on the layers `spec.target_modules` names; returns their names.

    The base's modules and state-dict keys stay as they are. freeze_base: every parameter but the adapters'
    stops requiring gradients (as peft's get_peft_model), so an optimizer over `requires_grad` trains only them.
    """
    names = match_targets(model, spec.target_modules)
    attach(model, names, spec, name)
    if freeze_base:
        for key, param in model.named_parameters():
            if not is_adapter_param(key):
                param.requires_grad_(False)
    return names


def attach(model: nn.Module, modules: list[str], spec: LoRASpec, name: str = DEFAULT_ADAPTER) -> None:
    """Adapter `name` (initialised per `spec`) on exactly the layers `modules` (full names)."""
    if not isinstance(name, str) or not name or "." in name or name in ADAPTER_PARTS:
        raise UserError(f"adapter name {name!r}: give a non-empty name without dots")
    context = context_of(model)
    if context is None:
        context = AdapterContext()
        object.__setattr__(model, _CONTEXT, context)  # a plain attribute, not a submodule
    if name in context.specs:
        raise UserError(f"the model already has an adapter named {name!r}; remove it first or pick another name")
    if context.rows is not None:
        raise UserError("adapters cannot be added while rows are selected; call set_active_adapters(model, None)")
    layers = []
    for full in modules:
        module = model.get_submodule(full)
        if not _is_linear(module):
            raise UserError(f"{full} is a {type(module).__name__}; adapters go on linear layers only")
        layers.append((full, module))
    context.specs[name] = spec
    for full, module in layers:
        if not hasattr(module, "lora_A"):
            module.lora_A = nn.ModuleDict()
            module.lora_B = nn.ModuleDict()
            object.__setattr__(module, _CONTEXT, context)
            module.lora_name = full
            module.register_forward_hook(_lora_hook)
        dtype, device = _factor_dtype(module)
        module.lora_A[name], module.lora_B[name] = _make_factors(module, full, spec, dtype, device)
    _note_expert_layers(model, context)


def _note_expert_layers(model: nn.Module, context: AdapterContext) -> None:
    experts = (m for m in adapted_modules(model) if ".experts." in f".{m}.")
    context.expert_layer = next(experts, None)


def set_active_adapters(model: nn.Module, rows: torch.Tensor | None) -> None:
    """Choose an adapter per batch row for the following forwards: rows (B,) holds indices into
    `adapter_names(model)`, -1 for the base alone; None goes back to every adapter on every row.

    Every forward until the next call must have B rows (a new batch composition needs a new call). The indices are
    range-checked here (pass them on the CPU to avoid a device sync) and moved to the adapters' device."""
    context = context_of(model)
    if rows is None:
        if context is not None:
            context.rows = None
        return
    if context is None:
        raise UserError("the model has no adapters to select")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise UserError("rows must be a 1-D integer tensor: one adapter index per batch row (-1: none)")
    n = len(context.specs)
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= n):
        raise UserError(f"rows: adapter indices must be in -1..{n - 1} (the model has {n} adapter(s))")
    if context.expert_layer is not None:
        raise UserError(
            f"per-row adapters cannot reach mixture-of-experts expert layers ({context.expert_layer}): they see "
            "tokens regrouped by expert; target the attention layers, or serve one adapter merged"
        )
    device = next((p.device for k, p in model.named_parameters() if is_adapter_param(k)), rows.device)
    context.rows = rows.to(device=device, dtype=torch.long)


def is_adapter_param(name: str) -> bool:
    """Whether a state-dict or parameter name belongs to an adapter (`...q_proj.lora_A.default.weight`)."""
    return any(part in ADAPTER_PARTS for part in name.split("."))


def adapter_of(key: str) -> str | None:
    """The adapter name in an adapter key (the part after lora_A / lora_B), None for a base key."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ADAPTER_PARTS:
            return parts[i + 1]
    return None


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors (of adapter `name` only, when given) under the model's own keys: LoRA factors'
    `weight`, NOLA factors' `coefficients` (NOLA bases are regenerated, never stored)."""
    return {
        k: v for k, v in model.state_dict().items() if is_adapter_param(k) and (name is None or adapter_of(k) == name)
    }


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without adapters: it loads into the plain model."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}


def delta_weight(module: nn.Module, name: str) -> torch.Tensor:
    """scale * B @ A of adapter `name` on one adapted layer, (out, in)."""
    spec = getattr(module, _CONTEXT).specs[name]
    return (module.lora_B[name].weight @ module.lora_A[name].weight) * spec.scale


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Fold adapters (all when None) into the base weights, W += scale * B @ A, and remove them; returns the
    merged layers.

    Only float `nn.Linear` bases merge: a compressed base (QLoRA) is refused, since folding the update into int4/int8
    codes would re-quantize it and change the results; merge into the float model it was compressed from, or
    dequantize it first (`slm merge-adapter` does that, writing a float model), or keep the adapter unmerged.
    """
    context = context_of(model)
    names = adapter_names(model) if names is None else names
    for name in names:
        adapter_spec(model, name)
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and any(a in m.lora_A for a in names)]
    head = getattr(model, "lm_head", None)
    embedding = getattr(model, "embed_tokens", None)
    tied = isinstance(head, nn.Linear) and head.weight is getattr(embedding, "weight", None)
    for full, module in layers:
        if not isinstance(module, nn.Linear):
            raise UserError(
                f"{full} is a compressed layer ({type(module).__name__}); an adapter cannot be merged into packed "
                "weights without re-quantizing them. Merge into the float model, or dequantize first "
                "(slm merge-adapter writes a float model), or keep the adapter unmerged"
            )
        if module is head and tied:
            raise UserError(
                "lm_head shares its weight with embed_tokens (tied embeddings); merging its adapter would change the "
                "embeddings too: keep it unmerged"
            )
    with torch.no_grad():
        for _, module in layers:
            for name in names:
                if name in module.lora_A:
                    module.weight += delta_weight(module, name).to(module.weight.dtype)
    assert context is not None or not names
    remove_adapters(model, names)
    return [full for full, _ in layers]


def remove_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Take adapters (all when None) off the model, leaving the base exactly as it was (merged or not)."""
    context = context_of(model)
    if context is None:
        return
    names = adapter_names(model) if names is None else names
    for name in names:
        adapter_spec(model, name)
    for module in model.modules():
        if not hasattr(module, "lora_A"):
            continue
        for name in names:
            if name in module.lora_A:
                del module.lora_A[name]
                del module.lora_B[name]
        module.__dict__.pop("_lora_stack", None)
        if len(module.lora_A) == 0:
            del module.lora_A, module.lora_B
            object.__delattr__(module, _CONTEXT)
            del module.lora_name
            for key, hook in list(module._forward_hooks.items()):
                if hook is _lora_hook:
                    del module._forward_hooks[key]
    for name in names:
        del context.specs[name]
    context.rows = None
    _note_expert_layers(model, context)
    if not context.specs:
        object.__delattr__(model, _CONTEXT)


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters of the model's adapters (NOLA: coefficients only)."""
    return sum(p.numel() for k, p in model.named_parameters() if is_adapter_param(k))
