"""The merge config: mergekit's YAML shape, read and checked before any weights are loaded.

```yaml
merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, model_stock, slerp
base_model: runs/base/final
models:
  - model: runs/math/final
    parameters: {weight: 0.6, density: 0.5}
  - model: runs/code/final
    parameters: {weight: 0.4, density: [0.3, 0.7]}   # a gradient: interpolated across the layers
parameters: {normalize: true, lambda: 1.0}
dtype: bfloat16               # the output's dtype (the inputs are rounded to it first, as mergekit does)
```

Parameters follow mergekit's rules, so its configs mean the same here:
- A value is a scalar, a *gradient* (a list of numbers, interpolated linearly over the layers: layer i of n takes
  position i / (n - 1); tensors outside the layers, embeddings, final norm, lm_head, take position 0, as in
  mergekit), or a list of `{filter: SUBSTRING, value: ...}` entries, the first whose filter is a substring of the
  tensor's name (Hugging Face names, e.g. `self_attn`, `mlp`) winning; an entry without a filter matches all.
- Per-model values (`weight`, `density`) come from the model's own `parameters`, else from the top level; the
  others (`normalize`, `lambda`, `t`, ...) only from the top level.
- With a `base_model` that the `models` list does not name, the base is added as one more input (for linear that
  means it is averaged in, with the top-level weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slmkit.errors import UserError

REQUIRED = object()
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["number", "bool"]
    scope: Literal["shared", "input", "non_base"]  # shared: top level only; input: every model; non_base: not the base
    default: Any = REQUIRED
    range: tuple[float, float] | None = None  # (low, high]: density


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    base_required: bool
    min_inputs: int = 1  # counting the base
    max_inputs: int | None = None
    what: str = ""

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def _weights(scope: Literal["input", "non_base"]) -> Param:
    return Param("weight", "number", scope)


_DENSITY = Param("density", "number", "non_base", 1.0, range=(0.0, 1.0))
_LAMBDA = Param("lambda", "number", "shared", 1.0)
_INT8_MASK = Param("int8_mask", "bool", "shared", False)  # mergekit's memory saving; the result is the same


def _delta_method(name: str, normalize: bool, density: bool, rescale: bool, what: str) -> Method:
    params = [_weights("non_base"), _LAMBDA, Param("normalize", "bool", "shared", normalize), _INT8_MASK]
    if density:
        params.append(_DENSITY)
    if rescale:
        params.append(Param("rescale", "bool", "shared", True))
    return Method(name, tuple(params), base_required=True, what=what)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            (_weights("input"), Param("normalize", "bool", "shared", True)),
            base_required=False,
            what="weighted average of the models",
        ),
        _delta_method("task_arithmetic", False, False, False, "base + lambda * weighted sum of task vectors"),
        _delta_method("ties", True, True, False, "trim, elect sign, disjoint mean of task vectors"),
        _delta_method("dare_linear", False, True, True, "random drop + rescale, then task arithmetic"),
        _delta_method("dare_ties", False, True, True, "random drop + rescale, then TIES' sign election"),
        Method(
            "model_stock",
            (Param("filter_wise", "bool", "shared", False),),
            base_required=True,
            min_inputs=3,
            what="interpolate towards the models' mean by the angle between their task vectors",
        ),
        Method(
            "slerp",
            (Param("t", "number", "shared"),),
            base_required=True,
            min_inputs=2,
            max_inputs=2,
            what="spherical interpolation between two models",
        ),
    )
}

_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under `models:`",
    "modules": "per-module configs are not supported; list whole models under `models:`",
    "tokenizer": "tokenizer merging is not supported: the models must share one vocabulary",
    "chat_template": "chat_template is not supported: the output keeps the tokenizer files of its source",
}


@dataclass
class Input:
    """One model of the merge, as the config names it and as found on disk."""

    name: str  # as written in the config
    directory: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    is_base: bool = False


@dataclass
class MergeSpec:
    method: Method
    inputs: list[Input]  # the models in config order, then the base if `models` does not list it
    parameters: dict[str, Any]
    dtype: str | None  # inputs are rounded to it; the output's dtype unless out_dtype says otherwise
    out_dtype: str | None
    tokenizer_source: Input
    text: str  # the config as read, kept beside the output

    @property
    def base(self) -> Input | None:
        return next((i for i in self.inputs if i.is_base), None)

    @property
    def others(self) -> list[Input]:
        return [i for i in self.inputs if not i.is_base]

    def resolve(self, name: str, tensor: str, position: float, model: Input | None = None) -> Any:
        """The value of parameter `name` for `tensor` (at layer `position` in [0, 1]) and `model` (None: a shared
        parameter); the model's own setting first, then the top level, then the method's default."""
        param = self.method.param(name)
        scopes = ([model.parameters] if model is not None else []) + [self.parameters]
        for scope in scopes:
            if name in scope:
                value = evaluate(scope[name], tensor, position)
                if value is not None:
                    return value
        if param.default is REQUIRED:
            where = f"model {model.name}" if model is not None else "the merge"
            raise UserError(
                f"{self.method.name}: no `{name}` for {where} (tensor {tensor}); give it under the model's "
                f"`parameters:` or under the top-level `parameters:`"
            )
        return param.default


def evaluate(setting: Any, tensor: str, position: float) -> Any:
    """A parameter setting's value for one tensor: gradients interpolated at `position`, filters matched against
    the tensor name; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        numeric = all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting)
        if not numeric:  # booleans: a step function over the layers
            return setting[int(position * (len(setting) - 1))]
        scaled = position * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for entry in setting:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor:
            return evaluate(entry["value"], tensor, position)
    return None


