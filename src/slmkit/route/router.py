"""Learned routers: which prompts the strong model should answer, predicted from the weak model's hidden states.

A router directory holds two files:
- ``router.json``: format version, classifier kind, decision threshold, the features it reads
  (:mod:`slmkit.route.features`), fingerprints of the weak and strong models it was trained for, and what it
  was trained on (tasks, items, the share of strong calls it was calibrated to);
- ``router.safetensors``: the feature standardisation (``feature_mean``, ``feature_std``) and the classifier's
  weights (logistic regression: ``weight`` (F,), ``bias`` (1,); MLP: ``hidden.weight``, ``hidden.bias``,
  ``out.weight``, ``out.bias``).

The router scores a prompt with P(strong model needed) and sends it to the strong model when that is at least
``threshold``; the threshold is calibrated so that a chosen share of held-out prompts goes to the strong model
(RouteLLM's cost knob).

A fingerprint names a model by its contents, not its path: the canonical ``config.json``, the size and
safetensors header of every weights file plus three 64 KiB samples of its data (start, middle, end: two
trainings of the same architecture differ there), and the hash of ``tokenizer.json``. Hashing whole files would
cost seconds per gigabyte on every load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slmkit.errors import UserError
from slmkit.route.features import FEATURE_VERSION, SCALAR_FEATURES, feature_size, prompt_features, unwrap

ROUTER_FORMAT = "slmkit-router"
ROUTER_VERSION = 1
ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
ClassifierKind = Literal["logreg", "mlp"]
CLASSIFIERS: tuple[str, ...] = ("logreg", "mlp")
_SAMPLE = 64 * 1024


# ---- fingerprints ---------------------------------------------------------------------------------------------


def _weights_digest(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest.update(head + fh.read(min(header_len, 100_000_000)))
        for offset in (8 + header_len, max(size // 2 - _SAMPLE // 2, 0), max(size - _SAMPLE, 0)):
            fh.seek(offset)
            digest.update(fh.read(_SAMPLE))


def model_fingerprint(directory: str | Path) -> dict[str, str]:
    """Content hashes of a model directory (or a run dir's latest checkpoint): config, weights, tokenizer."""
    from slmkit.interop.checkpoint import resolve_model_dir

    directory = resolve_model_dir(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{directory}/config.json: not readable JSON ({exc})") from None
    weights = sorted(directory.glob("*.safetensors"))
    weights = [p for p in weights if not p.name.startswith("adapter_")] or weights
    if not weights:
        raise UserError(f"{directory}: no weights (*.safetensors) to fingerprint")
    digest = hashlib.sha256()
    for path in weights:
        _weights_digest(path, digest)
    tokenizer = directory / "tokenizer.json"
    return {
        "name": directory.name if directory.name not in ("final",) else f"{directory.parent.name}/{directory.name}",
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
        "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.is_file() else "",
    }


def _mismatch(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    parts = {"config_sha256": "config", "weights_sha256": "weights", "tokenizer_sha256": "tokenizer"}
    return [label for key, label in parts.items() if expected.get(key) != actual.get(key)]


# ---- classifiers ----------------------------------------------------------------------------------------------


def _logits(kind: str, params: dict[str, Any], x: Any) -> Any:
    """Classifier logits (N,) of standardised features x (N, F); torch tensors."""
    import torch

    if kind == "logreg":
        return x @ params["weight"] + params["bias"]
    h = torch.relu(x @ params["hidden.weight"].T + params["hidden.bias"])
    return h @ params["out.weight"] + params["out.bias"]


def _fit_params(kind: str, x: Any, y: Any, l2: float, seed: int, hidden: int = 64, steps: int = 400) -> dict[str, Any]:
    """Minimise mean binary cross-entropy (soft labels allowed) + l2/2 |w|^2 / N on standardised features."""
    import torch

    n, f = x.shape
    gen = torch.Generator().manual_seed(seed)
    if kind == "logreg":
        params = {"weight": torch.zeros(f, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    else:
        params = {
            "hidden.weight": torch.randn(hidden, f, generator=gen, dtype=torch.float64) / math.sqrt(f),
            "hidden.bias": torch.zeros(hidden, dtype=torch.float64),
            "out.weight": torch.randn(hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden),
            "out.bias": torch.zeros(1, dtype=torch.float64),
        }
    for p in params.values():
        p.requires_grad_(True)
    weights = [p for name, p in params.items() if name.endswith("weight")]

    def objective() -> Any:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(_logits(kind, params, x), y)
        return loss + 0.5 * l2 / n * sum((w * w).sum() for w in weights)

    if kind == "logreg":  # convex: a quasi-Newton solve to convergence
        opt = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam(list(params.values()), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            objective().backward()
            opt.step()
    return {k: v.detach().to(torch.float32) for k, v in params.items()}


def ranking_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (labels thresholded at 0.5); nan without both."""
    from scipy.stats import rankdata

    positive = labels >= 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibrate_threshold(probabilities: np.ndarray, target_share: float) -> float:
    """The threshold t at which a share `target_share` of these scores is >= t (as near as the items allow)."""
    if not 0.0 <= target_share <= 1.0:
        raise UserError(f"--target-strong-share must be in [0, 1], got {target_share}")
    p = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    if p.size == 0:
        raise UserError("no held-out items to calibrate the threshold on; give more task items")
    k = int(round(target_share * p.size))
    if k <= 0:
        return float(np.nextafter(p[0], np.inf))
    if k >= p.size:
        return float(p[-1])
    return float((p[k - 1] + p[k]) / 2) if p[k - 1] > p[k] else float(p[k - 1])


# ---- the router -------------------------------------------------------------------------------------------------


@dataclass
class Router:
    """A fitted router: P(strong needed | prompt) from the weak model's features, and a threshold on it."""

    classifier: str
    threshold: float
    feature_mean: Any  # torch (F,)
    feature_std: Any  # torch (F,)
    params: dict[str, Any]
    models: dict[str, dict[str, str]]  # {"weak": fingerprint, "strong": fingerprint}
    d_model: int
    info: dict[str, Any] = field(default_factory=dict)  # what it was trained on; shown, never read back

    # -- scoring
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """P(strong needed) for feature rows (N, F) from :func:`slmkit.route.features.prompt_features`."""
        import torch

        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.feature_mean.shape[0]:
            raise UserError(
                f"router features have {self.feature_mean.shape[0]} columns, got {tuple(x.shape)}: "
                "the router belongs to a weak model of another width"
            )
        z = (x - self.feature_mean) / self.feature_std
        with torch.no_grad():
            return torch.sigmoid(_logits(self.classifier, self.params, z)).numpy().astype(np.float64)

    def _check_weak(self, weak_model: Any) -> None:
        d_model = unwrap(weak_model).config.d_model
        if d_model != self.d_model:
            raise UserError(
                f"this router reads a weak model of width {self.d_model}, got one of width {d_model}: "
                "pass the weak model it was trained for (see its router.json), or train a router for this one"
            )

    def strong_probabilities(self, weak_model: Any, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        self._check_weak(weak_model)
        return self.probabilities(prompt_features(weak_model, prompts))

    def strong_probability(self, weak_model: Any, prompt_ids: Sequence[int]) -> float:
        """P(the strong model is needed) for one prompt (token ids of the weak model's tokenizer)."""
        return float(self.strong_probabilities(weak_model, [prompt_ids])[0])

    def decide(self, weak_model: Any, prompt_ids: Sequence[int]) -> bool:
        """True: send this prompt to the strong model."""
        return self.strong_probability(weak_model, prompt_ids) >= self.threshold

    # -- models
    def check_models(self, weak_dir: str | Path, strong_dir: str | Path) -> None:
        """UserError unless the two model directories are the ones this router was trained for (by content)."""
        for role, directory in (("weak", weak_dir), ("strong", strong_dir)):
            expected = self.models.get(role, {})
            differ = _mismatch(expected, model_fingerprint(directory))
            if differ:
                raise UserError(
                    f"the router was trained for another {role} model than {directory} ({', '.join(differ)} "
                    f"differ; it was trained for {expected.get('name', '?')!r}): train a router for these models "
                    "with `slm route train`"
                )

    # -- files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": ROUTER_FORMAT,
            "version": ROUTER_VERSION,
            "classifier": self.classifier,
            "threshold": self.threshold,
            "features": {
                "version": FEATURE_VERSION,
                "d_model": self.d_model,
                "size": int(self.feature_mean.shape[0]),
                "layout": ["mean final hidden state", "last-position final hidden state", *SCALAR_FEATURES],
            },
            "models": self.models,
            **self.info,
        }

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write router.json + router.safetensors atomically; an existing directory needs `overwrite`."""
        from safetensors.torch import save_file

        from slmkit.interop.outputs import atomic_directory, check_output

        directory = check_output(directory, "dir", overwrite=overwrite)
        tensors = {"feature_mean": self.feature_mean, "feature_std": self.feature_std}
        tensors.update({k: v.contiguous() for k, v in self.params.items()})
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / ROUTER_WEIGHTS))
            (tmp / ROUTER_JSON).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return directory


_EXPECTED_PARAMS = {
    "logreg": ("weight", "bias"),
    "mlp": ("hidden.weight", "hidden.bias", "out.weight", "out.bias"),
}


def load_router(path: str | Path) -> Router:
    """A router directory written by `slm route train`; UserError when it is missing, corrupt or of another format."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    hint = "train one with `slm route train --weak DIR --strong DIR --tasks ... --out ROUTER`"
    if not path.is_dir():
        raise UserError(f"{path}: no such router directory ({hint})")
    meta_path, weights_path = path / ROUTER_JSON, path / ROUTER_WEIGHTS
    if not meta_path.is_file():
        raise UserError(f"{path}: not a router directory (no {ROUTER_JSON}; {hint})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_path}: corrupt router file, not valid JSON ({exc}); retrain the router") from None
    if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
        raise UserError(f"{meta_path}: not an slmkit router (format {ROUTER_FORMAT!r} expected)")
    if meta.get("version") != ROUTER_VERSION:
        version = meta.get("version")
        raise UserError(f"{meta_path}: router format version {version!r}; this slmkit reads {ROUTER_VERSION}")
    try:
        kind = meta["classifier"]
        threshold = float(meta["threshold"])
        d_model = int(meta["features"]["d_model"])
        models = meta["models"]
        feature_version = meta["features"]["version"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{meta_path}: corrupt router file (missing or bad field {exc}); retrain the router") from None
    if kind not in _EXPECTED_PARAMS:
        raise UserError(f"{meta_path}: unknown classifier {kind!r} (known: {', '.join(CLASSIFIERS)})")
    if feature_version != FEATURE_VERSION:
        raise UserError(f"{meta_path}: features of version {feature_version!r}; this slmkit computes {FEATURE_VERSION}")
    if not math.isfinite(threshold):
        raise UserError(f"{meta_path}: threshold {threshold} is not a finite number")
    if not weights_path.is_file():
        raise UserError(f"{path}: router weights {ROUTER_WEIGHTS} are missing; retrain the router")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights_path}: corrupt or truncated safetensors file ({exc}); retrain the router") from None
    size = feature_size(d_model)
    missing = [k for k in ("feature_mean", "feature_std", *_EXPECTED_PARAMS[kind]) if k not in tensors]
    if missing:
        raise UserError(f"{weights_path}: missing tensors {missing}; retrain the router")
    if tensors["feature_mean"].shape != (size,) or tensors["feature_std"].shape != (size,):
        raise UserError(f"{weights_path}: feature statistics are not of size {size}; retrain the router")
    params = {k: tensors[k].float() for k in _EXPECTED_PARAMS[kind]}
    width = params["weight"].shape if kind == "logreg" else params["hidden.weight"].shape[1:]
    if tuple(width) != (size,):
        raise UserError(f"{weights_path}: classifier weights do not match {size} features; retrain the router")
    known = {"format", "version", "classifier", "threshold", "features", "models"}
    return Router(
        classifier=kind,
        threshold=threshold,
        feature_mean=tensors["feature_mean"].float(),
        feature_std=tensors["feature_std"].float(),
        params=params,
        models=models,
        d_model=d_model,
        info={k: v for k, v in meta.items() if k not in known},
    )


def fit_router(
    features: np.ndarray,
    labels: np.ndarray,
    classifier: ClassifierKind = "logreg",
    d_model: int | None = None,
    l2: float | None = None,
    seed: int = 0,
) -> Router:
    """Fit a router on feature rows (N, F) and labels in [0, 1] (1: the strong model was needed). The threshold is
    0.5 until :func:`calibrate_threshold` sets it; `models` is empty until the caller fills it.

    Logistic regression picks its L2 strength by 3-fold cross-validated ranking AUC among a few values unless
    `l2` is given."""
    import torch

    if classifier not in CLASSIFIERS:
        raise UserError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    x_np = np.asarray(features, dtype=np.float64)
    y_np = np.clip(np.asarray(labels, dtype=np.float64), 0.0, 1.0)
    if x_np.ndim != 2 or x_np.shape[0] != y_np.shape[0] or x_np.shape[0] < 4:
        raise UserError(f"too few items to fit a router ({x_np.shape[0]}); give more task items")
    if (y_np >= 0.5).all() or (y_np < 0.5).all():
        raise UserError(
            "nothing to learn: on every training item the strong model is "
            + ("needed" if (y_np >= 0.5).all() else "never better than the weak one")
            + "; give other tasks or more items"
        )
    mean = x_np.mean(0)
    std = x_np.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    z = torch.as_tensor((x_np - mean) / std)
    y = torch.as_tensor(y_np)
    if l2 is None:
        l2 = _choose_l2(classifier, z, y, seed) if classifier == "logreg" else 1.0
    params = _fit_params(classifier, z, y, l2, seed)
    size = x_np.shape[1]
    inferred = (size - len(SCALAR_FEATURES)) // 2
    return Router(
        classifier=classifier,
        threshold=0.5,
        feature_mean=torch.as_tensor(mean, dtype=torch.float32),
        feature_std=torch.as_tensor(std, dtype=torch.float32),
        params=params,
        models={},
        d_model=d_model if d_model is not None else inferred,
        info={"l2": l2},
    )


def _choose_l2(kind: str, z: Any, y: Any, seed: int, grid: Sequence[float] = (1.0, 10.0, 100.0, 1000.0)) -> float:
    import torch

    n = z.shape[0]
    folds = np.random.default_rng(seed).permutation(n) % 3
    best, best_auc = grid[-1], -1.0
    for l2 in grid:
        aucs = []
        for fold in range(3):
            train = torch.as_tensor(folds != fold)
            held = folds == fold
            if (y[train] >= 0.5).all() or (y[train] < 0.5).all():
                continue
            params = _fit_params(kind, z[train], y[train], l2, seed)
            with torch.no_grad():
                scores = _logits(kind, params, z[torch.as_tensor(held)].float()).numpy()
            auc = ranking_auc(scores, y.numpy()[held])
            if math.isfinite(auc):
                aucs.append(auc)
        if aucs and float(np.mean(aucs)) > best_auc + 1e-9:
            best, best_auc = l2, float(np.mean(aucs))
    return best
