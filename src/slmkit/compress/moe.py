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
