"""The law fit: recovery of known parameters, held-out check, frontier, inference-aware optimum, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slmkit.errors import UserError
from slmkit.scaling.fit import (
    Law,
    analyse,
    inference_aware,
    load_rungs,
    optimal_for_compute,
    rungs_from_records,
)

TRUE = Law(E=1.7, A=120.0, B=900.0, alpha=0.36, beta=0.31)


def synthetic_records(noise: float = 0.005, seed: int = 1, law: Law = TRUE) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for n in (2e4, 5e4, 1e5, 2e5, 5e5, 1e6):
        for ratio in (2, 5, 10, 20):
            d = n * ratio * 10
            loss = float(law(n, d) * math.exp(rng.normal(0, noise)))
            records.append({"name": f"{n:g}-{ratio}", "params": n, "tokens": d, "flops": 7 * n * d, "val_loss": loss})
    return records


@pytest.fixture(scope="module")
def synthetic_fit():
    # 99% intervals: five parameters at 95% each would all cover the truth only ~77% of the time
    return analyse(rungs_from_records(synthetic_records()), bootstrap=40, ci_level=0.99, seed=0)


def test_fit_recovers_known_parameters_within_bootstrap_intervals(synthetic_fit):
    intervals = synthetic_fit.confidence_intervals()
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = intervals[name]
        truth = getattr(TRUE, name)
        assert low <= truth <= high, (name, truth, low, high)
        assert high > low  # a real interval, not a point
    # exponents are pinned down tightly by 24 points with 0.5% noise
    assert abs(synthetic_fit.law.alpha - TRUE.alpha) < 0.05
    assert abs(synthetic_fit.law.beta - TRUE.beta) < 0.05


def test_fit_without_noise_is_exact():
    records = synthetic_records(noise=0.0)
    law, objective, _ = __import__("slmkit.scaling.fit", fromlist=["fit_law"]).fit_law(
        np.array([r["params"] for r in records]),
        np.array([r["tokens"] for r in records]),
        np.array([r["val_loss"] for r in records]),
    )
    assert objective < 1e-12
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=1e-3)


def test_holdout_predicts_largest_compute_rung(synthetic_fit):
    h = synthetic_fit.holdout
    rungs = synthetic_fit.rungs
    assert h["flops"] == rungs.flops.max()
    assert h["actual_loss"] == pytest.approx(float(rungs.loss[np.argmax(rungs.flops)]))
    assert h["relative_error"] == pytest.approx((h["predicted_loss"] - h["actual_loss"]) / h["actual_loss"])
    assert abs(h["relative_error"]) < 0.02
    summary = synthetic_fit.to_dict()
    assert summary["holdout_relative_error"] == h["relative_error"]
    assert {"E", "A", "B", "alpha", "beta"} <= set(summary)


def test_frontier_is_the_minimum_of_the_law_at_fixed_compute(synthetic_fit):
    c = 1e16
    best = optimal_for_compute(synthetic_fit, c)
    assert best["params"] * synthetic_fit.flops_per_token(best["params"]) * best["tokens"] / best["params"] == (
        pytest.approx(c, rel=1e-6)
    )
    for factor in (0.7, 1.4):
        n = best["params"] * factor
        worse = synthetic_fit.law(n, c / synthetic_fit.flops_per_token(n))
        assert worse > best["loss"]
    # more compute: bigger model, more tokens, lower loss
    bigger = optimal_for_compute(synthetic_fit, c * 10)
    assert bigger["params"] > best["params"] and bigger["tokens"] > best["tokens"]
    assert bigger["loss"] < best["loss"]


def test_inference_aware_optimum_trains_a_smaller_model_longer(synthetic_fit):
    target = float(optimal_for_compute(synthetic_fit, 1e17)["loss"])
    none = inference_aware(synthetic_fit, target, 0.0)
    assert none["inference_aware"]["params"] == pytest.approx(none["compute_optimal"]["params"], rel=1e-3)
    lots = inference_aware(synthetic_fit, target, 1e13)
    a, c = lots["inference_aware"], lots["compute_optimal"]
    assert a["params"] < c["params"] and a["tokens"] > c["tokens"]
    assert a["total_flops"] < c["total_flops"]
    assert synthetic_fit.law(a["params"], a["tokens"]) == pytest.approx(target, rel=1e-6)
    with pytest.raises(UserError, match="irreducible"):
        inference_aware(synthetic_fit, synthetic_fit.law.E * 0.9, 1e9)


def _write(tmp_path, records):
    path = tmp_path / "ladder.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_too_few_rungs_is_a_user_error(tmp_path):
    path = _write(tmp_path, synthetic_records()[:5])
    with pytest.raises(UserError, match="needs at least 6"):
        analyse(load_rungs(path), bootstrap=0)


def test_non_finite_loss_is_a_user_error(tmp_path):
    records = synthetic_records()
    records[3]["val_loss"] = float("nan")
    with pytest.raises(UserError, match="finite positive"):
        load_rungs(_write(tmp_path, records))


def test_mixed_data_or_tokenizers_is_a_user_error(tmp_path):
    records = synthetic_records()
    for i, r in enumerate(records):
        r["data_fingerprint"] = "a" * 64
        r["tokenizer_sha256"] = "t1" if i < 10 else "t2"
    with pytest.raises(UserError, match="different tokenizer"):
        load_rungs(_write(tmp_path, records))
    for r in records:
        r["tokenizer_sha256"] = "t1"
    records[0]["data_fingerprint"] = "b" * 64
    with pytest.raises(UserError, match="different data"):
        load_rungs(_write(tmp_path, records))


def test_missing_ladder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no ladder results"):
        load_rungs(tmp_path)


def test_largest_rung_is_the_biggest_model_of_the_top_compute_level():
    from slmkit.scaling.fit import largest_rung

    records = [
        {"name": "small-top", "params": 1e4, "tokens": 1.02e6, "flops": 6.12e10, "val_loss": 3.0},
        {"name": "big-top", "params": 1e5, "tokens": 1e5, "flops": 6.0e10, "val_loss": 3.2},
        {"name": "bigger-low", "params": 1e6, "tokens": 5e3, "flops": 3e10, "val_loss": 4.0},
    ]
    assert largest_rung(rungs_from_records(records)) == 1


def test_fit_warnings_name_a_parameter_on_its_bound(synthetic_fit):
    import dataclasses

    from slmkit.scaling.fit import PARAM_BOUNDS, default_flops_levels, frontier
    from slmkit.scaling.report import fit_warnings

    summary = {"frontier": frontier(synthetic_fit, default_flops_levels(synthetic_fit))}
    assert not any("bound" in w for w in fit_warnings(synthetic_fit, summary))
    theta = synthetic_fit.theta.copy()
    theta[3] = PARAM_BOUNDS[3][0]  # alpha = 0: no size term
    stuck = dataclasses.replace(synthetic_fit, theta=theta)
    assert [w for w in fit_warnings(stuck, summary) if "bound" in w] == [
        "alpha ended on its bound (0): the rungs do not pin it down"
    ]
