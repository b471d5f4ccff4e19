"""Objectives of the one training loop: auxiliary losses reported by modules, trainable-parameter selection,
and the shared run-dir bookkeeping (one pruning, one latest-resumable checkpoint, one cross-entropy)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.train.checkpoints import STATE_PT, latest_resumable, prune_checkpoints
from slmkit.train.config import TrainConfig
from slmkit.train.loop import RunSpec, run, train
from slmkit.train.losses import next_token_cross_entropy
from slmkit.train.objectives import LanguageModeling, NamePatterns
from slmkit_testing import tiny_train_config as cfg


class ToyRouter(torch.nn.Module):
    """Stands in for a mixture-of-experts router: no parameters, and during forward it sets `aux_loss`
    (here the mean square of what passes through, so the loss has a gradient into the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_loss = x.float().pow(2).mean()
        return x


class ToyLM(torch.nn.Module):
    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.router = ToyRouter()
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.router(self.embed(x)))


def test_aux_loss_is_added_with_its_weight_and_logged():
    torch.manual_seed(0)
    model = ToyLM()
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    objective = LanguageModeling(aux_loss_weight=0.5)
    objective.attach(model, torch.device("cpu"))
    assert objective.aux.modules == [model.router]
    loss, metrics = objective.loss(model, x, y)
    hidden = model.embed(x)
    lm = F.cross_entropy(model.head(hidden).view(-1, 11), y.view(-1))
    aux = hidden.pow(2).mean()
    assert torch.allclose(loss, lm + 0.5 * aux)
    assert torch.allclose(metrics["lm_loss"], lm) and torch.allclose(metrics["aux_loss"], aux)
    assert not metrics["aux_loss"].requires_grad and model.router.aux_loss is None  # collected, then cleared
    loss.backward()
    assert model.embed.weight.grad is not None
    # a value left by a forward outside the objective (an evaluation) is not counted in the next loss
    with torch.no_grad():
        model(x)
    model.router.aux_loss = torch.tensor(1e6)
    again, _ = objective.loss(model, x, y)
    assert torch.allclose(again, loss)


def test_model_without_aux_modules_logs_nothing_extra():
    objective = LanguageModeling(aux_loss_weight=0.5)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    objective.attach(model, torch.device("cpu"))
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    loss, metrics = objective.loss(model, x, y)
    assert not metrics and torch.allclose(loss, F.cross_entropy(model(x).view(-1, 11), y.view(-1)))


def _model_for(c: TrainConfig, data_dir) -> torch.nn.Module:
    """The model `train(c, data_dir, ...)` starts from."""
    from slmkit.data.shards import load_data_dir
    from slmkit.models import build_model

    data = load_data_dir(data_dir)
    config = c.model_config(data.vocab_size).replace(bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id)
    model = build_model(config)
    model.init_weights(seed=c.seed)
    return model


def test_aux_loss_through_the_loop(data_dir, tmp_path):
    from slmkit.data.shards import load_data_dir

    c = cfg(max_steps=3, aux_loss_weight=0.1, eval_interval=3)
    model = _model_for(c, data_dir)
    model.layers[0].router = ToyRouter()  # no parameters: the checkpoint keeps the model's names
    model.layers[0].register_forward_hook(lambda module, args, out: module.router(out))
    data = load_data_dir(data_dir)
    spec = RunSpec("training", model, LanguageModeling(aux_loss_weight=0.1), data.path, "cfg.json", TrainConfig.to_dict)
    result = run(c, data, tmp_path / "run", spec)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and result.losses == [r["loss"] for r in steps]
    for r in steps:
        assert r["aux_loss"] > 0 and r["loss"] == pytest.approx(r["lm_loss"] + 0.1 * r["aux_loss"], rel=1e-6)
    assert load_model(result.final_dir).config.n_layers == 2
    # a plain model logs no aux metrics: the LM record is what it always was
    plain = train(cfg(max_steps=1), data_dir, tmp_path / "plain")
    record = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert "aux_loss" not in record and "lm_loss" not in record and plain.step == 1


def test_only_selected_parameters_train(data_dir, tmp_path):
    c = cfg(max_steps=4, save_interval=2, trainable=["*norm*"])
    before = {k: v.clone() for k, v in _model_for(c, data_dir).state_dict().items()}
    full = train(c, data_dir, tmp_path / "full")
    after = load_model(full.final_dir).state_dict()
    assert after.keys() == before.keys()  # the checkpoint holds the whole model
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("norm" in name for name in changed)
    assert {name for name in before if "norm" in name} == changed
    # frozen parameters are not in the optimizer
    state = torch.load(tmp_path / "full" / "final" / STATE_PT, weights_only=False)
    named = [n for group in state["optimizer"]["param_groups"] for n in group["params"]]
    assert named and all("norm" in n for n in named)
    # and a run with frozen parameters resumes exactly
    shutil.rmtree(tmp_path / "full" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "full", resume=True)
    assert resumed.losses == full.losses[2:]
    with pytest.raises(UserError, match="trainable pattern 'nothing.*' matches no parameter"):
        train(cfg(max_steps=1, trainable=["nothing.*"]), data_dir, tmp_path / "typo")
    with pytest.raises(UserError, match="trainable must be a non-empty list"):
        cfg(trainable="*norm*")


def test_name_patterns():
    select = NamePatterns(["*norm*", "lm_head.*"])
    p = torch.nn.Parameter(torch.zeros(1))
    assert select("layers.0.input_layernorm.weight", p) and select("lm_head.weight", p)
    assert not select("layers.0.self_attn.q_proj.weight", p)


def test_run_dir_bookkeeping(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 10, 4):
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-x").mkdir()
    prune_checkpoints(run_dir, keep=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-10", "step-4", "step-x"]
    with pytest.raises(UserError, match="nothing to resume .*no distillation checkpoint"):
        latest_resumable(run_dir, "distill_config.json", "distillation")
    (run_dir / "train_config.json").write_text("{}")
    with pytest.raises(UserError, match="no training checkpoint to resume from"):
        latest_resumable(run_dir, "train_config.json", "training")


def test_next_token_cross_entropy():
    logits, targets = torch.randn(2, 3, 7, dtype=torch.bfloat16), torch.randint(0, 7, (2, 3))
    mean = next_token_cross_entropy(logits, targets)
    assert mean.dtype == torch.float32
    expected = F.cross_entropy(logits.float().view(-1, 7), targets.view(-1))
    assert torch.allclose(mean, expected)
    assert torch.allclose(next_token_cross_entropy(logits, targets, reduction="sum"), expected * 6)
