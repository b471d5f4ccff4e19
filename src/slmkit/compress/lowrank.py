"""Low-rank factorization: W (N, K) ~= U (N, r) @ V (r, K) by truncated SVD, r chosen per layer.

The rank of each block linear layer is the smallest that keeps `energy` of its squared singular values
(sum of s_i^2); a layer whose factors would not be smaller than W stays dense. Factored layers load as
`LowRankLinear` (two thin matmuls), so the parameter count, file and compute all shrink.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slmkit.compress.targets import linear_names
from slmkit.errors import UserError
from slmkit.models.quantized import FORMAT_VERSION


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    cumulative = torch.cumsum(singular_values.double().pow(2), 0)
    total = float(cumulative[-1])
    if total == 0:
        return 1
    return int(torch.searchsorted(cumulative / total, torch.tensor(energy, dtype=torch.float64)).item()) + 1


@torch.no_grad()
def factorize_model(model: nn.Module, energy: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Phase 1 for low-rank: a state dict with weight_u/weight_v for the factored layers, and the spec."""
    if not (0 < energy < 1):
        raise UserError(f"--energy must be in (0, 1) (the share of squared singular values kept), got {energy}")
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    factored, ranks = [], {}
    for name in linear_names(model.config):
        w = state[name + ".weight"]
        n, k = w.shape
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = min(rank_for_energy(s, energy), len(s))
        if r * (n + k) >= n * k:
            continue  # factors would not be smaller than the matrix
        del state[name + ".weight"]
        state[name + ".weight_u"] = (u[:, :r] * s[:r]).contiguous()
        state[name + ".weight_v"] = vh[:r].contiguous()
        factored.append(name)
        ranks[name] = r
    if not factored:
        raise UserError(
            f"no layer has a rank-{energy} factorization smaller than the layer itself; lower --energy (e.g. 0.8)"
        )
    spec = {
        "quant_method": "slmkit",
        "format_version": FORMAT_VERSION,
        "method": "lowrank",
        "energy": energy,
        "modules": factored,
        "ranks": ranks,
    }
    return state, spec
