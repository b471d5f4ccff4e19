"""Fit the parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta to ladder rungs.

Chinchilla "approach 3" (Hoffmann et al. 2022), with the replication's caveats (Besiroglu et al. 2024):
minimise a Huber loss (delta = 1e-3) of the residuals between log L and
log-sum-exp(a - alpha log N, b - beta log D, e), with E = exp(e), A = exp(a), B = exp(b); run L-BFGS to
convergence (no early stopping: gradient tolerance 1e-12, no function tolerance, a large iteration cap)
from a grid of starting points, keep the best, and report the parameters unrounded. Confidence intervals
come from a nonparametric bootstrap over rungs.

N is the model's non-embedding parameter count, D the training tokens, C the training FLOPs the trainer
counted (``ModelConfig.flops_per_token`` times tokens). Everything here is numpy/scipy; no torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
N_PARAMS = len(PARAM_NAMES)
HUBER_DELTA = 1e-3
# Chinchilla's grid (their appendix D.2): e in {-1, -.5, ..., 1}, a and b in {0, 5, ..., 25},
# alpha and beta in {0, .5, ..., 2}.
GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
REQUIRED_FIELDS = ("params", "tokens", "flops", "val_loss")


# ---- rungs ----------------------------------------------------------------------------------------
@dataclass
class Rungs:
    """Measured points of a ladder (arrays of equal length)."""

    params: np.ndarray  # N, non-embedding parameters
    tokens: np.ndarray  # D
    flops: np.ndarray  # C
    loss: np.ndarray  # final validation loss, nats/token
    names: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, index: np.ndarray | Sequence[int]) -> Rungs:
        index = np.asarray(index)
        return Rungs(
            self.params[index],
            self.tokens[index],
            self.flops[index],
            self.loss[index],
            [self.names[i] for i in index],
            [self.records[i] for i in index] if self.records else [],
        )


def ladder_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "ladder.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no ladder results found; run `slm ladder` first or give a ladder.jsonl file")
    return path


def load_rungs(path: str | Path) -> Rungs:
    """Rungs from a ladder dir or a ladder.jsonl; rejects missing or non-finite values and mixed data."""
    path = ladder_file(path)
    records = []
    raw = path.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeError("it holds NUL bytes")
        text = raw.decode("utf-8")
    except UnicodeError as exc:
        raise UserError(
            f"{path}: not a ladder.jsonl (binary or not UTF-8 text: {exc}); give the ladder dir or its ladder.jsonl"
        ) from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_no}: expected a JSON object per line")
        record.setdefault("name", f"line {line_no}")
        for key in REQUIRED_FIELDS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"{path}:{line_no} (rung {record['name']}): missing or non-numeric {key!r}")
            if not math.isfinite(value) or value <= 0:
                raise UserError(
                    f"{path}:{line_no} (rung {record['name']}): {key} must be a finite positive number, got {value}; "
                    "a rung that diverged cannot be fitted: delete its line and re-run it (slm ladder resumes)"
                )
        records.append(record)
    check_same_data(records, str(path))
    return rungs_from_records(records)


def check_same_data(records: list[dict[str, Any]], source: str) -> None:
    for key, what in (("data_fingerprint", "data"), ("tokenizer_sha256", "tokenizer"), ("seq_len", "context length")):
        values = {json.dumps(r.get(key)) for r in records}
        if len(values) > 1:
            by_value: dict[str, list[str]] = {}
            for r in records:
                by_value.setdefault(json.dumps(r.get(key)), []).append(str(r["name"]))
            detail = "; ".join(f"{v}: {', '.join(names[:3])}" for v, names in by_value.items())
            raise UserError(
                f"{source}: rungs were trained with different {what} ({key} differs: {detail}); "
                "a law fitted across them would be meaningless: keep the rungs of one ladder only"
            )


def rungs_from_records(records: list[dict[str, Any]]) -> Rungs:
    return Rungs(
        params=np.array([float(r["params"]) for r in records]),
        tokens=np.array([float(r["tokens"]) for r in records]),
        flops=np.array([float(r["flops"]) for r in records]),
        loss=np.array([float(r["val_loss"]) for r in records]),
        names=[str(r.get("name", i)) for i, r in enumerate(records)],
        records=records,
    )


def check_fittable(rungs: Rungs, what: str = "the ladder") -> None:
    if len(rungs) < N_PARAMS + 1:
        raise UserError(
            f"{what} has {len(rungs)} rung(s); fitting the {N_PARAMS} parameters of L(N, D) = E + A/N^alpha + "
            f"B/D^beta needs at least {N_PARAMS + 1}: run a larger ladder (more --sizes or a larger budget)"
        )
    if len(np.unique(rungs.params)) < 2 or len(np.unique(rungs.tokens)) < 2:
        raise UserError(
            f"{what} needs at least two model sizes and two token counts to separate the N and D terms of the law"
        )


# ---- the law --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, params: Any, tokens: Any) -> Any:
        with np.errstate(over="ignore"):  # a bootstrap refit may have a huge exponent; inf is the answer
            return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def to_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARAM_NAMES}

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> Law:
        e, a, b, alpha, beta = (float(x) for x in theta)
        return cls(math.exp(e), math.exp(a), math.exp(b), alpha, beta)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    e, a, b, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    lse = top + np.log(total)
    weights /= total
    r = lse - log_l
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))
    grad = np.array(
        [
            (dr * weights[2]).sum(),
            (dr * weights[0]).sum(),
            (dr * weights[1]).sum(),
            -(dr * weights[0] * log_n).sum(),
            -(dr * weights[1] * log_d).sum(),
        ]
    )
    return value, grad


def _grid_values(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Objective at every grid point at once (to order the starts)."""
    e, a, b, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    lse = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
    r = np.abs(lse - log_l)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)


