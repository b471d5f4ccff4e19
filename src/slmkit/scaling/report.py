"""`slm scaling fit`: fit a ladder, summarise it (JSON-able), print it, and draw the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.scaling.fit import (
    PARAM_NAMES,
    FitResult,
    analyse,
    default_flops_levels,
    frontier,
    inference_aware,
    ladder_file,
    load_rungs,
)


def fit_ladder(
    path: str | Path,
    bootstrap: int = 100,
    ci_level: float = 0.95,
    plots_dir: str | Path | None = None,
    inference_tokens: float = 1e9,
    target_loss: float | None = None,
    seed: int = 0,
) -> tuple[FitResult, dict[str, Any]]:
    """Fit the law on a ladder, with frontier, inference-aware optimum, held-out check and plots.

    `plots_dir` defaults to `LADDER_DIR/plots` (PNG files); pass "" to skip the plots. The default
    target loss of the inference-aware comparison is the frontier's loss at 10x the ladder's largest rung.
    """
    rungs = load_rungs(path)
    fit = analyse(rungs, bootstrap=bootstrap, ci_level=ci_level, seed=seed)
    summary = fit.to_dict()
    levels = default_flops_levels(fit)
    summary["frontier"] = frontier(fit, levels)
    if target_loss is None:
        target_loss = summary["frontier"][2]["loss"]  # 10x the largest rung's compute
    summary["inference_aware"] = inference_aware(fit, target_loss, inference_tokens)
    predicted = fit.law(rungs.params, rungs.tokens)
    summary["residuals"] = [
        {"rung": name, "loss": float(actual), "predicted": float(pred), "log_residual": float(np.log(actual / pred))}
        for name, actual, pred in zip(rungs.names, rungs.loss, predicted, strict=True)
    ]
    summary["rms_log_residual"] = float(np.sqrt(np.mean(np.log(rungs.loss / predicted) ** 2)))
    summary["warnings"] = fit_warnings(fit, summary)
    if plots_dir is None:
        plots_dir = ladder_file(path).parent / "plots"
    if plots_dir:
        summary["plots"] = [str(p) for p in draw_plots(fit, summary, Path(plots_dir))]
    return fit, summary


def fit_warnings(fit: FitResult, summary: dict[str, Any]) -> list[str]:
    """Signs that the law is degenerate (a parameter on its bound, the frontier at the search edge)."""
    from slmkit.scaling.fit import PARAM_BOUNDS, search_bounds

    out = []
    for name, value, (low, high) in zip(PARAM_NAMES, fit.theta, PARAM_BOUNDS, strict=True):
        shown = "log " + name if name in ("E", "A", "B") else name
        if (low is not None and value <= low + 1e-6) or (high is not None and value >= high - 1e-6):
            out.append(f"{shown} ended on its bound ({value:.4g}): the rungs do not pin it down")
    if fit.law.E < 0.05 * float(fit.rungs.loss.min()):
        out.append(
            "E is near 0: the rungs are far from converged, so the law describes early training and "
            "extrapolates poorly; train longer rungs (a larger budget) for a usable frontier"
        )
    edge = math.exp(search_bounds(fit)[0])
    if any(row["params"] <= edge * 1.01 for row in summary["frontier"]):
        out.append(f"the frontier's N* sits at the search edge ({edge:,.0f}): smaller is always better on these rungs")
    return out


def draw_plots(fit: FitResult, summary: dict[str, Any], out: Path) -> list[Path]:
    """loss_vs_compute.png (rungs + fitted frontier), loss_vs_params.png (law at fixed D), isoflop.png,
    residuals.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    r = fit.rungs
    paths = []
    colour = np.log10(r.params)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sc = ax.scatter(r.flops, r.loss, c=colour, cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 N (non-embedding params)")
    c_grid = np.geomspace(r.flops.min() / 2, r.flops.max() * 100, 60)
    from slmkit.scaling.fit import optimal_for_compute

    best = [optimal_for_compute(fit, c)["loss"] for c in c_grid]
    ax.plot(c_grid, best, "k-", label="compute-optimal frontier L*(C)")
    if fit.holdout:
        h = fit.holdout
        ax.scatter(
            [h["flops"]], [h["predicted_loss"]], marker="x", c="red", s=60, zorder=4, label="held-out prediction"
        )
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="val loss (nats/token)", title="Loss vs compute")
    ax.legend()
    paths.append(_save(fig, out / "loss_vs_compute.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    n_grid = np.geomspace(r.params.min() / 3, r.params.max() * 30, 80)
    for d in np.geomspace(r.tokens.min(), r.tokens.max(), 4):
        ax.plot(n_grid, fit.law(n_grid, d), label=f"law at D = {d:.3g}")
    sc = ax.scatter(r.params, r.loss, c=np.log10(r.tokens), cmap="plasma", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 D (tokens)")
    ax.set(xscale="log", xlabel="non-embedding params N", ylabel="val loss", title="Loss vs N at fixed D")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_params.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = np.round(np.log10(r.flops) / 0.05)  # rungs within ~12% of each other's compute
    for g in np.unique(groups):
        near = groups == g
        flops = float(np.exp(np.log(r.flops[near]).mean()))
        curve = fit.law(n_grid, flops / fit.flops_per_token(n_grid))
        (line,) = ax.plot(n_grid, curve, label=f"C = {flops:.2g}")
        ax.scatter(r.params[near], r.loss[near], color=line.get_color(), zorder=3)
    ax.set(xscale="log", xlabel="non-embedding params N", ylabel="val loss", title="IsoFLOP view (law and rungs)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    residual = np.log(r.loss / fit.law(r.params, r.tokens))
    ax.axhline(0, color="k", lw=0.8)
    ax.scatter(r.flops, residual * 100, c=colour, cmap="viridis")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="log residual (%)", title="Residuals of the fit")
    paths.append(_save(fig, out / "residuals.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_fit(summary: dict[str, Any], console: Any) -> None:
    """Human-readable summary (the CLI's default output)."""
    from rich.table import Table

    level = summary["ci_level"]
    table = Table(title=f"L(N, D) = E + A/N^alpha + B/D^beta   ({summary['rungs']} rungs, N = non-embedding params)")
    for col in ("parameter", "estimate", f"{level:.0%} bootstrap CI ({summary['bootstrap_samples']} refits)"):
        table.add_column(col, justify="right")
    for name in PARAM_NAMES:
        low, high = summary["confidence_intervals"][name]
        table.add_row(name, repr(summary[name]), f"[{low:.6g}, {high:.6g}]")
    console.print(table)
    console.print(f"rms log residual: {summary['rms_log_residual'] * 100:.2f}%")
    h = summary["holdout"]
    if h:
        console.print(
            f"held-out check: fitted without rung {h['rung']} (largest compute, {h['flops']:.3g} FLOPs), predicted "
            f"{h['predicted_loss']:.4f} vs measured {h['actual_loss']:.4f}: relative error "
            f"{h['relative_error'] * 100:+.2f}%"
        )
    else:
        console.print("held-out check: skipped (needs one rung more than the fit's minimum)")
    k, gamma = summary["flops_per_token_model"]["k"], summary["flops_per_token_model"]["gamma"]
    front = Table(title=f"compute-optimal frontier (C = D * {k:.3g} * N^{gamma:.3f}, fitted on the rungs)")
    for col in ("C (FLOPs)", "N*", "D*", "D*/N*", "L*", "N* CI", "L* CI"):
        front.add_column(col, justify="right")
    for row in summary["frontier"]:
        n_ci = row.get("params_interval", (math.nan, math.nan))
        l_ci = row.get("loss_interval", (math.nan, math.nan))
        front.add_row(
            f"{row['flops']:.3g}",
            f"{row['params']:,.0f}",
            f"{row['tokens']:,.0f}",
            f"{row['tokens_per_param']:.1f}",
            f"{row['loss']:.4f}",
            f"{n_ci[0]:,.0f}-{n_ci[1]:,.0f}",
            f"{l_ci[0]:.3f}-{l_ci[1]:.3f}",
        )
    console.print(front)
    ia = summary["inference_aware"]
    a, c = ia["inference_aware"], ia["compute_optimal"]
    console.print(
        f"inference-aware optimum for loss {ia['target_loss']:.4f} and {ia['inference_tokens']:.3g} inference "
        f"tokens: N = {a['params']:,.0f}, D = {a['tokens']:,.0f} ({a['tokens_per_param']:.0f} tokens/param), "
        f"total {a['total_flops']:.3g} FLOPs vs compute-optimal N = {c['params']:,.0f}, D = {c['tokens']:,.0f}: "
        f"total {c['total_flops']:.3g} FLOPs ({ia['total_flops_saved'] * 100:.1f}% saved)"
    )
    for warning in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    if summary.get("plots"):
        console.print("plots: " + ", ".join(summary["plots"]))
