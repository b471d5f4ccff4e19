"""Distillation: the loss is the documented mix, a resumed run equals an uninterrupted one, bad input is refused."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from slmkit.compress.distill import distill, distill_loss
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.train.config import TrainConfig

CFG = TrainConfig(
    preset="tiny",
    model={"max_seq_len": 64},
    seq_len=32,
    batch_size=4,
    lr=3e-3,
    warmup_steps=2,
    max_steps=6,
    eval_batches=1,
    save_interval=1000,
    device="cpu",
    seed=3,
)


def test_distill_loss_terms():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    y = torch.randint(0, 11, (2, 5), generator=gen)
    temp = 2.0
    p = F.softmax(t / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean()
    ce = F.cross_entropy(s.view(-1, 11), y.view(-1))
    assert torch.allclose(distill_loss(s, t, y, temp, 1.0), temp**2 * kl, atol=1e-5)
    assert torch.allclose(distill_loss(s, t, y, temp, 0.0), ce, atol=1e-5)
    assert torch.allclose(distill_loss(s, t, y, temp, 0.3), 0.3 * temp**2 * kl + 0.7 * ce, atol=1e-5)
    assert float(distill_loss(t, t, y, temp, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_resume_equals_uninterrupted(float_model_dir, data_dir, tmp_path, make_model):
    student = make_model(tmp_path / "student", data_dir, d_model=32, d_ff=64, seed=5)
    full = distill(float_model_dir, student, data_dir, tmp_path / "full", CFG)
    assert len(full.losses) == 6 and all(math.isfinite(x) for x in full.losses)
    assert full.val_loss is not None and full.teacher_val_loss is not None
    part = distill(float_model_dir, student, data_dir, tmp_path / "part", dataclasses.replace(CFG, save_interval=3))
    assert part.losses == full.losses
    shutil.rmtree(tmp_path / "part" / "final")  # the run "died" after the step-3 checkpoint
    resumed = distill(float_model_dir, student, data_dir, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[3:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:6] == list(range(1, 7))
    a, b = load_model(tmp_path / "full" / "final"), load_model(resumed.final_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # extend a finished run with a larger budget
    more = distill(
        float_model_dir, student, data_dir, tmp_path / "full", resume=True, budget_overrides={"max_steps": 8}
    )
    assert more.step == 8 and len(more.losses) == 2


def test_student_from_preset_learns(float_model_dir, data_dir, tmp_path):
    cfg = dataclasses.replace(CFG, max_steps=25, lr=5e-3)
    result = distill(float_model_dir, "tiny", data_dir, tmp_path / "run", cfg, temperature=1.0, alpha=1.0)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first
    student = load_model(result.final_dir)
    assert student.config.d_model == 64 and student.config.vocab_size == load_model(float_model_dir).config.vocab_size


def test_distill_bad_input(float_model_dir, data_dir, tmp_path):
    from slmkit.compress.pipeline import compress

    with pytest.raises(UserError, match="--alpha"):
        distill(float_model_dir, "tiny", data_dir, tmp_path / "a", CFG, alpha=1.5)
    with pytest.raises(UserError, match="--temperature"):
        distill(float_model_dir, "tiny", data_dir, tmp_path / "a", CFG, temperature=0)
    with pytest.raises(UserError, match="neither a model directory nor a preset"):
        distill(float_model_dir, "huge", data_dir, tmp_path / "a", CFG)
    distill(float_model_dir, "tiny", data_dir, tmp_path / "once", dataclasses.replace(CFG, max_steps=1))
    with pytest.raises(UserError, match="already has checkpoints; pass --resume"):
        distill(float_model_dir, "tiny", data_dir, tmp_path / "once", CFG)
    with pytest.raises(UserError, match="no distillation checkpoint"):
        distill(float_model_dir, "tiny", data_dir, tmp_path / "nothing", resume=True)
    compress(float_model_dir, "int8", tmp_path / "q8", measure=False)
    with pytest.raises(UserError, match="student is quantized"):
        distill(float_model_dir, tmp_path / "q8", data_dir, tmp_path / "a", CFG)
    # a quantized teacher is fine: it only runs forward
    result = distill(tmp_path / "q8", "tiny", data_dir, tmp_path / "qt", dataclasses.replace(CFG, max_steps=2))
    assert result.step == 2


def _step_records(run) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_resumed_distillation_is_the_uninterrupted_one(float_model_dir, data_dir, tmp_path):
    """On the shared loop: grad-accum, every RNG state and the objective's metrics survive a resume."""
    cfg = dataclasses.replace(CFG, max_steps=4, grad_accum=2, eval_interval=2)
    full = distill(float_model_dir, "tiny", data_dir, tmp_path / "full", cfg, alpha=0.7)
    part_cfg = dataclasses.replace(cfg, save_interval=2)
    part = distill(float_model_dir, "tiny", data_dir, tmp_path / "part", part_cfg, alpha=0.7)
    assert part.losses == full.losses
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = distill(float_model_dir, "tiny", data_dir, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[2:]
    keys = ("step", "loss", "distill_kl", "lm_loss", "tokens")
    expected = [{k: r[k] for k in keys} for r in _step_records(tmp_path / "full")]
    assert [{k: r[k] for k in keys} for r in _step_records(tmp_path / "part")] == expected
    for r in _step_records(tmp_path / "full"):  # the logged loss is the documented mix of its terms
        assert r["loss"] == pytest.approx(0.7 * 2.0**2 * r["distill_kl"] + 0.3 * r["lm_loss"], rel=1e-5)
    state = torch.load(tmp_path / "part" / "final" / "trainer_state.pt", weights_only=False)
    assert set(state["rng"]) >= {"torch"} and state["optimizer"]["format"] == "by-name"
    saved = json.loads((tmp_path / "part" / "distill_config.json").read_text())
    assert saved["student"] == "tiny" and saved["alpha"] == 0.7
    a, b = load_model(tmp_path / "full" / "final"), load_model(resumed.final_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_ctrl_c_stops_distillation_after_the_step(float_model_dir, data_dir, tmp_path):
    """The first Ctrl-C is deferred to the end of the step, then a resumable checkpoint is saved."""
    import signal

    from slmkit.train.loop import LogReporter

    class CtrlCAtStep2(LogReporter):
        def step(self, m: dict) -> None:
            if m["step"] == 2:
                signal.raise_signal(signal.SIGINT)

    run = tmp_path / "run"
    result = distill(float_model_dir, "tiny", data_dir, run, CFG, reporter=CtrlCAtStep2())
    assert result.stop_reason == "interrupted" and result.step == 2 and result.final_dir is None
    assert (run / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    resumed = distill(float_model_dir, "tiny", data_dir, run, resume=True)
    assert resumed.step == CFG.max_steps and resumed.stop_reason == "steps"
