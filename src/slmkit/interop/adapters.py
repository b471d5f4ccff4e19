"""Adapters as PEFT files: what `peft.PeftModel.from_pretrained` loads on the transformers copy of the base, and
what slmkit loads from peft's own `save_pretrained`.

An adapter directory holds:
- `adapter_config.json`: peft's LoraConfig (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, use_rslora,
  target_modules, lora_dropout, bias "none", base_model_name_or_path, ...);
- `adapter_model.safetensors`: per adapted layer ``base_model.model.<transformers name>.lora_A.weight`` (r, in)
  and ``...lora_B.weight`` (out, r), named as the base's family names its layers (`slmkit.interop.families`);
- the base's tokenizer files, so the directory is self-contained for `slm serve --lora`;
- NOLA adapters only: `nola_config.json` (bases, seeds) and `nola_coefficients.safetensors` (the coefficients under
  slmkit's names). A and B are saved materialised as plain LoRA as well, so peft loads a NOLA adapter unchanged;
  slmkit reloads the coefficients (and regenerates the bases) so training can go on.

Writes are atomic (a temporary sibling renamed into place) and never replace an existing directory unless told.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit.errors import UserError
from slmkit.interop.checkpoint import ADAPTER_WEIGHTS, atomic_directory, copy_tokenizer, load_state_file
from slmkit.interop.families import FAMILIES
from slmkit.interop.outputs import check_output, use_umask
from slmkit.models.lora import (
    DEFAULT_ADAPTER,
    LoRASpec,
    adapted_modules,
    adapter_names,
    adapter_of,
    adapter_spec,
    attach,
    is_adapter_param,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
NOLA_CONFIG = "nola_config.json"
NOLA_WEIGHTS = "nola_coefficients.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model under these names


# ---- module names: ours <-> the family's -------------------------------------------------------------
def _rename(names: list[str], convert: Any, what: str) -> dict[str, str]:
    """Map module names through a family's weight-name conversion (on `<name>.weight` probes): a layer whose weight
    is only renamed maps to the new name; one that transformers fuses or transposes (GPT-2's c_attn) cannot carry a
    peft LoRA under our factors, and is refused."""
    probes = {f"{n}.weight": torch.empty(0) for n in names}
    owner = {id(t): k.removesuffix(".weight") for k, t in probes.items()}
    why = "transformers fuses or transposes it (as GPT-2's q/k/v in one Conv1D), so no PEFT LoRA holds its factors"
    try:
        converted = convert(probes)
    except (KeyError, IndexError, RuntimeError, ValueError):
        raise UserError(f"{what}: layer {names[0]} has no one-to-one transformers name: {why}") from None
    out: dict[str, str] = {}
    for key, tensor in converted.items():
        if id(tensor) in owner and key.endswith(".weight"):
            out[owner[id(tensor)]] = key.removesuffix(".weight")
    missing = [n for n in names if n not in out]
    if missing:
        raise UserError(f"{what}: layer {missing[0]} has no one-to-one transformers name: {why}")
    return out


def hf_module_names(config: Any, names: list[str]) -> dict[str, str]:
    """Our layer names -> the transformers module names of the config's family."""
    spec = FAMILIES[config.family]
    return _rename(names, lambda s: spec.weights_to_hf(s, config), f"family {config.family!r}")


def our_module_names(config: Any, names: list[str]) -> dict[str, str]:
    """Transformers module names of the config's family -> ours."""
    return _rename(names, FAMILIES[config.family].weights_from_hf, f"family {config.family!r}")


# ---- save ------------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_dir: str | Path | None = None,
    name: str = DEFAULT_ADAPTER,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write adapter `name` of `model` as a PEFT LoRA adapter directory (atomically; an existing non-empty
    directory is replaced only with `overwrite`). base_model_dir: recorded as base_model_name_or_path, and its
    tokenizer files are copied (default: the directory the model was loaded from). extra(tmp_dir) may add files
    (a training run's trainer state)."""
    spec = adapter_spec(model, name)
    config = model.config  # type: ignore[attr-defined]
    base = Path(base_model_dir) if base_model_dir is not None else getattr(model, "source_dir", None)
    directory = check_output(directory, "dir", overwrite)
    layers = adapted_modules(model, name)
    moe = [n for n in layers if ".experts." in n or n.endswith("mlp.gate")]
    if moe and config.family != "slmkit":
        raise UserError(
            f"adapter {name!r} is on mixture-of-experts layer {moe[0]}: transformers holds a layer's experts fused in "
            "one tensor (and the router as its own module), which PEFT LoRA factors per expert do not map onto; "
            "target the attention layers, or merge the adapter (slm merge-adapter)"
        )
    theirs = hf_module_names(config, layers)
    tensors: dict[str, torch.Tensor] = {}
    coefficients: dict[str, torch.Tensor] = {}
    for layer in layers:
        module = model.get_submodule(layer)
        for part in ("lora_A", "lora_B"):
            factor = getattr(module, part)[name]
            key = f"{PEFT_PREFIX}{theirs[layer]}.{part}.weight"
            tensors[key] = factor.weight.detach().float().contiguous().cpu()
            if spec.kind == "nola":
                coefficients[f"{layer}.{part}.coefficients"] = factor.coefficients.detach().float().cpu()
    adapter_config = peft_config(spec, [theirs[n] for n in layers], config, base)
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        use_umask(tmp / ADAPTER_WEIGHTS)
        if spec.kind == "nola":
            (tmp / NOLA_CONFIG).write_text(json.dumps({"slmkit_adapter": asdict(spec)}, indent=2) + "\n")
            save_file(coefficients, str(tmp / NOLA_WEIGHTS), metadata={"format": "pt"})
            use_umask(tmp / NOLA_WEIGHTS)
        if base is not None:
            copy_tokenizer(base, tmp)
        if extra is not None:
            extra(tmp)
    return directory


def peft_config(spec: LoRASpec, hf_modules: list[str], config: Any, base: Path | None) -> dict[str, Any]:
    """adapter_config.json for peft's LoraConfig. target_modules: the short names when they pick exactly the adapted
    layers (as peft matches them: by name ending), else a regex of the full names (peft's other form)."""
    short = sorted({m.rsplit(".", 1)[-1] for m in hf_modules})
    all_with_short = _count_named(config, short)
    targets: list[str] | str = short
    if all_with_short != len(hf_modules):
        targets = "^(?:" + "|".join(n.replace(".", r"\.") for n in hf_modules) + ")$"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base is not None else None,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _count_named(config: Any, short: list[str]) -> int:
    """How many linear layers of a model of `config` end in one of `short` (in transformers' names)."""
    from slmkit.models import build_model
    from slmkit.models.lora import LINEAR_TYPES

    with torch.device("meta"):
        model = build_model(config)
    ours = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    try:
        theirs = hf_module_names(config, ours)
    except UserError:
        return -1
    return sum(1 for n in theirs.values() if n.rsplit(".", 1)[-1] in short)


# ---- load ------------------------------------------------------------------------------------------
# LoraConfig options that change what the factors mean; slmkit refuses rather than loading them wrong
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (a magnitude vector per layer)",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D layers)",
    "modules_to_save": "modules_to_save (whole modules trained beside the adapter)",
    "rank_pattern": "rank_pattern (a different rank per layer)",
    "alpha_pattern": "alpha_pattern (a different alpha per layer)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QALoRA",
    "layer_replication": "layer_replication",
}


def check_adapter_dir(directory: str | Path) -> dict[str, Any]:
    """The adapter_config.json of an adapter directory (or of an adapter run's latest one); UserError for a missing
    path, a file, or a bad config."""
    return read_adapter_config(resolve_adapter_dir(directory))


def resolve_adapter_dir(directory: str | Path) -> Path:
    """An adapter directory as given, or for the run dir of `slm finetune --lora` its `final/` or latest checkpoint."""
    from slmkit.interop.checkpoint import resolve_model_dir

    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: no such adapter directory")
    if not directory.is_dir():
        raise UserError(f"{directory} is a file; give an adapter directory (adapter_config.json + {ADAPTER_WEIGHTS})")
    if not (directory / ADAPTER_CONFIG).is_file() and (
        (directory / "final").is_dir() or (directory / "checkpoints").is_dir()
    ):
        return resolve_model_dir(directory)
    return directory


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory}: not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    if d.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {d.get('peft_type')!r} is not supported; slmkit loads LoRA adapters (LORA)")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{path}: task_type {d.get('task_type')!r}: slmkit loads causal-LM adapters (CAUSAL_LM)")
    if d.get("bias", "none") != "none":
        raise UserError(f"{path}: bias {d.get('bias')!r} (trained biases) is not supported; use bias 'none'")
    for key, what in _REFUSED_OPTIONS.items():
        if d.get(key) not in (None, False, {}, []):
            raise UserError(f"{path}: {what} is not supported by slmkit's adapters")
    for key in ("r", "lora_alpha"):
        value = d.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UserError(f"{path}: {key} must be a positive number, got {value!r}")
    return d


