"""Carving a dense model into a mixture of experts (`slm compress --method moe-carve`, CMoE): no training."""

from __future__ import annotations

import pytest
import torch

from slmkit.errors import UserError
from slmkit_testing import run_slm, seeded_logits


def carve(source, data_dir, experts, top_k, shared, partition="activation", samples=8):
    from slmkit.compress.calibration import calibration_batches
    from slmkit.compress.moe import carve_model
    from slmkit.interop.checkpoint import load_model

    dense = load_model(source)
    batches = calibration_batches(data_dir, source, samples, 32)
    return dense, *carve_model(dense, batches, experts, top_k, shared, partition=partition)


@pytest.mark.parametrize("shared,bias", [(32, False), (0, False), (0, True), (16, True)])
def test_every_expert_active_reproduces_the_dense_model(shared, bias, data_dir, tmp_path, make_model):
    extra = dict(mlp_bias=True, family="slmkit") if bias else {}
    source = make_model(tmp_path / "dense", data_dir, vectors=0.5 if bias else 0.0, **extra)
    dense, moe, _ = carve(source, data_dir, experts=4, top_k=4, shared=shared)
    assert moe.config.moe_weighting == "unit" and moe.config.d_ff == (128 - shared) // 4
    assert (moe.config.moe_shared_d_ff, moe.config.family) == (shared, "slmkit")
    reference = seeded_logits(dense)
    assert torch.allclose(seeded_logits(moe), reference, atol=1e-5)
    moe.config.moe_top_k = 2  # a sanity check that the comparison can fail: half the experts off
    moe.layers[0].mlp.top_k = moe.layers[1].mlp.top_k = 2
    assert not torch.allclose(seeded_logits(moe), reference, atol=1e-3)


def test_carved_experts_partition_the_neurons(data_dir, tmp_path, make_model):
    source = make_model(tmp_path / "dense", data_dir)
    dense, moe, record = carve(source, data_dir, experts=4, top_k=2, shared=32)
    for i, layer in enumerate(moe.layers):
        groups = [record.shared[i], *record.experts[i]]
        assert sorted(n for g in groups for n in g) == list(range(128))  # each neuron exactly once
        assert [len(g) for g in groups] == [32, 24, 24, 24, 24]
        source_mlp, carved = dense.layers[i].mlp, layer.mlp
        pieces = [carved.shared_expert, *carved.experts]
        for group, piece in zip(groups, pieces, strict=True):
            assert torch.equal(piece.up_proj.weight, source_mlp.up_proj.weight[group])
            assert torch.equal(piece.down_proj.weight, source_mlp.down_proj.weight[:, group])
        # the router row of each expert: the direction of its own neurons' mean (unit-norm) gate row
        for e, group in enumerate(record.experts[i]):
            rows = source_mlp.gate_proj.weight[group].detach()
            mean = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
            assert torch.allclose(carved.gate.weight[e].detach(), mean / mean.norm(), atol=1e-6)
        # the shared expert holds the neurons active most often
        assert record.active_rate[i] > 0


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, data_dir):
    """A tiny model trained long enough that its MLPs matter (a random or barely trained one has no co-activation
    structure to find)."""
    from slmkit.train.loop import train
    from slmkit_testing import tiny_train_config

    run = tmp_path_factory.mktemp("carve") / "run"
    # AdamW, as when these expectations were set: at this size a Muon-trained MLP on the synthetic fallback corpus
    # (no ../shared) carves at no measurable cost (the carved model scored 2e-4 nats below the dense one once)
    config = tiny_train_config(max_steps=200, batch_size=8, seq_len=64, model={"max_seq_len": 64}, optimizer="adamw")
    return train(config, data_dir, run).final_dir


def test_clustered_carve_beats_a_random_partition_on_held_out_data(data_dir, trained_dir):
    """top_k < E: the activation-clustered carve loses less than random groups of the same sizes (same shared
    expert, same router rule), scored on the val split (calibration is the train split)."""
    from slmkit.data.shards import load_data_dir
    from slmkit.train.validation import token_nats

    source = trained_dir
    val = load_data_dir(data_dir).val
    scores = {}
    for partition in ("activation", "random"):
        dense, moe, _ = carve(source, data_dir, experts=8, top_k=2, shared=16, partition=partition, samples=32)
        nats, count = token_nats(moe, val, 64, 8, None)
        scores[partition] = nats / count
    nats, count = token_nats(dense, val, 64, 8, None)
    dense_loss = nats / count
    assert dense_loss < scores["activation"] < scores["random"], (dense_loss, scores)


def test_compress_writes_a_loadable_carved_model(data_dir, tmp_path, make_model):
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.interop.checkpoint import load_model

    source = make_model(tmp_path / "dense", data_dir)
    options = CompressOptions(experts=4, top_k=4, shared=16, calib_samples=8, calib_seq_len=32)
    result = compress(source, "moe-carve", tmp_path / "moe", data=data_dir, options=options, measure=False)
    moe = load_model(tmp_path / "moe")
    assert moe.config.moe_weighting == "unit" and moe.config.moe_experts == 4
    assert torch.allclose(seeded_logits(moe), seeded_logits(load_model(source)), atol=1e-5)
    assert result.after.loss == pytest.approx(result.before.loss, abs=1e-5)
    assert result.record["shared"] == 16 and (tmp_path / "moe" / "tokenizer.json").is_file()


def test_bad_carve_inputs(data_dir, tmp_path, make_model):
    from slmkit.compress.moe import upcycle

    source = make_model(tmp_path / "dense", data_dir)
    moe = upcycle(source, tmp_path / "upcycled", experts=2, top_k=1).out
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    base = ["compress", "--method", "moe-carve", "--no-measure", "--calib-samples", "4", "--calib-seq-len", "32"]
    cases = [  # through the command: one error line, exit 2
        ([source, "--out", tmp_path / "a", "--experts", "4"], "needs calibration data"),  # no --data
        ([source, "--out", tmp_path / "b", "--data", data_dir, "--experts", "5"], "must divide"),
        ([source, "--out", tmp_path / "taken", "--data", data_dir, "--experts", "4"], "--overwrite"),
    ]
    for args, message in cases:
        r = run_slm(*base, *args)
        assert r.returncode == 2 and r.stderr.count("error:") == 1 and message in r.stderr, (args, r.stderr)
    from slmkit.compress.pipeline import CompressOptions, compress

    api_cases = [  # the same checks behind the Python API
        (source, "c", CompressOptions(experts=4, shared=30), "must divide"),
        (source, "d", CompressOptions(experts=2, top_k=3), "top-k"),
        (moe, "e", CompressOptions(), "already a mixture of experts"),
    ]
    for model, out, options, message in api_cases:
        options.calib_samples, options.calib_seq_len = 4, 32
        with pytest.raises(UserError, match=message):
            compress(model, "moe-carve", tmp_path / out, data=data_dir, options=options, measure=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not any((tmp_path / name).exists() for name in "abcde")
    with pytest.raises(UserError, match="must divide"):
        carve(source, data_dir, experts=3, top_k=1, shared=0)
    gpt2 = dict(mlp="plain", activation="gelu_tanh", norm="layernorm", positions="learned", n_kv_heads=4)
    plain = make_model(tmp_path / "gpt2", data_dir, family="gpt2", qkv_bias=True, out_bias=True, mlp_bias=True, **gpt2)
    with pytest.raises(UserError, match="gated MLP"):
        carve(plain, data_dir, experts=4, top_k=1, shared=0)
