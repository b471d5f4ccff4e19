"""Model configuration: one typed dataclass, named presets, parameter and FLOP counts.

`ModelConfig` describes a decoder-only transformer. The defaults are the Llama recipe (RMSNorm, RoPE,
GQA, SwiGLU, no biases); a handful of switches (bias flags, norm type, activation, MLP kind, position
scheme, q/k norm, sliding window, rope scaling) cover the other small-model families (Mistral, Qwen2,
Qwen3, GPT-2). `family` only names the Hugging Face format the model is saved in; the model itself reads
only the switches.

This module is the lowest layer: it checks values on their own (types, ranges, choices). Which switch
values a family can save, its config.json and weight names all live in one spec per family in
`slmkit.interop.families`, which checks them (`check_family`) wherever a config comes from a user, and
`slmkit.interop.hf` reads and writes config.json (`load_config`, `save_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from slmkit.errors import UserError

Family = Literal[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gpt2",
    "mamba",
    "mamba2",
    "bamba",
    "jamba",
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "slmkit",
]
NormType = Literal["rmsnorm", "layernorm"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2"]  # relu2: relu(x)^2 (Primer)
MLPType = Literal["gated", "plain", "moe", "memory", "none"]
MoEWeighting = Literal["softmax", "unit"]
PositionScheme = Literal["rope", "learned", "none"]
QKNormScope = Literal["head", "projection"]
RopeScalingType = Literal["linear", "dynamic", "llama3", "yarn", "longrope"]


# Shapes beyond these are typos or corrupt files; refusing them beats trying to allocate terabytes.
MAX_POSITIONS = 2**20  # max_seq_len (and sliding_window)
MAX_LAYERS = 1024
MAX_WIDTH = 2**17  # d_model, d_ff, head_dim
MAX_HEADS = 4096
MAX_VOCAB = 2**22
MAX_PARAMS = 10**12
_LIMITS = {
    "max_seq_len": MAX_POSITIONS,
    "sliding_window": MAX_POSITIONS,
    "n_layers": MAX_LAYERS,
    "d_model": MAX_WIDTH,
    "d_ff": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "n_heads": MAX_HEADS,
    "n_kv_heads": MAX_HEADS,
    "vocab_size": MAX_VOCAB,
    "ssm_dt_rank": MAX_WIDTH,
}


def check_field_types(obj: Any, where: str) -> None:
    """UserError naming the field when a dataclass field holds a value of the wrong type.

    Checks the plain annotations (int, float, bool, str, dict, each optionally `| None`): ints are not bools,
    floats are finite numbers (a string that reads as one, like YAML's `1e18`, is converted). Other annotations
    (Literal choices, nested configs) are checked by the class itself.
    """
    for f in dataclasses.fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        base = kind.removesuffix("| None").strip()
        value = getattr(obj, f.name)
        if value is None:
            if kind.endswith("| None") or base not in ("int", "float", "bool", "str"):
                continue
            raise UserError(f"{where}: {f.name} must be set (a {base}), got null")
        if base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{where}: {f.name} must be an integer, got {value!r}")
        elif base == "float":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
                else:
                    setattr(obj, f.name, value)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{where}: {f.name} must be a finite number, got {value!r}")
        elif base == "bool":
            if not isinstance(value, bool):
                raise UserError(f"{where}: {f.name} must be true or false, got {value!r}")
        elif base == "str":
            if not isinstance(value, str):
                raise UserError(f"{where}: {f.name} must be a string, got {value!r}")
        elif base.startswith("dict") and not isinstance(value, dict):
            raise UserError(f"{where}: {f.name} must be a mapping, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of rotary embeddings, as transformers' `rope_parameters` describe it.

    linear: positions divided by `factor`; dynamic: NTK base growth beyond `max_seq_len`;
    llama3: per-frequency scaling between `low_freq_factor` and `high_freq_factor` wavelengths of
    `original_max_seq_len`.
    yarn (YaRN): frequencies that turn fewer than `beta_slow` times over `original_max_seq_len` are slowed by
    `factor`, those that turn more than `beta_fast` times are kept, a linear ramp between; cos/sin are multiplied
    by an attention factor (`attention_factor`, or derived from `factor`, `mscale`, `mscale_all_dim`).
    longrope (LongRoPE, Phi-3): one divisor per frequency, `short_factor` while a forward's positions stay within
    `original_max_seq_len` and `long_factor` once any passes it (transformers decides per forward call, and so does
    slmkit); cos/sin are multiplied by `attention_factor`, by default sqrt(1 + ln(factor) / ln(original)).
    `original_max_seq_len` is transformers' `original_max_position_embeddings`.
    """

    type: RopeScalingType
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_seq_len: int | None = None  # llama3, yarn, longrope
    attention_factor: float | None = None  # yarn, longrope: multiplies cos/sin (None: derived from factor)
    beta_fast: float | None = None  # yarn: None is transformers' default, 32
    beta_slow: float | None = None  # yarn: None is 1
    mscale: float | None = None  # yarn (DeepSeek style): with mscale_all_dim, shapes the derived attention factor
    mscale_all_dim: float | None = None
    truncate: bool | None = None  # yarn: round the ramp's ends to whole dimensions (None: true, as transformers)
    short_factor: tuple[float, ...] | None = None  # longrope: one divisor per rotated frequency (rope_dim / 2)
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in get_args(RopeScalingType):
            raise UserError(
                f"model config: rope_scaling type {self.type!r} is not supported "
                f"(supported: {', '.join(get_args(RopeScalingType))})"
            )
        if not _is_number(self.factor) or not (self.factor >= 1.0 and math.isfinite(self.factor)):
            raise UserError(f"model config: rope_scaling factor must be a number >= 1, got {self.factor!r}")
        allowed = _ROPE_KEYS[self.type]
        given = [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ("type", "factor") and getattr(self, f.name) is not None
        ]
        extra = [name for name in given if name not in allowed]
        if extra:
            raise UserError(
                f"model config: {self.type} rope_scaling does not take {', '.join(extra)} "
                f"(it takes factor{''.join(', ' + k for k in allowed)})"
            )
        original = self.original_max_seq_len
        if self.type in ("llama3", "yarn", "longrope") and (
            not isinstance(original, int) or isinstance(original, bool) or original <= 0
        ):
            raise UserError(
                f"model config: {self.type} rope_scaling needs original_max_seq_len "
                f"(original_max_position_embeddings), a positive integer: the context the model was trained at; "
                f"got {original!r}"
            )
        if self.type == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise UserError(
                    "model config: llama3 rope_scaling needs low_freq_factor, high_freq_factor and "
                    "original_max_seq_len (original_max_position_embeddings)"
                )
            if not (0 < self.low_freq_factor < self.high_freq_factor):
                raise UserError("model config: llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor")
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise UserError(f"model config: rope_scaling {name} must be a positive number, got {value!r}")
        if self.type == "yarn" and (self.beta_fast or 32) < (self.beta_slow or 1):
            raise UserError(
                f"model config: yarn rope_scaling needs beta_fast >= beta_slow, got {self.beta_fast} < {self.beta_slow}"
            )
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise UserError(f"model config: rope_scaling truncate must be true or false, got {self.truncate!r}")
        if self.type == "longrope":
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                if isinstance(value, list):
                    value = tuple(value)
                    object.__setattr__(self, name, value)
                if (
                    not isinstance(value, tuple)
                    or not value
                    or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in value)
                ):
                    raise UserError(
                        f"model config: longrope rope_scaling needs {name}, a list of positive numbers "
                        f"(one per rotated frequency, rope_dim / 2), got {value!r}"
                    )
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def attention_scale(self) -> float:
        """What cos/sin are multiplied by (transformers' `attention_scaling`): 1 except for yarn and longrope."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.type == "yarn":

            def yarn_mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if self.mscale and self.mscale_all_dim:
                return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
            return yarn_mscale(self.factor)
        if self.type == "longrope":
            assert self.original_max_seq_len is not None
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_seq_len))
        return 1.0

    def check_rope_dim(self, rope_dim: int) -> None:
        """longrope's per-frequency lists must have one entry per rotated frequency."""
        if self.type != "longrope":
            return
        for name in ("short_factor", "long_factor"):
            got = len(getattr(self, name))
            if got != rope_dim // 2:
                raise UserError(
                    f"model config: longrope rope_scaling {name} has {got} entries; it needs one per rotated "
                    f"frequency, rope_dim / 2 = {rope_dim // 2}"
                )

    @classmethod
    def coerce(cls, value: Any) -> RopeScaling | None:
        if value is None or isinstance(value, RopeScaling):
            return value
        if not isinstance(value, dict):
            raise UserError(
                f"model config: rope_scaling must be a mapping like {{type: linear, factor: 2}}, got {value!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - names)
        if bad or "type" not in value or "factor" not in value:
            raise UserError(
                f"model config: rope_scaling needs keys type and factor (optional: {sorted(names)}), got {value!r}"
            )
        return cls(**value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# the keys each rope scaling type takes besides type and factor
_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_seq_len"),
    "yarn": (
        "original_max_seq_len",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": ("original_max_seq_len", "attention_factor", "short_factor", "long_factor"),
}


# Parameter and FLOP counts of mixers registered outside slmkit (filled by `slmkit.models.registry.register_mixer`):
# name -> (config -> (parameters, of which in weight matrices), (config, context) -> FLOPs per token beyond them)
BUILTIN_MIXER_KINDS = ("attention", "mamba", "mamba2", "gla", "based")  # counted in ModelConfig._mixer_params
PLUGIN_MIXER_COUNTS: dict[str, tuple[Callable[[Any], tuple[int, int]], Callable[[Any, int], float]]] = {}


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer; defaults are the Llama family (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 704
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    head_dim: int | None = None  # None: d_model // n_heads
    # ---- family switches (defaults: Llama) ----
    family: Family = "llama"  # the Hugging Face format it is saved in (rules: slmkit.interop.families)
    qkv_bias: bool = False  # biases on q, k, v projections (Qwen2, GPT-2, Llama attention_bias)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, Llama attention_bias)
    mlp_bias: bool = False
    norm: NormType = "rmsnorm"
    activation: Activation = "silu"
    mlp: MLPType = "gated"  # gated: down(act(gate(x)) * up(x)); plain: down(act(up(x)))
    positions: PositionScheme = (
        "rope"  # learned: an absolute position embedding table (GPT-2); none: no positions (Jamba)
    )
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3)
    # what that RMSNorm spans: each head (Qwen3), or all heads' q (and k) together, one weight per channel (OLMoE)
    qk_norm_over: QKNormScope = "head"
    sliding_window: int | None = None  # attend to at most this many latest tokens (self included)
    rope_scaling: RopeScaling | None = None
    # share of each head's channels that rotary embeddings turn (the first ones; the rest pass through unchanged):
    # Bamba rotates half [partial_rotary_factor]
    rope_fraction: float = 1.0
    # ---- per-layer parts (slmkit.models.registry names them; Hugging Face families use attention) ----
    mixer: str = "attention"  # the sequence mixer of every layer, unless layer_pattern says otherwise
    layer_pattern: tuple[str, ...] | None = None  # one mixer name per layer (hybrids: a config, not a class)
    # ---- mamba2 layers (slmkit.models.mamba2; transformers' Mamba2Config names in brackets) ----
    ssm_state_size: int = 64  # N, state channels per head [state_size]
    ssm_expand: int = 2  # inner width = ssm_expand * d_model [expand]
    ssm_head_dim: int = 32  # P, channels per head; heads = inner width / P [head_dim]
    ssm_n_groups: int = 1  # G, groups of heads sharing B and C [n_groups]
    ssm_conv_kernel: int = 4  # K, depthwise causal conv width [conv_kernel]
    ssm_chunk_size: int = 64  # Q, tokens per chunk of the parallel scan (speed only) [chunk_size]
    # mamba (Mamba-1) layers also read ssm_state_size (N per channel), ssm_expand, ssm_conv_kernel, ssm_chunk_size
    ssm_dt_rank: int | None = None  # mamba: time-step projection rank; None: ceil(d_model / 16) [time_step_rank]
    ssm_dt_b_c_norm: bool = False  # mamba: RMSNorms over the time step, B and C inside the mixer (Jamba's)
    # ---- linear-attention layers (slmkit.models.linear_attention: gla, based) ----
    linear_feature_dim: int = 16  # based: q/k width per head before the 2nd-order Taylor map (1 + d + d^2 after)
    linear_window: int = 64  # based: tokens its sliding-window softmax branch sees (self included)
    linear_chunk_size: int = 32  # tokens per chunk of the parallel form (speed and memory only)
    linear_gate_rank: int = 16  # gla: rank of the data-dependent decay gate (d_model -> rank -> d_model / 2)
    # ---- mixture-of-experts MLPs (mlp: moe; slmkit.models.moe): every expert a gated MLP of width d_ff ----
    moe_experts: int = 8  # E, experts per layer [num_local_experts / num_experts]
    moe_top_k: int = 2  # k, experts each token uses [num_experts_per_tok]
    moe_shared_d_ff: int = 0  # width of a shared expert every token also uses (0: none) [Qwen2-MoE]
    moe_shared_gate: bool = False  # a sigmoid gate scales the shared expert per token [Qwen2-MoE]
    moe_norm_topk: bool = True  # renormalise the k chosen probabilities to sum to 1 [norm_topk_prob]
    # how a chosen expert's output is weighted: "softmax" by its router probability (as moe_norm_topk says);
    # "unit" by exactly 1, the router only choosing (a carved model: the experts are pieces of one MLP that sum
    # back to it); the router still learns, through the softmax weight's gradient (a straight-through 1)
    moe_weighting: MoEWeighting = "softmax"
    moe_z_loss_weight: float = 0.1  # router z-loss weight relative to the balance loss (x aux_loss_weight)
    # ---- per-layer MLP kinds and product-key memory layers (slmkit.models.memory) ----
    mlp_pattern: tuple[str, ...] | None = None  # one MLP kind per layer (e.g. memory in one layer); None: `mlp`
    memory_keys: int = 128  # n: sub-keys per half; the memory holds N = n^2 value rows
    memory_heads: int = 4  # H: query heads, each with its own sub-keys, all reading one shared value table
    memory_topk: int = 16  # k: value rows each head reads per token (exact top-k of its N scores)
    memory_key_dim: int = 64  # query/key width per head (split into two halves of memory_key_dim / 2)
    memory_value_dim: int = 0  # width of a value row (0: d_model)
    memory_gated: bool = True  # Memory+ output: down(silu(gate(x)) * memory(x)); false: memory(x) (Lample et al.)
    memory_query_batchnorm: bool = False  # BatchNorm1d on the queries (Lample et al.; running stats at inference)
    # ---- training-recipe switches (docs/training.md) ----
    zero_init_proj: bool = False  # residual output projections (o_proj, down_proj, out_proj) start at zero
    # residual dropout (GPT-2's resid/embd pdrop): this share of each block's mixer and MLP outputs and of the
    # embeddings is zeroed (the rest scaled up) in training only; a regulariser for data seen for several epochs
    dropout: float = 0.0
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2); slmkit's own format only
    # N tables of value embeddings (modded-nanogpt): the first N and the last N attention layers add table i's row
    # of each token to their values, v = a v + b ve (a, b learned, from 0.5); slmkit's own format only
    value_embeds: int = 0
    # U-net skips (modded-nanogpt): layer i of the first half's output is added, scaled by a learned weight (from
    # 1), to the input of layer n_layers - 1 - i; slmkit's own format only
    skip_connections: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF keys, kept for round trips

    def __post_init__(self) -> None:
        check_field_types(self, "model config")
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, int) and value > limit:
                raise UserError(f"model config: {name}={value:,} is beyond the limit of {limit:,}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(
                f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise UserError(
                    f"model config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                    "or set head_dim explicitly"
                )
        elif self.head_dim <= 0:
            raise UserError(f"model config: head_dim must be positive, got {self.head_dim}")
        if self.positions == "rope" and self.dim_per_head % 2 != 0:
            raise UserError(f"model config: head dimension must be even for rotary embeddings, got {self.dim_per_head}")
        if not (0 < self.rope_fraction <= 1) or self.rope_dim % 2 != 0 or self.rope_dim == 0:
            raise UserError(
                f"model config: rope_fraction={self.rope_fraction} must be in (0, 1] and turn an even, nonzero number "
                f"of the {self.dim_per_head} channels per head"
            )
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise UserError(f"model config: rope_theta must be a positive number, got {self.rope_theta}")
        if not (0 < self.norm_eps < 1):
            raise UserError(f"model config: norm_eps must be in (0, 1), got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise UserError(f"model config: {name}={value} is outside the vocabulary (size {self.vocab_size})")
        self._check_switches()
        if all(kind in BUILTIN_MIXER_KINDS or kind in PLUGIN_MIXER_COUNTS for kind in self.mixers):
            # (a mixer not registered yet is named by the model builder, which knows the registry)
            if self.num_params() > MAX_PARAMS:
                raise UserError(
                    f"model config: {self.num_params():,} parameters is beyond the limit of {MAX_PARAMS:,}; "
                    "check d_model, d_ff, n_layers and vocab_size"
                )

    def _check_switches(self) -> None:
        choices = {
            "family": Family,
            "norm": NormType,
            "activation": Activation,
            "mlp": MLPType,
            "positions": PositionScheme,
            "qk_norm_over": QKNormScope,
        }
        for name, kind in choices.items():
            if getattr(self, name) not in get_args(kind):
                raise UserError(
                    f"model config: {name}={getattr(self, name)!r} is not supported "
                    f"(choose one of: {', '.join(get_args(kind))})"
                )
        if not 0 <= self.dropout < 1:  # its type is checked with the other fields'
            raise UserError(f"model config: dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise UserError(f"model config: logit_softcap must be a positive number or null, got {self.logit_softcap}")
        for name in (
            "qkv_bias",
            "out_bias",
            "mlp_bias",
            "qk_norm",
            "tie_embeddings",
            "zero_init_proj",
            "ssm_dt_b_c_norm",
            "skip_connections",
        ):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise UserError(f"model config: sliding_window must be a positive integer or null, got {window!r}")
        if not isinstance(self.mixer, str) or not self.mixer:
            raise UserError(f"model config: mixer must be a name like 'attention', got {self.mixer!r}")
        if self.layer_pattern is not None:
            pattern = self.layer_pattern
            if isinstance(pattern, str) or not all(isinstance(m, str) and m for m in pattern):
                raise UserError(f"model config: layer_pattern must be a list of mixer names, got {pattern!r}")
            if len(pattern) != self.n_layers:
                raise UserError(
                    f"model config: layer_pattern names {len(pattern)} mixers for {self.n_layers} layers; "
                    "give one per layer"
                )
            self.layer_pattern = tuple(pattern)
        self._check_value_embeds()
        self._check_ssm()
        self._check_linear()
        self._check_moe()
        self._check_mlp_pattern()
        self.rope_scaling = RopeScaling.coerce(self.rope_scaling)
        if self.rope_scaling is not None and self.positions != "rope":
            raise UserError("model config: rope_scaling needs positions='rope'")
        if self.rope_scaling is not None:
            self.rope_scaling.check_rope_dim(self.rope_dim)

    def _check_value_embeds(self) -> None:
        n = self.value_embeds
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.n_layers:
            raise UserError(
                f"model config: value_embeds must be an integer in [0, n_layers={self.n_layers}], got {n!r}"
            )
        others = sorted({self.mixer_at(i) for i in self.value_embed_layers()} - {"attention"})
        if others:
            raise UserError(
                f"model config: value_embeds={n} feeds the first and last {n} layers' attention values, but some of "
                f"them are {', '.join(others)} layers; lower value_embeds or use attention there"
            )
        if self.skip_connections and self.n_layers < 2:
            raise UserError("model config: skip_connections needs at least 2 layers")

    def value_embed_layers(self) -> dict[int, int]:
        """{layer: value-embedding table} for `value_embeds` N: table i feeds layer i and layer n_layers - N + i
        (the first N layers and the last N, as in modded-nanogpt; a layer in both takes the first)."""
        n, last = self.value_embeds, self.n_layers - self.value_embeds
        return {**{last + i: i for i in range(n)}, **{i: i for i in range(n)}}

    def _check_ssm(self) -> None:
        names = ("ssm_state_size", "ssm_expand", "ssm_head_dim", "ssm_n_groups", "ssm_conv_kernel", "ssm_chunk_size")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.ssm_dt_rank is not None and self.ssm_dt_rank <= 0:
            raise UserError(
                f"model config: ssm_dt_rank must be a positive integer or null (ceil(d_model / 16)), "
                f"got {self.ssm_dt_rank!r}"
            )
        if "mamba2" in self.mixers:
            inner = self.ssm_expand * self.d_model
            if inner % self.ssm_head_dim:
                raise UserError(
                    f"model config: ssm_expand * d_model ({inner}) must be a multiple of ssm_head_dim "
                    f"({self.ssm_head_dim})"
                )
            if (inner // self.ssm_head_dim) % self.ssm_n_groups:
                raise UserError(
                    f"model config: the {inner // self.ssm_head_dim} mamba2 heads must split into ssm_n_groups "
                    f"({self.ssm_n_groups}) equal groups"
                )

    def _check_linear(self) -> None:
        for name in ("linear_feature_dim", "linear_window", "linear_chunk_size", "linear_gate_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        for kind in sorted(self.mixers & {"gla", "based"}):
            if self.d_model % self.n_heads:
                raise UserError(
                    f"model config: {kind} layers split d_model ({self.d_model}) into n_heads ({self.n_heads}) "
                    "value heads: make d_model a multiple of n_heads"
                )
        if "gla" in self.mixers and (self.d_model // 2) % self.n_heads:
            raise UserError(
                f"model config: gla layers split d_model / 2 ({self.d_model // 2}) into n_heads ({self.n_heads}) "
                "key heads: make d_model a multiple of 2 * n_heads"
            )

    def _check_moe(self) -> None:
        for name in ("moe_experts", "moe_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.moe_top_k > self.moe_experts:
            raise UserError(
                f"model config: moe_top_k ({self.moe_top_k}) cannot exceed moe_experts ({self.moe_experts})"
            )
        if self.moe_shared_d_ff < 0 or self.moe_shared_d_ff > MAX_WIDTH:
            raise UserError(f"model config: moe_shared_d_ff must be 0 (none) or a width, got {self.moe_shared_d_ff}")
        if self.moe_shared_gate and not self.moe_shared_d_ff:
            raise UserError("model config: moe_shared_gate needs a shared expert (moe_shared_d_ff > 0)")
        if self.moe_weighting not in get_args(MoEWeighting):
            raise UserError(f"model config: moe_weighting must be softmax or unit, got {self.moe_weighting!r}")
        if self.moe_z_loss_weight < 0:
            raise UserError(f"model config: moe_z_loss_weight must be >= 0, got {self.moe_z_loss_weight}")
        if self.mlp == "moe" and self.moe_experts > 4096:
            raise UserError(f"model config: moe_experts={self.moe_experts:,} is beyond the limit of 4,096")

    # ---- per-layer MLP kinds and memory layers ----
    def _check_mlp_pattern(self) -> None:
        pattern = self.mlp_pattern
        if pattern is not None:
            kinds = get_args(MLPType)
            if isinstance(pattern, str) or not all(isinstance(m, str) for m in pattern):
                raise UserError(f"model config: mlp_pattern must be a list of MLP kinds, got {pattern!r}")
            if len(pattern) != self.n_layers:
                raise UserError(
                    f"model config: mlp_pattern names {len(pattern)} MLPs for {self.n_layers} layers; "
                    "give one per layer"
                )
            bad = sorted(set(pattern) - set(kinds))
            if bad:
                raise UserError(f"model config: mlp_pattern has {bad} (choose from: {', '.join(kinds)})")
            self.mlp_pattern = tuple(pattern)
        names = ("memory_keys", "memory_heads", "memory_topk", "memory_key_dim")
        for name in names:
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.memory_value_dim < 0 or self.memory_value_dim > MAX_WIDTH:
            raise UserError(
                f"model config: memory_value_dim must be 0 (d_model) or a width, got {self.memory_value_dim}"
            )
        if self.memory_keys > 2**16:
            raise UserError(f"model config: memory_keys={self.memory_keys:,} is beyond the limit of 65,536 (N = n^2)")
        if self.memory_key_dim % 2:
            raise UserError(
                f"model config: memory_key_dim ({self.memory_key_dim}) must be even: it splits into two sub-key halves"
            )
        if self.memory_topk > self.memory_keys:
            raise UserError(
                f"model config: memory_topk ({self.memory_topk}) cannot exceed memory_keys ({self.memory_keys}): "
                "each half picks its top k of n sub-keys"
            )
        if "memory" in self.mlps and not self.memory_gated and self.memory_width != self.d_model:
            raise UserError(
                f"model config: an ungated memory adds its values to the residual, so memory_value_dim "
                f"({self.memory_value_dim}) must be 0 or d_model ({self.d_model}); or set memory_gated: true"
            )

    @property
    def memory_width(self) -> int:
        """Width of a memory value row (memory_value_dim, or d_model when 0)."""
        return self.memory_value_dim or self.d_model

    @property
    def mlps(self) -> set[str]:
        """The MLP kinds the layers use."""
        return set(self.mlp_pattern) if self.mlp_pattern is not None else {self.mlp}

    def mlp_at(self, layer: int) -> str:
        """The MLP kind of layer `layer`."""
        return self.mlp_pattern[layer] if self.mlp_pattern is not None else self.mlp

    def _memory_params(self) -> tuple[int, int, int, float]:
        """(parameters, of which a token uses, of which in the weight matrices it uses, FLOPs per token beyond
        them) of one product-key memory layer (slmkit.models.memory).

        Every token uses the query projection, all 2 H n sub-keys (scored by a matmul), the gate and down
        projections, and only H k of the N value rows; beyond the matrices it combines k x k candidate sums per
        head and sums H k weighted value rows."""
        c, h, n, k, dk, dv = (
            self.d_model,
            self.memory_heads,
            self.memory_keys,
            self.memory_topk,
            self.memory_key_dim,
            self.memory_width,
        )
        mats = c * h * dk + h * n * dk + (2 * c * dv if self.memory_gated else 0)  # query, sub-keys, gate + down
        norm = 2 * h * dk if self.memory_query_batchnorm else 0
        values = n * n * dv
        return mats + norm + values, mats + norm + h * k * dv, mats, float(h * k * k + 2 * h * k * dv)

    @property
    def mixers(self) -> set[str]:
        """The mixers the layers use."""
        return set(self.layer_pattern) if self.layer_pattern is not None else {self.mixer}

    def mixer_at(self, layer: int) -> str:
        """The mixer of layer `layer`."""
        return self.layer_pattern[layer] if self.layer_pattern is not None else self.mixer

    @property
    def mamba_dt_rank(self) -> int:
        """The rank of a mamba layer's time-step projection (ssm_dt_rank, or ceil(d_model / 16) as in Mamba)."""
        return self.ssm_dt_rank if self.ssm_dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Channels per head that rotary embeddings turn (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.dim_per_head * self.rope_fraction)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- counts -------------------------------------------------------------------------------
    def _norm_params(self) -> int:
        return self.d_model * (2 if self.norm == "layernorm" else 1)

    def _dense_mlp_params(self, gated: bool, d_ff: int) -> int:
        return (3 if gated else 2) * self.d_model * d_ff + ((2 if gated else 1) * d_ff + self.d_model) * self.mlp_bias

    def _mlp_params(self, kind: str | None = None) -> tuple[int, int, int]:
        """(parameters, of which a token uses, of which in the weight matrices it uses) of one layer's MLP of this
        kind (default: `mlp`).

        They differ for a mixture of experts: a token passes through the router, its k experts and the shared
        expert, and the other E - k experts are parameters it never touches (a memory layer: H k of N values)."""
        c = self.d_model
        kind = kind or self.mlp
        if kind == "memory":
            return self._memory_params()[:3]
        if kind == "none":
            return 0, 0, 0
        if kind in ("gated", "plain"):
            n = self._dense_mlp_params(kind == "gated", self.d_ff)
            return n, n, (3 if kind == "gated" else 2) * c * self.d_ff
        if kind == "moe":
            expert = self._dense_mlp_params(True, self.d_ff)
            shared = self._dense_mlp_params(True, self.moe_shared_d_ff) if self.moe_shared_d_ff else 0
            router = c * (self.moe_experts + self.moe_shared_gate)  # the router, and the shared expert's gate
            k = self.moe_top_k
            mats = k * 3 * c * self.d_ff + 3 * c * self.moe_shared_d_ff + router
            return self.moe_experts * expert + shared + router, k * expert + shared + router, mats
        raise UserError(f"model config: no parameter count for mlp {kind!r}")

    def _mixer_params(self, kind: str) -> tuple[int, int]:
        """(parameters, of which in weight matrices) of one layer's mixer of this kind."""
        hd, c = self.dim_per_head, self.d_model
        if kind == "attention":
            mats = c * hd * (self.n_heads * 2 + self.n_kv_heads * 2)  # q, o, k, v
            extra = hd * (self.n_heads + 2 * self.n_kv_heads) * self.qkv_bias + c * self.out_bias
            norm = 2 * hd if self.qk_norm_over == "head" else hd * (self.n_heads + self.n_kv_heads)
            return mats + extra + norm * self.qk_norm, mats
        if kind == "mamba2":
            inner = self.ssm_expand * c
            heads = inner // self.ssm_head_dim
            conv_dim = inner + 2 * self.ssm_n_groups * self.ssm_state_size
            mats = c * (inner + conv_dim + heads) + inner * c  # in_proj, out_proj
            return mats + conv_dim * (self.ssm_conv_kernel + 1) + 3 * heads + inner, mats  # conv, dt/A/D, norm
        if kind == "mamba":
            inner, n, rank = self.ssm_expand * c, self.ssm_state_size, self.mamba_dt_rank
            mats = c * 2 * inner + inner * (rank + 2 * n) + rank * inner + inner * c  # in, x, dt, out projections
            norms = (rank + 2 * n) * self.ssm_dt_b_c_norm  # Jamba's dt, B and C norms
            return mats + inner * (
                self.ssm_conv_kernel + 1
            ) + inner + inner * n + inner + norms, mats  # conv, dt bias, A, D
        if kind == "gla":
            key, rank = c // 2, self.linear_gate_rank
            mats = c * key * 2 + c * c * 3 + c * rank + rank * key  # q, k; v, output gate, o; the low-rank decay
            return mats + key + c // self.n_heads, mats  # decay bias, per-head output norm
        if kind == "based":
            attention, attention_mats = self._mixer_params("attention")  # the sliding-window branch
            mats = 2 * c * self.n_heads * self.linear_feature_dim + 2 * c * c  # q, k features; v, o
            return mats + attention, mats + attention_mats
        if kind in PLUGIN_MIXER_COUNTS:
            return PLUGIN_MIXER_COUNTS[kind][0](self)
        raise UserError(f"model config: no parameter count for mixer {kind!r}")

    def _mixer_flops(self, kind: str, t: int) -> float:
        """Forward FLOPs per token of one layer's mixer beyond its weight matrices (context length t)."""
        if kind == "attention":
            return 2 * 2 * t * self.n_heads * self.dim_per_head  # scores and weighted sum
        if kind == "mamba2":
            # the chunked scan: within-chunk scores (Q x G x N) and weighting (Q x H x P), state update and read-out
            inner = self.ssm_expand * self.d_model
            q = min(self.ssm_chunk_size, t)
            conv = 2 * (inner + 2 * self.ssm_n_groups * self.ssm_state_size) * self.ssm_conv_kernel
            return (
                conv + 2 * q * (self.ssm_n_groups * self.ssm_state_size + inner) + 2 * 2 * inner * self.ssm_state_size
            )
        if kind == "mamba":
            # the conv, discretising (dt A, exp, dt x B), the chunk's doubling scan (a multiply-add and a multiply
            # per level) and the read-out h . C, per channel and state entry; none of it grows past the chunk
            inner, n = self.ssm_expand * self.d_model, self.ssm_state_size
            levels = math.ceil(math.log2(max(min(self.ssm_chunk_size, t), 1)))
            return 2 * inner * self.ssm_conv_kernel + inner * n * (4 + 3 * levels + 2 + 2)
        if kind in ("gla", "based"):
            # the chunked form per token: within-chunk scores (Q x Dk) and weighting (Q x Dv), then the state
            # update k^T v and read-out q S (Dk x Dv per head); none of it grows with the context
            q, h = min(self.linear_chunk_size, t), self.n_heads
            if kind == "gla":
                keys, values = self.d_model // 2, self.d_model
            else:
                f = self.linear_feature_dim
                keys, values = h * (1 + f + f * f), self.d_model + h  # Taylor features; values and the normaliser
            linear = 2 * q * (keys + values) + 2 * 2 * keys * values / h
            if kind == "gla":
                return linear
            window = 2 * 2 * min(t, self.linear_window) * h * self.dim_per_head  # softmax over the window
            return linear + window
        if kind in PLUGIN_MIXER_COUNTS:
            return PLUGIN_MIXER_COUNTS[kind][1](self, t)
        raise UserError(f"model config: no FLOP count for mixer {kind!r}")

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Exact number of trainable parameters (tied embeddings counted once).

        active: only those one token uses (a mixture of experts' k chosen experts, not all E; the same as the
        total for dense models)."""
        c = self.d_model
        body = sum(self._mixer_params(self.mixer_at(i))[0] for i in range(self.n_layers))
        for i in range(self.n_layers):  # each layer's MLP (per-layer kinds: mlp_pattern) and its norms
            kind = self.mlp_at(i)
            total, used, _ = self._mlp_params(kind)
            body += (used if active else total) + (2 if kind != "none" else 1) * self._norm_params()
        body += self._norm_params()  # + final norm
        body += 2 * len(self.value_embed_layers()) + (self.n_layers // 2 if self.skip_connections else 0)
        if not include_embeddings:
            return body
        embed = self.vocab_size * c + (self.max_seq_len * c if self.positions == "learned" else 0)
        embed += self.value_embeds * self.vocab_size * self.n_kv_heads * self.dim_per_head
        head = 0 if self.tie_embeddings else self.vocab_size * c
        return body + embed + head

    def param_counts(self) -> dict[str, int]:
        """The counts reports print: all parameters, without embeddings, and those one token uses (MoE: k of the
        E experts; equal to all for dense models)."""
        return {
            "params": self.num_params(),
            "non_embedding_params": self.num_params(include_embeddings=False),
            "active_params": self.num_params(active=True),
        }

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

        Forward: 2 FLOPs per multiply-accumulate over every weight matrix (the lm_head included,
        the embedding lookup excluded), plus each mixer's own work: for attention the scores and weighted sum,
        2 * 2 * T * d_attn per layer per token with T the context (causal halves it on average, which we do not
        credit, as in the PaLM appendix convention of 6N + 12 L d T); for mamba2 the chunked scan and the conv;
        for gla and based their chunked linear attention (bounded by the chunk, not the context), and for based's
        sliding-window branch attention over min(T, linear_window) keys. A mixture of experts counts the weights
        a token passes through: the router, its k experts and the shared expert (the active FLOPs); a product-key
        memory its query, sub-key scores, gate and down projections and the H k value rows it reads.
        """
        t = seq_len or self.max_seq_len
        kinds = [self.mixer_at(i) for i in range(self.n_layers)]
        mlps = [self.mlp_at(i) for i in range(self.n_layers)]
        matmul_params = sum(self._mixer_params(k)[1] for k in kinds) + sum(self._mlp_params(m)[2] for m in mlps)
        matmul_params += self.vocab_size * self.d_model  # + lm_head
        mixing = sum(self._mixer_flops(k, t) for k in kinds)
        mixing += mlps.count("memory") * self._memory_params()[3]  # memory layers: candidates and value sums
        return 3 * (2 * matmul_params + mixing)


# Presets span ~0.5M to ~125M parameters at an 8k vocabulary (124m at GPT-2's 50k vocabulary).
# Widths are multiples of 64 and d_ff ~ 8/3 d_model rounded to a multiple of 32, as in Llama.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, max_seq_len=256),
    "micro": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=512),
    "mini": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=512, max_seq_len=512),
    "small": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=1024),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1376, max_seq_len=1024),
    "base": dict(d_model=640, n_layers=12, n_heads=10, n_kv_heads=5, d_ff=1728, max_seq_len=1024),
    "124m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_seq_len=1024, vocab_size=50304),
}
# Beyond attention, at about the parameters of micro and small. mamba2: the Mamba-2 recipe (no MLP, expand 2), so
# about 1.5 mamba2 layers per transformer layer; hybrid: three mamba2 layers then one attention layer (Jamba's
# interleaving), an MLP on every layer, d_ff trimmed to keep the size, rotary on half of each head's channels:
# Bamba's recipe, so transformers' BambaForCausalLM loads them (family bamba; mamba2 without MLPs: Mamba2ForCausalLM).
_M, _A = "mamba2", "attention"
_BAMBA: dict[str, Any] = dict(rope_fraction=0.5, family="bamba")
PRESETS.update(
    {
        "micro-mamba2": dict(PRESETS["micro"], n_layers=6, mixer=_M, mlp="none", family="mamba2"),
        "small-mamba2": dict(PRESETS["small"], n_layers=14, mixer=_M, mlp="none", family="mamba2"),
        "micro-hybrid": dict(PRESETS["micro"], d_ff=256, layer_pattern=(_M, _M, _M, _A), **_BAMBA),
        "small-hybrid": dict(PRESETS["small"], d_ff=512, layer_pattern=(_M, _M, _M, _A) * 2, **_BAMBA),
    }
)
# Mamba-1 (transformers' MambaForCausalLM): no MLP, expand 2, N = 16 state entries per channel as in the Mamba
# checkpoints; about 1.5 layers per transformer layer, like mamba2. Scan chunks of 8: its doubling scan does
# log2(chunk) passes, and training micro-mamba (forward + backward, batch 4 x 128, one CPU thread) took 0.29 s per
# layer at chunk 8 against 0.60 s at 64; prefill time was about the same.
_MAMBA = dict(mixer="mamba", mlp="none", ssm_state_size=16, ssm_chunk_size=8, family="mamba")
PRESETS.update(
    {
        "micro-mamba": dict(PRESETS["micro"], n_layers=6, **_MAMBA),
        "small-mamba": dict(PRESETS["small"], n_layers=14, **_MAMBA),
    }
)
# Jamba's recipe at micro size (transformers' JambaForCausalLM loads it): Mamba-1 layers (N = 16, with the dt/B/C
# norms) and one attention layer in four without any position encoding; every other MLP a mixture of 4 experts of
# width d_ff, 2 per token, weighted by their softmax probabilities unrenormalised. d_ff trimmed to about micro's size.
PRESETS["micro-jamba"] = dict(
    PRESETS["micro"], d_ff=128, layer_pattern=("mamba", "mamba", "mamba", "attention"),
    mlp_pattern=("gated", "moe", "gated", "moe"), moe_experts=4, moe_top_k=2, moe_norm_topk=False, positions="none",
    ssm_state_size=16, ssm_chunk_size=8, ssm_dt_b_c_norm=True, family="jamba",
)  # fmt: skip
# Linear attention in every layer, at the parameters of micro and small (d_ff trimmed for the wider mixers): gla
# (gated linear attention, 4 C^2 per layer against GQA attention's 3 C^2) and based (Taylor linear attention plus
# a 64-token sliding-window attention in each layer). Saved in slmkit's own format: transformers has no class.
PRESETS.update(
    {
        "micro-gla": dict(PRESETS["micro"], d_ff=288, mixer="gla", family="slmkit"),
        "small-gla": dict(PRESETS["small"], d_ff=608, mixer="gla", family="slmkit"),
        "micro-based": dict(PRESETS["micro"], d_ff=224, mixer="based", family="slmkit"),
        "small-based": dict(PRESETS["small"], d_ff=448, mixer="based", family="slmkit"),
    }
)

# Mixture of experts at the active size of micro and small: 8 experts of half the dense width, 2 per token, so a
# token costs what it costs in the dense preset (the router aside) while the MLPs hold 4x the parameters. Saved as
# Mixtral (transformers' MixtralForCausalLM loads them).
PRESETS.update(
    {
        "micro-moe": dict(PRESETS["micro"], d_ff=176, mlp="moe", moe_experts=8, moe_top_k=2, family="mixtral"),
        "small-moe": dict(PRESETS["small"], d_ff=352, mlp="moe", moe_experts=8, moe_top_k=2, family="mixtral"),
    }
)

# Product-key memory (Lample et al. 2019; Berges et al. 2024, Memory+): the middle layer's MLP replaced by a memory
# of n^2 value rows of width d_model, 4 heads reading the top 16 each; a token's FLOPs stay below the dense preset's
# while the parameters grow by the value table (micro: 128^2 rows, 2.1M; small: 256^2 rows, 16.8M).
_G = "gated"
PRESETS.update(
    {
        "micro-memory": dict(PRESETS["micro"], mlp_pattern=(_G, _G, "memory", _G), memory_keys=128, family="slmkit"),
        "small-memory": dict(
            PRESETS["small"],
            mlp_pattern=(_G,) * 4 + ("memory",) + (_G,) * 3,
            memory_keys=256,
            memory_key_dim=128,
            family="slmkit",
        ),
    }
)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional overrides (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown model config field(s) {bad}; valid fields: {sorted(fields - {'extra'})}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---- context extension ---------------------------------------------------------------------------------------------
EXTENSION_ROPE = ("linear", "dynamic", "yarn")  # what `--rope` may name when a model's context is extended


def extend_context(config: ModelConfig, context: int, rope: str = "yarn") -> ModelConfig:
    """`config` with max_seq_len `context` and rope scaling that stretches its trained window to it
    (factor = context / trained context): the start of a fine-tuning run at the longer length
    (`slm finetune --context N --rope yarn`, `slm train --init DIR --context N`).

    linear: positions divided by the factor everywhere; yarn: the low frequencies interpolated, the high ones kept,
    with original_max_seq_len the trained context; dynamic: transformers' dynamic NTK reads max_position_embeddings
    as the point its base starts growing, so inside the new window rotation is unchanged (positions past the
    trained length are new to the model until fine-tuning teaches them) and the base grows only past it.
    A model that already has linear or yarn scaling extends it again (its original window stays the reference);
    other scalings are refused."""
    if rope not in EXTENSION_ROPE:
        raise UserError(f"--rope {rope!r} is not a context extension (choose one of: {', '.join(EXTENSION_ROPE)})")
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise UserError(f"--context must be a positive integer, got {context!r}")
    if config.positions != "rope":
        raise UserError(
            f"--context: the model has {config.positions} position embeddings, not rotary ones; it cannot be stretched"
        )
    old = config.max_seq_len
    if context <= old:
        raise UserError(f"--context {context} does not extend the model's context ({old}); give a longer one")
    current = config.rope_scaling
    if current is not None and current.type not in ("linear", "yarn"):
        raise UserError(f"--context: extending a model that already has {current.type} rope scaling is not supported")
    if current is not None and current.type != rope:
        raise UserError(
            f"--rope {rope}: the model already has {current.type} rope scaling; extend it with --rope {current.type}"
        )
    if rope == "yarn":
        original = current.original_max_seq_len if current is not None else old
        assert original is not None
        base = {} if current is None else {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
        base.update(type="yarn", factor=context / original, original_max_seq_len=original)
        scaling = RopeScaling(**base)
    elif rope == "linear":
        scaling = RopeScaling(type="linear", factor=(current.factor if current else 1.0) * context / old)
    else:
        scaling = RopeScaling(type="dynamic", factor=context / old)
    return config.replace(max_seq_len=context, rope_scaling=scaling)
