"""Hugging Face format: config.json and state dicts, both ways, for every family in `slmkit.interop.families`.

One `ModelConfig` with a few switches covers the decoder families small open models use; this module
does the steps every family shares (model_type lookup, generic keys, quantization refusal, unknown keys
kept in `extra`, file I/O) and asks the family's `FamilySpec` for the rest:

- llama (incl. SmolLM- and MobileLLM-style configs): rope scaling linear / dynamic / llama3, optional
  attention and MLP biases;
- mistral: a sliding window on every layer;
- qwen2: biases on q, k, v; qwen3: per-head RMSNorm of q and k;
- gpt2: learned positions, LayerNorm, GELU, a fused q/k/v `Conv1D` (weights stored transposed).

Anything a family's config asks for that the model cannot do is refused by name (`UserError`), never
silently ignored; so is a config its family cannot save (`check_family`). Our own parameter names are the
Llama ones without the `model.` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.interop.families import FAMILIES, NATIVE_FAMILIES, check_family, prefixed_from_hf, prefixed_to_hf

if TYPE_CHECKING:
    import torch

# keys transformers writes into every config.json; they do not change the model's numbers
_GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "pad_token_id", "pretraining_tp", "tie_word_embeddings", "bos_token_id", "eos_token_id",
}  # fmt: skip
_QUANTIZATION_KEY = "quantization_config"  # slmkit.models.quantized.SPEC_KEY (compress sits above interop)


# ---- config.json <-> ModelConfig ------------------------------------------------------------------
def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig for a Hugging Face config dict; UserError naming any unsupported option."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)}); "
            "convert the model to one of these families first"
        )
    spec = FAMILIES[model_type]
    quantization = d.get(_QUANTIZATION_KEY)
    # our own compressed directories (slmkit.compress) load through their own modules; others are refused
    if quantization and not (isinstance(quantization, dict) and quantization.get("quant_method") == "slmkit"):
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UserError(
            f"{source}: quantized checkpoints ({method}) are not supported; load the unquantized weights instead"
        )
    fields = spec.fields_from_hf(d, source)
    known = _GENERIC_KEYS | spec.config_keys
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    config = ModelConfig(
        family=model_type,
        tie_embeddings=bool(d.get("tie_word_embeddings", spec.tie_default)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        extra={k: v for k, v in d.items() if k not in known},
        **fields,
    )
    return check_family(config, source)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict transformers' Auto classes load as `cfg.family`; UserError if it cannot hold `cfg`."""
    spec = FAMILIES[check_family(cfg).family]
    d: dict[str, Any] = dict(cfg.extra)
    d.update(
        {
            "architectures": [spec.architecture],
            "model_type": spec.name,
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.initializer_range,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "torch_dtype": "float32",
        }
    )
    d.update(spec.keys_to_hf(cfg))
    return d


def save_config(config: ModelConfig, path: str | Path) -> None:
    """Write `config` as its family's config.json."""
    Path(path).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a config.json file; UserError for a missing, unreadable or unsupported one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore it or re-export the model") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    try:
        return config_from_hf(d, source=str(path))
    except UserError as exc:
        raise UserError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:  # a value of the wrong type where conversion needs a number
        raise UserError(f"{path}: a value has the wrong type or is missing ({exc})") from None


# ---- state dicts ----------------------------------------------------------------------------------
def _compressed(config: ModelConfig) -> bool:
    """slmkit-compressed weights (packed codes, low-rank factors) keep our names under `model.` in every
    family: transformers cannot load them anyway, and packed tensors cannot be fused or transposed."""
    return config.extra.get(_QUANTIZATION_KEY) is not None


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names -> the family's (a tied head dropped, as transformers saves it)."""
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    if _compressed(config):
        return prefixed_to_hf(state)
    return FAMILIES[config.family].weights_to_hf(state, config)


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The family's names -> ours. Without a config, the family is told by the names (a family's
    `weight_marker`, else Llama's layout)."""
    if config is not None and _compressed(config):
        return prefixed_from_hf(state)
    if config is not None:
        return FAMILIES[config.family].weights_from_hf(state)
    for spec in FAMILIES.values():
        if spec.weight_marker is not None and any(spec.weight_marker in k for k in state):
            return spec.weights_from_hf(state)
    return prefixed_from_hf(state)


# ---- export ---------------------------------------------------------------------------------------
EXPORT_FORMATS = ("hf", "gguf")


def export_model(
    model_path: str | Path, fmt: str, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """`slm export`: a Hugging Face directory (fp32) or a GGUF file of the model at `model_path`.

    An existing `out` (a non-empty directory, a GGUF file) is replaced only with `overwrite`; a file never
    replaces a directory, nor the reverse."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r} is not supported; choose one of: {', '.join(EXPORT_FORMATS)}")
    if fmt == "gguf":
        from slmkit.interop.gguf import export_gguf

        return export_gguf(model_path, out, dtype or "f16", overwrite=overwrite)
    if dtype not in (None, "f32"):
        raise UserError(f"--dtype {dtype} applies to GGUF; Hugging Face export writes float32 weights")
    from slmkit.interop.checkpoint import load_model, resolve_model_dir, save_model
    from slmkit.interop.outputs import check_output

    directory = resolve_model_dir(model_path)
    model = load_model(directory)
    family = model.config.family  # type: ignore[union-attr]
    if family in NATIVE_FAMILIES:
        raise UserError(
            f"{directory}: a {family}-format model (mixers: {', '.join(sorted(model.config.mixers))}; or slmkit-only "  # type: ignore[union-attr]
            "switches such as logit_softcap) has no transformers class; Hugging Face export covers the llama, "
            "mistral, qwen2, qwen3, gpt2, mamba, mamba2 and "
            "mixtral families"
        )
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise UserError(f"--out {out} is the model directory itself; choose another directory")
    check_output(out, "dir", overwrite)
    return save_model(model, out, tokenizer_dir=directory)
