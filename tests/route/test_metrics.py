"""Routing curves and RouteLLM's numbers, on hand-computed examples and on random data."""

from __future__ import annotations

import numpy as np
import pytest

from slmkit.route.metrics import GRID, evaluate_routers, quality_curve, summarize_curve

Q_WEAK = np.array([0.0, 0.0, 0.0, 1.0])
Q_STRONG = np.array([1.0, 1.0, 0.0, 1.0])  # weak 0.25, strong 0.75


def test_curve_apgr_and_cpt_by_hand():
    best_first = quality_curve(np.array([4.0, 3.0, 2.0, 1.0]), Q_WEAK, Q_STRONG)
    np.testing.assert_allclose(best_first, [0.25, 0.5, 0.75, 0.75, 0.75])
    numbers = summarize_curve(best_first, 0.25, 0.75)
    # PGR 0, .5, 1, 1, 1 over shares 0, .25, ..., 1: trapezoids .25 * (.25 + .75 + 1 + 1)
    assert numbers["apgr"] == pytest.approx(0.75)
    assert numbers["cpt50"] == pytest.approx(0.25) and numbers["cpt80"] == pytest.approx(0.5)
    assert numbers["auc"] == pytest.approx(0.625)
    worst_first = quality_curve(np.array([1.0, 2.0, 3.0, 4.0]), Q_WEAK, Q_STRONG)
    np.testing.assert_allclose(worst_first, [0.25, 0.25, 0.25, 0.5, 0.75])
    numbers = summarize_curve(worst_first, 0.25, 0.75)
    assert numbers["apgr"] == pytest.approx(0.25)
    assert numbers["cpt50"] == pytest.approx(0.75) and numbers["cpt80"] == pytest.approx(1.0)


def test_no_gap_has_no_apgr():
    q = np.array([1.0, 0.0, 1.0, 0.0])
    numbers = summarize_curve(quality_curve(np.zeros(4), q, q[::-1].copy()), 0.5, 0.5)
    assert numbers["apgr"] is None and numbers["cpt50"] is None


def test_several_rows_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(0)
    scores = rng.random((5, 30))
    qw, qs = rng.integers(0, 2, 30).astype(float), rng.integers(0, 2, 30).astype(float)
    together = quality_curve(scores, qw, qs)
    for row in range(5):
        np.testing.assert_allclose(together[row], quality_curve(scores[row], qw, qs))


def _items(n: int, seed: int):
    rng = np.random.default_rng(seed)
    qw = (rng.random(n) < 0.4).astype(float)
    qs = np.where(rng.random(n) < 0.5, 1.0, qw)  # the strong model is right more often
    return qw, qs


def test_random_router_lies_on_the_straight_line_within_its_ci():
    qw, qs = _items(300, 0)
    result = evaluate_routers({}, qw, qs, resamples=300)
    random = result["routers"]["random"]
    line = result["weak"] + GRID * (result["strong"] - result["weak"])
    lo, hi = np.asarray(random["curve_ci95"])
    assert ((lo - 1e-9 <= line) & (line <= hi + 1e-9)).all()
    lo, hi = random["apgr"]["ci95"]
    assert lo <= 0.5 <= hi


def test_oracle_bounds_every_router_at_every_share():
    qw, qs = _items(200, 1)
    rng = np.random.default_rng(2)
    routers = {
        "noise": rng.random(200),
        "good": (qs - qw) + rng.normal(scale=0.5, size=200),
        "inverted": -(qs - qw),
        "constant": np.zeros(200),
    }
    oracle = quality_curve(qs - qw, qw, qs)
    for scores in routers.values():
        assert (quality_curve(scores, qw, qs) <= oracle + 1e-12).all()
    result = evaluate_routers(routers, qw, qs, resamples=100)
    for name, entry in result["routers"].items():
        assert np.all(np.asarray(entry["curve"]) <= np.asarray(result["routers"]["oracle"]["curve"]) + 1e-12), name
        assert entry["apgr"]["value"] <= result["routers"]["oracle"]["apgr"]["value"] + 1e-12
    apgr = {name: e["apgr"]["value"] for name, e in result["routers"].items()}
    assert apgr["inverted"] < apgr["random"] < apgr["good"] < apgr["oracle"]
    # a constant score breaks ties in a fixed random order: it is a random router, not "first items first"
    assert abs(apgr["constant"] - 0.5) < 0.1
    good_vs_random = next(d for d in result["apgr_differences"] if d["router"] == "good" and d["baseline"] == "random")
    assert good_vs_random["ci95"][0] > 0
