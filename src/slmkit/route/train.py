"""`slm route train` and `slm route eval`: fit a learned router from per-item quality of two models, and compare
routers (random, cascade, learned, oracle) by quality vs share of strong calls.

Training (RouteLLM's recipe on slmkit's own tasks): both models answer every item; the label of an item is
max(quality(strong) - quality(weak), 0) (1 where the strong model is right and the weak one wrong); the router
is fitted on the items whose key falls in the training split (``fit_fraction``) and its threshold calibrated on
the other, held-out items so that a share ``target_strong_share`` of them goes to the strong model.

Evaluation with a router uses only the items it was not fitted on (held out by the same key rule), so the
learned router is judged on prompts it never saw, side by side with the others on the same items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError

log = logging.getLogger(__name__)

FIT_FRACTION = 0.6


def _load_pair(weak: str | Path, strong: str | Path, device: str) -> tuple[Any, Any]:
    from slmkit.loading import load

    return load(weak, device=device), load(strong, device=device)


def _tasks(specs: Sequence[str], suite_size: int, seed: int, corpus: Sequence[str] | None) -> list[Any]:
    from slmkit.eval.builtin import resolve_tasks

    if not specs:
        raise UserError("give --tasks: task files (.jsonl) or built-in task names (e.g. pystdlib-nextline)")
    return resolve_tasks([str(s) for s in specs], suite_size, seed, list(corpus) if corpus else None)


def collect(
    weak: Any,
    strong: Any,
    tasks: Sequence[Any],
    template: str,
    batch_size: int,
    status: Callable[[str], None],
) -> dict[str, Any]:
    """Items, both models' per-item quality and confidence, and the weak model's router features."""
    from slmkit.route.features import prompt_features
    from slmkit.route.items import prompt_ids, score_items, task_items

    items = task_items(tasks, template)
    status(f"weak model: scoring {len(items)} items")
    start = time.perf_counter()
    weak_scores = score_items(weak, items, batch_size)
    weak_seconds = time.perf_counter() - start
    status(f"strong model: scoring {len(items)} items")
    start = time.perf_counter()
    strong_scores = score_items(strong, items, batch_size)
    strong_seconds = time.perf_counter() - start
    status("weak model: router features")
    features = prompt_features(weak, [prompt_ids(weak, it) for it in items], batch_size=max(batch_size, 8))
    return {
        "items": items,
        "weak": weak_scores,
        "strong": strong_scores,
        "features": features,
        "seconds": {"weak": weak_seconds, "strong": strong_seconds},
    }


def train_router(
    weak: str | Path,
    strong: str | Path,
    tasks: Sequence[str],
    out: str | Path,
    target_strong_share: float = 0.3,
    classifier: str = "logreg",
    template: str = "plain",
    suite_size: int = 100,
    seed: int = 0,
    fit_fraction: float = FIT_FRACTION,
    batch_size: int = 8,
    corpus: Sequence[str] | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit and save a router; returns its router.json contents."""
    from slmkit.interop.outputs import check_output
    from slmkit.route.router import CLASSIFIERS, calibrate_threshold, fit_router, model_fingerprint, ranking_auc

    status = on_status or (lambda _msg: None)
    if classifier not in CLASSIFIERS:
        raise UserError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if not 0.0 <= target_strong_share <= 1.0:
        raise UserError(f"--target-strong-share must be in [0, 1], got {target_strong_share}")
    if not 0.0 < fit_fraction < 1.0:
        raise UserError(f"--fit-fraction must be in (0, 1), got {fit_fraction}")
    check_output(out, "dir", overwrite=overwrite)  # before minutes of scoring
    task_list = _tasks(tasks, suite_size, seed, corpus)
    fingerprints = {"weak": model_fingerprint(weak), "strong": model_fingerprint(strong)}
    weak_lm, strong_lm = _load_pair(weak, strong, device)
    data = collect(weak_lm, strong_lm, task_list, template, batch_size, status)
    items = data["items"]
    qw, qs = data["weak"].quality, data["strong"].quality
    labels = np.clip(qs - qw, 0.0, 1.0)
    fit = np.array([it.unit() < fit_fraction for it in items])
    if fit.sum() < 4 or (~fit).sum() < 2:
        raise UserError(f"{len(items)} items are too few to fit and calibrate a router; give more task items")
    status(f"fitting a {classifier} router on {int(fit.sum())} items ({int(labels[fit].sum())} need the strong model)")
    router = fit_router(data["features"][fit], labels[fit], classifier, d_model=weak_lm.config.d_model, seed=seed)
    held = ~fit
    probs = router.probabilities(data["features"][held])
    router.threshold = calibrate_threshold(probs, target_strong_share)
    routed = probs >= router.threshold
    held_quality = float(np.where(routed, qs[held], qw[held]).mean())
    router.models = fingerprints
    router.info = {
        **router.info,
        "target_strong_share": target_strong_share,
        "trained": {
            "tasks": [t.name for t in task_list],
            "task_sources": [t.source for t in task_list],
            "template": template,
            "suite_size": suite_size,
            "seed": seed,
            "items": len(items),
            "fit_items": int(fit.sum()),
            "held_out_items": int(held.sum()),
            "split": f"an item is a training item when sha256(task, prompt, choices, answer) / 16^64 < {fit_fraction}",
            "fit_fraction": fit_fraction,
            "label": "max(quality(strong) - quality(weak), 0) per item",
            "positive_fit_items": int((labels[fit] >= 0.5).sum()),
        },
        "held_out": {
            "strong_share": float(routed.mean()),
            "quality": held_quality,
            "weak_quality": float(qw[held].mean()),
            "strong_quality": float(qs[held].mean()),
            "ranking_auc": ranking_auc(probs, labels[held]),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    router.save(out, overwrite=overwrite)
    return router.to_json()


def evaluate_routing(
    weak: str | Path,
    strong: str | Path,
    tasks: Sequence[str],
    router: str | Path | None = None,
    template: str | None = None,
    suite_size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    corpus: Sequence[str] | None = None,
    resamples: int = 1000,
    device: str = "cpu",
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Curves, APGR, CPT(50%/80%) and AUC with bootstrap CIs for random, cascade, (learned) and oracle routers.

    With a router: its models are checked first; the template and built-in task size default to the ones it was
    trained with, and only the items it was not fitted on are evaluated."""
    from slmkit.route.metrics import evaluate_routers
    from slmkit.route.router import load_router

    status = on_status or (lambda _msg: None)
    learned = None
    if router is not None:
        learned = load_router(router)
        learned.check_models(weak, strong)
        trained = learned.info.get("trained", {})
        template = template or trained.get("template")
        suite_size = suite_size or trained.get("suite_size")
    template = template or "plain"
    suite_size = suite_size or 100
    task_list = _tasks(tasks, suite_size, seed, corpus)
    weak_lm, strong_lm = _load_pair(weak, strong, device)
    data = collect(weak_lm, strong_lm, task_list, template, batch_size, status)
    items = data["items"]
    keep = np.ones(len(items), dtype=bool)
    if learned is not None:
        fit_fraction = float(learned.info.get("trained", {}).get("fit_fraction", FIT_FRACTION))
        keep = np.array([it.unit() >= fit_fraction for it in items])
        if keep.sum() < 2:
            raise UserError("fewer than 2 of these items were held out from the router's training; give more items")
    qw, qs = data["weak"].quality[keep], data["strong"].quality[keep]
    scores: dict[str, np.ndarray] = {"cascade": -data["weak"].confidence[keep]}
    operating_point = None
    if learned is not None:
        probs = learned.probabilities(data["features"][keep])
        scores["learned"] = probs
        routed = probs >= learned.threshold
        operating_point = {
            "threshold": learned.threshold,
            "strong_share": float(routed.mean()),
            "quality": float(np.where(routed, qs, qw).mean()),
        }
    status(f"curves and {resamples} bootstrap resamples over {int(keep.sum())} items")
    result = evaluate_routers(scores, qw, qs, resamples=resamples, seed=seed)
    per_task = {}
    for name in dict.fromkeys(it.task for it in items):
        mask = np.array([it.task == name for it, k in zip(items, keep, strict=True) if k])
        per_task[name] = {"items": int(mask.sum()), "weak": float(qw[mask].mean()), "strong": float(qs[mask].mean())}
    from slmkit.eval.runner import model_name

    return {
        "weak_model": {"name": model_name(weak_lm.directory), "path": str(weak_lm.directory)},
        "strong_model": {"name": model_name(strong_lm.directory), "path": str(strong_lm.directory)},
        "router": str(router) if router is not None else None,
        "learned_operating_point": operating_point,
        "tasks": per_task,
        "template": template,
        "held_out_only": learned is not None,
        "quality_metric": "per item: multiple choice acc_norm, generation exact match",
        "cascade_confidence": "multiple choice: the weak model's probability of its pick among the choices; "
        "generation: mean token log-probability of its answer",
        "scoring_seconds": data["seconds"],
        **result,
    }
