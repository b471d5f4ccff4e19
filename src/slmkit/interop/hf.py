"""Hugging Face families: config.json keys and weight names, both ways.

One `ModelConfig` with a few switches covers the decoder families small open models use; this module
translates between it and each family's `config.json` and state dict:

- llama (incl. SmolLM- and MobileLLM-style configs): rope scaling linear / dynamic / llama3, optional
  attention and MLP biases;
- mistral: a sliding window on every layer;
- qwen2: biases on q, k, v; qwen3: per-head RMSNorm of q and k;
- gpt2: learned positions, LayerNorm, GELU, a fused q/k/v `Conv1D` (weights stored transposed).

Anything a family's config asks for that the model cannot do is refused by name (`UserError`), never
silently ignored. Our own parameter names are the Llama ones without the `model.` prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.config import ModelConfig, RopeScaling
from slmkit.errors import UserError

if TYPE_CHECKING:
    import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# HF activation names -> ours, and back
_ACT_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
# keys transformers writes into every config.json; they do not change the model's numbers
_GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "pad_token_id", "pretraining_tp", "tie_word_embeddings", "bos_token_id", "eos_token_id",
}  # fmt: skip
_LLAMA_LIKE_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "head_dim", "hidden_act",
    "attention_bias", "mlp_bias", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types",
}  # fmt: skip
_GPT2_KEYS = {
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention", "n_ctx",
}  # fmt: skip


# ---- config.json -> ModelConfig -------------------------------------------------------------------
def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig for a Hugging Face config dict; UserError naming any unsupported option."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)}); "
            "convert the model to one of these families first"
        )
    quantization = d.get("quantization_config")
    # our own compressed directories (slmkit.compress) load through their own modules; others are refused
    if quantization and not (isinstance(quantization, dict) and quantization.get("quant_method") == "slmkit"):
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UserError(
            f"{source}: quantized checkpoints ({method}) are not supported; load the unquantized weights instead"
        )
    fields = _gpt2_fields(d, source) if model_type == "gpt2" else _llama_like_fields(d, model_type, source)
    known = _GENERIC_KEYS | (_GPT2_KEYS if model_type == "gpt2" else _LLAMA_LIKE_KEYS)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    default_tie = model_type == "gpt2"
    return ModelConfig(
        family=model_type,
        tie_embeddings=bool(d.get("tie_word_embeddings", default_tie)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        extra={k: v for k, v in d.items() if k not in known},
        **fields,
    )


def _require(d: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing required keys {missing}")


def _activation(name: Any, key: str, source: str) -> str:
    if name not in _ACT_FROM_HF:
        raise UserError(f"{source}: {key}={name!r} is not supported (supported: {', '.join(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


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
    if kind not in ("linear", "dynamic", "llama3"):
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (supported: linear, dynamic, llama3)")
    if kind == "llama3":
        scaling = RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(
                params.get("original_max_position_embeddings") or d.get("max_position_embeddings", 8192)
            ),
        )
    else:
        scaling = RopeScaling(type=kind, factor=float(params["factor"]))
    return float(theta), scaling


def _window(d: dict[str, Any], model_type: str, n_layers: int, source: str) -> int | None:
    """One sliding window for every layer, or None; mixed full/sliding layers are refused."""
    window = d.get("sliding_window")
    if model_type == "mistral":
        return d.get("sliding_window", 4096)  # transformers' default when the key is absent
    if model_type == "llama":
        return None
    if not d.get("use_sliding_window"):
        return None
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


def _llama_like_fields(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
    if model_type == "mistral" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise UserError(f"{source}: mistral with attention_bias or mlp_bias is not supported")
    attention_bias = bool(d.get("attention_bias", False))
    mlp_bias = bool(d.get("mlp_bias", False))
    if model_type in ("qwen2", "qwen3") and mlp_bias:
        raise UserError(f"{source}: {model_type} with mlp_bias is not supported")
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
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        out_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=_window(d, model_type, d["num_hidden_layers"], source),
    )


def _gpt2_fields(d: dict[str, Any], source: str) -> dict[str, Any]:
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


# ---- ModelConfig -> config.json -------------------------------------------------------------------
def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict transformers' Auto classes load as `cfg.family`."""
    d: dict[str, Any] = dict(cfg.extra)
    common = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }
    if cfg.family == "gpt2":
        d.update(common)
        d.update(
            {
                "n_embd": cfg.d_model,
                "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len,
                "activation_function": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
                "layer_norm_epsilon": cfg.norm_eps,
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
            }
        )
        return d
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update({"rope_type": s.type, "factor": s.factor})
        if s.type == "llama3":
            rope.update(
                {
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_seq_len,
                }
            )
    d.update(common)
    d.update(
        {
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
    )
    if cfg.family in ("llama", "qwen3"):
        d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
        d["rope_scaling"] = None
    if cfg.family == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        windowed = cfg.sliding_window is not None
        d.update(
            {
                "use_sliding_window": windowed,
                "sliding_window": cfg.sliding_window,
                "max_window_layers": 0 if windowed else cfg.n_layers,
                "layer_types": [("sliding_attention" if windowed else "full_attention")] * cfg.n_layers,
            }
        )
    return d


# ---- state dicts ----------------------------------------------------------------------------------
_PREFIX = "model."


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names -> the family's (tied lm_head dropped, as transformers saves it)."""
    state = {k: v for k, v in state.items() if not (k == "lm_head.weight" and config.tie_embeddings)}
    if config.family == "gpt2":
        return _gpt2_to_hf(state, config)
    return {(k if k == "lm_head.weight" else _PREFIX + k): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The family's names -> ours. Without a config, the family is told by the names (GPT-2 or Llama-like)."""
    gpt2 = config.family == "gpt2" if config is not None else any(".attn.c_attn." in k for k in state)
    if gpt2:
        return _gpt2_from_hf(state)
    return {k.removeprefix(_PREFIX): v for k, v in state.items()}


def _gpt2_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {
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


def _gpt2_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
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


# ---- export ---------------------------------------------------------------------------------------
EXPORT_FORMATS = ("hf", "gguf")


def export_model(model_path: str | Path, fmt: str, out: str | Path, dtype: str | None = None) -> Path:
    """`slm export`: a Hugging Face directory (fp32) or a GGUF file of the model at `model_path`."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r} is not supported; choose one of: {', '.join(EXPORT_FORMATS)}")
    if fmt == "gguf":
        from slmkit.interop.gguf import export_gguf

        return export_gguf(model_path, out, dtype or "f16")
    if dtype not in (None, "f32"):
        raise UserError(f"--dtype {dtype} applies to GGUF; Hugging Face export writes float32 weights")
    from slmkit.interop.checkpoint import load_model, resolve_model_dir, save_model

    directory = resolve_model_dir(model_path)
    model = load_model(directory)
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise UserError(f"--out {out} is the model directory itself; choose another directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    return save_model(model, out, tokenizer_dir=directory)
