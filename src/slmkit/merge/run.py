"""`slm merge`: load the models of a merge config, check they can be merged, merge tensor by tensor, write a model dir.

The merge works on the saved state dicts under their Hugging Face names (the names mergekit sees, so `filter:`
entries such as `self_attn` match the same tensors), which makes it family-agnostic: any slmkit family the models
share merges the same way. The output is a normal model directory with the config of the base model (or of the
first model when there is no base), the tokenizer files of `tokenizer_source` (default the same model), and the
config as `mergekit_config.yml` (the name mergekit gives it), written atomically. Inputs are read a tensor at a
time (memory-mapped safetensors), so N models merge in about the memory of the one merged model.
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


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class Weights:
    """The tensors of a model dir (`model.safetensors`, or the shards its index lists), read one at a time from the
    memory-mapped files: a merge of N models holds the inputs of one tensor at a time, not N whole models."""

    def __init__(self, model: Input) -> None:
        from safetensors import SafetensorError, safe_open

        from slmkit.interop.checkpoint import WEIGHTS, WEIGHTS_INDEX

        directory = model.directory
        single, index = directory / WEIGHTS, directory / WEIGHTS_INDEX
        if single.is_file() or not index.is_file():
            files: dict[str, Path] | None = None
            paths = [single]
        else:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: directory / str(file) for name, file in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{model.name}: {index} is not a valid shard index ({exc})") from None
            outside = [f for f in files.values() if f.parent != directory or f.name in ("", ".", "..")]
            if outside:
                raise UserError(f"{model.name}: {index} names {outside[0]}, which is not a file beside it")
            paths = sorted(set(files.values()))
        self._handles = {}
        for path in paths:
            if not path.is_file():
                raise UserError(f"{model.name}: weights file {path} not found")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise UserError(f"{model.name}: {path} is not a readable safetensors file ({exc})") from None
        self._where = {}
        for path, handle in self._handles.items():
            for name in handle.keys():
                if files is None or files.get(name) == path:
                    self._where[name] = path
        if files is not None and set(files) - set(self._where):
            raise UserError(f"{model.name}: tensors {sorted(set(files) - set(self._where))[:4]} missing from shards")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, path in self._where.items():
            piece = self._handles[path].get_slice(name)
            if piece.get_dtype() not in _FLOAT_DTYPES:
                raise UserError(f"{model.name}: tensor {name} has dtype {piece.get_dtype()}; merge float models only")
            self.shapes[name] = tuple(piece.get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def _load(model: Input) -> tuple[ModelConfig, Weights]:
    from slmkit.interop.hf import load_config

    config = load_config(model.directory / "config.json")
    if config.extra.get("quantization_config") is not None:
        raise UserError(
            f"{model.name}: the model is compressed (quantized or factored); merge the float models it came from"
        )
    return config, Weights(model)


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
    reference: Input, ref_config: ModelConfig, ref_shapes: dict, other: Input, config: ModelConfig, shapes: dict
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
    missing = sorted(set(ref_shapes) - set(shapes))
    extra = sorted(set(shapes) - set(ref_shapes))
    if missing or extra:
        what = f"{other.name} lacks {missing[0]}" if missing else f"{other.name} has {extra[0]}, which"
        rest = "" if missing else f" {reference.name} lacks"
        raise UserError(f"the models have different architectures: {what}{rest}")
    for name, shape in ref_shapes.items():
        if shapes[name] != shape:
            raise UserError(
                f"the models have different shapes: tensor {name} is {shape} in {reference.name} "
                f"but {shapes[name]} in {other.name}"
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
    spec: MergeSpec,
    states: list[Weights] | list[dict[str, torch.Tensor]],
    names: list[str],
    n_layers: int,
    out_dtype: torch.dtype,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The merged state dict of `states` (one per spec.inputs, Hugging Face names, checked compatible), tensor by
    tensor, each stored as `out_dtype` before the next is read."""
    compute = _TORCH_DTYPES[spec.dtype] if spec.dtype else None
    merged = {}
    for name in names:
        tensors = {i: s[name] if compute is None else s[name].to(compute) for i, s in enumerate(states)}
        merged[name] = merge_tensor(spec, name, layer_position(name, n_layers), tensors, seed).to(out_dtype)
    return merged


def merge(config_path: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False) -> MergeResult:
    """Merge the models a mergekit-shaped YAML config names into the model directory `out`."""
    from slmkit.interop.checkpoint import atomic_directory, write_state_files
    from slmkit.interop.hf import from_hf_state_dict
    from slmkit.interop.outputs import check_output

    spec = read(config_path)
    out = Path(out)
    for model in spec.inputs:  # replacing it (--overwrite) would delete an input: refused even then
        if model.directory.is_relative_to(out.expanduser().resolve()):
            raise UserError(f"--out {out} is or holds a merged model ({model.name}); choose another directory")
    check_output(out, "dir", overwrite)

    reference = spec.base or spec.inputs[0]
    ref_config, ref_weights = _load(reference)
    states: list[Weights] = []
    for model in spec.inputs:
        if model is reference:
            states.append(ref_weights)
            continue
        config, weights = _load(model)
        check_compatible(reference, ref_config, ref_weights.shapes, model, config, weights.shapes)
        states.append(weights)

    names = list(ref_weights.shapes)
    stored = ref_weights[names[0]].dtype
    dtype_name = spec.out_dtype or spec.dtype or {v: k for k, v in _TORCH_DTYPES.items()}.get(stored, "float32")
    log.info("merging %d models with %s", len(spec.inputs), spec.method.name)
    merged = merge_states(spec, states, names, ref_config.n_layers, _TORCH_DTYPES[dtype_name], seed)
    del states

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