# Exponents are kept in [0, 10]: a negative one (loss growing with N or D) is not a scaling law, and
# tiny, badly undertrained ladders can otherwise fit one. e, a, b (logs of E, A, B) get wide bounds that
# only keep exp() finite; a fit that ends on a bound is degenerate, and the summary says so.
# In the order of theta: log E, log A, log B, alpha, beta.
PARAM_BOUNDS = [(-20.0, 10.0), (-20.0, 80.0), (-20.0, 80.0), (0.0, 10.0), (0.0, 10.0)]
_GRID_POINTS = np.array(list(itertools.product(GRID["e"], GRID["a"], GRID["b"], GRID["alpha"], GRID["beta"])))


def grid_starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, per_cell: int = 1, best: int = 8):
    """Starting points from the grid: the best `per_cell` in each (alpha, beta) cell, so every pair of
    exponents is tried (the fit has poor local minima where one term vanishes), plus the `best` overall."""
    values = _grid_values(_GRID_POINTS, log_n, log_d, log_l, HUBER_DELTA)
    order = np.argsort(values, kind="stable")
    chosen: list[int] = list(order[:best])
    cells: dict[tuple[float, float], int] = {}
    for i in order:
        key = (_GRID_POINTS[i, 3], _GRID_POINTS[i, 4])
        if cells.get(key, 0) < per_cell:
            cells[key] = cells.get(key, 0) + 1
            chosen.append(int(i))
    return _GRID_POINTS[sorted(set(chosen), key=chosen.index)]


