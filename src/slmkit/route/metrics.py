"""Quality vs share of strong-model calls, RouteLLM's way.

A router is a score per item (higher: send it to the strong model first). At a share k/n of strong calls the
k highest-scored items go to the strong model and the rest to the weak one; the quality at that share is the
mean of the chosen model's per-item quality. The curve runs over k = 0..n, from the weak model alone to the
strong model alone.

- PGR(k) (performance gap recovered) = (quality(k) - weak) / (strong - weak);
- APGR = the area under PGR over the share in [0, 1] (trapezoids over the n + 1 points): 0.5 for a random
  router (the straight line), up to ~1 for a router that finds the items where the strong model wins first;
- CPT(x) (call-performance threshold) = the smallest share of strong calls with PGR >= x;
- AUC = the area under quality itself.

Ties in a score are broken by a fixed random order (so a constant score behaves as a random router, not as
"the first items first"). Intervals are percentile bootstraps over items: each resample draws items with
replacement and recomputes every router's curve and numbers on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GRID = np.linspace(0.0, 1.0, 21)  # shares at which curves are reported (the numbers use every point)


def _order(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in `tiebreak` order; scores (..., n)."""
    return np.lexsort((tiebreak, -scores), axis=-1) if scores.ndim == 1 else _order_rows(scores, tiebreak)


def _order_rows(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    # rank by (-score, tiebreak): a stable argsort of tiebreak order first, then a stable sort by -score
    first = np.argsort(np.broadcast_to(tiebreak, scores.shape), axis=-1, kind="stable")
    by_score = np.argsort(np.take_along_axis(-scores, first, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(first, by_score, axis=-1)


def quality_curve(
    scores: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray, tiebreak: np.ndarray | None = None
) -> np.ndarray:
    """Quality (..., n + 1) at k = 0..n strong calls; scores (..., n) (several routers or resamples at once)."""
    scores = np.asarray(scores, dtype=np.float64)
    q_weak = np.asarray(q_weak, dtype=np.float64)
    q_strong = np.asarray(q_strong, dtype=np.float64)
    n = q_weak.shape[-1]
    if tiebreak is None:
        tiebreak = np.arange(n)
    order = _order(scores, tiebreak)
    gain = np.broadcast_to(q_strong - q_weak, scores.shape)
    gained = np.take_along_axis(gain, order, axis=-1).cumsum(-1)  # (..., n)
    base = q_weak.sum(-1, keepdims=True)
    totals = np.concatenate([np.broadcast_to(base, gained.shape[:-1] + (1,)), base + gained], axis=-1)
    return totals / n


def summarize_curve(curve: np.ndarray, weak: float, strong: float) -> dict[str, float | None]:
    """APGR, CPT(50%), CPT(80%) and AUC of one curve (n + 1 points); APGR/CPT are None without a gap."""
    n = curve.shape[-1] - 1
    shares = np.arange(n + 1) / n
    auc = float(np.trapezoid(curve, shares))
    gap = strong - weak
    if gap <= 0:
        return {"apgr": None, "cpt50": None, "cpt80": None, "auc": auc}
    pgr = (curve - weak) / gap
    out: dict[str, float | None] = {"apgr": float(np.trapezoid(pgr, shares)), "auc": auc}
    for name, level in (("cpt50", 0.5), ("cpt80", 0.8)):
        reached = np.flatnonzero(pgr >= level - 1e-12)
        out[name] = float(shares[reached[0]]) if reached.size else None
    return out


def _grid(curve: np.ndarray) -> np.ndarray:
    n = curve.shape[-1] - 1
    return curve[..., np.rint(GRID * n).astype(int)]


def evaluate_routers(
    routers: dict[str, np.ndarray],
    q_weak: Sequence[float],
    q_strong: Sequence[float],
    random_repeats: int = 32,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Curves and numbers (with bootstrap 95% CIs) of each router's scores (n,), plus `random` (the mean curve of
    `random_repeats` random orders) and `oracle` (the per-item quality gain, which no router beats at any share)."""
    q_weak = np.asarray(q_weak, dtype=np.float64)
    q_strong = np.asarray(q_strong, dtype=np.float64)
    n = q_weak.size
    if n < 2:
        from slmkit.errors import UserError

        raise UserError(f"{n} item(s): routing curves need at least 2 items; give more task items")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n)
    scores: dict[str, np.ndarray] = {"random": rng.random((random_repeats, n))}
    scores.update({name: np.asarray(s, dtype=np.float64) for name, s in routers.items()})
    scores["oracle"] = q_strong - q_weak
    weak, strong = float(q_weak.mean()), float(q_strong.mean())

    def curve_of(name: str, idx: np.ndarray | None) -> np.ndarray:
        s = scores[name]
        if idx is None:
            c = quality_curve(s, q_weak, q_strong, tiebreak)
        else:
            c = quality_curve(s[..., idx], q_weak[idx], q_strong[idx], tiebreak[idx])
        return c.mean(0) if c.ndim == 2 else c

    result: dict[str, Any] = {
        "items": n,
        "weak": weak,
        "strong": strong,
        "shares": GRID.tolist(),
        "resamples": resamples,
        "routers": {},
    }
    curves = {name: curve_of(name, None) for name in scores}
    boot: dict[str, dict[str, list[float]]] = {name: {} for name in scores}
    boot_grid: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    boot_rng = np.random.default_rng(seed + 1)
    pairs = [(a, b) for a in routers for b in ("random", "cascade") if b in scores and a != b]
    differences: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(resamples):
        idx = boot_rng.integers(0, n, size=n)
        w, s = float(q_weak[idx].mean()), float(q_strong[idx].mean())
        for name in scores:
            c = curve_of(name, idx)
            boot_grid[name].append(_grid(c))
            for key, value in summarize_curve(c, w, s).items():
                boot[name].setdefault(key, []).append(np.nan if value is None else value)
        for a, b in pairs:
            differences[(a, b)].append(boot[a]["apgr"][-1] - boot[b]["apgr"][-1])
    for name in scores:
        numbers = summarize_curve(curves[name], weak, strong)
        grid_samples = np.asarray(boot_grid[name])
        entry: dict[str, Any] = {
            "curve": _grid(curves[name]).tolist(),
            "curve_ci95": [np.percentile(grid_samples, 2.5, axis=0).tolist(),
                           np.percentile(grid_samples, 97.5, axis=0).tolist()],
        }  # fmt: skip
        for key, value in numbers.items():
            samples = np.asarray(boot[name][key], dtype=np.float64)
            finite = samples[np.isfinite(samples)]
            ci = [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None
            entry[key] = {"value": value, "ci95": ci}
        result["routers"][name] = entry
    # paired: the same resamples for both routers, so the interval of the difference is much narrower than
    # the two intervals side by side suggest
    result["apgr_differences"] = []
    for (a, b), samples in differences.items():
        arr = np.asarray(samples, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        va, vb = result["routers"][a]["apgr"]["value"], result["routers"][b]["apgr"]["value"]
        result["apgr_differences"].append({
            "router": a,
            "baseline": b,
            "value": None if va is None or vb is None else va - vb,
            "ci95": [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if arr.size else None,
        })  # fmt: skip
    return result
