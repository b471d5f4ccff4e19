"""Fixtures for the routing tests: small random models that share a tokenizer (the trained tiny model's), one with
another tokenizer, and a small multiple-choice task file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from slmkit.interop.hf import load_config


def _random_model(tiny_model_dir: Path, out: Path, seed: int, **changes) -> Path:
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    cfg = load_config(tiny_model_dir / "config.json").replace(**changes)
    model = build_model(cfg)
    model.init_weights(seed=seed)
    save_model(model, out, tokenizer_dir=tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def weak_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A 1-layer random model of width 32 with the tiny model's tokenizer."""
    root = tmp_path_factory.mktemp("weak")
    return _random_model(tiny_model_dir, root / "weak", 1, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="session")
def strong_dir(tiny_model_dir) -> Path:
    """The trained tiny model (2 layers, width 64)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def other_weak_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Same shape as weak_dir, other weights."""
    root = tmp_path_factory.mktemp("weak2")
    return _random_model(tiny_model_dir, root / "weak2", 5, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory, tiny_model_dir) -> Path:
    from slmkit.data.tokenizer import save_tokenizer, train_tokenizer
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    cfg = load_config(tiny_model_dir / "config.json")
    tok = train_tokenizer(["completely different text " * 20, "zebra yak quokka " * 30], 300)
    root = tmp_path_factory.mktemp("othertok")
    save_tokenizer(tok, root / "tok")
    model = build_model(cfg.replace(n_layers=1))
    model.init_weights(seed=2)
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory) -> Path:
    """80 four-way multiple-choice items over short English-like contexts."""
    rng = random.Random(0)
    words = "model data train token language small scaling loss compute budget attention layer".split()
    path = tmp_path_factory.mktemp("tasks") / "mc.jsonl"
    with path.open("w") as fh:
        for _ in range(80):
            context = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            choices = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(4)]
            fh.write(json.dumps({"context": context, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    return path
