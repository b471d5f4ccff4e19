"""Model directories: save and load, atomically, in the Hugging Face layout.

A model directory holds `config.json` (shaped as its family's config, see `slmkit.interop.hf`),
`model.safetensors` (weights named as transformers names them; above `max_shard_bytes` split into
`model-0000i-of-0000n.safetensors` shards listed in `model.safetensors.index.json`), `tokenizer.json` +
`tokenizer_config.json` and `generation_config.json`.
Writes go to a temporary sibling directory that is renamed into place, so a crash mid-save never leaves
a half-written directory under the final name, and the previous one stays loadable.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.interop.hf import from_hf_state_dict, load_config, save_config, to_hf_state_dict
from slmkit.interop.outputs import atomic_directory as atomic_directory  # where model dirs have always found it
from slmkit.interop.outputs import use_umask

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


def write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One `model.safetensors`, or shards of at most ~max_shard_bytes plus `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise UserError(f"max shard size must be positive, got {max_shard_bytes}")
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        use_umask(directory / WEIGHTS)  # safetensors writes 0600; a model dir is read as any other file
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in state.items():
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += sizes[name]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        use_umask(directory / filename)
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_model_files(
    model: torch.nn.Module,
    config: ModelConfig,
    directory: Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write a model directory's files into an existing (usually temporary) directory."""
    write_state_files(model.state_dict(), config, directory, tokenizer_dir, max_shard_bytes)


def write_state_files(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    directory: Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """A model directory's files for a state dict under our names (float, or packed by slmkit.compress)."""
    save_config(config, directory / "config.json")  # first: a config its family cannot hold fails before any I/O
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_weights(to_hf_state_dict(state, config), directory, max_shard_bytes)
    # Greedy by default, and quiet in transformers: no `max_length` (every `generate(max_new_tokens=...)` would
    # warn that both are set; the context length is config.json's max_position_embeddings), and the neutral
    # temperature 1.0 written out, because transformers' text-generation pipeline fills an unset temperature with
    # its own 0.7, which it then flags as invalid next to do_sample false.
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "do_sample": False,
        "temperature": 1.0,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, directory)


def copy_tokenizer(source: str | Path, directory: Path) -> None:
    source = Path(source)
    if source.is_file():  # a tokenizer.json given directly
        shutil.copyfile(source, directory / "tokenizer.json")
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def save_model(
    model: torch.nn.Module,
    directory: str | Path,
    tokenizer_dir: str | Path | None = None,
    extra: Callable[[Path], None] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Atomically write a model directory; `extra(tmp_dir)` may add files (e.g. trainer state)."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    with atomic_directory(directory) as tmp:
        write_model_files(model, config, tmp, tokenizer_dir, max_shard_bytes)
        if extra is not None:
            extra(tmp)
    return Path(directory)


_STEP_DIR = re.compile(r"^step-(\d+)$")
# a checkpoint of an adapter run (`slm finetune --lora`) holds a PEFT adapter instead of a model
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def holds_weights(directory: Path) -> bool:
    """Whether a checkpoint directory holds a model's or an adapter's weights."""
    return (directory / WEIGHTS).is_file() or (directory / ADAPTER_WEIGHTS).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in ckpt_root.iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name)) and holds_weights(p)
    ]
    return max(steps)[1] if steps else None


def checkpoint_step(directory: Path) -> int:
    """The optimizer step a checkpoint was taken at (from trainer_state.json), -1 if unknown."""
    try:
        return int(json.loads((directory / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir as given, or for a run dir its `final/` or else its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model or run directory")
    if not path.is_dir():
        raise UserError(f"{path}: expected a model directory (with config.json and {WEIGHTS}) or a run dir")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    if (path / "checkpoints").is_dir() or (path / "final").is_dir():
        # the later of final/ and the latest step checkpoint: a resumed run may be past its old final/
        candidates = [p for p in (path / "final", latest_checkpoint(path)) if p is not None and holds_weights(p)]
        if not candidates:
            raise UserError(f"{path}: run directory has no checkpoint yet (train it, or give a model dir)")
        return max(candidates, key=checkpoint_step)
    raise UserError(f"{path}: not a model directory (no config.json) nor a run directory (no checkpoints/)")


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({exc}); re-save or re-download it") from None


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model dir: `model.safetensors`, or the shards its index lists (each checked)."""
    single, index_path = directory / WEIGHTS, directory / WEIGHTS_INDEX
    if single.is_file() or not index_path.is_file():
        return load_state_file(single)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("empty weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{index_path}: not a valid shard index ({exc})") from None
    for name in weight_map.values():
        if not isinstance(name, str) or not _plain_file_name(name):
            raise UserError(
                f"{index_path}: shard name {name!r} is not a file in {directory}; "
                "an index may only name files beside it (no directories, '..' or absolute paths)"
            )
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UserError(f"{index_path}: names shard file(s) {missing} that are not in {directory}; copy every shard")
    state: dict[str, torch.Tensor] = {}
    for filename in files:
        shard = load_state_file(directory / filename)
        for name, tensor in shard.items():
            if weight_map.get(name) == filename:
                state[name] = tensor
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise UserError(f"{index_path}: tensors {absent[:4]} are listed but missing from their shards")
    return state


def _plain_file_name(name: str) -> bool:
    """A bare file name: no separator of any OS, not '.' or '..', no drive, nothing absolute."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0:")


def _load_adapted(directory: Path, device: str | torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    from slmkit.interop.adapters import check_adapter_dir, load_adapter

    base = check_adapter_dir(directory).get("base_model_name_or_path")
    if not isinstance(base, str) or not base or not Path(base).is_dir():
        raise UserError(
            f"{directory}: an adapter whose base model ({base!r} in adapter_config.json) is not a directory here; "
            "load the base and attach the adapter (slm merge-adapter BASE ADAPTER, or slm serve BASE --lora)"
        )
    model = load_model(base, device, dtype)
    load_adapter(model, directory)
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Load a model directory (or a run dir's latest checkpoint) into a `Transformer`.

    The module is built on the meta device and the safetensors weights are assigned to it, so no
    memory is spent on a throwaway random initialisation.
    """
    from slmkit.models import build_model

    directory = resolve_model_dir(path)
    if not (directory / "config.json").is_file():  # an adapter directory: its base with the adapter attached
        return _load_adapted(directory, device, dtype)
    config = load_config(directory / "config.json")
    weights = directory / WEIGHTS if (directory / WEIGHTS).is_file() else directory / WEIGHTS_INDEX
    state = from_hf_state_dict(load_weights(directory), config)
    if config.extra.get("quantization_config") is not None:  # quantized / factored: layers stay packed
        from slmkit.models.quantized import load_compressed

        model = load_compressed(directory, config, state, device, dtype)
        model.source_dir = directory  # type: ignore[attr-defined]
        return model
    with torch.device("meta"):
        model = build_model(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not match config.json (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(
                f"{weights}: tensor {name} has dtype {tensor.dtype}, expected a float dtype "
                "(quantized or corrupt checkpoint); load the unquantized weights"
            )
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{weights}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    target_dtype = dtype or torch.float32
    state = {k: v.to(device=device, dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    model.source_dir = directory  # type: ignore[attr-defined]
    return model
