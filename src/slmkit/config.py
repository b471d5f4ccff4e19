"""Model configuration: one typed dataclass, named presets, parameter and FLOP counts.

`ModelConfig` describes a Llama-style decoder. It is saved as a Hugging Face `LlamaConfig`-shaped
`config.json` (see :meth:`ModelConfig.to_hf_dict`) so transformers loads our model directories as they
are, and we load theirs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import UserError


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer (Llama family: RMSNorm, RoPE, GQA, SwiGLU)."""

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
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF keys, kept for round trips

    def __post_init__(self) -> None:
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
        if self.dim_per_head % 2 != 0:
            raise UserError(f"model config: head dimension must be even for rotary embeddings, got {self.dim_per_head}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise UserError(f"model config: rope_theta must be a positive number, got {self.rope_theta}")
        if not (0 < self.norm_eps < 1):
            raise UserError(f"model config: norm_eps must be in (0, 1), got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise UserError(f"model config: {name}={value} is outside the vocabulary (size {self.vocab_size})")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- counts -------------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact number of trainable parameters (tied embeddings counted once)."""
        hd = self.dim_per_head
        attn = self.d_model * hd * (self.n_heads * 2 + self.n_kv_heads * 2)  # q, o, k, v
        mlp = 3 * self.d_model * self.d_ff
        norms = 2 * self.d_model
        body = self.n_layers * (attn + mlp + norms) + self.d_model  # + final norm
        if not include_embeddings:
            return body
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return body + embed + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

        Forward: 2 FLOPs per multiply-accumulate over every weight matrix (the lm_head included,
        the embedding lookup excluded), plus attention scores and weighted sum: 2 * 2 * T * d_attn per
        layer per token with T the context (causal halves it on average, which we do not credit, as
        in the PaLM appendix convention of 6N + 12 L d T).
        """
        t = seq_len or self.max_seq_len
        hd = self.dim_per_head
        matmul_params = self.num_params(include_embeddings=False) - (2 * self.n_layers + 1) * self.d_model
        matmul_params += self.vocab_size * self.d_model  # lm_head
        attention = 2 * 2 * self.n_layers * t * self.n_heads * hd
        return 3 * (2 * matmul_params + attention)

    # ---- Hugging Face config.json -------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "intermediate_size": self.d_ff,
                "max_position_embeddings": self.max_seq_len,
                "rope_theta": self.rope_theta,
                "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings,
                "initializer_range": self.initializer_range,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "head_dim": self.dim_per_head,
                "hidden_act": "silu",
                "attention_bias": False,
                "mlp_bias": False,
                "attention_dropout": 0.0,
                "rope_scaling": None,
                "torch_dtype": "float32",
            }
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "llama":
            raise UserError(
                f"{source}: model_type {model_type!r} is not supported (supported: 'llama'); "
                "convert the model to a Llama-style checkpoint first"
            )
        for key, unsupported in (
            ("hidden_act", lambda v: v not in ("silu", "swish")),
            ("attention_bias", bool),
            ("mlp_bias", bool),
            ("rope_scaling", lambda v: bool(v)),
        ):
            if key in d and unsupported(d[key]):
                raise UserError(f"{source}: {key}={d[key]!r} is not supported by slmkit's Llama model")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: missing required keys {missing}")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        known = {
            "architectures",
            "model_type",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "rope_theta",
            "rms_norm_eps",
            "tie_word_embeddings",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "head_dim",
            "hidden_act",
            "attention_bias",
            "mlp_bias",
            "attention_dropout",
            "rope_scaling",
            "torch_dtype",
            "dtype",
            "rope_parameters",
            "transformers_version",
        }
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim * n_heads == d["hidden_size"]:
            head_dim = None  # the default; keep configs comparable
        return cls(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            head_dim=head_dim,
            extra={k: v for k, v in d.items() if k not in known},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))


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


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional overrides (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown model config field(s) {bad}; valid fields: {sorted(fields - {'extra'})}")
    return ModelConfig(**{**PRESETS[name], **overrides})