# ---- reading and checking the YAML ------------------------------------------------------------------------
def _check_leaf(value: Any, param: Param, where: str) -> Any:
    """The value, checked; a number written as text (`1e-3`, which YAML 1.1 reads as a string) as a float."""
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{where}: `{param.name}` must be true or false, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: `{param.name}` must be a number, got {value!r}")
    if param.range is not None:
        low, high = param.range
        if not low < value <= high:
            raise UserError(f"{where}: `{param.name}` must be in ({low:g}, {high:g}], got {value!r}")
    return value


def _check_setting(setting: Any, param: Param, where: str) -> Any:
    """A scalar, a list of scalars (gradient), {filter, value} or a list of those, every value checked and in
    range; returned with numbers written as text converted."""
    entries = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else None
    if entries is None:
        return _check_leaf(setting, param, where)
    if not entries:
        raise UserError(f"{where}: `{param.name}` is an empty list; give a value or a list of values")
    if all(not isinstance(e, dict) for e in entries):
        for e in entries:
            if isinstance(e, list):
                raise UserError(f"{where}: `{param.name}` has a nested list; a gradient is a flat list of values")
        return [_check_leaf(e, param, where) for e in entries]
    checked = []
    for e in entries:
        if not isinstance(e, dict):
            raise UserError(f"{where}: `{param.name}` mixes plain values and {{filter, value}} entries")
        unknown = set(e) - {"filter", "value"}
        if unknown or "value" not in e:
            raise UserError(
                f"{where}: each entry of `{param.name}` is {{filter: NAME_PART, value: V}} (filter optional), got {e!r}"
            )
        if e.get("filter") is not None and not isinstance(e["filter"], str):
            raise UserError(f"{where}: `{param.name}` filter must be text (part of a tensor name), got {e['filter']!r}")
        if isinstance(e["value"], dict):
            raise UserError(f"{where}: `{param.name}`: a filter's value is a number or a list of numbers")
        checked.append({**e, "value": _check_setting(e["value"], param, where)})
    return checked


def _check_parameters(raw: Any, method: Method, where: str, per_model: bool) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: `parameters` must be a mapping of name: value, got {raw!r}")
    allowed = [p.name for p in method.params if not per_model or p.scope != "shared"]
    checked: dict[str, Any] = {}
    for name, setting in raw.items():
        if name not in allowed:
            shared = not per_model or name not in (p.name for p in method.params)
            hint = (
                f"valid {'per-model ' if per_model else ''}parameters of {method.name}: {', '.join(allowed) or 'none'}"
                if shared
                else f"`{name}` applies to the whole merge: put it under the top-level `parameters:`"
            )
            raise UserError(f"{where}: unknown parameter `{name}` for {method.name} ({hint})")
        checked[name] = _check_setting(setting, method.param(name), where)
    return checked


