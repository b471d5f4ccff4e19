"""`slm merge`: load the models of a merge config, check they can be merged, merge tensor by tensor, write a model dir.

The merge works on the saved state dicts under their Hugging Face names (the names mergekit sees, so `filter:`
entries such as `self_attn` match the same tensors), which makes it family-agnostic: any slmkit family the models
share merges the same way. The output is a normal model directory with the config of the base model (or of the
first model when there is no base), the tokenizer files of `tokenizer_source` (default the same model), and the
config as `mergekit_config.yml` (the name mergekit gives it), written atomically.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.merge import methods
from slmkit.merge.spec import Input, MergeSpec, read

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeResult:
    out: Path
    method: str
    models: list[str]  # the merged models other than the base, as the config names them
    base: str | None
    dtype: str
    tensors: int


def layer_position(name: str, n_layers: int) -> float:
    """Where a tensor sits for gradients: layer i of n at i / (n - 1) (1 for a one-layer model); tensors outside the
    layers (embeddings, final norm, lm_head) at 0, as mergekit plans them."""
    for part in name.split("."):
        if part.isdigit():
            return int(part) / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


def _load(model: Input) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from slmkit.interop.checkpoint import load_weights
    from slmkit.interop.hf import load_config

    config = load_config(model.directory / "config.json")
    if config.extra.get("quantization_config") is not None:
        raise UserError(
            f"{model.name}: the model is compressed (quantized or factored); merge the float models it came from"
        )
    state = load_weights(model.directory)
    for tensor_name, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{model.name}: tensor {tensor_name} has dtype {tensor.dtype}; merge float models only")
    return config, state


def _vocabulary(directory: Path) -> dict | None:
    """The token -> id map of a model dir's tokenizer.json (with its added tokens), None without one."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        vocab = dict(data.get("model", {}).get("vocab") or {})
        for token in data.get("added_tokens") or []:
            vocab[token["content"]] = token["id"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return vocab


def check_compatible(
    reference: Input, ref_config: ModelConfig, ref_state: dict, other: Input, config: ModelConfig, state: dict
) -> None:
    """UserError unless `other` has the same architecture, vocabulary and tensors (names and shapes) as `reference`."""
    if config.family != ref_config.family:
        raise UserError(
            f"the models have different architectures: {reference.name} is {ref_config.family}, "
            f"{other.name} is {config.family}"
        )
    if config.vocab_size != ref_config.vocab_size:
        raise UserError(
            f"the models have different vocabularies: {reference.name} has {ref_config.vocab_size} tokens, "
            f"{other.name} has {config.vocab_size}; merge models that share a tokenizer"
        )
    ref_vocab, vocab = _vocabulary(reference.directory), _vocabulary(other.directory)
    if ref_vocab is not None and vocab is not None and ref_vocab != vocab:
        raise UserError(
            f"the models have different vocabularies: the tokenizers of {reference.name} and {other.name} map "
            "tokens to different ids; merge models that share a tokenizer"
        )
    missing = sorted(set(ref_state) - set(state))
    extra = sorted(set(state) - set(ref_state))
    if missing or extra:
        what = f"{other.name} lacks {missing[0]}" if missing else f"{other.name} has {extra[0]}, which"
        rest = "" if missing else f" {reference.name} lacks"
        raise UserError(f"the models have different architectures: {what}{rest}")
    for name, tensor in ref_state.items():
        if state[name].shape != tensor.shape:
            raise UserError(
                f"the models have different shapes: tensor {name} is {tuple(tensor.shape)} in {reference.name} "
                f"but {tuple(state[name].shape)} in {other.name}"
            )


def tensor_seed(seed: int, model_index: int, name: str) -> int:
    """The seed of DARE's draws for one model's tensor: independent of the order tensors are merged in."""
    return (seed * 1_000_003 + model_index * 7919 + zlib.crc32(name.encode())) % (2**63 - 1)


def merge_tensor(
    spec: MergeSpec, name: str, position: float, tensors: dict[int, torch.Tensor], seed: int
) -> torch.Tensor:
    """One merged tensor: `tensors` maps each input's index in spec.inputs to its tensor."""
    method = spec.method.name
    inputs = spec.inputs
    base_index = next((i for i, m in enumerate(inputs) if m.is_base), None)
    others = [i for i in range(len(inputs)) if i != base_index]

    def shared(param: str):
        return spec.resolve(param, name, position)

    def each(param: str, indices: list[int]) -> list:
        return [spec.resolve(param, name, position, inputs[i]) for i in indices]

    if method == "linear":
        order = list(range(len(inputs)))
        weights = each("weight", order)
        normalize = shared("normalize")
        if normalize and sum(weights) == 0:
            raise UserError(f"linear: the weights of tensor {name} sum to 0; they cannot be normalized")
        return methods.linear([tensors[i] for i in order], weights, normalize)
    base = tensors[base_index]  # every other method has a base (spec.parse checks)
    models = [tensors[i] for i in others]
    if method == "task_arithmetic":
        return methods.task_arithmetic(base, models, each("weight", others), shared("lambda"), shared("normalize"))
    if method == "ties":
        return methods.ties(
            base, models, each("weight", others), each("density", others), shared("lambda"), shared("normalize")
        )
    if method in ("dare_linear", "dare_ties"):
        generators = [torch.Generator().manual_seed(tensor_seed(seed, i, name)) for i in others]
        return methods.dare(
            base,
            models,
            each("weight", others),
            each("density", others),
            generators,
            consensus=method == "dare_ties",
            lam=shared("lambda"),
            normalize=shared("normalize"),
            rescale=shared("rescale"),
        )
    if method == "model_stock":
        return methods.model_stock(base, models, shared("filter_wise"))
    if method == "slerp":
        return methods.slerp(shared("t"), base, models[0])
    raise AssertionError(method)


def merge_states(
    spec: MergeSpec, states: list[dict[str, torch.Tensor]], n_layers: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The merged state dict (float32) of `states` (one per spec.inputs, Hugging Face names, checked compatible)."""
    compute = _TORCH_DTYPES[spec.dtype] if spec.dtype else None
    merged = {}
    for name in states[0]:
        tensors = {i: s[name] if compute is None else s[name].to(compute) for i, s in enumerate(states)}
        merged[name] = merge_tensor(spec, name, layer_position(name, n_layers), tensors, seed)
    return merged


def merge(config_path: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False) -> MergeResult:
    """Merge the models a mergekit-shaped YAML config names into the model directory `out`."""
    from slmkit.interop.checkpoint import atomic_directory, write_state_files
    from slmkit.interop.hf import from_hf_state_dict
    from slmkit.interop.outputs import check_output

    spec = read(config_path)
    out = Path(out)
    for model in spec.inputs:
        if out.exists() and out.resolve() == model.directory:
            raise UserError(f"--out {out} is one of the merged models ({model.name}); choose another directory")
    check_output(out, "dir", overwrite)

    reference = spec.base or spec.inputs[0]
    ref_config, ref_state = _load(reference)
    states: list[dict[str, torch.Tensor]] = []
    for model in spec.inputs:
        if model is reference:
            states.append(ref_state)
            continue
        config, state = _load(model)
        check_compatible(reference, ref_config, ref_state, model, config, state)
        states.append(state)

    stored = next(iter(ref_state.values())).dtype
    dtype_name = spec.out_dtype or spec.dtype or {v: k for k, v in _TORCH_DTYPES.items()}.get(stored, "float32")
    log.info("merging %d models with %s", len(spec.inputs), spec.method.name)
    merged = merge_states(spec, states, ref_config.n_layers, seed)
    merged = {k: v.to(_TORCH_DTYPES[dtype_name]) for k, v in merged.items()}
    del states, ref_state

    ours = from_hf_state_dict(merged, ref_config)
    with atomic_directory(out) as tmp:
        write_state_files(ours, ref_config, tmp, tokenizer_dir=spec.tokenizer_source.directory)
        config_json = json.loads((tmp / "config.json").read_text())
        config_json["torch_dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (tmp / "mergekit_config.yml").write_text(spec.text)
    return MergeResult(
        out=out,
        method=spec.method.name,
        models=[m.name for m in spec.others],
        base=spec.base.name if spec.base else None,
        dtype=dtype_name,
        tensors=len(merged),
    )
