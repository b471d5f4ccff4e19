"""One spec per Hugging Face family: everything that differs between llama, mistral, qwen2, qwen3 and gpt2.

A `FamilySpec` is a frozen record of what one `model_type` means to slmkit:

- rules: which `ModelConfig` switch values the family's config.json can express (`allowed`), and which
  switches one config.json key holds together (`shared`); `check` refuses a config outside them;
- config.json: `model_type`, `architectures`, the keys read and written (`fields_from_hf`, `keys_to_hf`);
- weights: the transformers parameter names, both ways (`weights_to_hf`, `weights_from_hf`);
- GGUF: llama.cpp's architecture, its tensor names and layout conventions (`gguf`);
- compression: which block linear layers compress (`compressible`) and where AWQ folds its input
  scales (`scale_folds`).

`slmkit.interop.hf`, `slmkit.interop.gguf` and `slmkit.compress` read these specs and name no family
themselves. Adding a family is one `FamilySpec` entry in `FAMILIES` (plus its name in the typed
`slmkit.config.Family` field; a test keeps the two in step).

`slmkit.config` sits below interop and checks generic values only; the family rules are checked here,
by `check_family`, wherever a config comes from a user: training-config resolution (before any step
runs), reading and writing config.json, and compression.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from slmkit.config import ModelConfig, RopeScaling
from slmkit.errors import UserError

if TYPE_CHECKING:
    import torch

StateDict = dict[str, "torch.Tensor"]
WindowStyle = Literal["none", "every_layer", "layer_types"]


@dataclass(frozen=True)
class ScaleFold:
    """Block linears that read one input, and the op producing that input.

    AWQ multiplies the consumers' input columns by s and divides the producer's output by s, which is exact
    only when nothing nonlinear sits between them: a norm (weight and bias) or a linear layer whose output
    feeds the consumers directly (v_proj -> o_proj through the attention average; up_proj -> down_proj
    through a gated product, not through GPT-2's GELU)."""

    producer: str  # module name inside a block: a norm or a linear layer
    consumers: tuple[str, ...]  # linear layers inside the same block
    per_kv_group: bool = False  # o_proj: one scale per channel of a kv group, shared by the heads that read it


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's architecture for this family names and lays out the tensors."""

    arch: str  # general.architecture
    tensors: Mapping[str, str]  # our module name inside a block -> member name of gguf.MODEL_TENSOR
    fused: Mapping[str, tuple[str, ...]]  # a GGUF tensor made of ours by concatenating rows (GPT-2's attn_qkv)
    rope_pairs: bool  # llama.cpp rotates interleaved pairs (x0, x1): q/k rows are permuted per head
    explicit_output: bool  # writes `output` even when the head is tied (llama.cpp's gpt2 loads one)
    activation: str  # the MLP activation llama.cpp's architecture computes
    mlp_bias: bool  # whether that architecture reads MLP biases
    rope_scaling: tuple[str, ...]  # rope scaling types it reproduces
    # mixtures of experts: whether llama.cpp's architecture renormalises the k router weights (None: no experts)
    expert_weights_norm: bool | None = None
    # state-space (and other non-attention) architectures: tensors llama.cpp names without a .weight/.bias suffix,
    # per-tensor conversions, tensors kept in f32 at any file type, and the architecture's own hyperparameters
    parameters: Mapping[str, str] = field(default_factory=dict)  # block parameter ("mixer.A_log") -> member
    convert: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)  # block tensor -> f
    keep_f32: tuple[str, ...] = ()  # members of gguf.MODEL_TENSOR written in f32 whatever the file's type
    hparams: Callable[[Any, ModelConfig], None] | None = None  # (GGUFWriter, config): None: attention's keys
    refuse: Callable[[ModelConfig], str | None] | None = None  # what llama.cpp would compute otherwise, if any


@dataclass(frozen=True, eq=False)  # one instance per family: compared and hashed by identity
class FamilySpec:
    """Everything family-specific about one Hugging Face `model_type` (see the module docstring)."""

    name: str  # config.json's model_type, and ModelConfig.family
    architecture: str  # config.json's architectures[0]
    allowed: Mapping[str, tuple[Any, ...]]  # ModelConfig switch -> the values config.json can express
    shared: Mapping[str, tuple[str, ...]]  # config.json key -> switches it holds together (so they must be equal)
    config_keys: frozenset[str]  # family keys of config.json that fields_from_hf reads (the rest stays in `extra`)
    read_config: Callable[[FamilySpec, dict[str, Any], str], dict[str, Any]]
    write_config: Callable[[FamilySpec, ModelConfig], dict[str, Any]]
    weights_to_hf: Callable[[StateDict, ModelConfig], StateDict]  # our float names -> transformers'
    weights_from_hf: Callable[[StateDict], StateDict]  # transformers' names -> ours
    gguf: GGUFLayout | None  # None: llama.cpp has no architecture for it (yet)
    compressible: tuple[str, ...]  # linear layers inside a block that compression methods replace (if present)
    scale_folds: tuple[ScaleFold, ...]
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    weight_marker: str | None = None  # a substring only this family's weight names have (tells it from names)
    # llama-like config.json details (unused by families with their own reader)
    flag_keys: tuple[str, ...] = ()  # boolean keys (attention_bias, mlp_bias) this family's config.json has
    refused_flags: tuple[str, ...] = ()  # boolean keys its transformers class ignores: true means another model
    window: WindowStyle = "none"  # how config.json states a sliding window
    fixed_keys: Mapping[str, Any] = field(default_factory=dict)  # constant keys written to config.json
    mixers: tuple[str, ...] | None = ("attention",)  # the sequence mixers its layers can have; None: any
    # the MLP kinds its layers can mix per layer (mlp_pattern); None: one kind for every layer (as `allowed` says)
    mlp_kinds: tuple[str, ...] | None = None
    # where its layers of each kind may sit (Jamba's periodic patterns): what config.json cannot state, or None
    layout: Callable[[ModelConfig], str | None] | None = None

    def __post_init__(self) -> None:
        # frozen all the way down: a spec is shared by every model of its family
        for name in ("allowed", "shared", "fixed_keys"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    # ---- rules -----------------------------------------------------------------------------------
    def problem(self, config: ModelConfig) -> tuple[str, str | None] | None:
        """(what is wrong, the usual fix when not said already) for the first switch this family cannot
        express, else None."""
        layer_mixers = config.mixers
        if self.mixers is not None and not layer_mixers <= set(self.mixers):
            other = sorted(layer_mixers - set(self.mixers))
            return (
                f"family {self.name!r} has only {' or '.join(self.mixers)} layers, not {', '.join(other)}",
                "set family: slmkit (slmkit's own format, any mixers) or use a family that has these layers",
            )
        if self.mlp_kinds is not None and not config.mlps <= set(self.mlp_kinds):
            other = sorted(config.mlps - set(self.mlp_kinds))
            return (
                f"family {self.name!r} has only {' or '.join(self.mlp_kinds)} MLPs, not {', '.join(other)}",
                "set family: slmkit (slmkit's own format, any layers)",
            )
        if (
            self.mixers is not None
            and self.mlp_kinds is None
            and (config.mlp_pattern is not None or "memory" in config.mlps)
        ):
            return (  # per-layer MLP kinds and memory layers: slmkit's own format only
                f"family {self.name!r} cannot express "
                + ("mlp_pattern (per-layer MLP kinds)" if config.mlp_pattern is not None else "memory MLPs"),
                "set family: slmkit (slmkit's own format, any layers)",
            )
        own = {"logit_softcap": None, "value_embeds": 0, "skip_connections": False}  # slmkit-only switches, off
        for name, off in own.items():
            if self.mixers is not None and getattr(config, name) != off:
                return (  # transformers' classes of these families have no such weights or logits
                    f"family {self.name!r} cannot express {name}={getattr(config, name)} (slmkit-only switch)",
                    f"set family: slmkit (slmkit's own format) or drop {name}",
                )
        for name, allowed in self.allowed.items():
            value = getattr(config, name)
            if value not in allowed:
                needs = " or ".join(map(repr, allowed))
                return (
                    f"family {self.name!r} cannot express {name}={value!r} (it needs {needs})",
                    f"change {name} or pick another family",
                )
        for key, switches in self.shared.items():
            values = {getattr(config, s) for s in switches}
            if len(values) > 1:
                kind = "flag" if all(isinstance(v, bool) for v in values) else "key"
                return f"family {self.name!r} has one {key} {kind}: set {' == '.join(switches)}", None
        if self.layout is not None:
            what = self.layout(config)
            if what is not None:
                return f"family {self.name!r} cannot express {what}", "set family: slmkit (slmkit's own format)"
        return None

    def check(self, config: ModelConfig, source: str = "model config", fix: str | None = None) -> ModelConfig:
        """`config` if this family can save it, else UserError naming the switch and the fix."""
        found = self.problem(config)
        if found is not None:
            what, usual_fix = found
            fix = fix or usual_fix
            raise UserError(f"{source}: {what}" + (f"; {fix}" if fix else ""))
        return config

    # ---- config.json and weights -----------------------------------------------------------------
    def fields_from_hf(self, d: dict[str, Any], source: str) -> dict[str, Any]:
        """ModelConfig fields (shape and switches) from this family's config.json."""
        return self.read_config(self, d, source)

    def keys_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """This family's config.json keys for `config` (the generic ones are added by slmkit.interop.hf)."""
        return self.write_config(self, config)

    # ---- compression -----------------------------------------------------------------------------
    def block_linears(self, config: ModelConfig) -> list[str]:
        """Full names of the compressible linear layers of every block, in order (each layer's own: a hybrid's
        attention layers have q/k/v/o, its other layers their mixer's; a mixture of experts has each expert's MLP
        layers, and its router stays in float)."""
        return [
            f"layers.{i}.{name}"
            for i in range(config.n_layers)
            for sub in self.compressible
            if _in_layer(sub, config.mixer_at(i), config.mlp_at(i), config)
            for name in _mlp_copies(sub, config, config.mlp_at(i))
        ]


def _mlp_copies(sub: str, config: ModelConfig, mlp: str) -> list[str]:
    """`sub` inside a block, once per MLP that has it: a mixture of experts' `mlp.up_proj` is every expert's."""
    if mlp != "moe" or not sub.startswith("mlp."):
        return [sub]
    leaf = sub.removeprefix("mlp.")
    shared = [f"mlp.shared_expert.{leaf}"] if config.moe_shared_d_ff else []
    return [f"mlp.experts.{e}.{leaf}" for e in range(config.moe_experts)] + shared


def _in_layer(sub: str, mixer: str, mlp: str, config: ModelConfig) -> bool:
    """Whether a block of this mixer and MLP kind has the module `sub`."""
    if mlp == "memory":  # a product-key memory: its gate and down projections (Memory+); query and tables stay float
        return sub in ("mlp.gate_proj", "mlp.down_proj") if config.memory_gated else not sub.startswith("mlp.")
    if sub.startswith("self_attn."):
        return mixer == "attention"
    if sub.startswith("mixer."):
        return sub in MIXER_LINEARS.get(mixer, ())
    if sub.startswith("mlp."):
        return mlp != "none" and (mlp in ("gated", "moe") or sub != "mlp.gate_proj")
    return True


# ---- config.json readers and writers --------------------------------------------------------------
# HF activation names -> ours, and back
_ACT_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}
# what each boolean key means wherever a llama-like config.json has it
_FLAG_SWITCHES = {"attention_bias": ("qkv_bias", "out_bias"), "mlp_bias": ("mlp_bias",)}
# switches a llama-like family may pin to one value in `allowed`; the reader sets them from there
_PINNABLE = ("qkv_bias", "out_bias", "mlp_bias", "qk_norm", "qk_norm_over", "norm", "mlp", "positions")