def fit_law(
    params: np.ndarray,
    tokens: np.ndarray,
    loss: np.ndarray,
    starts: int | None = None,
    extra_starts: Sequence[np.ndarray] = (),
    delta: float = HUBER_DELTA,
) -> tuple[Law, float, np.ndarray]:
    """Best (law, objective, theta) over L-BFGS runs from grid starting points.

    `starts=None`: one start per (alpha, beta) grid cell plus the 8 best grid points; `starts=k`: the k
    best grid points only (for bootstrap refits, which also start from the full fit's optimum).
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    if starts is None:
        grid = grid_starts(log_n, log_d, log_l)
    else:
        order = np.argsort(_grid_values(_GRID_POINTS, log_n, log_d, log_l, delta), kind="stable")
        grid = _GRID_POINTS[order[:starts]]
    candidates = list(grid) + [np.asarray(x, dtype=float) for x in extra_starts]
    best_value, best_theta = math.inf, None
    # BLAS threads only slow these tiny problems down (badly so on a busy machine)
    with threadpool_limits(1), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for theta0 in candidates:
            result = minimize(
                _objective,
                theta0,
                args=(log_n, log_d, log_l, delta),
                jac=True,
                method="L-BFGS-B",
                bounds=PARAM_BOUNDS,
                options={"maxiter": 20000, "maxfun": 40000, "ftol": 0.0, "gtol": 1e-12},
            )
            if np.all(np.isfinite(result.x)) and math.isfinite(result.fun) and result.fun < best_value:
                best_value, best_theta = float(result.fun), result.x
    if best_theta is None:
        raise UserError("the scaling-law fit failed from every starting point; check the ladder's losses")
    return Law.from_theta(best_theta), best_value, best_theta


# ---- the full analysis ---------------------------------------------------------------------------
@dataclass
class FitResult:
    law: Law
    objective: float
    theta: np.ndarray
    rungs: Rungs
    bootstrap: list[Law]  # refits on resampled rungs
    ci_level: float
    flops_model: tuple[float, float]  # C/D = k * N^gamma, fitted on the rungs
    holdout: dict[str, Any] | None
    starts: int
    extrapolation: dict[str, Any] | None = None  # extrapolation_check(rungs), when analyse ran it

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        tail = (1 - self.ci_level) / 2 * 100
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        return float(low), float(high)

    def confidence_intervals(self) -> dict[str, tuple[float, float]]:
        return {k: self.interval(np.array([getattr(law, k) for law in self.bootstrap])) for k in PARAM_NAMES}

    def predict(self, params: float, tokens: float) -> tuple[float, float, float]:
        """Predicted loss and its bootstrap interval at (N, D)."""
        samples = np.array([law(params, tokens) for law in self.bootstrap])
        low, high = self.interval(samples) if len(samples) else (math.nan, math.nan)
        return float(self.law(params, tokens)), low, high

    def predict_far(self, params: float, tokens: float, flops: float) -> tuple[float, float, float]:
        """Predicted loss at (N, D) and an interval that also covers extrapolation in compute: the bootstrap
        interval, widened to loss * exp(+-w), w = the ladder's own error per log of compute beyond its rungs
        (`extrapolation_check`) times log(flops / the top rung's flops). Without a check (too few rungs to hold
        out a level) or inside the ladder's compute range it is the bootstrap interval."""
        loss, low, high = self.predict(params, tokens)
        w = extrapolation_width(self.extrapolation, float(self.rungs.flops.max()), flops)
        if w > 0:
            low, high = min(low, loss * math.exp(-w)), max(high, loss * math.exp(w))
        return loss, low, high

    def flops_per_token(self, params: Any) -> Any:
        k, gamma = self.flops_model
        return k * np.power(params, gamma)

    def to_dict(self) -> dict[str, Any]:
        ci = self.confidence_intervals()
        out: dict[str, Any] = dict(self.law.to_dict())
        out["confidence_intervals"] = {k: list(v) for k, v in ci.items()}
        out["ci_level"] = self.ci_level
        out["bootstrap_samples"] = len(self.bootstrap)
        out["huber_delta"] = HUBER_DELTA
        out["objective"] = self.objective
        out["lbfgs_starts"] = self.starts
        out["rungs"] = len(self.rungs)
        out["params_definition"] = "non-embedding parameters"
        out["flops_per_token_model"] = {"k": self.flops_model[0], "gamma": self.flops_model[1]}
        out["holdout"] = self.holdout
        out["holdout_relative_error"] = self.holdout["relative_error"] if self.holdout else None
        out["extrapolation"] = self.extrapolation
        return out


def largest_rung(rungs: Rungs) -> int:
    """The biggest model of the top compute level (rungs within 10% of the largest compute), i.e. the
    run a ladder is meant to predict."""
    top = np.flatnonzero(rungs.flops >= 0.9 * rungs.flops.max())
    return int(top[np.lexsort((rungs.flops[top], rungs.params[top]))[-1]])


def top_level(rungs: Rungs) -> np.ndarray:
    """Indices of the rungs of the top compute level: the ladder's `level` field when every rung has one, else the
    rungs within 10% of the largest compute."""
    levels = [r.get("level") for r in rungs.records] if rungs.records else []
    if levels and all(isinstance(v, int) for v in levels):
        return np.flatnonzero(np.array(levels) == max(levels))
    return np.flatnonzero(rungs.flops >= 0.9 * rungs.flops.max())


