"""Cross-architecture distillation: weight transfer into a hybrid student, the alignment stage, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from slmkit.compress.distill import check_transferable, distill, read_student_config, transfer_weights
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.models import build_model
from slmkit.train.config import TrainConfig
from slmkit.train.objectives import Distillation

CFG = TrainConfig(seq_len=32, batch_size=4, lr=3e-3, warmup_steps=1, max_steps=4, eval_batches=1, device="cpu", seed=3)


@pytest.fixture(scope="module")
def teacher(float_model_dir):
    return load_model(float_model_dir)


def write(path, fields):
    path.write_text(json.dumps(fields))
    return path


def student_of(teacher, tmp_path, **fields):
    config = read_student_config(write(tmp_path / "student.json", fields), teacher.config)
    check_transferable(teacher.config, config)
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights(seed=1)
    return model


def test_transfer_copies_exactly_what_it_reports(teacher, tmp_path):
    student = student_of(teacher, tmp_path, layer_pattern=["mamba2", "attention"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = transfer_weights(teacher, student)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert "embed_tokens.weight" in report.copied and "norm.weight" in report.copied
    assert "layers.0.mlp.up_proj.weight" in report.copied and "layers.1.self_attn.q_proj.weight" in report.copied
    assert not any(name.startswith("layers.0.mixer.") for name in report.copied)
    assert any(name.startswith("layers.0.mixer.") for name in report.fresh)
    assert set(report.copied).isdisjoint(report.fresh)
    for name in report.copied:
        assert torch.equal(s_state[name], t_state[name]), name
    for name in report.fresh:
        assert torch.equal(s_state[name], before[name]), name
    # every student tensor is accounted for (a tied head is the embedding)
    assert set(report.copied) | set(report.fresh) >= set(dict(student.named_parameters()))


def test_identical_student_reproduces_teacher(teacher, tmp_path):
    student = student_of(teacher, tmp_path)  # no fields: the teacher's own config
    report = transfer_weights(teacher, student)
    assert report.fresh == []
    x = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def _alignment(teacher, student, steps=6, lr=3e-3):
    objective = Distillation(teacher, 1.0, 1.0, align_steps=steps)
    objective.attach(student, torch.device("cpu"))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    x = torch.randint(0, teacher.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        assert objective.aligning()
        loss, metrics = objective.loss(student, x, x)
        assert set(metrics) == {"align_mse"}
        opt.zero_grad()
        loss.backward()
        # each layer is fed the teacher's input: no gradient reaches the embeddings (or crosses layers)
        assert student.embed_tokens.weight.grad is None
        opt.step()
        losses.append(float(loss.detach()))
    assert not objective.aligning()  # the stage ends after `steps`: logit distillation follows
    _loss, metrics = objective.loss(student, x, x)
    assert "distill_kl" in metrics
    return losses


def test_alignment_loss_zero_for_copy_and_decreases(teacher, tmp_path):
    same = student_of(teacher, tmp_path)
    transfer_weights(teacher, same)
    assert _alignment(teacher, same, steps=1)[0] == 0.0
    hybrid = student_of(teacher, tmp_path, layer_pattern=["gla", "attention"])
    transfer_weights(teacher, hybrid)
    losses = _alignment(teacher, hybrid, steps=8)
    assert losses[0] > 0 and losses[-1] < 0.8 * losses[0], losses


def test_bad_student_configs(teacher, float_model_dir, data_dir, tmp_path):
    with pytest.raises(UserError, match="vocab_size 999 differs"):
        read_student_config(write(tmp_path / "v.json", {"vocab_size": 999}), teacher.config)
    wide = read_student_config(write(tmp_path / "w.json", {"d_model": 128, "n_heads": 4}), teacher.config)
    with pytest.raises(UserError, match=r"width \(d_model\) 128 differs from the teacher's 64"):
        check_transferable(teacher.config, wide)
    deep = read_student_config(write(tmp_path / "d.json", {"preset": "tiny", "n_layers": 3}), teacher.config)
    with pytest.raises(UserError, match="layer count 3 differs"):
        check_transferable(teacher.config, deep)
    with pytest.raises(UserError, match="unknown model config field"):
        read_student_config(write(tmp_path / "u.json", {"d_modle": 64}), teacher.config)
    with pytest.raises(UserError, match="exactly one of --student"):
        distill(float_model_dir, "tiny", data_dir, tmp_path / "r", CFG, student_config=tmp_path / "d.json")
    with pytest.raises(UserError, match="layer count"):
        distill(float_model_dir, None, data_dir, tmp_path / "r", CFG, student_config=tmp_path / "d.json")


def test_resumed_run_continues_the_stage(float_model_dir, data_dir, tmp_path):
    config = write(tmp_path / "h.json", {"layer_pattern": ["gla", "attention"]})
    run = tmp_path / "run"
    first = dataclasses.replace(CFG, max_steps=2, save_interval=2)
    distill(float_model_dir, None, data_dir, run, first, student_config=config, align_steps=3)
    distill(float_model_dir, None, data_dir, run, resume=True, budget_overrides={"max_steps": 4})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = {m["step"]: "align_mse" in m for m in records if "loss" in m}
    assert stages == {1: True, 2: True, 3: True, 4: False}
