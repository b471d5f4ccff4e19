"""Pruning. Every result is a plain dense model that any runtime loads.

- `magnitude`: zero the smallest |w| of each linear layer (a share `sparsity` per layer).
- `wanda` (Sun et al. 2023): score |w_ij| * ||x_j||_2 (x: calibration inputs of the layer), zero the
  lowest-scoring share of each output row; blocks are visited in order, so later blocks see the already
  pruned earlier ones.
- `2:4`: in every group of 4 consecutive inputs keep the 2 best (Wanda score with data, |w| without),
  the pattern sparse tensor cores accelerate. The zeros are stored densely: file size and CPU speed do
  not change until a sparse kernel runs them.
- `structured` (Minitron / ShortGPT style): rank attention heads by the norm of their output, FFN
  channels by the mean |activation| entering down_proj, layers by 1 - cos(input, output) of the block,
  all on calibration data; drop the least important and write a smaller config. This does shrink the
  file, memory and compute; quality drops more, so follow it with `slm distill`. The smaller shape must
  be one the family's config.json can state (GPT-2's head width is n_embd / n_head, so it keeps its
  heads); that is checked before any calibration pass.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from slmkit.compress.calibration import run_until_block
from slmkit.compress.targets import linear_names
from slmkit.errors import UserError
from slmkit.interop.families import check_family

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_unstructured(
    model: nn.Module, method: str, sparsity: float, batches: list[torch.Tensor] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of `model` (zeros in its block linear layers) and a record for config.json."""
    config = model.config
    names = linear_names(config)
    if method not in ("magnitude", "wanda", "2:4"):
        raise UserError(f"unknown pruning method {method!r}")
    if method == "2:4":
        for name in names:
            k = model.get_submodule(name).in_features
            if k % 4:
                raise UserError(f"2:4 sparsity needs input widths divisible by 4; {name} has {k}")
        sparsity = 0.5
    elif not (0.0 < sparsity < 1.0):
        raise UserError(f"--sparsity must be in (0, 1), got {sparsity}")
    if method == "wanda" and not batches:
        raise UserError("wanda pruning needs calibration data: pass --data DATA_DIR")
    work = copy.deepcopy(model).float().eval()
    use_data = method == "wanda" or (method == "2:4" and bool(batches))
    for i in range(config.n_layers):
        block = work.layers[i]
        subs = [n.removeprefix(f"layers.{i}.") for n in names if n.startswith(f"layers.{i}.")]
        norms: dict[str, torch.Tensor] = {}
        if use_data:
            assert batches is not None
            for sub in subs:
                norms[sub] = torch.zeros(block.get_submodule(sub).in_features)

            def make_hook(acc: torch.Tensor):
                def hook(x: torch.Tensor) -> None:
                    acc.add_(x.float().pow(2).sum(0))

                return hook

            run_until_block(work, i, batches, {sub: make_hook(norms[sub]) for sub in subs})
        for sub in subs:
            w = block.get_submodule(sub).weight
            score = w.abs() * (norms[sub].sqrt()[None, :] if use_data else 1.0)
            mask = torch.ones_like(w, dtype=torch.bool)
            if method == "2:4":
                groups = score.view(w.shape[0], -1, 4)
                drop = groups.topk(2, dim=-1, largest=False).indices
                mask.view(w.shape[0], -1, 4).scatter_(-1, drop, False)
            elif method == "wanda":
                count = int(w.shape[1] * sparsity)
                drop = score.topk(count, dim=1, largest=False).indices
                mask.scatter_(1, drop, False)
            else:
                count = int(w.numel() * sparsity)
                drop = score.reshape(-1).topk(count, largest=False).indices
                mask.view(-1)[drop] = False
            w.mul_(mask)
    record = {"method": f"prune-{method}", "sparsity": sparsity, "modules": "block linear layers"}
    return work, record