def extrapolation_check(rungs: Rungs, starts: int | None = None) -> dict[str, Any] | None:
    """How wrong the law gets when it extrapolates in compute, measured on the ladder itself: refit without the
    top compute level and predict its rungs. `per_log_compute` = rms of log(predicted / measured) over those
    rungs divided by log(their largest compute / the largest compute left in the fit); None when the rest cannot
    be fitted (too few rungs, sizes or token counts)."""
    held = top_level(rungs)
    rest = rungs.subset([i for i in range(len(rungs)) if i not in set(held.tolist())])
    if len(held) == 0 or len(rest) < N_PARAMS + 1 or len(np.unique(rest.params)) < 2 or len(np.unique(rest.tokens)) < 2:
        return None
    distance = math.log(float(rungs.flops[held].max()) / float(rest.flops.max()))
    if distance <= 0:
        return None
    law, _, _ = fit_law(rest.params, rest.tokens, rest.loss, starts=starts)
    errors = np.log(law(rungs.params[held], rungs.tokens[held]) / rungs.loss[held])
    rms = float(np.sqrt(np.mean(errors**2)))
    return {
        "rungs": [rungs.names[i] for i in held],
        "log_errors": [float(e) for e in errors],
        "rms_log_error": rms,
        "log_distance": distance,
        "per_log_compute": rms / distance,
    }


def extrapolation_width(check: dict[str, Any] | None, top_flops: float, flops: float) -> float:
    """Half-width, in log loss, of `FitResult.predict_far`'s widening at `flops` (0 inside the ladder's range)."""
    if not check or not flops > top_flops:
        return 0.0
    return float(check["per_log_compute"]) * math.log(flops / top_flops)


def fit_flops_model(rungs: Rungs) -> tuple[float, float]:
    """C/D = k N^gamma by least squares in log space (exactly 6N-like when gamma = 1)."""
    per_token = rungs.flops / rungs.tokens
    if len(np.unique(rungs.params)) < 2:
        return float(np.median(per_token / rungs.params)), 1.0
    gamma, log_k = np.polyfit(np.log(rungs.params), np.log(per_token), 1)
    return float(math.exp(log_k)), float(gamma)


def analyse(
    rungs: Rungs,
    bootstrap: int = 100,
    ci_level: float = 0.95,
    starts: int | None = None,
    bootstrap_starts: int = 2,
    holdout: bool = True,
    seed: int = 0,
    extrapolation: bool = False,
) -> FitResult:
    """Fit the law, bootstrap it, and check it by predicting the largest-compute rung from the others.

    Bootstrap refits start from the full fit's optimum (plus the `bootstrap_starts` best grid points) and
    run L-BFGS to convergence like the main fit; the held-out fit uses the full grid of starts.
    """
    check_fittable(rungs)
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {bootstrap}")
    if not 0 < ci_level < 1:
        raise UserError(f"--ci must be in (0, 1), got {ci_level}")
    law, objective, theta = fit_law(rungs.params, rungs.tokens, rungs.loss, starts=starts)
    rng = np.random.default_rng(seed)
    laws: list[Law] = []
    n = len(rungs)
    while len(laws) < bootstrap:
        index = rng.integers(0, n, n)
        sample = rungs.subset(index)
        if len(np.unique(sample.params)) < 2 or len(np.unique(sample.tokens)) < 2:
            continue
        boot, _, _ = fit_law(sample.params, sample.tokens, sample.loss, starts=bootstrap_starts, extra_starts=[theta])
        laws.append(boot)
    held = None
    if holdout and n - 1 >= N_PARAMS + 1:
        largest = largest_rung(rungs)
        rest = rungs.subset([i for i in range(n) if i != largest])
        if len(np.unique(rest.params)) >= 2 and len(np.unique(rest.tokens)) >= 2:
            held_law, _, _ = fit_law(rest.params, rest.tokens, rest.loss, starts=starts)
            predicted = float(held_law(rungs.params[largest], rungs.tokens[largest]))
            actual = float(rungs.loss[largest])
            held = {
                "rung": rungs.names[largest],
                "params": float(rungs.params[largest]),
                "tokens": float(rungs.tokens[largest]),
                "flops": float(rungs.flops[largest]),
                "predicted_loss": predicted,
                "actual_loss": actual,
                "relative_error": (predicted - actual) / actual,
                "law": held_law.to_dict(),
            }
    return FitResult(
        law=law,
        objective=objective,
        theta=theta,
        rungs=rungs,
        bootstrap=laws,
        ci_level=ci_level,
        flops_model=fit_flops_model(rungs),
        holdout=held,
        extrapolation=extrapolation_check(rungs, starts=starts) if extrapolation else None,
        starts=len(grid_starts(np.log(rungs.params), np.log(rungs.tokens), np.log(rungs.loss)))
        if starts is None
        else starts,
    )


# ---- compute-optimal frontier and inference-aware optimum -----------------------------------------
_LOG_N_BOUNDS = (math.log(1e2), math.log(1e13))


