"""The trainer: loss falls, resume is exact, budgets stop the run, bad input is refused."""

import json

import pytest

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig
from slmkit.train.loop import train
from slmkit.train.optim import lr_at
from slmkit_testing import tiny_train_config as cfg


def test_loss_falls(data_dir, tmp_path):
    result = train(cfg(max_steps=40, lr=5e-3), data_dir, tmp_path / "run")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5
    assert result.val_loss is not None and result.val_bits_per_byte is not None
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    full = train(cfg(max_steps=8, grad_accum=2), data_dir, tmp_path / "full")
    part = train(cfg(max_steps=8, grad_accum=2, save_interval=4), data_dir, tmp_path / "part")
    assert part.losses == full.losses
    # pretend the run died after the step-4 checkpoint: drop what came after it and resume
    import shutil

    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[4:]
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == list(range(1, 9))


def test_extend_a_finished_run(data_dir, tmp_path):
    train(cfg(max_steps=4), data_dir, tmp_path / "run")
    more = train(TrainConfig(), data_dir, tmp_path / "run", resume=True, budget_overrides={"max_steps": 6})
    assert more.step == 6 and len(more.losses) == 2


def test_token_and_flop_budgets(data_dir, tmp_path):
    tokens_per_step = 4 * 32
    r = train(cfg(max_tokens=tokens_per_step * 3), data_dir, tmp_path / "t")
    assert r.step == 3 and r.stop_reason == "tokens"
    c = cfg()
    flops_per_step = c.model_config(512).flops_per_token(32) * tokens_per_step
    r = train(cfg(max_flops=flops_per_step * 2.5), data_dir, tmp_path / "f")
    assert r.step == 3 and r.stop_reason == "flops"


def test_refuses_to_overwrite_checkpoints(data_dir, tmp_path):
    train(cfg(max_steps=2), data_dir, tmp_path / "run")
    before = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already has checkpoints"):
        train(cfg(max_steps=2, seed=1), data_dir, tmp_path / "run")
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == before


def test_bad_inputs(data_dir, tmp_path):
    with pytest.raises(UserError, match="no training budget"):
        train(cfg(), data_dir, tmp_path / "a")
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg(max_steps=1), data_dir, tmp_path / "b", resume=True)
    with pytest.raises(UserError, match="unknown preset"):
        cfg(preset="enormous")
    with pytest.raises(UserError, match="batch_size"):
        cfg(batch_size=0)
    with pytest.raises(UserError, match="lr"):
        cfg(lr=-1.0)
    with pytest.raises(UserError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_yaml_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nlr: 0.002\nmodel:\n  n_layers: 3\n")
    c = TrainConfig.from_yaml(path)
    assert c.lr == 0.002 and c.model_config(512).n_layers == 3
    path.write_text("model: [1, 2]\n")
    with pytest.raises(UserError, match="mapping"):
        TrainConfig.from_yaml(path)
    path.write_text("model:\n  d_model: -3\n")
    with pytest.raises(UserError, match="d_model"):
        TrainConfig.from_yaml(path)


def test_schedules():
    c = TrainConfig(warmup_steps=10, lr=1.0, min_lr_ratio=0.1, max_steps=100)
    assert lr_at(c, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(c, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(c, 100, 1.0) == pytest.approx(0.1)
    w = TrainConfig(warmup_steps=0, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2, max_steps=10)
    assert lr_at(w, 5, 0.7) == 1.0 and lr_at(w, 9, 0.9) == pytest.approx(0.5)
