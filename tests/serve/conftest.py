"""Fixtures of the serving tests: the tiny model with shaken weights, saved as a model dir of its own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shaken_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights shaken: the briefly trained one repeats one token for every prompt, which
    could not tell one request's output from another's; these weights give varied, prompt-dependent text."""
    import torch

    from slmkit.api import load
    from slmkit.interop.checkpoint import save_model

    lm = load(tiny_model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return save_model(lm.model, tmp_path_factory.mktemp("serve") / "shaken", tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def engine(shaken_model_dir):
    from slmkit.infer.engine import Engine

    return Engine.load(shaken_model_dir, device="cpu")
