"""Mixing laws: a domain's validation loss as a function of the training mixture, fitted on proxy runs.

Two laws, both fitted on (mixture, loss) pairs of small proxy runs (RegMix, Liu et al. 2024: many tiny runs on
random mixtures, a regression, the best mixture predicted from it):

* ``exp`` (Data Mixing Laws, Ye et al. 2024): ``L(r) = c + k * exp(sum_j t_j r_j)``. Since the shares sum to 1,
  ``k * exp(t . r) = exp(sum_j (t_j + log k) r_j)``: only ``u = t + log k`` is identifiable, and the fit reports
  ``k = exp(mean(u))`` and ``t = u - mean(u)`` (the ``t`` that sum to 0). It is fitted by profiling ``c`` (for a
  fixed ``c``, ``log(L - c)`` is linear in ``r``) and then refining all parameters with least squares. Being
  monotone in one linear score, its best mixture is always a single domain; it fits how loss falls with a
  domain's share, and says which domain helps most.
* ``quadratic`` (Scheffe's quadratic mixture model, a RegMix-style regression with interactions):
  ``L(r) = sum_j b_j r_j + sum_{j<l} b_jl r_j r_l``, linear least squares with a small ridge. Its optimum can lie
  inside the simplex, where domains help each other.

``auto`` picks the law with the smaller leave-one-out error. The best mixture is searched over many Dirichlet
samples of the simplex plus its vertices (as RegMix does), and its uncertainty comes from refitting on
bootstrap resamples of the proxies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from slmkit.errors import UserError

LAWS = ("auto", "exp", "quadratic")
_RIDGE = 1e-6


@dataclass
class MixingLaw:
    """A fitted law: `predict(R)` takes mixtures (n, k) and returns losses (n,)."""

    kind: str  # "exp" or "quadratic"
    params: dict[str, Any]
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    rmse: float = float("nan")  # on the points it was fitted to
    loo_rmse: float | None = None  # leave-one-out, when computed

    def summary(self) -> dict[str, Any]:
        return {"law": self.kind, "params": self.params, "rmse": self.rmse, "loo_rmse": self.loo_rmse}


def _check(mixtures: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(mixtures, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if r.ndim != 2 or y.shape != (r.shape[0],):
        raise ValueError("mixtures must be (n, k) and losses (n,)")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(y))):
        raise UserError("mixing law: the proxies' mixtures and losses must be finite numbers")
    return r, y


def _exp_predict(c: float, u: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda r: c + np.exp(np.asarray(r, dtype=np.float64) @ u)


def fit_exp(mixtures: np.ndarray, losses: np.ndarray) -> MixingLaw:
    """The Data Mixing Laws form ``c + k exp(t . r)`` (see the module docstring for the gauge of ``t``)."""
    from scipy.optimize import least_squares

    r, y = _check(mixtures, losses)
    n, k = r.shape
    if n < min_proxies("exp", k) - 1:
        raise UserError(f"mixing law 'exp' needs at least {k + 1} points for {k} domains, got {n}")
    spread = float(y.max() - y.min()) or 1.0

    def u_for(c: float) -> np.ndarray:
        u, *_ = np.linalg.lstsq(r, np.log(y - c), rcond=None)
        return u

    def residual(theta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # a wild trial step; the optimiser backs off
            return theta[0] + np.exp(r @ theta[1:]) - y

    def profile(c: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.sum((c + np.exp(r @ u_for(c)) - y) ** 2))

    # profile c below the smallest loss (log(L - c) is linear in r for fixed c: cheap), then refine everything
    # from the best few starting points
    gaps = np.geomspace(1e-3, 100.0, 30)
    starts = sorted(gaps, key=lambda gap: profile(float(y.min() - gap * spread)))[:3]
    best = None
    for gap in starts:
        c0 = float(y.min() - gap * spread)
        theta0 = np.concatenate([[c0], u_for(c0)])
        try:
            fit = least_squares(residual, theta0, method="lm", max_nfev=400)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(fit.x)) and (best is None or fit.cost < best.cost):
            best = fit
    if best is None:
        raise UserError("mixing law 'exp' could not be fitted to the proxies' losses")
    c, u = float(best.x[0]), best.x[1:]
    predict = _exp_predict(c, u)
    log_k = float(u.mean())
    params = {"c": c, "k": float(np.exp(log_k)), "t": (u - log_k).tolist()}
    rmse = float(np.sqrt(np.mean((predict(r) - y) ** 2)))
    return MixingLaw("exp", params, predict, rmse)


def _quadratic_features(r: np.ndarray) -> np.ndarray:
    k = r.shape[1]
    pairs = [r[:, i] * r[:, j] for i, j in combinations(range(k), 2)]
    return np.column_stack([r, *pairs]) if pairs else r


def fit_quadratic(mixtures: np.ndarray, losses: np.ndarray) -> MixingLaw:
    """Scheffe's quadratic mixture model ``sum_j b_j r_j + sum_{j<l} b_jl r_j r_l`` (least squares, tiny ridge)."""
    r, y = _check(mixtures, losses)
    n, k = r.shape
    x = _quadratic_features(r)
    if n < x.shape[1]:
        raise UserError(f"mixing law 'quadratic' needs at least {x.shape[1]} points for {k} domains, got {n}")
    scale = float(np.mean(x**2))
    b = np.linalg.solve(x.T @ x + _RIDGE * scale * n * np.eye(x.shape[1]), x.T @ y)

    def predict(m: np.ndarray) -> np.ndarray:
        return _quadratic_features(np.atleast_2d(np.asarray(m, dtype=np.float64))) @ b

    pairs = {f"{i},{j}": float(b[k + p]) for p, (i, j) in enumerate(combinations(range(k), 2))}
    rmse = float(np.sqrt(np.mean((predict(r) - y) ** 2)))
    return MixingLaw("quadratic", {"linear": b[:k].tolist(), "pairs": pairs}, predict, rmse)


