"""Mixtures of experts made from a dense model: upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling").

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
    if config.mlp != "gated":
        raise UserError(
            f"upcycling copies a gated MLP into experts; this model's mlp is {config.mlp!r}"
            + (" (it is already a mixture of experts)" if config.mlp == "moe" else "")
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


# ---- carving experts out of a dense MLP (CMoE) ----------------------------------------------------------
def expert_width(d_ff: int, experts: int) -> int:
    """Routed experts' default width: d_ff / (E + 1) rounded down to a multiple of 8 (the rest, at least one
    expert's width, is the shared expert)."""
    width = d_ff // (experts + 1)
    return max(width // 8 * 8, 1) if width >= 8 else max(width, 1)


def _activations(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, |act(gate(x)) * up(x)| (tokens, d_ff): what each FFN neuron adds, on the calibration tokens."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [
        block.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).abs().float())
        )
        for i, block in enumerate(model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(parts) for parts in captured]


def _balanced_clusters(features: torch.Tensor, clusters: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Balanced k-means: `features` (n, d) rows into `clusters` groups of exactly `size` (n = clusters x size),
    by cosine similarity; each round assigns the most similar (row, cluster) pairs first while a cluster has room."""
    n = features.shape[0]
    unit = torch.nn.functional.normalize(features, dim=1)
    centroids = unit[torch.randperm(n, generator=gen)[:clusters]]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(12):
        sim = unit @ centroids.T  # (n, clusters)
        order = torch.argsort(sim.flatten(), descending=True)
        room = [size] * clusters
        assignment.fill_(-1)
        left = n
        for flat in order.tolist():
            row, c = divmod(flat, clusters)
            if assignment[row] < 0 and room[c]:
                assignment[row] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
        new = torch.stack([unit[assignment == c].mean(0) for c in range(clusters)])
        new = torch.nn.functional.normalize(new, dim=1)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [torch.nonzero(assignment == c).flatten() for c in range(clusters)]


def carved_model(
    dense: torch.nn.Module,
    batches: list[torch.Tensor],
    experts: int,
    top_k: int,
    shared: int | None = None,
    active_fraction: float = 0.1,
    seed: int = 0,
    random_partition: bool = False,
):
    """CMoE (Pei et al. 2025, "Fast Carving of Mixture-of-Experts"): each layer's FFN neurons split, without
    training, into a shared expert and `experts` routed ones, with a router built from the weights.

    - A neuron is active on a token when it is among that token's `active_fraction` largest |act(gate) * up|;
      the `shared` neurons active most often (on the calibration tokens) form the shared expert.
    - The rest are grouped by co-activation: balanced k-means on their activation patterns over the tokens,
      into equal experts (neurons that fire together end up in the same expert).
    - Router row e is the gate-projection row of expert e's most central neuron: a token goes to the experts whose
      representative neuron it drives hardest.
    - Outputs are added with weight 1 (`moe_weighting: unit`): the FFN is a sum over its neurons, so with every
      expert active (top-k = E) the carved layer is the dense one up to round-off.
    `random_partition` (for comparison): shared and routed neurons drawn at random, same sizes and router rule.
    """
    from slmkit.models import build_model

    config = dense.config
    if config.mlp != "gated":
        raise UserError(f"moe-carve splits a gated MLP into experts; this model's mlp is {config.mlp!r}")
    if config.mlp_bias:
        raise UserError("moe-carve needs an MLP without biases (a down-projection bias would count once per expert)")
    if not (isinstance(experts, int) and experts >= 2 and isinstance(top_k, int) and 1 <= top_k <= experts):
        raise UserError(f"--experts must be >= 2 and --top-k between 1 and --experts, got {experts} and {top_k}")
    width = expert_width(config.d_ff, experts)
    if shared is None:
        shared = config.d_ff - experts * width
    elif not (0 <= shared < config.d_ff) or (config.d_ff - shared) % experts:
        raise UserError(
            f"--shared {shared}: the other {config.d_ff - shared} of the {config.d_ff} FFN neurons must split into "
            f"{experts} equal experts"
        )
    width = (config.d_ff - shared) // experts
    if width < 1:
        raise UserError(f"{config.d_ff} FFN neurons cannot make {experts} experts besides {shared} shared ones")
    if not batches:
        raise UserError("moe-carve groups neurons by their activations on calibration data: pass --data")
    gen = torch.Generator().manual_seed(seed)
    new_config = config.replace(
        mlp="moe", d_ff=width, moe_experts=experts, moe_top_k=top_k, moe_shared_d_ff=shared, moe_shared_gate=False,
        moe_weighting="unit", family="slmkit",
    )  # fmt: skip
    model = build_model(new_config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    partitions = []
    for i, acts in enumerate(_activations(dense, batches)):
        mlp = dense.layers[i].mlp
        k_active = max(1, round(active_fraction * config.d_ff))
        top = acts.topk(k_active, dim=1).indices
        active = torch.zeros_like(acts).scatter_(1, top, 1.0)  # (tokens, d_ff) 0/1
        if random_partition:
            order = torch.randperm(config.d_ff, generator=gen)
            shared_idx, routed = order[:shared], order[shared:]
            groups = [routed[e * width : (e + 1) * width] for e in range(experts)]
        else:
            order = torch.argsort(active.mean(0), descending=True, stable=True)
            shared_idx, routed = order[:shared], order[shared:]
            groups = [routed[g] for g in _balanced_clusters(active[:, routed].T, experts, width, gen)]
        prefix = f"layers.{i}.mlp."
        rows = []
        for e, idx in enumerate(groups):
            idx = idx.sort().values
            state[f"{prefix}experts.{e}.gate_proj.weight"] = mlp.gate_proj.weight[idx]
            state[f"{prefix}experts.{e}.up_proj.weight"] = mlp.up_proj.weight[idx]
            state[f"{prefix}experts.{e}.down_proj.weight"] = mlp.down_proj.weight[:, idx]
            pattern = torch.nn.functional.normalize(active[:, idx].T, dim=1)  # (width, tokens)
            centre = torch.nn.functional.normalize(pattern.mean(0), dim=0)
            rows.append(mlp.gate_proj.weight[idx[int((pattern @ centre).argmax())]])
        state[f"{prefix}gate.weight"] = torch.stack(rows)
        if shared:
            shared_idx = shared_idx.sort().values
            state[f"{prefix}shared_expert.gate_proj.weight"] = mlp.gate_proj.weight[shared_idx]
            state[f"{prefix}shared_expert.up_proj.weight"] = mlp.up_proj.weight[shared_idx]
            state[f"{prefix}shared_expert.down_proj.weight"] = mlp.down_proj.weight[:, shared_idx]
        partitions.append({"shared": shared_idx.tolist(), "experts": [g.sort().values.tolist() for g in groups]})
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    record = {
        "method": "moe-carve",
        "experts": experts,
        "top_k": top_k,
        "expert_width": width,
        "shared_neurons": shared,
        "active_fraction": active_fraction,
        "random_partition": random_partition,
    }
    return model.eval(), record, partitions