def load_adapter(
    model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER, trainable: bool = False
) -> list[str]:
    """Load the PEFT LoRA adapter in `directory` (slmkit's or peft's `save_pretrained`) onto `model` as adapter
    `name`; returns the adapted layers. trainable: the adapter's tensors require gradients (to continue training;
    a NOLA adapter continues from its coefficients). UserError for missing or corrupt files, a non-LoRA adapter,
    and an adapter for another base (layers this model lacks, or of other shapes)."""
    directory = resolve_adapter_dir(directory)
    d = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise UserError(f"{directory}: adapter_model.bin (pickle) is not read; re-save it as safetensors")
    state = load_state_file(weights)
    config = model.config  # type: ignore[attr-defined]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        body = key.removeprefix(PEFT_PREFIX)
        part = body.rsplit(".", 2)
        if (
            not key.startswith(PEFT_PREFIX)
            or len(part) != 3
            or part[1] not in ("lora_A", "lora_B")
            or part[2] != "weight"
        ):
            raise UserError(f"{weights}: tensor {key} is not a LoRA factor slmkit can load (lora_A / lora_B weights)")
        factors.setdefault(part[0], {})[part[1]] = tensor
    if not factors:
        raise UserError(f"{weights}: holds no LoRA factors")
    ours = our_module_names(config, sorted(factors))
    modules = dict(model.named_modules())
    r = int(d["r"])
    for theirs, pair in factors.items():
        layer = ours[theirs]
        module = modules.get(layer)
        if module is None:
            raise UserError(
                f"{directory}: the adapter has layer {theirs}, which this model lacks: it was trained for another base"
            )
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{weights}: layer {theirs} has only {', '.join(pair)}; the file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        want_a = (r, getattr(module, "in_features", -1))
        want_b = (getattr(module, "out_features", -1), r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise UserError(
                f"{directory}: layer {theirs} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, this model "
                f"needs {want_a} and {want_b}: the adapter was trained for another base"
            )
    spec, coefficients = _spec_of(directory, d, [ours[t] for t in factors])
    layers = [ours[t] for t in factors]
    attach(model, layers, spec, name)
    try:
        with torch.no_grad():
            for theirs, pair in factors.items():
                module = modules[ours[theirs]]
                for part, tensor in pair.items():
                    factor = getattr(module, part)[name]
                    if coefficients is None:
                        factor.weight.copy_(tensor)
                    else:
                        factor.coefficients.copy_(coefficients[f"{ours[theirs]}.{part}.coefficients"])
                        if not torch.allclose(factor.weight.float(), tensor.float(), rtol=1e-4, atol=1e-6):
                            raise UserError(
                                f"{directory / NOLA_WEIGHTS}: the NOLA coefficients do not reproduce {theirs}.{part} "
                                "of the adapter file; the files are from different adapters"
                            )
    except BaseException:
        from slmkit.models.lora import remove_adapters

        remove_adapters(model, [name])
        raise
    for key, param in model.named_parameters():
        if is_adapter_param(key):
            if adapter_of(key) == name:
                param.requires_grad_(trainable)
        elif trainable:  # as add_adapters: training the adapter leaves the base frozen
            param.requires_grad_(False)
    log.info("adapter %s: %d layers from %s (adapters now: %s)", name, len(layers), directory, adapter_names(model))
    return sorted(layers, key=list(modules).index)


def _spec_of(directory: Path, d: dict[str, Any], layers: list[str]) -> tuple[LoRASpec, dict[str, torch.Tensor] | None]:
    dropout = d.get("lora_dropout") or 0.0
    common = dict(
        r=int(d["r"]),
        alpha=float(d["lora_alpha"]),
        dropout=float(dropout),
        use_rslora=bool(d.get("use_rslora", False)),
        target_modules=tuple(layers),
    )
    if not (directory / NOLA_CONFIG).is_file():
        return LoRASpec(**common), None  # type: ignore[arg-type]
    path = directory / NOLA_CONFIG
    try:
        saved = json.loads(path.read_text())["slmkit_adapter"]
        spec = LoRASpec(
            **common,  # type: ignore[arg-type]
            kind="nola",
            nola_bases=int(saved["nola_bases"]),
            nola_seed=int(saved["nola_seed"]),
            seed=int(saved.get("seed", 0)),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a valid NOLA record ({exc!r}); re-save the adapter") from None
    coefficients = load_state_file(directory / NOLA_WEIGHTS)
    needed = [f"{n}.{p}.coefficients" for n in layers for p in ("lora_A", "lora_B")]
    absent = [k for k in needed if k not in coefficients]
    if absent:
        raise UserError(f"{directory / NOLA_WEIGHTS}: coefficients {absent[0]} missing; re-save the adapter")
    if any(coefficients[k].shape != (spec.nola_bases,) for k in needed):
        raise UserError(f"{directory / NOLA_WEIGHTS}: coefficients do not match nola_bases={spec.nola_bases}")
    return spec, coefficients


# ---- merging ---------------------------------------------------------------------------------------
def dequantize_model(model: nn.Module) -> nn.Module:
    """A float copy of an slmkit-compressed model (each packed layer replaced by the float weight it stands for;
    the config without its compression spec), adapters carried over; a float model is returned as it is."""
    import dataclasses

    from slmkit.models import build_model
    from slmkit.models.lora import adapter_state_dict, context_of
    from slmkit.models.quantized import SPEC_KEY, dense_state_dict

    config = model.config  # type: ignore[attr-defined]
    if config.extra.get(SPEC_KEY) is None:
        return model
    adapters = adapter_state_dict(model)
    state = {k: v for k, v in dense_state_dict(model).items() if not is_adapter_param(k)}
    float_config = dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k != SPEC_KEY})
    with torch.device("meta"):
        dense = build_model(float_config)
    if float_config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dense.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if float_config.tie_embeddings:
        dense.lm_head.weight = dense.embed_tokens.weight
    context = context_of(model)
    if context is not None:
        for name, spec in context.specs.items():
            attach(dense, adapted_modules(model, name), spec, name)
        with torch.no_grad():
            own = dense.state_dict()
            for key, tensor in adapters.items():
                own[key].copy_(tensor)
    dense.eval()
    dense.source_dir = getattr(model, "source_dir", None)  # type: ignore[attr-defined]
    return dense