_FITTERS = {"exp": fit_exp, "quadratic": fit_quadratic}


def min_proxies(kind: str, k: int) -> int:
    """Fewest proxies law `kind` needs over `k` domains: one per parameter, plus one for the leave-one-out error
    (`auto`: the fewest any law needs)."""
    if kind == "auto":
        return min(min_proxies(name, k) for name in _FITTERS)
    parameters = k + 1 if kind == "exp" else k + k * (k - 1) // 2
    return parameters + 1


def check_proxies(kind: str, k: int, n: int) -> None:
    """UserError unless `n` proxies are enough for law `kind` over `k` domains."""
    need = min_proxies(kind, k)
    if n < need:
        raise UserError(
            f"the {kind} mixing law over {k} domains needs at least {need} proxies, got {n}; raise --proxies"
            + (" or use --law exp" if kind == "quadratic" else "")
        )


def loo_rmse(kind: str, mixtures: np.ndarray, losses: np.ndarray) -> float:
    """Leave-one-out root mean squared error of law `kind` (each proxy predicted by a fit without it)."""
    r, y = _check(mixtures, losses)
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        law = _FITTERS[kind](r[keep], y[keep])
        errors.append(float(law.predict(r[i : i + 1])[0] - y[i]))
    return float(np.sqrt(np.mean(np.square(errors))))


def fit_law(mixtures: np.ndarray, losses: np.ndarray, kind: str = "auto") -> MixingLaw:
    """Fit law `kind`; `auto` fits every law that has enough proxies and keeps the smallest leave-one-out error."""
    if kind not in LAWS:
        raise UserError(f"unknown mixing law {kind!r}; choose one of {', '.join(LAWS)}")
    check_proxies(kind, np.shape(mixtures)[1], len(losses))
    kinds = list(_FITTERS) if kind == "auto" else [kind]
    fitted: list[MixingLaw] = []
    problems = []
    for name in kinds:
        if len(losses) < min_proxies(name, np.shape(mixtures)[1]):
            continue  # auto: too few proxies for this law
        try:
            law = _FITTERS[name](mixtures, losses)
            law.loo_rmse = loo_rmse(name, mixtures, losses)
        except UserError as exc:
            if kind != "auto":
                raise
            problems.append(str(exc))
            continue
        fitted.append(law)
    if not fitted:
        raise UserError("; ".join(problems))
    return min(fitted, key=lambda law: law.loo_rmse if law.loo_rmse is not None else np.inf)


def simplex_candidates(k: int, count: int = 20000, seed: int = 0) -> np.ndarray:
    """Mixtures to search: the vertices, the uniform mixture, every pair's midpoint and Dirichlet(1) samples."""
    rng = np.random.default_rng(seed)
    eye = np.eye(k)
    midpoints = [(eye[i] + eye[j]) / 2 for i, j in combinations(range(k), 2)]
    fixed = [eye, np.full((1, k), 1 / k), *([np.array(midpoints)] if midpoints else [])]
    return np.vstack([*fixed, rng.dirichlet(np.ones(k), size=count)])


def best_mixture(law: MixingLaw, candidates: np.ndarray) -> tuple[np.ndarray, float]:
    """The candidate mixture with the lowest predicted loss, and that loss."""
    predicted = law.predict(candidates)
    i = int(np.argmin(predicted))
    return candidates[i], float(predicted[i])


@dataclass
class MixtureChoice:
    """The predicted best mixture, with bootstrap spread over the proxies."""

    law: MixingLaw
    mixture: np.ndarray  # (k,)
    predicted_loss: float
    share_std: np.ndarray  # (k,) standard deviation of the best mixture over bootstrap refits
    loss_interval: tuple[float, float]  # 5% and 95% of the refits' predicted loss at `mixture`
    bootstrap_mixtures: np.ndarray  # (b, k)

    def predict(self, mixture: np.ndarray) -> float:
        return float(self.law.predict(np.atleast_2d(mixture))[0])


def choose_mixture(
    mixtures: np.ndarray,
    losses: np.ndarray,
    kind: str = "auto",
    bootstrap: int = 100,
    seed: int = 0,
    candidates: np.ndarray | None = None,
) -> MixtureChoice:
    """Fit a law, find its best mixture, and refit on `bootstrap` resamples of the proxies for the spread."""
    r, y = _check(mixtures, losses)
    law = fit_law(r, y, kind)
    if candidates is None:
        candidates = simplex_candidates(r.shape[1], seed=seed)
    mixture, predicted = best_mixture(law, candidates)
    rng = np.random.default_rng(seed + 1)
    picks, at_choice = [], []
    for _ in range(bootstrap):
        sample = rng.integers(0, len(y), len(y))
        try:
            refit = _FITTERS[law.kind](r[sample], y[sample])
        except (UserError, np.linalg.LinAlgError):
            continue  # a resample with too few distinct proxies
        picks.append(best_mixture(refit, candidates)[0])
        at_choice.append(float(refit.predict(mixture[None])[0]))
    spread = np.array(picks) if picks else np.zeros((0, r.shape[1]))
    share_std = spread.std(axis=0) if picks else np.full(r.shape[1], np.nan)
    interval = (
        (float(np.quantile(at_choice, 0.05)), float(np.quantile(at_choice, 0.95)))
        if at_choice
        else (
            float("nan"),
            float("nan"),
        )
    )
    return MixtureChoice(law, mixture, predicted, share_std, interval, spread)