def _require(d: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing required keys {missing}")


def _activation(name: Any, key: str, source: str) -> str:
    if name not in _ACT_FROM_HF:
        raise UserError(f"{source}: {key}={name!r} is not supported (supported: {', '.join(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


# rope_parameters keys of yarn and longrope beyond factor and original_max_position_embeddings (the same names in
# RopeScaling); each is written only when set, so a config.json round trip keeps what it had
_ROPE_OPTIONAL = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("attention_factor",),
}
ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn", "longrope")


def _rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from the legacy `rope_scaling` + `rope_theta` or transformers 5's `rope_parameters`."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise UserError(f"{source}: per-layer rope parameters are not supported")
    params = {**legacy, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind in ("linear", "dynamic"):
        return float(theta), RopeScaling(type=kind, factor=_rope_number(params, "factor", source))
    # as transformers: a top-level original_max_position_embeddings (Phi-3's) wins over the one in the rope
    # parameters, and without either the model's own context is the original one
    original = d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = original or d.get("max_position_embeddings", 8192 if kind == "llama3" else 2048)
    if params.get("factor") is None and kind in ("yarn", "longrope"):
        params["factor"] = d.get("max_position_embeddings", original) / original  # transformers' implicit factor
    common = dict(type=kind, factor=_rope_number(params, "factor", source), original_max_seq_len=int(original))
    if kind == "llama3":
        scaling = RopeScaling(
            **common,
            low_freq_factor=_rope_number(params, "low_freq_factor", source),
            high_freq_factor=_rope_number(params, "high_freq_factor", source),
        )
    else:
        extra = {k: params[k] for k in _ROPE_OPTIONAL[kind] if params.get(k) is not None}
        if kind == "longrope":
            for name in ("short_factor", "long_factor"):
                if not isinstance(params.get(name), list):
                    raise UserError(f"{source}: longrope rope parameters need {name}, a list of numbers")
                extra[name] = tuple(params[name])
        scaling = RopeScaling(**common, **extra)
    return float(theta), scaling


def _rope_number(params: dict[str, Any], key: str, source: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{source}: rope parameters need {key}, a number, got {value!r}")
    return float(value)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for `cfg` (rope_theta included)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is None:
        return rope
    rope.update({"rope_type": s.type, "factor": s.factor})
    if s.type in ("llama3", "yarn", "longrope"):
        rope["original_max_position_embeddings"] = s.original_max_seq_len
    if s.type == "llama3":
        rope.update({"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor})
    for key in _ROPE_OPTIONAL.get(s.type, ()):
        if getattr(s, key) is not None:
            rope[key] = getattr(s, key)
    if s.type == "longrope":
        rope.update({"short_factor": list(s.short_factor or ()), "long_factor": list(s.long_factor or ())})
    return rope


def _read_window(style: WindowStyle, d: dict[str, Any], n_layers: int, source: str) -> int | None:
    """One sliding window for every layer, or None; mixed full/sliding layers are refused."""
    if style == "none":
        return None
    if style == "every_layer":
        return d.get("sliding_window", 4096)  # transformers' default when the key is absent
    if not d.get("use_sliding_window"):
        return None
    window = d.get("sliding_window")
    layer_types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= d.get("max_window_layers", 0) else "full_attention"
        for i in range(n_layers)
    ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise UserError(
        f"{source}: a mix of full and sliding-window layers (layer_types / max_window_layers) is not supported"
    )


def _write_window(style: WindowStyle, cfg: ModelConfig) -> dict[str, Any]:
    if style == "none":
        return {}
    if style == "every_layer":
        return {"sliding_window": cfg.sliding_window}
    windowed = cfg.sliding_window is not None
    return {
        "use_sliding_window": windowed,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": 0 if windowed else cfg.n_layers,
        "layer_types": [("sliding_attention" if windowed else "full_attention")] * cfg.n_layers,
    }


_LLAMA_LIKE_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "head_dim", "hidden_act",
    "attention_bias", "mlp_bias", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "original_max_position_embeddings",
})  # fmt: skip


def _read_llama_like(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
    refused = [key for key in spec.refused_flags if d.get(key)]
    if refused:
        raise UserError(f"{source}: {spec.name} with {' or '.join(refused)} is not supported")
    # switches the family pins (Qwen2's q/k/v biases, Qwen3's q/k norm) come from its rules; flags from config.json
    switches: dict[str, Any] = {
        name: values[0] for name, values in spec.allowed.items() if name in _PINNABLE and len(values) == 1
    }
    for key in spec.flag_keys:
        switches.update(dict.fromkeys(_FLAG_SWITCHES[key], bool(d.get(key, False))))
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * n_heads == d["hidden_size"]:
        head_dim = None  # the default; keep configs comparable
    theta, scaling = _rope(d, source)
    return dict(
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        head_dim=head_dim,
        activation=_activation(d.get("hidden_act", "silu"), "hidden_act", source),
        sliding_window=_read_window(spec.window, d, d["num_hidden_layers"], source),
        **switches,
    )


def _write_llama_like(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    rope = _rope_to_hf(cfg)
    d: dict[str, Any] = {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rms_norm_eps": cfg.norm_eps,
        "head_dim": cfg.dim_per_head,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "attention_dropout": 0.0,
    }
    for key in spec.flag_keys:  # the rules made the switches a key holds equal, so the first one speaks for all
        d[key] = getattr(cfg, _FLAG_SWITCHES[key][0])
    d.update(_write_window(spec.window, cfg))
    d.update(spec.fixed_keys)
    return d


_GPT2_KEYS = frozenset({
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention", "n_ctx",
})  # fmt: skip


def _read_gpt2(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "n_embd", "n_layer", "n_head"), source)
    for key, bad in (
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("add_cross_attention", True),
    ):
        if d.get(key, not bad) == bad:
            raise UserError(f"{source}: gpt2 option {key}={bad} is not supported")
    if d.get("tie_word_embeddings", True) is False:
        raise UserError(f"{source}: gpt2 with tie_word_embeddings=false is not supported")
    return dict(
        vocab_size=d["vocab_size"],
        d_model=d["n_embd"],
        n_layers=d["n_layer"],
        n_heads=d["n_head"],
        n_kv_heads=d["n_head"],
        d_ff=d.get("n_inner") or 4 * d["n_embd"],
        max_seq_len=d.get("n_positions", 1024),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(d.get("activation_function", "gelu_new"), "activation_function", source),
        norm="layernorm",
        mlp="plain",
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )


def _write_gpt2(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    return {
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        "layer_norm_epsilon": cfg.norm_eps,
        **spec.fixed_keys,
    }


# ---- weight names ---------------------------------------------------------------------------------
LLAMA_PREFIX = "model."  # our names are Llama's without it


def prefixed_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    """Our names -> Llama's: everything but the head under `model.`."""
    return {(k if k.startswith("lm_head.") else LLAMA_PREFIX + k): v for k, v in state.items()}


def prefixed_from_hf(state: StateDict) -> StateDict:
    return {k.removeprefix(LLAMA_PREFIX): v for k, v in state.items()}


def _gpt2_to_hf(state: StateDict, config: ModelConfig) -> StateDict:
    import torch

    out: StateDict = {
        "transformer.wte.weight": state["embed_tokens.weight"],
        "transformer.wpe.weight": state["embed_positions.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for part in ("weight", "bias"):
            out[theirs + f"ln_1.{part}"] = state[ours + f"input_layernorm.{part}"]
            out[theirs + f"ln_2.{part}"] = state[ours + f"post_attention_layernorm.{part}"]
        attn = ours + "self_attn."
        # Conv1D stores (in, out): the transpose of nn.Linear's weight
        qkv = [state[attn + f"{p}_proj.weight"] for p in "qkv"]
        out[theirs + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat([state[attn + f"{p}_proj.bias"] for p in "qkv"])
        out[theirs + "attn.c_proj.weight"] = state[attn + "o_proj.weight"].t().contiguous()
        out[theirs + "attn.c_proj.bias"] = state[attn + "o_proj.bias"]
        out[theirs + "mlp.c_fc.weight"] = state[ours + "mlp.up_proj.weight"].t().contiguous()
        out[theirs + "mlp.c_fc.bias"] = state[ours + "mlp.up_proj.bias"]
        out[theirs + "mlp.c_proj.weight"] = state[ours + "mlp.down_proj.weight"].t().contiguous()
        out[theirs + "mlp.c_proj.bias"] = state[ours + "mlp.down_proj.bias"]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


_GPT2_SIMPLE = {
    "wte.weight": "embed_tokens.weight",
    "wpe.weight": "embed_positions.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
}
_GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _gpt2_from_hf(state: StateDict) -> StateDict:
    out: StateDict = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            out[name] = tensor  # tied; the loader drops it
            continue
        key = name.removeprefix("transformer.")
        if key in _GPT2_SIMPLE:
            out[_GPT2_SIMPLE[key]] = tensor
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[0] != "h":
            out[name] = tensor  # unknown: reported by the loader as unexpected
            continue
        layer, rest = parts[1], ".".join(parts[2:])
        module, _, kind = rest.rpartition(".")
        if module == "attn" and kind in ("bias", "masked_bias"):
            continue  # old checkpoints saved the causal-mask buffers
        ours = f"layers.{layer}."
        if module == "attn.c_attn":
            q, k, v = (tensor.t() if kind == "weight" else tensor).chunk(3, dim=0)
            for p, part in zip("qkv", (q, k, v), strict=True):
                out[ours + f"self_attn.{p}_proj.{kind}"] = part.contiguous()
        elif module in _GPT2_LAYER:
            conv1d = module != "ln_1" and module != "ln_2" and kind == "weight"
            out[ours + f"{_GPT2_LAYER[module]}.{kind}"] = tensor.t().contiguous() if conv1d else tensor
        else:
            out[name] = tensor
    return out


# ---- mamba2 (transformers' Mamba2ForCausalLM) -----------------------------------------------------
_MAMBA2_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size", "expand", "n_groups",
    "conv_kernel", "chunk_size", "layer_norm_epsilon", "use_bias", "use_conv_bias", "hidden_act",
    "residual_in_fp32", "time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "time_step_limit",
    "rescale_prenorm_residual", "max_position_embeddings", "rms_norm", "layer_types", "norm_before_gate",
})  # fmt: skip


def _read_mamba2(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers"), source)
    for key, wanted in (("use_bias", False), ("use_conv_bias", True), ("rms_norm", True), ("norm_before_gate", False)):
        if key in d and bool(d[key]) != wanted:
            raise UserError(f"{source}: mamba2 with {key}={d[key]!r} is not supported")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"{source}: mamba2 with hidden_act={d['hidden_act']!r} is not supported (silu only)")
    limit = [_json_float(v) for v in d.get("time_step_limit") or (0.0, float("inf"))]
    if limit[0] > 0 or limit[1] != float("inf"):
        raise UserError(f"{source}: mamba2 with a time_step_limit ({limit}) is not supported")
    c, expand, head_dim = d["hidden_size"], d.get("expand", 2), d.get("head_dim", 64)
    if "num_heads" in d and d["num_heads"] * head_dim != expand * c:
        raise UserError(
            f"{source}: num_heads * head_dim ({d['num_heads']} * {head_dim}) must equal expand * hidden_size "
            f"({expand} * {c})"
        )
    return dict(
        vocab_size=d["vocab_size"],
        d_model=c,
        n_layers=d["num_hidden_layers"],
        n_heads=1,  # attention fields: unused by mamba2 layers
        n_kv_heads=1,
        d_ff=c,
        max_seq_len=d.get("max_position_embeddings", 2048),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        mixer="mamba2",
        mlp="none",
        ssm_state_size=d.get("state_size", 128),
        ssm_expand=expand,
        ssm_head_dim=head_dim,
        ssm_n_groups=d.get("n_groups", 1),
        ssm_conv_kernel=d.get("conv_kernel", 4),
        ssm_chunk_size=d.get("chunk_size", 256),
    )


def _json_float(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _write_mamba2(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    inner = cfg.ssm_expand * cfg.d_model
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_heads": inner // cfg.ssm_head_dim,
        "head_dim": cfg.ssm_head_dim,
        "state_size": cfg.ssm_state_size,
        "expand": cfg.ssm_expand,
        "n_groups": cfg.ssm_n_groups,
        "conv_kernel": cfg.ssm_conv_kernel,
        "chunk_size": cfg.ssm_chunk_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        **spec.fixed_keys,
    }


_MAMBA2_NAMES = {"embed_tokens.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"}


def _mamba2_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    out: StateDict = {}
    for name, tensor in state.items():
        if name in _MAMBA2_NAMES:
            out[_MAMBA2_NAMES[name]] = tensor
        elif name.startswith("layers."):
            out["backbone." + name.replace(".input_layernorm.", ".norm.")] = tensor
        else:
            out[name] = tensor  # lm_head
    return out


def _mamba2_from_hf(state: StateDict) -> StateDict:
    back = {v: k for k, v in _MAMBA2_NAMES.items()}
    out: StateDict = {}
    for name, tensor in state.items():
        if name in back:
            out[back[name]] = tensor
        elif name.startswith("backbone.layers."):
            parts = name.removeprefix("backbone.").split(".")
            if parts[2] == "norm":  # layers.i.norm.weight: the block's pre-norm
                parts[2] = "input_layernorm"
            out[".".join(parts)] = tensor
        else:
            out[name] = tensor
    return out


# ---- mamba (transformers' MambaForCausalLM, Mamba-1): the same backbone names as mamba2 ---------------------
_MAMBA_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel", "intermediate_size",
    "layer_norm_epsilon", "use_bias", "use_conv_bias", "hidden_act", "residual_in_fp32", "time_step_rank",
    "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor",
    "rescale_prenorm_residual", "use_mambapy", "use_associative_scan", "max_position_embeddings", "chunk_size",
    "layer_types",
})  # fmt: skip


def _read_mamba(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers"), source)
    for key, wanted in (("use_bias", False), ("use_conv_bias", True)):
        if key in d and bool(d[key]) != wanted:
            raise UserError(f"{source}: mamba with {key}={d[key]!r} is not supported")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"{source}: mamba with hidden_act={d['hidden_act']!r} is not supported (silu only)")
    c, expand = d["hidden_size"], d.get("expand", 2)
    if d.get("intermediate_size") is not None and d["intermediate_size"] != expand * c:
        raise UserError(
            f"{source}: intermediate_size ({d['intermediate_size']}) must equal expand * hidden_size ({expand} * {c})"
        )
    rank = d.get("time_step_rank", "auto")
    if rank == "auto" or rank == math.ceil(c / 16):
        rank = None  # the default; keep configs comparable
    return dict(
        vocab_size=d["vocab_size"],
        d_model=c,
        n_layers=d["num_hidden_layers"],
        n_heads=1,  # attention fields: unused by mamba layers
        n_kv_heads=1,
        d_ff=c,
        max_seq_len=d.get("max_position_embeddings", 2048),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        mixer="mamba",
        mlp="none",
        ssm_state_size=d.get("state_size", 16),
        ssm_expand=expand,
        ssm_conv_kernel=d.get("conv_kernel", 4),
        ssm_chunk_size=d.get("chunk_size", 64),
        ssm_dt_rank=rank,
    )


def _write_mamba(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "state_size": cfg.ssm_state_size,
        "expand": cfg.ssm_expand,
        "intermediate_size": cfg.ssm_expand * cfg.d_model,
        "conv_kernel": cfg.ssm_conv_kernel,
        "time_step_rank": cfg.mamba_dt_rank,
        "layer_norm_epsilon": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "chunk_size": cfg.ssm_chunk_size,  # slmkit's scan chunk (speed only); transformers keeps it as an extra key
        **spec.fixed_keys,
    }


# ---- bamba (transformers' BambaForCausalLM): Mamba-2 layers and attention layers, a gated MLP in each -------
_BAMBA_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attn_layer_indices",
    "layer_types", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
    "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit",
    "z_loss_coefficient", "num_logits_to_keep", "rope_theta", "rope_parameters", "rope_scaling",
    "partial_rotary_factor", "attention_bias", "mlp_bias", "head_dim",
})  # fmt: skip
_BAMBA_ROPE_FRACTION = 0.5  # BambaConfig sets partial_rotary_factor to 0.5 whatever config.json says


def _read_bamba(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
    for key, wanted in (("mamba_proj_bias", False), ("mamba_conv_bias", True)):
        if key in d and bool(d[key]) != wanted:
            raise UserError(f"{source}: bamba with {key}={d[key]!r} is not supported")
    limit = [_json_float(v) for v in d.get("time_step_limit") or (0.0, float("inf"))]
    if limit[0] > 0 or limit[1] != float("inf"):
        raise UserError(f"{source}: bamba with a time_step_limit ({limit}) is not supported")
    if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
        raise UserError(f"{source}: bamba with head_dim={d['head_dim']!r} is not supported (hidden / heads only)")
    n_layers = d["num_hidden_layers"]
    attn = d.get("attn_layer_indices") or []
    if any(not isinstance(i, int) or not 0 <= i < n_layers for i in attn):
        raise UserError(f"{source}: attn_layer_indices {attn!r} must be layer numbers below {n_layers}")
    pattern = tuple("attention" if i in attn else "mamba2" for i in range(n_layers))
    c, expand = d["hidden_size"], d.get("mamba_expand", 2)
    n_heads_ssm = d.get("mamba_n_heads", 128)
    head_dim = d.get("mamba_d_head", "auto")
    head_dim = expand * c // n_heads_ssm if head_dim in (None, "auto") else head_dim
    if n_heads_ssm * head_dim != expand * c:
        raise UserError(
            f"{source}: mamba_n_heads * mamba_d_head ({n_heads_ssm} * {head_dim}) must equal mamba_expand * "
            f"hidden_size ({expand} * {c})"
        )
    # rope without partial_rotary_factor, which the shared reader refuses and Bamba fixes (read above)
    rope = {k: v for k, v in d.items() if k != "partial_rotary_factor"}
    if isinstance(rope.get("rope_parameters"), dict):
        rope["rope_parameters"] = {k: v for k, v in rope["rope_parameters"].items() if k != "partial_rotary_factor"}
    theta, scaling = _rope(rope, source)
    bias = bool(d.get("attention_bias", False))
    kinds = set(pattern)
    return dict(
        vocab_size=d["vocab_size"],
        d_model=c,
        n_layers=n_layers,
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_fraction=_BAMBA_ROPE_FRACTION,
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        activation=_activation(d.get("hidden_act", "silu"), "hidden_act", source),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        mixer=pattern[0] if len(kinds) == 1 else "attention",
        layer_pattern=pattern if len(kinds) > 1 else None,
        ssm_state_size=d.get("mamba_d_state", 256),
        ssm_expand=expand,
        ssm_head_dim=head_dim,
        ssm_n_groups=d.get("mamba_n_groups", 1),
        ssm_conv_kernel=d.get("mamba_d_conv", 4),
        ssm_chunk_size=d.get("mamba_chunk_size", 256),
    )


def _write_bamba(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    inner = cfg.ssm_expand * cfg.d_model
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rope_fraction}
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "attn_layer_indices": [i for i in range(cfg.n_layers) if cfg.mixer_at(i) == "attention"],
        "mamba_n_heads": inner // cfg.ssm_head_dim,
        "mamba_d_head": cfg.ssm_head_dim,
        "mamba_n_groups": cfg.ssm_n_groups,
        "mamba_d_state": cfg.ssm_state_size,
        "mamba_d_conv": cfg.ssm_conv_kernel,
        "mamba_expand": cfg.ssm_expand,
        "mamba_chunk_size": cfg.ssm_chunk_size,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "partial_rotary_factor": cfg.rope_fraction,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        **spec.fixed_keys,
    }


# our block modules -> Bamba's (inside model.layers.{i}); the rest (input_layernorm, self_attn) keep their names
_BAMBA_BLOCK = {"mixer": "mamba", "mlp": "feed_forward", "post_attention_layernorm": "pre_ff_layernorm"}
_BAMBA_TOP = {"norm.weight": "final_layernorm.weight"}


def _bamba_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    out: StateDict = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 2:
            parts[2] = _BAMBA_BLOCK.get(parts[2], parts[2])
        name = _BAMBA_TOP.get(".".join(parts), ".".join(parts))
        out[name if name == "lm_head.weight" else "model." + name] = tensor
    return out


def _bamba_from_hf(state: StateDict) -> StateDict:
    block = {v: k for k, v in _BAMBA_BLOCK.items()}
    top = {v: k for k, v in _BAMBA_TOP.items()}
    out: StateDict = {}
    for name, tensor in state.items():
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers" and len(parts) > 2:
            parts[2] = block.get(parts[2], parts[2])
        joined = ".".join(parts)
        out[top.get(joined, joined)] = tensor
    return out


def _unfused_experts(prefix: str, tail: list[str], tensor: torch.Tensor) -> StateDict | None:
    """transformers' fused in-memory expert weights (experts.gate_up_proj (E, 2F, C), gate half first;
    experts.down_proj (E, C, F)) as our per-expert tensors under `prefix` (layers.{i}.mlp); None for other names."""
    if tail == ["experts", "gate_up_proj"]:
        gate, up = tensor.chunk(2, dim=1)
        halves = (("gate_proj", gate), ("up_proj", up))
        return {f"{prefix}.experts.{e}.{proj}.weight": half[e] for e in range(len(tensor)) for proj, half in halves}
    if tail == ["experts", "down_proj"]:
        return {f"{prefix}.experts.{e}.down_proj.weight": tensor[e] for e in range(len(tensor))}
    return None


# ---- jamba (transformers' JambaForCausalLM): Mamba-1 and attention layers, dense and expert MLPs, by period ----
# Jamba's attention has no position encoding at all (positions: none), its Mamba-1 mixers RMS-normalise the time
# step, B and C (ssm_dt_b_c_norm), and its router weights the k chosen experts by their softmax probabilities
# without renormalising them (moe_norm_topk: false). Which layers attend and which MLPs are mixtures of experts
# is stated by a period and an offset each: layer i attends when i % attn_layer_period == attn_layer_offset.
_JAMBA_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attn_layer_period",
    "attn_layer_offset", "expert_layer_period", "expert_layer_offset", "num_experts", "num_local_experts",
    "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
    "mamba_proj_bias", "use_mamba_kernels", "use_mambapy", "use_associative_scan", "attention_dropout",
    "output_router_logits", "router_aux_loss_coef", "num_logits_to_keep", "head_dim", "chunk_size",
})  # fmt: skip


def _jamba_period(flags: list[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset), offset < period, with flags[i] == (i % period == offset) for every layer, or
    None; no flag set: a period longer than the stack."""
    n = len(flags)
    if not any(flags):
        return n + 1, n
    offset = flags.index(True)
    for period in range(offset + 1, n + 1):
        if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
            return period, offset
    return None


def _jamba_layout(cfg: ModelConfig) -> str | None:
    attention = [cfg.mixer_at(i) == "attention" for i in range(cfg.n_layers)]
    experts = [cfg.mlp_at(i) == "moe" for i in range(cfg.n_layers)]
    if _jamba_period(attention) is None:
        return "layer_pattern " + repr(cfg.layer_pattern) + " (attention layers must recur with one period and offset)"
    if _jamba_period(experts) is None:
        return "mlp_pattern " + repr(cfg.mlp_pattern) + " (moe layers must recur with one period and offset)"
    if any(experts) and cfg.moe_experts < 2:
        return f"moe_experts={cfg.moe_experts} (a Jamba layer with one expert is a dense MLP: set mlp: gated)"
    return None


def _jamba_int(d: dict[str, Any], key: str, default: int, source: str) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{source}: jamba {key} must be a non-negative integer, got {value!r}")
    return value


def _read_jamba(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
    for key, wanted in (("mamba_proj_bias", False), ("mamba_conv_bias", True)):
        if key in d and bool(d[key]) != wanted:
            raise UserError(f"{source}: jamba with {key}={d[key]!r} is not supported")
    if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
        raise UserError(f"{source}: jamba with head_dim={d['head_dim']!r} is not supported (hidden / heads only)")
    n_layers, c = d["num_hidden_layers"], d["hidden_size"]
    periods = {}
    for name, period, offset in (("attn", 8, 4), ("expert", 2, 1)):
        p = _jamba_int(d, f"{name}_layer_period", period, source)
        o = _jamba_int(d, f"{name}_layer_offset", offset, source)
        if not o < p:
            raise UserError(f"{source}: jamba {name}_layer_offset ({o}) must be below {name}_layer_period ({p})")
        periods[name] = (p, o)
    n_experts = _jamba_int(d, "num_experts", d.get("num_local_experts", 16), source)
    (ap, ao), (ep, eo) = periods["attn"], periods["expert"]
    mixers = tuple("attention" if i % ap == ao else "mamba" for i in range(n_layers))
    mlps = tuple("moe" if n_experts > 1 and i % ep == eo else "gated" for i in range(n_layers))
    rank = d.get("mamba_dt_rank", "auto")
    if rank == "auto" or rank == math.ceil(c / 16):
        rank = None  # the default; keep configs comparable
    moe = (
        dict(moe_experts=n_experts, moe_top_k=_jamba_int(d, "num_experts_per_tok", 2, source)) if n_experts > 1 else {}
    )
    return dict(
        vocab_size=d["vocab_size"],
        d_model=c,
        n_layers=n_layers,
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 262144),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        activation=_activation(d.get("hidden_act", "silu"), "hidden_act", source),
        positions="none",
        mixer=mixers[0] if len(set(mixers)) == 1 else "attention",  # with a pattern the defaults, as the presets
        layer_pattern=mixers if len(set(mixers)) > 1 else None,
        mlp=mlps[0] if len(set(mlps)) == 1 else "gated",
        mlp_pattern=mlps if len(set(mlps)) > 1 else None,
        ssm_state_size=d.get("mamba_d_state", 16),
        ssm_expand=d.get("mamba_expand", 2),
        ssm_conv_kernel=d.get("mamba_d_conv", 4),
        ssm_chunk_size=d.get("chunk_size", 64),
        ssm_dt_rank=rank,
        ssm_dt_b_c_norm=True,
        moe_norm_topk=False,
        **moe,
    )


def _write_jamba(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    attention = _jamba_period([cfg.mixer_at(i) == "attention" for i in range(cfg.n_layers)])
    experts = _jamba_period([cfg.mlp_at(i) == "moe" for i in range(cfg.n_layers)])
    assert attention is not None and experts is not None  # the rules (_jamba_layout) checked them
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "attn_layer_period": attention[0],
        "attn_layer_offset": attention[1],
        "expert_layer_period": experts[0],
        "expert_layer_offset": experts[1],
        "num_experts": cfg.moe_experts,  # without expert layers the period passes every layer by
        "num_experts_per_tok": cfg.moe_top_k,
        "mamba_d_state": cfg.ssm_state_size,
        "mamba_d_conv": cfg.ssm_conv_kernel,
        "mamba_expand": cfg.ssm_expand,
        "mamba_dt_rank": cfg.mamba_dt_rank,
        "chunk_size": cfg.ssm_chunk_size,  # slmkit's scan chunk (speed only); transformers keeps it as an extra key
        **spec.fixed_keys,
    }


# Jamba names its block modules and final norm as Bamba does (mamba, feed_forward, pre_ff_layernorm,
# final_layernorm); a mixture of experts' router is `feed_forward.router` (ours: mlp.gate)


def _jamba_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    """Our names -> Jamba's files (each expert's own gate/up/down_proj: transformers fuses them when it loads)."""
    renamed: StateDict = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "layers" and parts[2:4] == ["mlp", "gate"]:
            parts[3] = "router"
        renamed[".".join(parts)] = tensor
    return _bamba_to_hf(renamed, config)


def _jamba_from_hf(state: StateDict) -> StateDict:
    """Jamba's names -> ours, from its files (per-expert weights) or transformers' fused in-memory layout
    (feed_forward.experts.gate_up_proj (E, 2F, C), gate half first; feed_forward.experts.down_proj (E, C, F))."""
    out: StateDict = {}
    for name, tensor in _bamba_from_hf(state).items():
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 3:
            if parts[2:4] == ["mlp", "router"]:
                parts[3] = "gate"
            experts = _unfused_experts(".".join(parts[:3]), parts[3:], tensor)
            if experts is not None:
                out.update(experts)
                continue
        out[".".join(parts)] = tensor
    return out


# ---- mixtures of experts: Llama's layout with the MLP replaced by a router and experts --------------------
_MIXTRAL_KEYS = _LLAMA_LIKE_KEYS | {
    "num_local_experts", "num_experts_per_tok", "router_jitter_noise", "output_router_logits"
}  # fmt: skip
# our expert projections -> Mixtral's (w1 gate, w3 up, w2 down), inside `block_sparse_moe` (transformers' files)
_MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _read_mixtral(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    _require(d, ("num_local_experts", "num_experts_per_tok"), source)
    fields = _read_llama_like(spec, d, source)
    return fields | dict(moe_experts=d["num_local_experts"], moe_top_k=d["num_experts_per_tok"], moe_norm_topk=True)


def _write_mixtral(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    d = _write_llama_like(spec, cfg)
    return d | {"num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k}


def _mixtral_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    out: StateDict = {}
    for name, tensor in prefixed_to_hf(state).items():
        parts = name.split(".")  # model.layers.{i}.mlp.(gate.weight | experts.{e}.{proj}.weight)
        if len(parts) > 4 and parts[3] == "mlp":
            parts[3] = "block_sparse_moe"
            if parts[4] == "experts":
                parts[6] = _MIXTRAL_PROJ[parts[6]]
        out[".".join(parts)] = tensor
    return out


def _mixtral_from_hf(state: StateDict) -> StateDict:
    """Mixtral's files (block_sparse_moe.experts.{e}.w1/w2/w3), or transformers' fused in-memory layout
    (mlp.experts.gate_up_proj (E, 2F, C) with the gate half first, mlp.experts.down_proj (E, C, F))."""
    back = {v: k for k, v in _MIXTRAL_PROJ.items()}
    out: StateDict = {}
    for name, tensor in prefixed_from_hf(state).items():
        parts = name.split(".")
        if len(parts) > 3 and parts[2] in ("block_sparse_moe", "mlp"):
            parts[2] = "mlp"
            experts = _unfused_experts(".".join(parts[:3]), parts[3:], tensor)
            if experts is not None:
                out.update(experts)
                continue
            if parts[3] == "experts":
                parts[5] = back.get(parts[5], parts[5])
        out[".".join(parts)] = tensor
    return out


# ---- Qwen2-MoE and OLMoE: routers and per-expert MLPs under `mlp.` as slmkit names them -------------------
_QWEN2_MOE_KEYS = _LLAMA_LIKE_KEYS | {
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "qkv_bias", "output_router_logits",
}  # fmt: skip
_OLMOE_KEYS = _LLAMA_LIKE_KEYS | {"num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv",
                                  "output_router_logits"}  # fmt: skip


def _read_experts(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    """The router fields every family of this section shares (num_experts, num_experts_per_tok, norm_topk_prob)."""
    _require(d, ("num_experts", "num_experts_per_tok"), source)
    fields = _read_llama_like(spec, d, source)
    return fields | dict(
        moe_experts=d["num_experts"], moe_top_k=d["num_experts_per_tok"], moe_norm_topk=bool(d.get("norm_topk_prob"))
    )


def _read_qwen2_moe(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    # a dense MLP in some layers (every decoder_sparse_step-th layer sparse, or mlp_only_layers) is another model
    if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
        raise UserError(
            f"{source}: qwen2_moe with dense MLP layers (decoder_sparse_step != 1 or mlp_only_layers) is not "
            "supported; slmkit reads Qwen2-MoE models whose every layer is a mixture of experts"
        )
    if d.get("qkv_bias", True) is not True:
        raise UserError(f"{source}: qwen2_moe with qkv_bias=false is not supported")
    _require(d, ("moe_intermediate_size", "shared_expert_intermediate_size"), source)
    fields = _read_experts(spec, d, source)
    return fields | dict(
        d_ff=d["moe_intermediate_size"], moe_shared_d_ff=d["shared_expert_intermediate_size"], moe_shared_gate=True
    )


def _write_qwen2_moe(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    d = _write_llama_like(spec, cfg)
    return d | {
        "intermediate_size": cfg.moe_shared_d_ff,  # the dense MLP's width: no layer has one (decoder_sparse_step 1)
        "moe_intermediate_size": cfg.d_ff,
        "shared_expert_intermediate_size": cfg.moe_shared_d_ff,
        "num_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "norm_topk_prob": cfg.moe_norm_topk,
    }


def _read_olmoe(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    if d.get("clip_qkv") is not None:
        raise UserError(f"{source}: olmoe with clip_qkv={d['clip_qkv']!r} is not supported (only null)")
    return _read_experts(spec, d, source)


def _write_olmoe(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    d = _write_llama_like(spec, cfg)
    del d["head_dim"]  # OlmoeConfig has none: its q/k norms are hidden_size // num_attention_heads per head wide
    experts = {"num_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k}
    return d | experts | {"norm_topk_prob": cfg.moe_norm_topk}


def _experts_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    """Qwen2-MoE's and OLMoE's files: our names under `model.` (mlp.gate, mlp.experts.{e}.{gate,up,down}_proj,
    mlp.shared_expert, mlp.shared_expert_gate); transformers fuses the experts itself when it loads them."""
    return prefixed_to_hf(state)


def _read_slmkit(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    import dataclasses

    generic = {"tie_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "family", "extra"}
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - generic
    out = {k: d[k] for k in fields if k in d}
    _require(out, ("d_model", "n_layers"), source)
    for key in ("layer_pattern", "mlp_pattern"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def _write_slmkit(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    import dataclasses

    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "family", "vocab_size")}
    for key in ("tie_embeddings", "initializer_range", "bos_token_id", "eos_token_id"):
        d.pop(key)  # generic keys: written by slmkit.interop.hf under transformers' names
    return d


def _same_names(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    return dict(state)


# the linear layers of each mixer other than attention, inside a block; a mixer not named here (a plugin) keeps
# its layers in float when the model is compressed
_WINDOW = ("mixer.window_attn.q_proj", "mixer.window_attn.k_proj", "mixer.window_attn.v_proj")
MIXER_LINEARS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "mamba": ("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"),
    "mamba2": ("mixer.in_proj", "mixer.out_proj"),
    "gla": ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.gk_proj.0", "mixer.gk_proj.1", "mixer.g_proj",
            "mixer.o_proj"),
    "based": ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj", *_WINDOW, "mixer.window_attn.o_proj"),
})  # fmt: skip
_MAMBA2_LINEARS = MIXER_LINEARS["mamba2"]
_MAMBA_LINEARS = MIXER_LINEARS["mamba"]
# AWQ folds of the mixers' layers: each reads the block's input norm; based's window branch is attention (v -> o
# per kv group). Its linear branch's v -> o would be exact too, but gla has modules of the same names behind a
# per-head RMSNorm, where it is not, and a fold applies wherever a block has its modules.
_MIXER_FOLDS = (
    ScaleFold("input_layernorm", ("mixer.in_proj",)),
    ScaleFold("input_layernorm", ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.gk_proj.0", "mixer.g_proj")),
    ScaleFold("input_layernorm", ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", *_WINDOW)),
    ScaleFold("mixer.window_attn.v_proj", ("mixer.window_attn.o_proj",), per_kv_group=True),
)


# ---- shared pieces of the specs -------------------------------------------------------------------
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATED_LINEARS = (*_QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PLAIN_LINEARS = (*_QKV, "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")

_V_TO_O = ScaleFold("self_attn.v_proj", ("self_attn.o_proj",), per_kv_group=True)
GATED_FOLDS = (
    ScaleFold("input_layernorm", _QKV),
    ScaleFold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    _V_TO_O,
    ScaleFold("mlp.up_proj", ("mlp.down_proj",)),  # down reads act(gate) * up: linear in up's rows
)
# GPT-2's down_proj reads GELU(up): no exact fold, so AWQ leaves its inputs unscaled
PLAIN_FOLDS = (ScaleFold("input_layernorm", _QKV), ScaleFold("post_attention_layernorm", ("mlp.up_proj",)), _V_TO_O)

_GGUF_COMMON = {
    "input_layernorm": "ATTN_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "self_attn.o_proj": "ATTN_OUT",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_GGUF_GATED = {
    **_GGUF_COMMON,
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate_proj": "FFN_GATE",
}


def _mamba_hparams(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's `mamba` hyperparameters (as its convert_hf_to_gguf.py writes them: no attention, no MLP)."""
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(cfg.n_layers)
    writer.add_ssm_conv_kernel(cfg.ssm_conv_kernel)
    writer.add_ssm_inner_size(cfg.ssm_expand * cfg.d_model)
    writer.add_ssm_state_size(cfg.ssm_state_size)
    writer.add_ssm_time_step_rank(cfg.mamba_dt_rank)
    writer.add_ssm_dt_b_c_rms(False)  # FalconMamba's extra norms: not in this model
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _negative_exp(t: torch.Tensor) -> torch.Tensor:
    return -t.exp()


def _squeeze_conv(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(1)  # depthwise (I, 1, K) -> (I, K)


# llama.cpp's `mamba`: A stored as -exp(A_log) (I, N), D as (I,), both without a suffix; the conv as (I, K); the
# small SSM tensors stay f32 at every file type (as llama.cpp's converter keeps them)
MAMBA_GGUF = GGUFLayout(
    arch="mamba",
    tensors=MappingProxyType(
        {
            "input_layernorm": "ATTN_NORM",
            "mixer.in_proj": "SSM_IN",
            "mixer.conv1d": "SSM_CONV1D",
            "mixer.x_proj": "SSM_X",
            "mixer.dt_proj": "SSM_DT",
            "mixer.out_proj": "SSM_OUT",
        }
    ),  # fmt: skip
    fused=MappingProxyType({}),
    rope_pairs=False,
    explicit_output=False,
    activation="silu",
    mlp_bias=False,
    rope_scaling=(),
    parameters=MappingProxyType({"mixer.A_log": "SSM_A", "mixer.D": "SSM_D"}),
    convert=MappingProxyType({"mixer.A_log": _negative_exp, "mixer.conv1d.weight": _squeeze_conv}),
    keep_f32=("SSM_CONV1D", "SSM_X", "SSM_DT", "SSM_A", "SSM_D"),
    hparams=_mamba_hparams,
)


def _mamba2_ssm_keys(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's `ssm.*` keys of a Mamba-2 mixer (its mamba2 and granitehybrid architectures read the same)."""
    inner = cfg.ssm_expand * cfg.d_model
    writer.add_ssm_conv_kernel(cfg.ssm_conv_kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(cfg.ssm_state_size)
    writer.add_ssm_time_step_rank(inner // cfg.ssm_head_dim)  # the number of heads
    writer.add_ssm_group_count(cfg.ssm_n_groups)


def _mamba2_gguf_hparams(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's `mamba2` hyperparameters (as its convert_hf_to_gguf.py writes them)."""
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_feed_forward_length(0)  # llama.cpp reads both keys for every architecture; mamba2 uses neither
    writer.add_head_count(0)
    _mamba2_ssm_keys(writer, cfg)


def _mamba2_groups_refused(cfg: ModelConfig, arch: str) -> str | None:
    if cfg.ssm_n_groups != 1:  # llama.cpp's gated norm is per group; ours (transformers') spans all channels
        return f"llama.cpp's {arch} normalises each of the {cfg.ssm_n_groups} groups apart (ssm_n_groups 1 only)"
    return None


def _mamba2_gguf_refuse(cfg: ModelConfig) -> str | None:
    return _mamba2_groups_refused(cfg, "mamba2")


def _column(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1)  # (H,) -> (H, 1)


def _negative_exp_column(t: torch.Tensor) -> torch.Tensor:
    return -t.exp().unsqueeze(1)


def _one_group(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)  # the gated norm's weight as (G = 1, inner): llama.cpp normalises per group


# llama.cpp's mamba2 (convert_hf_to_gguf.py's Mamba2Model): dt_bias is ssm_dt's bias, A is stored as -exp(A_log)
# and A, D as (H, 1) columns, the depthwise conv as (channels, K), and the gated norm's weight per group
_GGUF_MAMBA2 = GGUFLayout(
    arch="mamba2",
    tensors=MappingProxyType({
        "input_layernorm": "ATTN_NORM", "mixer.in_proj": "SSM_IN", "mixer.conv1d": "SSM_CONV1D",
        "mixer.norm": "SSM_NORM", "mixer.out_proj": "SSM_OUT",
    }),
    fused=MappingProxyType({}),
    rope_pairs=False,
    explicit_output=False,
    activation="silu",
    mlp_bias=False,
    rope_scaling=(),
    parameters=MappingProxyType({"mixer.dt_bias": "SSM_DT.bias", "mixer.A_log": "SSM_A", "mixer.D": "SSM_D"}),
    convert=MappingProxyType({
        "mixer.A_log": _negative_exp_column, "mixer.D": _column, "mixer.conv1d.weight": _squeeze_conv,
        "mixer.norm.weight": _one_group,
    }),
    keep_f32=("SSM_CONV1D", "SSM_A", "SSM_D"),
    hparams=_mamba2_gguf_hparams,
    refuse=_mamba2_gguf_refuse,
)  # fmt: skip


def _hybrid_layer_gguf_hparams(writer: Any, cfg: ModelConfig) -> None:
    """The sizes llama.cpp's hybrid architectures (jamba, granitehybrid) share: a per-layer kv head count in which
    0 marks a recurrent layer and the others attend."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv([cfg.n_kv_heads if cfg.mixer_at(i) == "attention" else 0 for i in range(cfg.n_layers)])


def _granitehybrid_gguf_hparams(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's `granitehybrid` hyperparameters for Bamba: a layer without kv heads is a Mamba-2 layer, the others
    attend; every layer has the gated MLP. Granite's multipliers are written as Bamba's math has them (llama.cpp skips
    a scale whose key is absent or 0 and then uses 1 / sqrt(head width) for attention): embedding, residual and logit
    scales 1, attention scale 1 / sqrt(head width). Its graph turns q and k only where `rope.scaling.finetuned` is true
    (absent means true; IBM's Granite 4 hybrids set it false), over the `rope.dimension_count` leading channels of each
    head, in interleaved pairs."""
    _hybrid_layer_gguf_hparams(writer, cfg)
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    writer.add_rope_dimension_count(cfg.rope_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_scaling_finetuned(True)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    _mamba2_ssm_keys(writer, cfg)
    writer.add_embedding_scale(1.0)
    writer.add_residual_scale(1.0)
    writer.add_logit_scale(1.0)
    writer.add_attention_scale(1.0 / math.sqrt(cfg.dim_per_head))


def _granitehybrid_gguf_refuse(cfg: ModelConfig) -> str | None:
    if len(cfg.mixers) == 1:  # measured: its context aborts (GGML_ASSERT(buffer)) on the other kind's empty cache
        return (
            f"llama.cpp's granitehybrid needs both Mamba-2 and attention layers; this model has only {min(cfg.mixers)} "
            "layers (layer_pattern)"
        )
    if cfg.ssm_expand != 2:  # its loader asserts d_inner == 2 * n_embd
        return f"llama.cpp's granitehybrid needs ssm_expand 2 (Mamba-2 width twice d_model), not {cfg.ssm_expand}"
    return _mamba2_groups_refused(cfg, "granitehybrid")


# llama.cpp's `granitehybrid` (convert_hf_to_gguf.py's GraniteHybridModel, which takes BambaForCausalLM): Mamba-2
# layers as its `mamba2` writes them, attention layers with q/k rows in interleaved-pair order over the turned
# channels (`undo_permute`), optional attention and MLP biases, and the gated MLP (or experts, not in Bamba) after
# every mixer
_GRANITEHYBRID_GGUF = GGUFLayout(
    arch="granitehybrid",
    tensors=MappingProxyType({
        **{k: v for k, v in _GGUF_GATED.items() if k not in ("self_attn.q_norm", "self_attn.k_norm")},
        **_GGUF_MAMBA2.tensors,
    }),
    fused=MappingProxyType({}),
    rope_pairs=True,
    explicit_output=False,
    activation="silu",
    mlp_bias=True,  # ffn_{gate,up,down}.bias: optional in its loader, added in its graph
    rope_scaling=(),
    parameters=_GGUF_MAMBA2.parameters,
    convert=_GGUF_MAMBA2.convert,
    keep_f32=_GGUF_MAMBA2.keep_f32,
    hparams=_granitehybrid_gguf_hparams,
    refuse=_granitehybrid_gguf_refuse,
)  # fmt: skip


def _gguf_llama_like(arch: str, rope_pairs: bool, rope_scaling: tuple[str, ...]) -> GGUFLayout:
    return GGUFLayout(
        arch=arch,
        tensors=MappingProxyType(_GGUF_GATED),
        fused=MappingProxyType({}),
        rope_pairs=rope_pairs,
        explicit_output=False,
        activation="silu",
        mlp_bias=False,
        rope_scaling=rope_scaling,
    )


_GGUF_MOE = {
    **_GGUF_GATED,
    "mlp.gate": "FFN_GATE_INP",  # the router
    # slmkit.interop.gguf stacks each layer's experts into one (E, out, in) tensor per projection
    "mlp.experts.gate_proj": "FFN_GATE_EXP",
    "mlp.experts.up_proj": "FFN_UP_EXP",
    "mlp.experts.down_proj": "FFN_DOWN_EXP",
    "mlp.shared_expert.gate_proj": "FFN_GATE_SHEXP",
    "mlp.shared_expert.up_proj": "FFN_UP_SHEXP",
    "mlp.shared_expert.down_proj": "FFN_DOWN_SHEXP",
    "mlp.shared_expert_gate": "FFN_GATE_INP_SHEXP",
}


def _olmoe_gguf_refuse(cfg: ModelConfig) -> str | None:
    if cfg.n_kv_heads != cfg.n_heads:  # its q/k norms are loaded as (n_embd,): a grouped k projection fails to load
        return f"llama.cpp's olmoe needs as many kv heads as heads (its k norm spans d_model), not {cfg.n_kv_heads}"
    return None


def _gguf_moe(arch: str, rope_pairs: bool, expert_weights_norm: bool) -> GGUFLayout:
    """llama.cpp's layout of a mixture of experts: Mixtral runs as `llama` (interleaved rope pairs, k weights
    renormalised), Qwen2-MoE as `qwen2moe` and OLMoE as `olmoe` (NeoX rope; their graphs do not renormalise)."""
    return GGUFLayout(
        arch=arch,
        tensors=MappingProxyType(_GGUF_MOE),
        fused=MappingProxyType({}),
        rope_pairs=rope_pairs,
        explicit_output=False,
        activation="silu",
        mlp_bias=False,
        rope_scaling=("linear", "llama3", "yarn") if arch == "llama" else ("yarn",),
        expert_weights_norm=expert_weights_norm,
        refuse=_olmoe_gguf_refuse if arch == "olmoe" else None,
    )


def _jamba_gguf_hparams(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's `jamba` hyperparameters (as its convert_hf_to_gguf.py writes them): a layer without kv heads is a
    Mamba layer, the others attend (without positions); a layer with a router is a mixture of experts."""
    _hybrid_layer_gguf_hparams(writer, cfg)
    writer.add_ssm_conv_kernel(cfg.ssm_conv_kernel)
    writer.add_ssm_inner_size(cfg.ssm_expand * cfg.d_model)
    writer.add_ssm_state_size(cfg.ssm_state_size)
    writer.add_ssm_time_step_rank(cfg.mamba_dt_rank)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_expert_count(cfg.moe_experts)
    writer.add_expert_used_count(cfg.moe_top_k)


# llama.cpp's `jamba`: Mamba-1 tensors as its `mamba` (A as -exp(A_log), the conv as (I, K)) plus the dt/B/C norms,
# attention without positions (q/k rows as they are), dense MLPs or experts stacked per projection with a router
_JAMBA_GGUF = GGUFLayout(
    arch="jamba",
    tensors=MappingProxyType({
        **{k: v for k, v in _GGUF_MOE.items() if "shared" not in k}, **MAMBA_GGUF.tensors,
        "mixer.dt_layernorm": "SSM_DT_NORM", "mixer.b_layernorm": "SSM_B_NORM", "mixer.c_layernorm": "SSM_C_NORM",
    }),
    fused=MappingProxyType({}),
    rope_pairs=False,
    explicit_output=False,
    activation="silu",
    mlp_bias=False,
    rope_scaling=(),
    expert_weights_norm=False,  # softmax over all experts, the k chosen weighted as they are (norm_w false)
    parameters=MAMBA_GGUF.parameters,
    convert=MAMBA_GGUF.convert,
    keep_f32=MAMBA_GGUF.keep_f32,
    hparams=_jamba_gguf_hparams,
)  # fmt: skip


def _llama_like(
    name: str, architecture: str, gguf: GGUFLayout, allowed: dict[str, tuple[Any, ...]], **keys: Any
) -> FamilySpec:
    """A spec for a family whose config.json and weights follow Llama's (key names, `model.` prefix); `allowed`
    adds to the recipe they all share (RMSNorm, gated MLP, rope)."""
    return FamilySpec(
        name=name,
        architecture=architecture,
        allowed=dict(norm=("rmsnorm",), mlp=("gated",), positions=("rope",), rope_fraction=(1.0,)) | allowed,
        config_keys=_LLAMA_LIKE_KEYS,
        read_config=_read_llama_like,
        write_config=_write_llama_like,
        weights_to_hf=prefixed_to_hf,
        weights_from_hf=prefixed_from_hf,
        gguf=gguf,
        compressible=GATED_LINEARS,
        scale_folds=GATED_FOLDS,
        **keys,
    )


_NO_BIAS = dict(qkv_bias=(False,), out_bias=(False,), mlp_bias=(False,))
_ONE_ATTENTION_BIAS = {"attention_bias": ("qkv_bias", "out_bias")}

# Qwen2-MoE: Qwen2's attention (q/k/v biases) and every MLP a mixture of experts plus a shared expert behind a
# sigmoid gate. OLMoE: no biases, q and k each RMS-normalised over the whole projection (not per head); no shared
# expert. Both renormalise the k router probabilities only when norm_topk_prob says so.
_MOE_ATTENTION = dict(norm=("rmsnorm",), mlp=("moe",), positions=("rope",), sliding_window=(None,), mlp_bias=(False,))
_QWEN2_MOE_SPEC = FamilySpec(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    allowed=dict(
        **_MOE_ATTENTION,
        qk_norm=(False,),
        qkv_bias=(True,),
        out_bias=(False,),
        moe_shared_gate=(True,),
    ),  # fmt: skip
    shared={},
    config_keys=_QWEN2_MOE_KEYS,
    read_config=_read_qwen2_moe,
    write_config=_write_qwen2_moe,
    weights_to_hf=_experts_to_hf,
    weights_from_hf=lambda state: _mixtral_from_hf(state),  # the same per-expert or fused names, no w1/w2/w3
    gguf=_gguf_moe("qwen2moe", rope_pairs=False, expert_weights_norm=False),
    compressible=GATED_LINEARS,
    scale_folds=(GATED_FOLDS[0], _V_TO_O),
    weight_marker=".shared_expert_gate.",
    window="layer_types",
    fixed_keys={"decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True, "output_router_logits": False},
)
_OLMOE_SPEC = FamilySpec(
    name="olmoe",
    architecture="OlmoeForCausalLM",
    allowed=dict(
        **_MOE_ATTENTION,
        qk_norm=(True,),
        qk_norm_over=("projection",),
        qkv_bias=(False,),
        out_bias=(False,),
        moe_shared_d_ff=(0,),
        moe_shared_gate=(False,),
        head_dim=(None,),
    ),  # fmt: skip
    shared={},
    config_keys=_OLMOE_KEYS,
    read_config=_read_olmoe,
    write_config=_write_olmoe,
    weights_to_hf=_experts_to_hf,
    weights_from_hf=lambda state: _mixtral_from_hf(state),
    gguf=_gguf_moe("olmoe", rope_pairs=False, expert_weights_norm=False),
    compressible=GATED_LINEARS,
    scale_folds=(GATED_FOLDS[0], _V_TO_O),  # the MLP folds would have to scale every expert and the router
    fixed_keys={"attention_bias": False, "clip_qkv": None, "output_router_logits": False},
)

# ---- Phi-3 ----------------------------------------------------------------------------------------
# Llama's recipe with q/k/v fused into one qkv_proj and gate/up into one gate_up_proj, an optional partial rotary
# factor, a sliding window stated as `sliding_window` (null: none), and rope scaling only as longrope: Phi3Config
# renames yarn to longrope and refuses other types, and its top-level original_max_position_embeddings (default
# 4096) overrides the one in rope_parameters, so it is written there too.
_PHI3_KEYS = _LLAMA_LIKE_KEYS | {"partial_rotary_factor", "resid_pdrop", "embd_pdrop", "attention_dropout"}


class _RopeTypes(tuple):
    """An `allowed` entry for rope_scaling: None, or a RopeScaling of one of the type names it holds."""

    def __contains__(self, value: object) -> bool:
        return value is None or (isinstance(value, RopeScaling) and value.type in tuple(self)[1:])


def _read_phi3(spec: FamilySpec, d: dict[str, Any], source: str) -> dict[str, Any]:
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    fraction = float(rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):  # Phi3Config's own renaming
        rope["rope_type"] = "longrope"
    plain = {k: v for k, v in d.items() if k not in ("partial_rotary_factor", "rope_scaling", "sliding_window")}
    if not rope.get("original_max_position_embeddings") and "original_max_position_embeddings" not in d:
        plain["original_max_position_embeddings"] = 4096  # Phi3Config's default, which transformers applies
    fields = _read_llama_like(spec, {**plain, "rope_parameters": rope}, source)
    return fields | dict(rope_fraction=fraction, sliding_window=d.get("sliding_window"))


def _write_phi3(spec: FamilySpec, cfg: ModelConfig) -> dict[str, Any]:
    d = _write_llama_like(spec, cfg)
    d["rope_parameters"]["partial_rotary_factor"] = cfg.rope_fraction
    scaling = cfg.rope_scaling
    original = scaling.original_max_seq_len if scaling is not None else cfg.max_seq_len
    pad = cfg.extra.get("pad_token_id")  # Phi3Config's default (32000) is outside a smaller vocabulary
    if not (isinstance(pad, int) and 0 <= pad < cfg.vocab_size):
        pad = None
    return d | {
        "pad_token_id": pad,
        "partial_rotary_factor": cfg.rope_fraction,
        "original_max_position_embeddings": original,
        "sliding_window": cfg.sliding_window,
        "rope_scaling": None,
    }


def _phi3_to_hf(state: StateDict, config: ModelConfig | None = None) -> StateDict:
    """Our names -> Phi-3's: q/k/v rows stacked into qkv_proj, gate and up rows into gate_up_proj."""
    import torch

    fused = {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", (".self_attn.k_proj.", ".self_attn.v_proj.")),
        ".mlp.gate_proj.": (".mlp.gate_up_proj.", (".mlp.up_proj.",)),
    }
    out: StateDict = {}
    for key, tensor in state.items():
        head = next((h for h in fused if h in key), None)
        if head is not None:
            target, rest = fused[head]
            parts = [tensor] + [state[key.replace(head, other)] for other in rest]
            out[LLAMA_PREFIX + key.replace(head, target)] = torch.cat(parts, dim=0)
        elif not any(other in key for _, rest in fused.values() for other in rest):
            out[LLAMA_PREFIX + key if not key.startswith("lm_head.") else key] = tensor
    return out


def _phi3_from_hf(state: StateDict) -> StateDict:
    """Phi-3's names -> ours: qkv_proj split at the query width (o_proj's input width) and two equal k/v parts,
    gate_up_proj split in halves."""
    out: StateDict = {}
    for key, tensor in prefixed_from_hf(state).items():
        if ".self_attn.qkv_proj." in key:
            o_proj = state[LLAMA_PREFIX + key.split(".self_attn.")[0] + ".self_attn.o_proj.weight"]
            q_rows = o_proj.shape[1]
            kv_rows = (tensor.shape[0] - q_rows) // 2
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[key.replace("qkv_proj", name)] = part
        elif ".mlp.gate_up_proj." in key:
            gate, up = tensor.chunk(2, dim=0)
            out[key.replace("gate_up_proj", "gate_proj")] = gate
            out[key.replace("gate_up_proj", "up_proj")] = up
        else:
            out[key] = tensor
    return out


FAMILIES: dict[str, FamilySpec] = {
    "llama": _llama_like(
        "llama",
        "LlamaForCausalLM",
        _gguf_llama_like("llama", rope_pairs=True, rope_scaling=("linear", "llama3", "yarn")),
        allowed=dict(qk_norm=(False,), sliding_window=(None,)),
        shared=_ONE_ATTENTION_BIAS,
        flag_keys=("attention_bias", "mlp_bias"),
        fixed_keys={"rope_scaling": None},  # rope_parameters holds it; a stale legacy key would shadow it
    ),
    "mistral": _llama_like(
        "mistral",
        "MistralForCausalLM",
        _gguf_llama_like("llama", rope_pairs=True, rope_scaling=("linear", "llama3", "yarn")),
        allowed=dict(qk_norm=(False,), **_NO_BIAS),
        shared={},
        refused_flags=("attention_bias", "mlp_bias"),
        window="every_layer",
    ),
    "qwen2": _llama_like(
        "qwen2",
        "Qwen2ForCausalLM",
        _gguf_llama_like("qwen2", rope_pairs=False, rope_scaling=("yarn",)),
        allowed=dict(qk_norm=(False,), qkv_bias=(True,), out_bias=(False,), mlp_bias=(False,)),
        shared={},
        refused_flags=("mlp_bias",),
        window="layer_types",
    ),
    "qwen3": _llama_like(
        "qwen3",
        "Qwen3ForCausalLM",
        _gguf_llama_like("qwen3", rope_pairs=False, rope_scaling=("yarn",)),
        allowed=dict(qk_norm=(True,), qk_norm_over=("head",), mlp_bias=(False,)),
        shared=_ONE_ATTENTION_BIAS,
        flag_keys=("attention_bias",),
        refused_flags=("mlp_bias",),
        window="layer_types",
    ),
    # Phi-3 (microsoft/Phi-3-*, Phi-4-mini): Llama's layers with fused qkv_proj and gate_up_proj weights
    "phi3": FamilySpec(
        name="phi3",
        architecture="Phi3ForCausalLM",
        allowed=dict(
            norm=("rmsnorm",),
            mlp=("gated",),
            positions=("rope",),
            qk_norm=(False,),
            **_NO_BIAS,
            head_dim=(None,),  # Phi3Config sizes the rope factors from hidden_size / num_attention_heads
            rope_scaling=_RopeTypes((None, "longrope")),
        ),  # fmt: skip
        shared={},
        config_keys=_PHI3_KEYS,
        read_config=_read_phi3,
        write_config=_write_phi3,
        weights_to_hf=_phi3_to_hf,
        weights_from_hf=_phi3_from_hf,
        gguf=None,  # llama.cpp's phi3 architecture is not written yet
        compressible=GATED_LINEARS,
        scale_folds=GATED_FOLDS,
        weight_marker=".self_attn.qkv_proj.",
        fixed_keys={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0},
    ),
    "gpt2": FamilySpec(
        name="gpt2",
        architecture="GPT2LMHeadModel",
        allowed=dict(
            norm=("layernorm",),
            mlp=("plain",),
            positions=("learned",),
            qk_norm=(False,),
            sliding_window=(None,),
            qkv_bias=(True,),
            out_bias=(True,),
            mlp_bias=(True,),
            tie_embeddings=(True,),
            rope_scaling=(None,),
            head_dim=(None,),  # config.json has no head_dim: it is n_embd / n_head
            rope_fraction=(1.0,),
        ),  # fmt: skip
        shared={"n_head": ("n_heads", "n_kv_heads")},
        config_keys=_GPT2_KEYS,
        read_config=_read_gpt2,
        write_config=_write_gpt2,
        weights_to_hf=_gpt2_to_hf,
        weights_from_hf=_gpt2_from_hf,
        gguf=GGUFLayout(
            arch="gpt2",
            tensors=MappingProxyType({**_GGUF_COMMON, "self_attn.qkv_proj": "ATTN_QKV"}),
            fused=MappingProxyType({"self_attn.qkv_proj": _QKV}),  # as GPT-2's own checkpoints have it
            rope_pairs=False,
            explicit_output=True,
            activation="gelu_tanh",
            mlp_bias=True,
            rope_scaling=(),
        ),
        compressible=PLAIN_LINEARS,
        scale_folds=PLAIN_FOLDS,
        tie_default=True,
        weight_marker=".attn.c_attn.",
        fixed_keys={
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    ),
    "mamba": FamilySpec(
        name="mamba",
        architecture="MambaForCausalLM",
        allowed=dict(mlp=("none",), norm=("rmsnorm",), sliding_window=(None,), rope_scaling=(None,)),
        shared={},
        config_keys=_MAMBA_KEYS,
        read_config=_read_mamba,
        write_config=_write_mamba,
        weights_to_hf=_mamba2_to_hf,  # backbone.embeddings, backbone.layers.{i}.norm / .mixer.*, backbone.norm_f
        weights_from_hf=_mamba2_from_hf,
        gguf=MAMBA_GGUF,
        compressible=_MAMBA_LINEARS,
        scale_folds=(ScaleFold("input_layernorm", ("mixer.in_proj",)),),
        tie_default=True,  # MambaConfig's default
        weight_marker=".mixer.dt_proj.",
        fixed_keys={
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "residual_in_fp32": True,
            "rescale_prenorm_residual": False,
        },
        mixers=("mamba",),
    ),
    "mamba2": FamilySpec(
        name="mamba2",
        architecture="Mamba2ForCausalLM",
        allowed=dict(mlp=("none",), norm=("rmsnorm",), sliding_window=(None,), rope_scaling=(None,)),
        shared={},
        config_keys=_MAMBA2_KEYS,
        read_config=_read_mamba2,
        write_config=_write_mamba2,
        weights_to_hf=_mamba2_to_hf,
        weights_from_hf=_mamba2_from_hf,
        gguf=_GGUF_MAMBA2,
        compressible=_MAMBA2_LINEARS,
        scale_folds=(ScaleFold("input_layernorm", ("mixer.in_proj",)),),
        weight_marker=".mixer.dt_bias",
        fixed_keys={
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "residual_in_fp32": True,
            "rescale_prenorm_residual": False,
        },
        mixers=("mamba2",),
    ),
    # Jamba (AI21): Mamba-1 layers (with dt/B/C norms) and attention layers without positions, dense and expert MLPs
    # by period and offset (_jamba_layout); listed before bamba, whose weight marker its names also have
    "jamba": FamilySpec(
        name="jamba",
        architecture="JambaForCausalLM",
        allowed=dict(
            norm=("rmsnorm",),
            activation=("silu",),  # its mixers' conv uses hidden_act too, and ours SiLU
            positions=("none",),
            qk_norm=(False,),
            sliding_window=(None,),
            rope_scaling=(None,),
            head_dim=(None,),
            **_NO_BIAS,
            ssm_dt_b_c_norm=(True,),
            moe_shared_d_ff=(0,),
            moe_shared_gate=(False,),
            moe_norm_topk=(False,),
            moe_weighting=("softmax",),
        ),  # fmt: skip
        shared={},
        config_keys=_JAMBA_KEYS,
        read_config=_read_jamba,
        write_config=_write_jamba,
        weights_to_hf=_jamba_to_hf,
        weights_from_hf=_jamba_from_hf,
        gguf=_JAMBA_GGUF,
        compressible=(*GATED_LINEARS, *_MAMBA_LINEARS),  # each expert's MLP layers; the routers stay float
        scale_folds=(GATED_FOLDS[0], _V_TO_O, ScaleFold("input_layernorm", ("mixer.in_proj",))),
        weight_marker=".mamba.dt_layernorm.",
        fixed_keys={
            "use_mamba_kernels": False,  # transformers' PyTorch path: the fused kernels need CUDA and mamba-ssm
            "mamba_conv_bias": True,
            "mamba_proj_bias": False,
            "attention_dropout": 0.0,
            "output_router_logits": False,
        },
        mixers=("mamba", "attention"),
        mlp_kinds=("gated", "moe"),
        layout=_jamba_layout,
    ),
    # Bamba (IBM): Mamba-2 layers with attention layers at attn_layer_indices, a gated MLP after every mixer; its
    # attention turns half of each head's channels (rope_fraction 0.5). llama.cpp runs it as `granitehybrid`.
    "bamba": FamilySpec(
        name="bamba",
        architecture="BambaForCausalLM",
        allowed=dict(
            norm=("rmsnorm",),
            mlp=("gated",),
            activation=("silu",),  # its mixers' conv uses hidden_act too, and ours SiLU
            positions=("rope",),
            qk_norm=(False,),
            sliding_window=(None,),
            rope_scaling=(None,),
            head_dim=(None,),  # BambaAttention's head_dim is hidden_size / num_attention_heads
            rope_fraction=(_BAMBA_ROPE_FRACTION,),
        ),  # fmt: skip
        shared={"attention_bias": ("qkv_bias", "out_bias")},
        config_keys=_BAMBA_KEYS,
        read_config=_read_bamba,
        write_config=_write_bamba,
        weights_to_hf=_bamba_to_hf,
        weights_from_hf=_bamba_from_hf,
        gguf=_GRANITEHYBRID_GGUF,
        compressible=(*GATED_LINEARS, *_MAMBA2_LINEARS),
        scale_folds=(*GATED_FOLDS, ScaleFold("input_layernorm", ("mixer.in_proj",))),
        weight_marker=".pre_ff_layernorm.",
        fixed_keys={
            "mamba_conv_bias": True,
            "mamba_proj_bias": False,
            "z_loss_coefficient": 0.0,
            "attention_dropout": 0.0,
        },
        mixers=("mamba2", "attention"),
    ),
    # Mixtral: Mistral's attention (a sliding window in every layer, or none), every MLP a mixture of experts whose
    # k router probabilities are renormalised; no shared expert. llama.cpp runs it as `llama` with expert tensors.
    "mixtral": FamilySpec(
        name="mixtral",
        architecture="MixtralForCausalLM",
        allowed=dict(
            norm=("rmsnorm",),
            mlp=("moe",),
            positions=("rope",),
            qk_norm=(False,),
            **_NO_BIAS,
            moe_shared_d_ff=(0,),
            moe_shared_gate=(False,),
            moe_norm_topk=(True,),
            moe_weighting=("softmax",),
            rope_fraction=(1.0,),
        ),  # fmt: skip
        shared={},
        config_keys=_MIXTRAL_KEYS,
        read_config=_read_mixtral,
        write_config=_write_mixtral,
        weights_to_hf=_mixtral_to_hf,
        weights_from_hf=_mixtral_from_hf,
        gguf=_gguf_moe("llama", rope_pairs=True, expert_weights_norm=True),
        compressible=GATED_LINEARS,  # each expert's (slmkit.interop.families._mlp_copies); the router stays float
        scale_folds=(GATED_FOLDS[0], _V_TO_O),  # the MLP folds would have to scale every expert and the router
        weight_marker=".block_sparse_moe.",
        window="every_layer",
        fixed_keys={"router_jitter_noise": 0.0, "output_router_logits": False},
    ),
    "qwen2_moe": _QWEN2_MOE_SPEC,
    "olmoe": _OLMOE_SPEC,
    # slmkit's own format: every ModelConfig field under its own name, our weight names; any mixers (hybrids,
    # linear attention). transformers has no class for it, so `slm export hf` refuses it.
    "slmkit": FamilySpec(
        name="slmkit",
        architecture="SlmkitForCausalLM",
        allowed={},
        shared={},
        config_keys=frozenset(f for f in ModelConfig.__dataclass_fields__ if f != "extra"),
        read_config=_read_slmkit,
        write_config=_write_slmkit,
        weights_to_hf=_same_names,
        weights_from_hf=_same_names,
        gguf=None,
        compressible=(*GATED_LINEARS, *dict.fromkeys(sub for subs in MIXER_LINEARS.values() for sub in subs)),
        # folds apply where a block has their modules; up -> down is left out (exact only for a gated MLP)
        scale_folds=(*GATED_FOLDS[:3], *_MIXER_FOLDS),
        mixers=None,
    ),
}

NATIVE_FAMILIES = ("slmkit",)  # saved in slmkit's own format: no transformers class loads them


def family_spec(name: str) -> FamilySpec:
    """The spec of family `name`; UserError naming the supported ones otherwise."""
    if name not in FAMILIES:
        raise UserError(f"family {name!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def check_family(config: ModelConfig, source: str = "model config", fix: str | None = None) -> ModelConfig:
    """`config` if its family can save it; UserError naming the switch and the fix otherwise."""
    return family_spec(config.family).check(config, source, fix)