def search_bounds(fit: FitResult) -> tuple[float, float]:
    """log N range of optimisation: from a tenth of the smallest rung (the FLOPs-per-token model is not
    trusted further down) to 1e13."""
    return max(_LOG_N_BOUNDS[0], math.log(fit.rungs.params.min() / 10)), _LOG_N_BOUNDS[1]


def optimal_for_compute(fit: FitResult, flops: float, law: Law | None = None) -> dict[str, float]:
    """N*(C), D*(C) and the loss there: minimise L(N, C / flops_per_token(N)) over N."""
    from scipy.optimize import minimize_scalar

    law = law or fit.law

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return float(law(n, flops / fit.flops_per_token(n)))

    grid = np.linspace(*search_bounds(fit), 400)
    values = [loss_at(x) for x in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    result = minimize_scalar(loss_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(result.x)
    d = flops / fit.flops_per_token(n)
    return {"flops": flops, "params": n, "tokens": d, "tokens_per_param": d / n, "loss": loss_at(result.x)}


def frontier(fit: FitResult, flops_levels: Sequence[float]) -> list[dict[str, float]]:
    rows = []
    for c in flops_levels:
        row = optimal_for_compute(fit, c)
        samples = [optimal_for_compute(fit, c, law) for law in fit.bootstrap]
        if samples:
            row["params_interval"] = fit.interval(np.array([s["params"] for s in samples]))
            row["loss_interval"] = fit.interval(np.array([s["loss"] for s in samples]))
        rows.append(row)
    return rows


def default_flops_levels(fit: FitResult, count: int = 5) -> list[float]:
    top = float(fit.rungs.flops.max())
    return [top * 10.0**k for k in range(-1, count - 1)]


def inference_aware(fit: FitResult, target_loss: float, inference_tokens: float) -> dict[str, Any]:
    """Smallest training + inference FLOPs reaching `target_loss` when the model will then predict
    `inference_tokens` tokens (Sardana et al. 2024, "Beyond Chinchilla-optimal"); inference costs a
    forward pass, a third of the training FLOPs per token. Compared with the compute-optimal model
    for the same loss (which ignores inference)."""
    from scipy.optimize import minimize_scalar

    law = fit.law
    if not target_loss > law.E:
        raise UserError(
            f"target loss {target_loss} is not above the fitted irreducible loss E = {law.E:.4f}; "
            "no model reaches it: choose a higher --target-loss"
        )
    if inference_tokens < 0:
        raise UserError(f"--inference-tokens must be >= 0, got {inference_tokens}")
    if law.beta <= 0:
        raise UserError("the fitted law has no data term (beta = 0), so no token count reaches a target loss")
    log_n_min = math.log(law.A / (target_loss - law.E)) / law.alpha if law.alpha > 0 else _LOG_N_BOUNDS[0]

    def tokens_for(log_n: float) -> float:
        gap = target_loss - law.E - law.A * math.exp(-law.alpha * log_n)
        if gap <= 0 or law.beta <= 0:
            return math.inf
        return math.exp(min((math.log(law.B) - math.log(gap)) / law.beta, 700.0))

    def cost(log_n: float, inference: float) -> float:
        per_token = fit.flops_per_token(math.exp(log_n))
        return per_token * tokens_for(log_n) + per_token / 3 * inference

    def solve(inference: float) -> dict[str, float]:
        lo = max(log_n_min + 1e-9, search_bounds(fit)[0])
        grid = np.linspace(lo + 1e-6, lo + 25, 500)
        values = [cost(x, inference) for x in grid]
        i = int(np.argmin(values))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        x = minimize_scalar(lambda v: cost(v, inference), bounds=(a, b), method="bounded").x
        n, d = math.exp(x), tokens_for(x)
        per_token = float(fit.flops_per_token(n))
        train_flops, inference_flops = per_token * d, per_token / 3 * inference_tokens
        return {
            "params": n,
            "tokens": d,
            "tokens_per_param": d / n,
            "training_flops": train_flops,
            "inference_flops": inference_flops,
            "total_flops": train_flops + inference_flops,
        }

    aware = solve(inference_tokens)
    chinchilla = solve(0.0)
    return {
        "target_loss": target_loss,
        "inference_tokens": inference_tokens,
        "inference_aware": aware,
        "compute_optimal": chinchilla,
        "total_flops_saved": 1 - aware["total_flops"] / chinchilla["total_flops"],
    }
