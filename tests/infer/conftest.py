"""Fixtures for the engine tests: the trained tiny model, a random draft model, a scripted model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.interop.hf import load_config


@pytest.fixture(scope="session")
def lm(tiny_model_dir):
    from slmkit.api import load

    return load(tiny_model_dir)


@pytest.fixture(scope="session")
def random_draft_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A 1-layer random model with the target's tokenizer: a poor draft (many rejections)."""
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    target = load_config(tiny_model_dir / "config.json")
    cfg = target.replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    model = build_model(cfg)
    model.init_weights(seed=1)
    out = tmp_path_factory.mktemp("draft") / "draft"
    save_model(model, out, tokenizer_dir=tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def other_tokenizer_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A model of the same shape but with a different tokenizer."""
    from slmkit.data.tokenizer import save_tokenizer, train_tokenizer
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    target = load_config(tiny_model_dir / "config.json")
    tok = train_tokenizer(["completely different text " * 20, "zebra yak quokka " * 30], 300)
    root = tmp_path_factory.mktemp("othertok")
    save_tokenizer(tok, root / "tok")
    model = build_model(target.replace(n_layers=1))
    model.init_weights(seed=2)
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


class ScriptedModel(torch.nn.Module):
    """A stand-in model whose next token is script[position]: logits put all mass on that token.

    It has the Transformer's forward/new_state interface, so the engine runs on it unchanged; tests use it to
    force byte sequences (split UTF-8 characters) that a real tiny model would rarely produce.
    """

    def __init__(self, script: list[int], vocab_size: int, prompt_len: int) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, d_model=8, n_heads=2, n_kv_heads=2, d_ff=8, max_seq_len=128)
        self.script = script
        self.prompt_len = prompt_len
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_state(self, batch_size, max_len=None, dtype=None):
        from slmkit.models.state import ModelState

        return ModelState([], batch_size, max_len or self.config.max_seq_len)  # it keeps nothing between calls

    def forward(self, idx, *, state=None, pos=None, active=None, upto=None, last_only=False, logits_at=None):
        b, t = idx.shape
        pos = pos.expand(b, t) if pos.dim() == 2 else pos[None, :].expand(b, t)
        logits = torch.full((b, t, self.config.vocab_size), -10.0)
        for i in range(b):
            for j in range(t):
                k = int(pos[i, j]) + 1 - self.prompt_len
                token = self.script[k] if 0 <= k < len(self.script) else self.config.eos_token_id
                logits[i, j, token] = 10.0
        if logits_at is not None:
            return logits[torch.arange(b), logits_at].unsqueeze(1)
        return logits[:, -1:] if last_only else logits


@pytest.fixture
def scripted_model():
    return ScriptedModel
