"""Mixtures of experts made from a dense model: upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling") and
carving (Pei et al. 2025, CMoE; `carve_model`, notes above it).

`upcycle` copies each layer's gated MLP into E experts and adds a router; everything else is copied. With
identical experts the output equals the dense model's whatever the router says (the k renormalised weights sum
to 1), so training starts from the dense model's loss and the router and experts diverge from there
(`slm train --init DIR`). A little noise on the experts (`noise`, relative to each weight's scale) breaks their
symmetry from the first step, at the cost of that exact start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.errors import UserError


@dataclass
class UpcycleResult:
    out: Path
    experts: int
    top_k: int
    params_before: int
    params_after: int
    active_params: int


def upcycled_model(dense: torch.nn.Module, experts: int, top_k: int, noise: float = 0.0, seed: int = 0):
    """A mixture-of-experts copy of `dense` (a float model with gated MLPs), family slmkit."""
    from slmkit.models import build_model

    config = dense.config
    if config.mlps != {"gated"}:  # mlp_pattern: a memory layer has no MLP to copy
        raise UserError(
            f"upcycling copies a gated MLP into experts; this model's mlp is "
            f"{config.mlp if config.mlp_pattern is None else config.mlp_pattern!r}"
            + (" (it is already a mixture of experts)" if "moe" in config.mlps else "")
        )
    if not (isinstance(experts, int) and experts >= 1 and isinstance(top_k, int) and 1 <= top_k <= experts):
        raise UserError(f"--experts must be >= 1 and --top-k between 1 and --experts, got {experts} and {top_k}")
    if not (noise >= 0 and noise < 1):
        raise UserError(f"--noise must be in [0, 1), got {noise}")
    new_config = config.replace(
        mlp="moe", moe_experts=experts, moe_top_k=top_k, moe_norm_topk=True, moe_shared_d_ff=0,
        moe_shared_gate=False, family="slmkit",
    )  # fmt: skip
    model = build_model(new_config)
    dense_state = dense.state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if ".mlp.experts." in name:  # layers.{i}.mlp.experts.{e}.{proj}.weight <- layers.{i}.mlp.{proj}.weight
            source = dense_state[".".join(parts[:3] + parts[5:])]
            value = source.clone()
            if noise:
                value += torch.randn(source.shape, generator=gen) * noise * source.float().std()
        elif name.endswith(".mlp.gate.weight"):  # the router: small random logits
            value = torch.randn(tensor.shape, generator=gen) * config.initializer_range
        else:
            value = dense_state[name]
        state[name] = value.to(tensor.dtype)
    model.load_state_dict(state, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def upcycle(
    model: str | Path,
    out: str | Path,
    experts: int = 8,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> UpcycleResult:
    """Write the upcycled mixture of experts of the model directory `model` to `out` (atomically, with the
    source's tokenizer). An existing `out` is replaced only with `overwrite`."""
    from slmkit.interop.checkpoint import load_model, resolve_model_dir, save_model
    from slmkit.interop.outputs import check_output

    source = resolve_model_dir(model)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the input model; choose another directory")
    check_output(out, "dir", overwrite)
    dense = load_model(source)
    if getattr(dense, "compression", None) is not None:
        raise UserError(f"{source}: the model is quantized or factored; upcycle its float original")
    moe = upcycled_model(dense, experts, top_k, noise, seed)
    save_model(moe, out, tokenizer_dir=source)
    return UpcycleResult(
        out=out,
        experts=experts,
        top_k=top_k,
        params_before=dense.config.num_params(),
        params_after=moe.config.num_params(),
        active_params=moe.config.num_params(active=True),
    )


# ---- carving (CMoE, Pei et al. 2025): a dense MLP's neurons split into experts, no training ----------------------
#
# A gated MLP is a sum over its d_ff neurons: y = sum_i down[:, i] h_i(x), h_i = act(gate_i . x) (up_i . x). Any
# partition of the neurons into a shared group and E routed groups of equal width therefore gives experts whose
# outputs add up to the dense MLP exactly, so a carved model with every expert active (top_k = E) and each
# expert weighted by 1 (moe_weighting: unit) computes what the dense model does. With top_k < E the router
# skips the groups it expects to contribute least; the carving makes that guess good:
# - statistics: on calibration windows each neuron's |h_i| per token; a neuron is *active* on a token when it is
#   among the token's `active` largest, `active` = the neurons the carved model will compute per token
#   (shared + top_k x expert width);
# - shared expert: the `shared` neurons active on the most tokens (always computed, as they are almost always
#   needed);
# - routed experts: the rest clustered by co-activation, balanced k-means on each neuron's 0/1 activation
#   pattern over the calibration tokens (every cluster exactly (d_ff - shared) / E neurons: each round assigns
#   neurons to cluster slots by minimum total distance, scipy's linear_sum_assignment);
# - router (a bias-free linear layer, as every MoE here): row e is the mean of expert e's neurons' gate_proj rows,
#   each first scaled to unit norm, and the mean scaled to unit norm again. A neuron of a silu-type gated MLP is
#   large where its gate pre-activation is large, and neurons that fire together have gate rows that point the
#   same way, so the logit x . row_e is the expert's typical gate pre-activation. CMoE routes by one
#   representative neuron; on the micro model of docs/sparse.md the mean of the group routes better (val loss
#   5.04 vs 5.08, both above random groups' 5.09 / 5.15). The unit norms: with unit weighting the scale changes
#   nothing now, and small logits keep the softmax tame if the model is fine-tuned later.


@dataclass
class CarveRecord:
    """What `carve_model` did, per layer: the neuron indices of the shared expert and of each routed expert."""

    shared: list[list[int]]
    experts: list[list[list[int]]]
    active_rate: list[float]  # per layer: mean share of calibration tokens on which a shared neuron is active


def _balanced_kmeans(patterns: torch.Tensor, clusters: int, iterations: int, seed: int) -> list[list[int]]:
    """Split the rows of `patterns` (n, T) into `clusters` groups of exactly n / clusters rows."""
    from scipy.optimize import linear_sum_assignment

    n = patterns.shape[0]
    size = n // clusters
    gen = torch.Generator().manual_seed(seed)
    centroids = patterns[torch.randperm(n, generator=gen)[:clusters]].clone()
    assignment = None
    for _ in range(iterations):
        distance = torch.cdist(patterns, centroids).square()  # (n, clusters)
        # each cluster offers `size` slots; the cheapest complete matching of neurons to slots
        rows, cols = linear_sum_assignment(distance.repeat_interleave(size, dim=1).double().numpy())
        new = torch.as_tensor(cols[rows.argsort()] // size)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.stack([patterns[assignment == c].mean(0) for c in range(clusters)])
    assert assignment is not None
    return [sorted(torch.nonzero(assignment == c).flatten().tolist()) for c in range(clusters)]


@torch.no_grad()
def carve_model(
    dense: torch.nn.Module,
    batches: list[torch.Tensor],
    experts: int,
    top_k: int,
    shared: int = 0,
    partition: str = "activation",
    iterations: int = 20,
    seed: int = 0,
) -> tuple[torch.nn.Module, CarveRecord]:
    """A mixture of experts carved out of `dense` (family slmkit, moe_weighting unit); see the notes above.

    `partition="random"` keeps the sizes, shared expert and router rule but groups the routed neurons at
    random: the baseline that shows what the clustering buys."""
    from slmkit.compress.calibration import run_until_block
    from slmkit.models import build_model

    config = dense.config
    if config.mlp != "gated":
        raise UserError(
            f"carving splits a gated MLP into experts; this model's mlp is {config.mlp!r}"
            + (" (it is already a mixture of experts)" if config.mlp == "moe" else "")
        )
    if not (experts >= 1 and 1 <= top_k <= experts):
        raise UserError(f"--experts must be >= 1 and --top-k between 1 and --experts, got {experts} and {top_k}")
    routed = config.d_ff - shared
    if shared < 0 or routed < experts or routed % experts:
        raise UserError(
            f"--experts {experts} must divide the MLP width d_ff={config.d_ff} minus --shared {shared} "
            f"({routed}); choose --experts / --shared so that (d_ff - shared) / experts is a whole number"
        )
    if partition not in ("activation", "random"):
        raise ValueError(f"partition must be activation or random, got {partition!r}")
    width = routed // experts
    active = shared + top_k * width
    new_config = config.replace(
        mlp="moe", d_ff=width, moe_experts=experts, moe_top_k=top_k, moe_shared_d_ff=shared, moe_shared_gate=False,
        moe_norm_topk=True, moe_weighting="unit", family="slmkit",
    )  # fmt: skip
    record = CarveRecord(shared=[], experts=[], active_rate=[])
    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.layers):
        mlp = layer.mlp
        patterns: list[torch.Tensor] = []

        def capture(h: torch.Tensor, patterns: list[torch.Tensor] = patterns) -> None:
            magnitude = h.float().abs()  # (tokens, d_ff)
            top = magnitude.topk(active, dim=-1).indices
            patterns.append(torch.zeros_like(magnitude, dtype=torch.bool).scatter_(1, top, True))

        run_until_block(dense, i, batches, {"mlp.down_proj": capture})
        pattern = torch.cat(patterns).T.float()  # (d_ff, tokens): each neuron's 0/1 activation pattern
        rate = pattern.mean(1)
        order = torch.argsort(rate, descending=True, stable=True)
        shared_idx = sorted(order[:shared].tolist())
        rest = order[shared:]
        if partition == "random":
            perm = rest[torch.randperm(len(rest), generator=gen)]
            groups = [sorted(perm[e * width : (e + 1) * width].tolist()) for e in range(experts)]
        else:
            local = _balanced_kmeans(pattern[rest], experts, iterations, seed + i)
            groups = [sorted(rest[g].tolist()) for g in local]
        record.shared.append(shared_idx)
        record.experts.append(groups)
        record.active_rate.append(float(rate[order[:shared]].mean()) if shared else 0.0)

        prefix = f"layers.{i}.mlp."
        router = []
        for e, group in enumerate(groups):
            rows = mlp.gate_proj.weight[group].float()
            row = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
            router.append(row / row.norm().clamp_min(1e-12))
            _copy_neurons(state, f"{prefix}experts.{e}.", mlp, group, experts_sharing_bias=0 if shared else top_k)
        state[f"{prefix}gate.weight"] = torch.stack(router).to(mlp.gate_proj.weight.dtype)
        if shared:
            _copy_neurons(state, f"{prefix}shared_expert.", mlp, shared_idx, experts_sharing_bias=1)
    model = build_model(new_config)
    model.load_state_dict(state, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), record


def _copy_neurons(state: dict, prefix: str, mlp: torch.nn.Module, neurons: list[int], experts_sharing_bias: int):
    """The gated MLP restricted to `neurons`, under `prefix`. down_proj's bias (if any) must be added once per
    token: by the shared expert alone (experts_sharing_bias=1), else split over the k experts every token uses
    (each k-th of it; 0: none, the shared expert has it)."""
    index = torch.tensor(neurons)
    for name in ("gate_proj", "up_proj"):
        linear = getattr(mlp, name)
        state[f"{prefix}{name}.weight"] = linear.weight[index].clone()
        if linear.bias is not None:
            state[f"{prefix}{name}.bias"] = linear.bias[index].clone()
    state[f"{prefix}down_proj.weight"] = mlp.down_proj.weight[:, index].clone()
    if mlp.down_proj.bias is not None:
        bias = mlp.down_proj.bias
        share = bias / experts_sharing_bias if experts_sharing_bias else torch.zeros_like(bias)
        state[f"{prefix}down_proj.bias"] = share
