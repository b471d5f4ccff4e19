"""Merge methods, one function each, on the tensors that share one name across the merged models.

Every function takes whole tensors of one parameter (the base's and each model's, same shape) and the
parameters already resolved for that tensor (`slmkit.merge.spec` resolves gradients and filters); it returns
the merged tensor in float32 (float64 when the inputs are). The arithmetic follows the papers, with the choices
mergekit made where a paper leaves one open, so that a mergekit config gives the same model here:

- linear (Wortsman et al. 2022, model soups): sum_i w_i theta_i, divided by sum_i w_i when `normalize`.
- task arithmetic (Ilharco et al. 2023): base + lambda * sum_i w_i (theta_i - base); `normalize` divides the sum
  by sum_i w_i (off by default, as in mergekit).
- TIES (Yadav et al. 2023): each task vector keeps its top-`density` fraction by magnitude (per tensor, at least
  one entry); the weighted, trimmed vectors elect a sign per entry by their sum (a zero sum elects +); the merged
  delta is the mean of the entries whose sign agrees with the elected one ("disjoint mean": each entry is divided
  by the weights of the models that contributed to it, not of all models).
- DARE (Yu et al. 2024): each entry of a task vector is dropped with probability 1 - density and the survivors are
  scaled by 1 / density, so the delta is unchanged in expectation; then task arithmetic (dare_linear) or TIES'
  sign election and disjoint mean (dare_ties). The draws come from a generator seeded per tensor and model, so a
  merge is reproducible whatever order tensors are visited in.
- Model Stock (Jang et al. 2024): with N fine-tuned models and cos the mean pairwise cosine between their deltas
  from the base, the merge interpolates from the base towards their average by t = N cos / (1 + (N - 1) cos);
  per tensor (or per row, `filter_wise`).
- SLERP: spherical interpolation between two models, the angle taken between the whole tensors (flattened); for
  nearly colinear tensors (|cos| > 0.9995) sin(theta) vanishes and linear interpolation takes over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DOT_THRESHOLD = 0.9995  # |cos| above which SLERP falls back to linear interpolation (mergekit's value)


def _work(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """The weighted sum of the models' tensors; with `normalize`, divided by the sum of the weights."""
    total = sum(w * _work(t) for w, t in zip(weights, tensors, strict=True))
    return total / sum(weights) if normalize else total


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the int(density * numel) entries of largest magnitude (at least one), zero the rest."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    # argsort as mergekit ranks them, so that equal magnitudes at the cut are broken the same way
    keep[torch.argsort(flat.abs().float(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE's drop: each entry kept with probability `density`, the kept ones divided by `density` (`rescale`)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    kept = delta / density if rescale else delta
    return torch.where(keep, kept, torch.zeros_like(delta))


def combine_deltas(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """base + lambda * (the weighted deltas summed), the sum over the sign-elected entries only with `consensus`
    (TIES); `normalize` divides each entry by the weights that went into it."""
    stacked = torch.stack([_work(d) for d in deltas])  # (models, *shape)
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = (weighted.sign() == elected).to(stacked.dtype)  # a zero entry agrees with no sign
        merged = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        merged = merged / divisor
    return _work(base) + lam * merged


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """base + lambda * sum_i w_i (theta_i - base)."""
    if not tensors:
        return _work(base)
    deltas = [_work(t) - _work(base) for t in tensors]
    return combine_deltas(base, deltas, weights, consensus=False, normalize=normalize, lam=lam)


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging: trim each delta to its top-density magnitudes, elect signs, disjoint mean."""
    if not tensors:
        return _work(base)
    deltas = [trim(_work(t) - _work(base), d) for t, d in zip(tensors, densities, strict=True)]
    return combine_deltas(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    consensus: bool,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE: drop and rescale each delta, then task arithmetic (dare_linear) or TIES' election (dare_ties)."""
    if not tensors:
        return _work(base)
    deltas = [
        drop(_work(t) - _work(base), d, g, rescale) for t, d, g in zip(tensors, densities, generators, strict=True)
    ]
    return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lam=lam)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the N deltas; the result is
    t * mean(models) + (1 - t) * base. Where 1 + (N - 1) cos is 0 (opposed deltas) there is no finite t and
    the base is kept. `filter_wise`: one t per row (output filter) instead of one per tensor."""
    shape = base.shape
    w0 = _work(base)
    ws = [_work(t) for t in tensors]
    if filter_wise:
        w0 = w0.reshape(1, -1) if w0.dim() <= 1 else w0.reshape(w0.shape[0], -1)
    else:
        w0 = w0.reshape(1, -1)
    ws = [w.reshape(w0.shape) for w in ws]
    deltas = [w - w0 for w in ws]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)  # (rows, 1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) along the great circle between the two tensors'
    directions; linear interpolation when they are nearly colinear (|cos| > dot_threshold)."""
    a, b = _work(v0).reshape(-1), _work(v1).reshape(-1)
    norm_a, norm_b = a.norm(), b.norm()
    eps = 1e-8
    unit_a = a / (norm_a if norm_a > eps else 1)
    unit_b = b / (norm_b if norm_b > eps else 1)
    dot = float((unit_a * unit_b).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(torch.tensor(dot, dtype=a.dtype))
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - t) * theta) / sin_theta
    coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)