def _model_dir(value: Any, where: str) -> Path:
    from slmkit.interop.checkpoint import resolve_model_dir

    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected the path of a model directory, got {value!r}")
    path = Path(value).expanduser()
    try:
        directory = resolve_model_dir(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc} (relative paths are taken from the current directory)") from None
    if not (directory / "config.json").is_file():
        raise UserError(f"{where}: {directory} has no config.json; give a model directory")
    return directory.resolve()


def _dtype(raw: dict, key: str, source: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("torch."):  # mergekit accepts torch.bfloat16 too
        value = value[len("torch.") :]
    if value not in DTYPES:
        raise UserError(f"{source}: `{key}: {value}` is not supported; choose one of: {', '.join(DTYPES)}")
    return value


def parse(text: str, source: str = "merge config") -> MergeSpec:
    """A checked MergeSpec from the YAML text; UserError naming the first problem."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping with merge_method, models, ... (mergekit's config shape)")
    for key in raw:
        if key in _UNSUPPORTED_KEYS:
            raise UserError(f"{source}: `{key}`: {_UNSUPPORTED_KEYS[key]}")
        if key not in _TOP_KEYS:
            raise UserError(f"{source}: unknown key `{key}` (valid keys: {', '.join(_TOP_KEYS)})")
    name = raw.get("merge_method")
    if name not in METHODS:
        given = "no merge_method" if name is None else f"merge_method {name!r} is not supported"
        raise UserError(f"{source}: {given}; choose one of: {', '.join(METHODS)}")
    method = METHODS[name]
    parameters = _check_parameters(raw.get("parameters"), method, f"{source}: parameters", per_model=False)

    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{source}: `models` must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    inputs: list[Input] = []
    for i, entry in enumerate(models):
        where = f"{source}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise UserError(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)} (a model entry has `model` and `parameters`)")
        directory = _model_dir(entry["model"], where)
        if any(directory == other.directory for other in inputs):
            raise UserError(f"{where}: {entry['model']} is listed twice; list each model once")
        params = _check_parameters(entry.get("parameters"), method, where, per_model=True)
        inputs.append(Input(str(entry["model"]), directory, params))

    base_name = raw.get("base_model")
    if base_name is not None:
        base_dir = _model_dir(base_name, f"{source}: base_model")
        base = next((i for i in inputs if i.directory == base_dir), None)
        if base is None:
            base = Input(str(base_name), base_dir)
            inputs.append(base)
        base.is_base = True
    elif method.base_required:
        raise UserError(f"{source}: {method.name} needs a `base_model` (the model the others were fine-tuned from)")

    count = len(inputs)
    if method.name == "slerp" and count != 2:
        raise UserError(
            f"{source}: slerp interpolates between exactly 2 models (base_model and one other), got {count} "
            f"({', '.join(i.name for i in inputs)})"
        )
    if count < method.min_inputs:
        raise UserError(
            f"{source}: {method.name} needs the base_model and at least {method.min_inputs - 1} other models, "
            f"got {count - 1}"
        )

    tokenizer = raw.get("tokenizer_source")
    first = next((i for i in inputs if i.is_base), inputs[0])
    if tokenizer is None or tokenizer == "base":
        tokenizer_input = first
    else:
        if tokenizer == "union" or not isinstance(tokenizer, str):
            raise UserError(
                f"{source}: tokenizer_source {tokenizer!r} is not supported: the models must share one vocabulary; "
                "give `base` or one of the merged models"
            )
        directory = _model_dir(tokenizer, f"{source}: tokenizer_source")
        tokenizer_input = next((i for i in inputs if i.directory == directory), None)
        if tokenizer_input is None:
            raise UserError(f"{source}: tokenizer_source {tokenizer} is not one of the merged models")
    return MergeSpec(
        method=method,
        inputs=inputs,
        parameters=parameters,
        dtype=_dtype(raw, "dtype", source),
        out_dtype=_dtype(raw, "out_dtype", source),
        tokenizer_source=tokenizer_input,
        text=text,
    )


def read(path: str | Path) -> MergeSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: merge config not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the merge config ({exc})") from None
    return parse(text, str(path))