@torch.no_grad()
def importance(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head (L, H), FFN channel (L, d_ff) and layer (L,) importance on calibration batches."""
    config = model.config
    n_layers, n_heads, hd = config.n_layers, config.n_heads, config.dim_per_head
    heads = torch.zeros(n_layers, n_heads)
    channels = torch.zeros(n_layers, config.d_ff)
    layers = torch.zeros(n_layers)
    count = torch.zeros(1)
    handles = []
    for i, block in enumerate(model.layers):

        def o_hook(_m, args, i=i):
            x = args[0].float().reshape(-1, n_heads, hd)
            heads[i] += x.norm(dim=-1).sum(0)

        def down_hook(_m, args, i=i):
            channels[i] += args[0].float().reshape(-1, config.d_ff).abs().sum(0)

        def block_hook(_m, args, output, i=i):
            x_in = args[0].float().reshape(-1, config.d_model)
            x_out = output.float().reshape(-1, config.d_model)
            layers[i] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum()
            if i == 0:
                count.add_(x_in.shape[0])

        handles.append(block.self_attn.o_proj.register_forward_pre_hook(o_hook))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(down_hook))
        handles.append(block.register_forward_hook(block_hook))
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    n = float(count)
    return {"heads": heads / n, "channels": channels / n, "layers": layers / n}


def _round_width(width: int, keep: float) -> int:
    target = width * keep
    if width >= 64:  # multiples of 32 keep int4 group sizes and kernels usable
        return int(min(width, max(32, round(target / 32) * 32)))
    return max(1, round(target))


# how structured pruning cuts each block linear: (weight axis: 0 output rows, 1 input columns, kept index set)
_CUTS = {
    "self_attn.q_proj": (0, "q"),
    "self_attn.k_proj": (0, "kv"),
    "self_attn.v_proj": (0, "kv"),
    "self_attn.o_proj": (1, "q"),
    "mlp.gate_proj": (0, "ff"),
    "mlp.up_proj": (0, "ff"),
    "mlp.down_proj": (1, "ff"),
}


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    batches: list[torch.Tensor] | None,
    heads_keep: float = 1.0,
    ffn_keep: float = 1.0,
    drop_layers: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A smaller dense model: fewer heads (or kv groups), FFN channels and layers."""
    from slmkit.models import build_model

    config = model.config
    others = sorted(config.mixers - {"attention"})
    lacks = [f"{', '.join(others)} layers"] if others else []
    kinds = {"none": "no MLP", "moe": "mixture-of-experts MLPs", "memory": "product-key memory layers"}
    lacks += [what for kind, what in kinds.items() if kind in config.mlps]
    if config.value_embeds or config.skip_connections:  # tables sized to the kv width, weights per layer pair
        lacks.append("value embeddings or U-net skips")
    if lacks:  # heads and FFN channels are attention's and the MLP's: other mixers' widths are not cut here
        raise UserError(
            f"prune-structured cuts attention heads and MLP channels, and this model has {' and '.join(lacks)}; "
            "use a quantization method or unstructured pruning (prune-magnitude, prune-wanda, prune-2:4)"
        )
    if not batches:
        raise UserError("structured pruning ranks heads, channels and layers on calibration data: pass --data")
    if not (0 < heads_keep <= 1) or not (0 < ffn_keep <= 1):
        raise UserError(f"--heads-keep and --ffn-keep must be in (0, 1], got {heads_keep} and {ffn_keep}")
    if not (0 <= drop_layers < config.n_layers):
        raise UserError(f"--drop-layers must be in [0, {config.n_layers - 1}] for this model, got {drop_layers}")
    if heads_keep == 1 and ffn_keep == 1 and drop_layers == 0:
        raise UserError("structured pruning needs at least one of --heads-keep < 1, --ffn-keep < 1, --drop-layers > 0")
    h, k, hd = config.n_heads, config.n_kv_heads, config.dim_per_head
    per_group = h // k
    if per_group > 1:  # drop query heads inside each kv group, keeping the group structure
        new_per_group = max(1, math.floor(per_group * heads_keep + 0.5))
        new_k = k
    else:  # multi-head attention: a head is its own kv group, so drop whole groups
        new_per_group = 1
        new_k = max(1, math.floor(k * heads_keep + 0.5))
    new_ff = _round_width(config.d_ff, ffn_keep)
    new_heads = new_k * new_per_group
    new_config = config.replace(
        n_layers=config.n_layers - drop_layers,
        n_heads=new_heads,
        n_kv_heads=new_k,
        d_ff=new_ff,
        head_dim=None if new_heads * hd == config.d_model else hd,  # None where the default holds, as loaded
        extra=dict(config.extra),
    )
    # before any calibration pass: a shape the family's config.json cannot state could not be saved
    check_family(
        new_config,
        source="prune-structured",
        fix="keep every head (--heads-keep 1) and prune FFN channels (--ffn-keep) or layers (--drop-layers)",
    )
    scores = importance(model.float().eval(), batches)
    keep_layers = sorted(torch.topk(scores["layers"], config.n_layers - drop_layers).indices.tolist())
    with torch.device("meta"):
        small = build_model(new_config)
    source = model.state_dict()
    # everything outside the blocks (embeddings, final norm, head) is kept as it is
    state = {name: tensor.clone() for name, tensor in source.items() if not name.startswith("layers.")}
    for new_i, old_i in enumerate(keep_layers):
        p, q = f"layers.{old_i}.", f"layers.{new_i}."
        head_score = scores["heads"][old_i].view(k, per_group)
        if per_group > 1:
            kv_keep = list(range(k))
            within = head_score.topk(new_per_group, dim=1).indices.sort(dim=1).values  # (K, m)
            q_heads = (torch.arange(k)[:, None] * per_group + within).reshape(-1).tolist()
        else:
            kv_keep = sorted(head_score[:, 0].topk(new_k).indices.tolist())
            q_heads = kv_keep
        kept = {
            "q": torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in q_heads]),
            "kv": torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in kv_keep]),
            "ff": torch.tensor(sorted(scores["channels"][old_i].topk(new_ff).indices.tolist())),
        }
        for name, tensor in source.items():
            if not name.startswith(p):
                continue
            sub = name.removeprefix(p)
            module, _, kind = sub.rpartition(".")
            axis, index = _CUTS.get(module, (None, None))
            # norms and per-head q/k norms serve every kept channel; an input cut leaves the output bias whole
            if index is None or (kind == "bias" and axis == 1):
                state[q + sub] = tensor.clone()
            else:
                state[q + sub] = tensor.index_select(axis if kind == "weight" else 0, kept[index]).clone()
    if new_config.tie_embeddings:
        state.pop("lm_head.weight")
    small.load_state_dict(state, strict=not new_config.tie_embeddings, assign=True)
    if new_config.tie_embeddings:
        small.lm_head.weight = small.embed_tokens.weight
    small.eval()
    record = {
        "method": "prune-structured",
        "heads_keep": heads_keep,
        "ffn_keep": ffn_keep,
        "dropped_layers": sorted(set(range(config.n_layers)) - set(keep_layers)),
        "from": {"n_layers": config.n_layers, "n_heads": h, "n_kv_heads": k, "d_ff": config.d_ff},
    }
    return small, record
