"""Sparse upcycling: a dense model's MLPs copied into experts; training continues from it with `slm train --init`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slmkit.errors import UserError
from slmkit.loading import load
from slmkit_testing import run_slm


def logits(model, vocab: int, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("experts,top_k", [(4, 2), (3, 1), (4, 4)])
def test_upcycled_model_equals_the_dense_model_before_and_after_saving(experts, top_k, data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle
    from slmkit.interop.checkpoint import load_model

    source = make_model(tmp_path / "dense", data_dir)
    result = upcycle(source, tmp_path / "moe", experts=experts, top_k=top_k)
    dense, moe = load_model(source), load_model(result.out)
    assert moe.config.mlp == "moe" and (moe.config.moe_experts, moe.config.moe_top_k) == (experts, top_k)
    assert moe.config.family == "slmkit" and (tmp_path / "moe" / "tokenizer.json").is_file()
    vocab = dense.config.vocab_size
    assert torch.allclose(logits(moe, vocab), logits(dense, vocab), atol=1e-5)
    for e in range(experts):
        assert torch.equal(moe.layers[1].mlp.experts[e].up_proj.weight, dense.layers[1].mlp.up_proj.weight)
    assert moe.layers[0].mlp.gate.weight.abs().sum() > 0  # a random router: tokens spread from the first step
    assert result.params_after == moe.config.num_params() == sum(p.numel() for p in moe.parameters())


def test_noise_breaks_the_symmetry_of_the_experts(data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle
    from slmkit.interop.checkpoint import load_model

    source = make_model(tmp_path / "dense", data_dir)
    moe = load_model(upcycle(source, tmp_path / "moe", experts=4, top_k=2, noise=0.01).out)
    a, b = moe.layers[0].mlp.experts[0].down_proj.weight, moe.layers[0].mlp.experts[1].down_proj.weight
    assert not torch.equal(a, b) and (a - b).norm() / a.norm() < 0.05


def test_training_continues_from_the_upcycled_model(data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    source = make_model(tmp_path / "dense", data_dir)
    upcycle(source, tmp_path / "moe", experts=4, top_k=2)
    cfg = TrainConfig(
        init=str(tmp_path / "moe"), seq_len=32, batch_size=4, max_steps=6, lr=1e-3, warmup_steps=2,
        eval_interval=1000, save_interval=3, log_interval=1,
    )  # fmt: skip
    result = train(cfg, data_dir, tmp_path / "run")
    trained = load(tmp_path / "run").model
    assert trained.config.mlp == "moe" and trained.config.moe_experts == 4
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("moe_load/L0" in r for r in records)
    shutil.rmtree(tmp_path / "run" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "run", resume=True)
    assert resumed.losses == result.losses[3:]


def test_first_step_of_a_continued_run_starts_at_the_dense_loss(data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    source = make_model(tmp_path / "dense", data_dir)
    upcycle(source, tmp_path / "moe", experts=4, top_k=2)
    common = dict(seq_len=32, batch_size=4, max_steps=1, lr=1e-3, warmup_steps=1, eval_interval=1000, seed=3)
    dense_run = train(TrainConfig(init=str(source), **common), data_dir, tmp_path / "d")
    moe_run = train(TrainConfig(init=str(tmp_path / "moe"), aux_loss_weight=0.0, **common), data_dir, tmp_path / "m")
    assert moe_run.losses[0] == pytest.approx(dense_run.losses[0], abs=1e-4)


def test_bad_upcycle_inputs(data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle

    source = make_model(tmp_path / "dense", data_dir)
    with pytest.raises(UserError, match="top-k"):
        upcycle(source, tmp_path / "a", experts=2, top_k=3)
    moe = upcycle(source, tmp_path / "moe", experts=2, top_k=1).out
    with pytest.raises(UserError, match="already a mixture of experts"):
        upcycle(moe, tmp_path / "b")
    gpt2 = dict(mlp="plain", activation="gelu_tanh", norm="layernorm", positions="learned", n_kv_heads=4)
    plain = make_model(tmp_path / "gpt2", data_dir, family="gpt2", qkv_bias=True, out_bias=True, mlp_bias=True, **gpt2)
    with pytest.raises(UserError, match="gated MLP"):
        upcycle(plain, tmp_path / "c")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    r = run_slm("upcycle", source, "--out", tmp_path / "taken", "--experts", "2")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "--overwrite" in r.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    r = run_slm("upcycle", source, "--out", tmp_path / "ok", "--experts", "2", "--top-k", "1")
    assert r.returncode == 0 and "slm train --init" in r.stdout


def test_train_init_refuses_conflicting_or_foreign_models(data_dir, tmp_path, make_model):
    from slmkit.train.config import TrainConfig

    source = make_model(tmp_path / "dense", data_dir)
    with pytest.raises(UserError, match="init"):
        TrainConfig(init=str(source), model={"n_layers": 3})
    r = run_slm("train", "--init", source, "--preset", "tiny", "--data", data_dir, "--out", tmp_path / "r",
                "--max-steps", "1")  # fmt: skip
    assert r.returncode == 2 and "--init gives the model" in r.stderr
    r = run_slm("train", "--init", tmp_path / "missing", "--data", data_dir, "--out", tmp_path / "r2",
                "--max-steps", "1")  # fmt: skip
    assert r.returncode == 2 and "no such model" in r.stderr
