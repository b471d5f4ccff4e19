"""Learned routers: fitting on a planted signal, threshold calibration, the directory format, model checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slmkit.errors import UserError
from slmkit.route.features import feature_size, prompt_features
from slmkit.route.router import (
    calibrate_threshold,
    fit_router,
    load_router,
    model_fingerprint,
    ranking_auc,
)

D_MODEL = 8  # synthetic features: 2 * 8 + 3 columns


def _planted(n: int, seed: int, d_model: int = D_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """Features where the strong model is needed exactly when column 3 plus a little noise is high."""
    rng = np.random.default_rng(seed)
    scales = np.random.default_rng(99).uniform(0.5, 5.0, size=feature_size(d_model))  # unstandardised columns
    x = rng.normal(size=(n, feature_size(d_model))) * scales
    y = (x[:, 3] / scales[3] + 0.3 * rng.normal(size=n) > 0.8).astype(np.float64)
    return x, y


@pytest.mark.parametrize("classifier", ["logreg", "mlp"])
def test_learned_router_separates_a_planted_signal(classifier):
    x, y = _planted(600, 0)
    router = fit_router(x, y, classifier=classifier, d_model=D_MODEL, seed=0)
    x_test, y_test = _planted(600, 1)
    assert ranking_auc(router.probabilities(x_test), y_test) > 0.9
    # and a router fitted on shuffled labels does not
    noise = fit_router(x, np.random.default_rng(3).permutation(y), classifier=classifier, d_model=D_MODEL)
    assert ranking_auc(noise.probabilities(x_test), y_test) < 0.7


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.8])
def test_threshold_calibration_hits_the_target_share_on_held_out_items(target):
    x, y = _planted(400, 0)
    router = fit_router(x, y, d_model=D_MODEL)
    x_cal, _ = _planted(800, 1)
    router.threshold = calibrate_threshold(router.probabilities(x_cal), target)
    x_test, _ = _planted(2000, 2)
    share = float((router.probabilities(x_test) >= router.threshold).mean())
    assert abs(share - target) < 0.05, share


def test_calibration_extremes():
    p = np.array([0.1, 0.4, 0.4, 0.9])
    assert (p >= calibrate_threshold(p, 0.0)).sum() == 0
    assert (p >= calibrate_threshold(p, 1.0)).sum() == 4
    assert (p >= calibrate_threshold(p, 0.25)).sum() == 1
    with pytest.raises(UserError):
        calibrate_threshold(p, 1.5)


def test_strong_share_is_monotone_in_the_threshold(weak_dir):
    from slmkit.api import load

    weak = load(weak_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, weak.config.vocab_size, size=rng.integers(2, 20)).tolist() for _ in range(40)]
    features = prompt_features(weak, prompts)
    router = fit_router(features, (features[:, -1] > np.median(features[:, -1])).astype(float), d_model=32)
    shares = []
    for t in np.linspace(-0.01, 1.01, 30):
        router.threshold = float(t)
        shares.append(np.mean([router.decide(weak, p) for p in prompts[:10]]))
    assert all(a >= b for a, b in zip(shares, shares[1:], strict=False)), shares
    assert shares[0] == 1.0 and shares[-1] == 0.0


def test_features_of_a_batch_equal_features_one_by_one(weak_dir):
    from slmkit.api import load

    weak = load(weak_dir)
    prompts = [[5, 6, 7, 8, 9, 10], [3], [11, 12, 13]]
    together = prompt_features(weak, prompts, batch_size=3)
    alone = np.concatenate([prompt_features(weak, [p]) for p in prompts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    # the scalar columns: mean NLL of the prompt tokens under the model, from a plain forward
    with torch.no_grad():
        logits = weak.model(torch.tensor([prompts[0]]))[0].float()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompts[0][1:])[:, None]).mean()
    assert together[0, -3] == pytest.approx(float(nll), rel=1e-4)


def _saved_router(tmp_path, weak_dir, strong_dir):
    x, y = _planted(200, 0, d_model=32)
    router = fit_router(x, y, d_model=32)
    router.threshold = 0.4
    router.models = {"weak": model_fingerprint(weak_dir), "strong": model_fingerprint(strong_dir)}
    path = router.save(tmp_path / "router")
    return router, path, x


def test_router_directory_round_trips(tmp_path, weak_dir, strong_dir):
    router, path, x = _saved_router(tmp_path, weak_dir, strong_dir)
    assert sorted(p.name for p in path.iterdir()) == ["router.json", "router.safetensors"]
    loaded = load_router(path)
    assert loaded.threshold == 0.4 and loaded.classifier == "logreg"
    np.testing.assert_allclose(loaded.probabilities(x), router.probabilities(x), rtol=1e-6)
    loaded.check_models(weak_dir, strong_dir)  # the models it was trained for: no error
    with pytest.raises(UserError, match="already exists"):
        router.save(path)
    router.save(path, overwrite=True)


def test_router_trained_for_other_models_is_refused(tmp_path, weak_dir, strong_dir, other_weak_dir):
    _, path, _ = _saved_router(tmp_path, weak_dir, strong_dir)
    router = load_router(path)
    with pytest.raises(UserError, match="another weak model.*weights"):
        router.check_models(other_weak_dir, strong_dir)
    with pytest.raises(UserError, match="another strong model"):
        router.check_models(weak_dir, weak_dir)
    assert model_fingerprint(weak_dir) != model_fingerprint(other_weak_dir)


def test_missing_or_corrupt_router_is_a_user_error(tmp_path, weak_dir, strong_dir):
    with pytest.raises(UserError, match="no such router directory"):
        load_router(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a router directory"):
        load_router(tmp_path / "empty")
    _, path, _ = _saved_router(tmp_path, weak_dir, strong_dir)
    weights = (path / "router.safetensors").read_bytes()
    (path / "router.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_router(path)
    (path / "router.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_router(path)
    (path / "router.json").write_text(json.dumps({"format": "slmkit-router", "version": 1}))
    with pytest.raises(UserError, match="corrupt router file"):
        load_router(path)
