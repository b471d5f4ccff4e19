"""Mixing laws fitted on synthetic proxies whose generating law is known."""

from __future__ import annotations

import numpy as np
import pytest

from slmkit.errors import UserError
from slmkit.scaling.mixlaw import choose_mixture, fit_exp, fit_law, fit_quadratic, simplex_candidates


def proxies(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


def test_exp_law_recovers_its_parameters():
    c, k, t = 2.1, 1.3, np.array([-1.2, 0.5, 0.7])  # t sums to 0: the gauge the fit reports
    r = proxies(24, 3)
    y = c + k * np.exp(r @ t) + np.random.default_rng(1).normal(0, 1e-4, 24)
    law = fit_exp(r, y)
    assert law.params["c"] == pytest.approx(c, abs=0.02)
    assert law.params["k"] == pytest.approx(k, rel=0.02)
    np.testing.assert_allclose(law.params["t"], t, atol=0.02)
    assert law.rmse < 2e-4


def test_quadratic_law_recovers_its_parameters():
    b = np.array([3.0, 3.4, 3.8])
    pairs = {(0, 1): -1.5, (0, 2): 0.4, (1, 2): -0.8}
    r = proxies(30, 3)
    y = r @ b + sum(v * r[:, i] * r[:, j] for (i, j), v in pairs.items())
    law = fit_quadratic(r, y)
    np.testing.assert_allclose(law.params["linear"], b, atol=1e-3)
    for (i, j), v in pairs.items():
        assert law.params["pairs"][f"{i},{j}"] == pytest.approx(v, abs=5e-3)


def test_auto_picks_the_law_that_generated_the_losses():
    r = proxies(20, 3, seed=3)
    exp_losses = 1.5 + np.exp(r @ np.array([0.9, -0.4, 0.2]))
    quad_losses = r @ np.array([3.0, 3.0, 3.0]) - 2.5 * r[:, 0] * r[:, 1] + 1.0 * r[:, 1] * r[:, 2]
    assert fit_law(r, exp_losses).kind == "exp"
    assert fit_law(r, quad_losses).kind == "quadratic"


def test_the_search_beats_uniform_and_natural_on_a_known_best_mixture():
    """Synthetic target loss with a known interior optimum: proxies are noisy samples of it; the chosen mixture
    is scored on the true (noise-free) law. This tests the law-level search, not real training."""
    b = np.array([3.2, 3.0, 3.6])
    pair = {(0, 1): -2.0, (0, 2): -0.5, (1, 2): 0.3}

    def true_loss(r):
        r = np.atleast_2d(r)
        return r @ b + sum(v * r[:, i] * r[:, j] for (i, j), v in pair.items())

    grid = simplex_candidates(3, 200000, seed=9)
    optimum = grid[np.argmin(true_loss(grid))]
    natural = np.array([0.1, 0.2, 0.7])
    uniform = np.full(3, 1 / 3)
    r = np.random.default_rng(5).dirichlet(natural * 3 + 0.3, size=32)
    y = true_loss(r) + np.random.default_rng(6).normal(0, 0.01, 32)
    choice = choose_mixture(r, y, bootstrap=50)
    chosen = true_loss(choice.mixture)[0]
    assert chosen < true_loss(uniform)[0] - 0.05 and chosen < true_loss(natural)[0] - 0.05
    assert chosen - true_loss(optimum)[0] < 0.01
    assert np.all(choice.share_std < 0.15) and choice.loss_interval[0] <= choice.predicted_loss + 0.02


def test_too_few_proxies_and_unknown_law():
    r = proxies(3, 3)
    with pytest.raises(UserError, match="at least 4 points"):
        fit_exp(r, np.ones(3))
    with pytest.raises(UserError, match="at least 5 proxies"):
        fit_law(r, np.ones(3), "exp")
    with pytest.raises(UserError, match="unknown mixing law"):
        fit_law(r, np.ones(3), "cubic")
