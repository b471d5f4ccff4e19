"""Weight-only quantization, phase 1: a float model -> a state dict of packed tensors + a spec.

- int8: symmetric, one scale per output channel (row). Round-to-nearest is within noise of exact here.
- int4: asymmetric, one fp16 scale and zero per group of `group_size` consecutive inputs of a row,
  w ~= (q - 8) * scale + zero with q in [0, 15] (the CPU kernel's convention). Three ways to pick q:
  round-to-nearest (`rtn`), GPTQ (`gptq`: quantize a column at a time and push the rounding error onto
  the columns not yet quantized, weighted by the inverse Hessian X^T X of calibration inputs), and
  AWQ (`awq`: scale input channels by s = mean|x|^alpha before rounding, alpha searched per layer
  group to minimise the output error on calibration inputs, and fold 1/s into the op that feeds the layer).
- outliers (SpQR-style, optional): the given fraction of weights with the largest rounding error, weighted
  by the input's scale, is kept as an fp16 sparse correction.
- the token embedding (and the tied output head) is int8 per row by default: the head is the layer most
  sensitive to rounding, and int8 rows keep the embedding a cheap row gather. `embeddings="int4"` makes
  them int4 rows (round-to-nearest, groups of 64 where they fit) for the smallest file.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slmkit.compress.calibration import run_until_block
from slmkit.compress.targets import linear_names
from slmkit.errors import UserError
from slmkit.interop.families import ScaleFold, family_spec
from slmkit.models.quantized import FORMAT_VERSION, int4_dequant, pack_int4

log = logging.getLogger(__name__)


@dataclass
class QuantOptions:
    bits: int = 4  # 4 or 8
    group_size: int | None = None  # None: 128 where it divides a layer's input width, else 64, 32, ...
    algorithm: str = "rtn"  # rtn | gptq | awq
    outliers: float = 0.0  # share of each int4 layer's weights kept in fp16
    damp: float = 0.01  # GPTQ: Hessian damping, as a share of its mean diagonal
    activations: str = "none"  # int8: "dynamic" quantizes activations per call on CPU (W8A8); the file is the same
    embeddings: str = "int8"  # the token embedding / output head: "int8" per row, or "int4" group-wise rows


# ---- primitives ----------------------------------------------------------------------------------
def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes int8 (N, K), scales fp32 (N,))."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales.float()


def int4_params(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of a group (N, g), rounded to fp16 as they are stored."""
    lo, hi = weight.amin(dim=1), weight.amax(dim=1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()
    zero = (lo + 8 * scale).half().float()
    return scale, zero


def int4_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """weight (N, g) with per-row scale/zero (N,) -> codes (N, g) in [0, 15]."""
    return torch.round((weight - zero[:, None]) / scale[:, None] + 8).clamp(0, 15)


def int4_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes (N, K), scales (N, G), zeros (N, G)."""
    n, k = weight.shape
    grouped = weight.reshape(n * (k // group_size), group_size)
    scale, zero = int4_params(grouped)
    codes = int4_codes(grouped, scale, zero)
    return codes.view(n, k), scale.view(n, -1), zero.view(n, -1)


def int4_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) with static groups, in blocks of 128 columns (lazy batch updates)."""
    w = weight.clone().float()
    n, k = w.shape
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.diag(h).mean()
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except RuntimeError:  # not positive definite even after damping: fall back to more damping
        h += torch.eye(k, dtype=h.dtype) * torch.diag(h).mean()
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.zeros_like(w)
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)
    block = max(group_size, 128 // group_size * group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        scale = zero = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                scale, zero = int4_params(w1[:, i : i + group_size])
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            assert scale is not None and zero is not None
            q = int4_codes(w1[:, i : i + 1], scale, zero)[:, 0]
            codes[:, col] = q
            deq = (q - 8) * scale + zero
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros


def outlier_correction(
    weight: torch.Tensor, dequant: torch.Tensor, fraction: float, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (int32) and fp16 deltas of the `fraction` largest (input-weighted) rounding errors."""
    delta = weight - dequant
    score = delta.abs() * (input_scale[None, :] if input_scale is not None else 1.0)
    count = max(1, int(round(fraction * weight.numel())))
    index = torch.topk(score.reshape(-1), count).indices.sort().values
    return index.to(torch.int32), delta.reshape(-1)[index].half()


# ---- whole-model quantization --------------------------------------------------------------------
def check_options(model: nn.Module, options: QuantOptions) -> None:
    if options.bits not in (4, 8):
        raise UserError(f"--bits must be 4 or 8, got {options.bits}")
    if options.algorithm not in ("rtn", "gptq", "awq"):
        raise UserError(f"unknown quantization algorithm {options.algorithm!r}; use rtn, gptq or awq")
    if options.bits == 8 and options.algorithm != "rtn":
        raise UserError("int8 uses round-to-nearest per channel; gptq/awq are for int4 (use --method gptq-int4)")
    if options.activations not in ("none", "dynamic"):
        raise UserError(f"--activations must be none or dynamic, got {options.activations!r}")
    if options.activations == "dynamic" and options.bits != 8:
        raise UserError("--activations dynamic (W8A8) applies to int8 only; int4 layers stay weight-only")
    if options.embeddings not in ("int8", "int4"):
        raise UserError(f"--embeddings must be int8 or int4, got {options.embeddings!r}")
    if options.embeddings == "int4":
        embedding_group_size(model.config.d_model)
    if not (0.0 <= options.outliers < 0.1):
        raise UserError(f"--outliers must be a fraction in [0, 0.1), got {options.outliers}")
    if options.bits == 4:
        g = options.group_size
        if g is not None and (g < 2 or g % 2):
            raise UserError(f"--group-size must be an even number >= 2 (32, 64 or 128 are usual), got {g}")
        layer_group_sizes(model, g)


def embedding_group_size(width: int) -> int:
    """int4 embedding rows: groups of 64 where they fit, else the largest power of two dividing the width.
    Smaller than the blocks' 128 because the embedding is also the output head, the layer most sensitive to
    rounding; on the micro model g64 scored as g32 and better than g128 (docs/compression.md)."""
    for g in (64, 32, 16, 8, 4, 2):
        if width % g == 0:
            return g
    raise UserError(f"--embeddings int4 needs an even embedding width, got {width}")


def layer_group_sizes(model: nn.Module, group_size: int | None) -> dict[str, int]:
    """The group size of each block linear layer: the one asked for (it must divide every input width), or
    by default 128 where it divides the layer's width and the largest power of two below that otherwise."""
    widths = {name: model.get_submodule(name).in_features for name in linear_names(model.config)}
    if group_size is None:
        out = {}
        for name, k in widths.items():
            fits = [c for c in (128, 64, 32, 16, 8, 4, 2) if k % c == 0]
            if not fits:
                raise UserError(f"{name} has an odd input width {k}; int4 needs even widths (use int8)")
            out[name] = fits[0]
        return out
    for name, k in widths.items():
        if k % group_size:
            fits = [c for c in (256, 128, 64, 32, 16, 8) if all(w % c == 0 for w in widths.values())]
            hint = f"sizes that fit this model: {', '.join(map(str, fits))}" if fits else "no power of two fits"
            raise UserError(
                f"--group-size {group_size} does not divide the input width {k} of {name}; {hint} "
                "(or leave --group-size out: 128 where it divides, smaller groups elsewhere)"
            )
    return dict.fromkeys(widths, group_size)


def fold_awq_scales(block: nn.Module, fold: ScaleFold, s: torch.Tensor, config: Any) -> None:
    """Multiply the consumers' input columns by s and divide the producer's output by s (exact in float)."""
    out_scale = s
    if fold.per_kv_group:  # o_proj's input repeats each kv group's v channels for the heads of that group
        out_scale = s.view(config.n_kv_heads, -1, config.dim_per_head)[:, 0, :].reshape(-1)
    producer = block.get_submodule(fold.producer)
    # a linear layer's output rows, or a norm's elementwise weight; a bias scales with them
    producer.weight.div_(out_scale[:, None] if isinstance(producer, nn.Linear) else out_scale)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(out_scale)
    for name in fold.consumers:
        block.get_submodule(name).weight.mul_(s[None, :])


def _awq_search(
    weights: list[torch.Tensor], x: torch.Tensor, mean_abs: torch.Tensor, group_size: int, tie: tuple[int, int] | None
) -> torch.Tensor:
    """Best s = mean|x|^alpha over an alpha grid, by output error of the quantized layers on x."""
    reference = [x @ w.t() for w in weights]
    best, best_err = torch.ones_like(mean_abs), math.inf
    for alpha in [i / 10 for i in range(11)]:
        s = mean_abs.clamp(min=1e-5).pow(alpha)
        if tie is not None:  # o_proj: one scale per kv group channel, shared by its heads
            groups, hd = tie
            s = s.view(groups, -1, hd).mean(dim=1, keepdim=True).expand(groups, s.numel() // (groups * hd), hd)
            s = s.reshape(-1)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, reference, strict=True):
            codes, sc, ze = int4_rtn(w * s[None, :], group_size)
            deq = int4_dequant(codes, sc, ze, group_size) / s[None, :]
            err += float((x @ deq.t() - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def quantize_model(
    model: nn.Module, options: QuantOptions, batches: list[torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Phase 1: the packed state dict (our names) and the spec for config.json. `model` is not modified."""
    check_options(model, options)
    config = model.config
    work = copy.deepcopy(model).float().eval()
    names = linear_names(config)
    groups_of = layer_group_sizes(model, options.group_size) if options.bits == 4 else {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    needs_data = options.algorithm in ("gptq", "awq") or options.outliers > 0
    if needs_data and not batches:
        raise UserError(f"{options.algorithm} needs calibration data: pass --data DATA_DIR")

    for i in range(config.n_layers):
        block = work.layers[i]
        subs = [n.removeprefix(f"layers.{i}.") for n in names if n.startswith(f"layers.{i}.")]
        stats: dict[str, dict[str, Any]] = {}
        if needs_data:
            assert batches is not None
            for sub in subs:
                k = block.get_submodule(sub).in_features
                stats[sub] = {"h": torch.zeros(k, k), "n": 0, "abs": torch.zeros(k), "sq": torch.zeros(k), "x": []}

            def make_hook(st: dict[str, Any]):
                def hook(x: torch.Tensor) -> None:
                    x = x.float()
                    st["n"] += x.shape[0]
                    st["h"] += x.t() @ x
                    st["abs"] += x.abs().sum(0)
                    st["sq"] += x.pow(2).sum(0)
                    if sum(len(t) for t in st["x"]) < 4096:  # rows kept for the AWQ search
                        st["x"].append(x[:: max(1, x.shape[0] // 512)])

                return hook

            run_until_block(work, i, batches, {sub: make_hook(stats[sub]) for sub in subs})
            for st in stats.values():
                st["h"] /= max(st["n"], 1)
                st["abs"] /= max(st["n"], 1)
                st["x"] = torch.cat(st["x"])[:4096]
        if options.algorithm == "awq" and options.bits == 4:
            # every scale is searched on the unfolded block, then all are folded (they touch disjoint
            # rows and columns, or commute: up_proj's columns for its input, its rows for down_proj's)
            found = []
            for fold in family_spec(config.family).scale_folds:
                if not all(f"layers.{i}.{name}" in groups_of for name in fold.consumers):
                    continue  # a hybrid's block of another kind
                st = stats[fold.consumers[0]]
                g = groups_of[f"layers.{i}.{fold.consumers[0]}"]
                tie = (config.n_kv_heads, config.dim_per_head) if fold.per_kv_group else None
                weights = [block.get_submodule(name).weight for name in fold.consumers]
                found.append((fold, _awq_search(weights, st["x"], st["abs"], g, tie)))
            for fold, s in found:
                fold_awq_scales(block, fold, s, config)
                for name in fold.consumers:  # the stats were taken before the fold: rescale them to its inputs
                    st = stats[name]
                    st["h"] = st["h"] / s[:, None] / s[None, :]
                    st["sq"] = st["sq"] / s.pow(2)
        for sub in subs:
            lin = block.get_submodule(sub)
            w = lin.weight.float()
            if options.bits == 8:
                codes8, scales8 = int8_quantize(w)
                packed[f"layers.{i}.{sub}"] = {"qweight": codes8, "scales": scales8}
                lin.weight.copy_(codes8.float() * scales8[:, None])
                continue
            g = groups_of[f"layers.{i}.{sub}"]
            if options.algorithm == "gptq":
                codes, sc, ze = int4_gptq(w, stats[sub]["h"], g, options.damp)
            else:
                codes, sc, ze = int4_rtn(w, g)
            deq = int4_dequant(codes, sc, ze, g)
            entry = {"qweight": pack_int4(codes), "scales": sc.half(), "zeros": ze.half()}
            if options.outliers > 0:
                input_scale = (stats[sub]["sq"] / max(stats[sub]["n"], 1)).sqrt() if stats else None
                index, value = outlier_correction(w, deq, options.outliers, input_scale)
                entry["outlier_index"], entry["outlier_value"] = index, value
                deq.view(-1).index_add_(0, index.long(), value.float())
            packed[f"layers.{i}.{sub}"] = entry
            lin.weight.copy_(deq)  # later blocks calibrate on this block's quantized output
        log.info("quantized block %d/%d", i + 1, config.n_layers)

    state: dict[str, torch.Tensor] = {}
    for name, tensor in work.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if (module_name in packed and not name.endswith(".bias")) or name.startswith(("embed_tokens.", "lm_head.")):
            continue
        state[name] = tensor.detach().clone()
    for module_name, entry in packed.items():
        for key, tensor in entry.items():
            state[f"{module_name}.{key}"] = tensor.contiguous()
    heads = ["embed_tokens"] if config.tie_embeddings else ["embed_tokens", "lm_head"]
    embedding_group = embedding_group_size(config.d_model) if options.embeddings == "int4" else None
    for name in heads:
        weight = work.get_submodule(name).weight.float()
        if embedding_group is None:
            state[f"{name}.qweight"], state[f"{name}.scales"] = int8_quantize(weight)
        else:
            codes, sc, ze = int4_rtn(weight, embedding_group)
            state[f"{name}.qweight"], state[f"{name}.scales"], state[f"{name}.zeros"] = (
                pack_int4(codes),
                sc.half(),
                ze.half(),
            )
    spec: dict[str, Any] = {
        "quant_method": "slmkit",
        "format_version": FORMAT_VERSION if options.embeddings == "int8" else 2,
        "method": "int8" if options.bits == 8 else "int4",
        "bits": options.bits,
        "algorithm": options.algorithm,
        "modules": names,
        "embeddings": options.embeddings,
    }
    if embedding_group is not None:
        spec["embeddings_group_size"] = embedding_group
    if options.bits == 8:
        spec["activations"] = options.activations
    if options.bits == 4:
        nominal = options.group_size or max(groups_of.values())
        spec["group_size"] = nominal
        spec["group_sizes"] = {name: g for name, g in groups_of.items() if g != nominal}
        spec["outliers"] = options.outliers
    return state, spec
