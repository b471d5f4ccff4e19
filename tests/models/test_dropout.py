"""Residual dropout (ModelConfig.dropout): active in training only, for every mixer; bad values refused."""

import json

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit.train.loop import train
from slmkit_testing import tiny_train_config

MIXERS = {
    "attention": {},
    "mamba2": dict(mixer="mamba2", mlp="none", family="mamba2"),
    "hybrid": dict(layer_pattern=("mamba2", "attention"), rope_fraction=0.5, family="bamba"),
}


def pair(p: float, **changes):
    """The same weights built with and without dropout."""
    torch.manual_seed(0)
    plain = build_model(preset("tiny", vocab_size=300, **changes))
    dropped = build_model(preset("tiny", vocab_size=300, dropout=p, **changes))
    dropped.load_state_dict(plain.state_dict())
    return plain, dropped


@pytest.mark.parametrize("mixer", MIXERS)
def test_dropout_acts_in_training_only(mixer):
    plain, dropped = pair(0.3, **MIXERS[mixer])
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain.eval(), dropped.eval()
        torch.testing.assert_close(dropped(idx), plain(idx), rtol=0, atol=0)  # inference: exactly the model
        dropped.train()
        torch.manual_seed(2)
        first = dropped(idx)
        torch.manual_seed(3)
        second = dropped(idx)
        plain.train()
        reference = plain(idx)  # no dropout: training mode alone changes nothing
    assert not torch.allclose(first, second)  # a fresh mask per call
    assert not torch.allclose(first, reference)
    torch.testing.assert_close(reference, plain.eval()(idx))


def test_dropout_zeroes_the_residual_branch_at_its_rate():
    """With every layer's output weights at zero a block adds nothing; the embeddings' dropout is then all that
    reaches the head: about p of the hidden units are zero, the rest scaled by 1/(1-p)."""
    _, model = pair(0.25)
    model.train()
    captured = {}
    model.norm.register_forward_hook(lambda mod, inputs, out: captured.setdefault("x", inputs[0]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        idx = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(4))
        model(idx)
        kept = model.embed_tokens(idx)
    x = captured["x"]
    zeroed = (x == 0).float().mean().item()
    assert 0.2 < zeroed < 0.3
    mask = x != 0
    torch.testing.assert_close(x[mask], kept[mask] / 0.75)


@pytest.mark.parametrize("value", [1.0, -0.1, True, "lots"])
def test_bad_dropout_is_refused(value):
    with pytest.raises(UserError, match="model config: dropout must be"):
        preset("tiny", dropout=value)


def test_trained_with_dropout_loads_for_inference(tmp_path, data_dir):
    """The loop trains with the masks (a different run than without); the saved model loads in eval mode: its
    logits are deterministic and those of the same weights without dropout. (A training switch, like the init
    ones: the run's train_config.json keeps it for a resume; Hugging Face configs have no field for it.)"""
    runs = {}
    for p in (0.0, 0.5):
        cfg = tiny_train_config(model={"max_seq_len": 64, "dropout": p}, max_steps=6)
        train(cfg, data_dir, tmp_path / f"run-{p}")
        runs[p] = load_model(tmp_path / f"run-{p}")
    assert json.loads((tmp_path / "run-0.5" / "train_config.json").read_text())["model"]["dropout"] == 0.5
    weights = [run.state_dict().values() for run in runs.values()]
    same = all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert not same  # dropout was on during training
    model = runs[0.5]
    assert not model.training
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        once, twice = model(idx), model(idx)
    torch.testing.assert_close(once, twice, rtol=0, atol=0)
    plain = build_model(preset("tiny", **{**model.config.__dict__, "dropout": 0.0}))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(idx), once, rtol=0, atol=0)
    save_model(model, tmp_path / "copy")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "copy")(idx), once, rtol=0, atol=0)
