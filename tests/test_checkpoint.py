import os

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import atomic_directory, load_model, resolve_model_dir, save_model
from slmkit.models import build_model


def tiny(seed=0):
    model = build_model(preset("tiny", vocab_size=300, max_seq_len=32))
    model.init_weights(seed)
    return model


def test_save_load_round_trip_and_hf_layout(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "m")
    names = set(os.listdir(tmp_path / "m"))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    loaded = load_model(tmp_path / "m")
    idx = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # ties survive loading
    mask = os.umask(0)
    os.umask(mask)
    # the directory gets the permissions mkdir() would give, not tempfile's private 0700
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~mask


def test_save_killed_midway_keeps_previous(tmp_path):
    first, second = tiny(0), tiny(1)
    save_model(first, tmp_path / "m")

    def crash(tmp):
        assert (tmp / "model.safetensors").exists()  # the new weights were half way in place
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(second, tmp_path / "m", extra=crash)
    loaded = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.embed_tokens.weight, first.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left


def test_atomic_directory_replaces_existing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path / "d")) == ["new.txt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_user_error(tmp_path, damage):
    save_model(tiny(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_match_config(tmp_path):
    save_model(tiny(), tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 128')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(UserError, match="config.json implies"):
        load_model(tmp_path / "m")


def test_resolve_paths(tmp_path):
    with pytest.raises(UserError, match="no such model"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint yet"):
        resolve_model_dir(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_dir(tmp_path / "empty")
    save_model(tiny(), tmp_path / "run" / "checkpoints" / "step-5")
    save_model(tiny(), tmp_path / "run" / "checkpoints" / "step-10")
    assert resolve_model_dir(tmp_path / "run").name == "step-10"
