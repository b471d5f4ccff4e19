"""Pruning and low-rank: the sparsity patterns hold, structured pruning shrinks the config exactly."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.compress.targets import linear_names
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.models.quantized import LowRankLinear
from slmkit_testing import seeded_logits as logits

CALIB = dict(calib_samples=8, calib_seq_len=32)


def compress(*args, **kwargs):
    kwargs.setdefault("measure", False)
    kwargs.setdefault("eval_windows", 4)
    return _compress(*args, **kwargs)


def block_weights(model):
    return {name: model.get_submodule(name).weight for name in linear_names(model.config)}


@pytest.mark.parametrize("method", ["prune-magnitude", "prune-wanda"])
def test_unstructured_sparsity(float_model_dir, data_dir, tmp_path, method):
    out = tmp_path / method
    compress(float_model_dir, method, out, data=data_dir, options=CompressOptions(sparsity=0.6, **CALIB))
    model = load_model(out)  # a plain dense model: loads with the ordinary loader
    record = json.loads((out / "config.json").read_text())["slmkit_compression"]
    assert record[-1]["method"] == method
    original = block_weights(load_model(float_model_dir))
    for name, w in block_weights(model).items():
        zeros = (w == 0).float()
        if method == "prune-wanda":  # per output row
            assert torch.allclose(zeros.mean(1), torch.full((w.shape[0],), int(w.shape[1] * 0.6) / w.shape[1]))
        else:
            assert abs(float(zeros.mean()) - 0.6) < 0.01
            kept = original[name][w != 0].abs().min()
            assert kept >= original[name][w == 0].abs().max()  # the smallest magnitudes went
        assert torch.equal(w[w != 0], original[name][w != 0])
    assert torch.equal(model.embed_tokens.weight, load_model(float_model_dir).embed_tokens.weight)


def test_two_four_pattern(float_model_dir, data_dir, tmp_path):
    out = tmp_path / "24"
    compress(float_model_dir, "prune-2:4", out, data=data_dir, options=CompressOptions(**CALIB))
    for w in block_weights(load_model(out)).values():
        zeros_per_group = (w.view(w.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros_per_group >= 2).all())


def test_two_four_needs_width_divisible_by_four(data_dir, tmp_path, make_model):
    src = make_model(tmp_path / "odd", data_dir, d_ff=30)
    with pytest.raises(UserError, match="divisible by 4; layers.0.mlp.down_proj has 30"):
        compress(src, "prune-2:4", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_structured_drops_dead_channels_and_layers_exactly(data_dir, tmp_path, make_model):
    """Channels whose activation is zero and a block that is the identity are what it removes first."""
    from slmkit.interop.checkpoint import save_model

    src = make_model(tmp_path / "src", data_dir, n_layers=3)
    model = load_model(src)
    with torch.no_grad():
        for block in model.layers:
            block.mlp.up_proj.weight[1::2] = 0  # half the FFN channels carry nothing
        model.layers[1].self_attn.o_proj.weight.zero_()  # block 1 adds nothing: x_out == x_in
        model.layers[1].mlp.down_proj.weight.zero_()
    save_model(model, tmp_path / "dead", tokenizer_dir=src)
    reference = logits(model)
    out = tmp_path / "small"
    result = compress(
        tmp_path / "dead",
        "prune-structured",
        out,
        data=data_dir,
        options=CompressOptions(ffn_keep=0.5, drop_layers=1, **CALIB),
    )
    small = load_model(out)
    assert (small.config.n_layers, small.config.d_ff) == (2, 64)
    assert torch.allclose(logits(small), reference, atol=1e-5)
    assert result.after.parameters < result.before.parameters
    assert result.after.size_bytes < result.before.size_bytes


def test_structured_heads(float_model_dir, data_dir, tmp_path):
    out = tmp_path / "heads"
    compress(float_model_dir, "prune-structured", out, data=data_dir, options=CompressOptions(heads_keep=0.5, **CALIB))
    small = load_model(out)
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.dim_per_head) == (2, 2, 16)
    assert small.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    out_config = json.loads((out / "config.json").read_text())
    assert out_config["num_attention_heads"] == 2 and out_config["head_dim"] == 16
    with pytest.raises(UserError, match="at least one of"):
        compress(float_model_dir, "prune-structured", tmp_path / "x", data=data_dir, options=CompressOptions(**CALIB))
    with pytest.raises(UserError, match="needs calibration data"):
        compress(float_model_dir, "prune-structured", tmp_path / "x", options=CompressOptions(ffn_keep=0.5))


def test_lowrank(float_model_dir, tmp_path):
    f_model = load_model(float_model_dir)
    result = compress(float_model_dir, "lowrank", tmp_path / "lr", options=CompressOptions(energy=0.5))
    model = load_model(tmp_path / "lr")
    spec = json.loads((tmp_path / "lr" / "config.json").read_text())["quantization_config"]
    assert spec["method"] == "lowrank" and spec["modules"]
    layer = model.get_submodule(spec["modules"][0])
    assert isinstance(layer, LowRankLinear) and layer.rank == spec["ranks"][spec["modules"][0]]
    assert result.after.parameters < result.before.parameters
    assert result.after.size_bytes < result.before.size_bytes
    # weights that are truly rank 8: the factorization finds rank 8 and keeps the function
    from slmkit.interop.checkpoint import save_model

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in block_weights(f_model).values():
            w.copy_(torch.randn(w.shape[0], 8, generator=gen) @ torch.randn(8, w.shape[1], generator=gen) * 0.1)
    save_model(f_model, tmp_path / "rank8", tokenizer_dir=float_model_dir)
    compress(tmp_path / "rank8", "lowrank", tmp_path / "hi", options=CompressOptions(energy=0.999))
    hi = load_model(tmp_path / "hi")
    assert all(layer.rank == 8 for layer in hi.modules() if isinstance(layer, LowRankLinear))
    assert torch.allclose(logits(hi), logits(f_model), atol=1e-4)
    with pytest.raises(UserError, match="--energy"):
        compress(float_model_dir, "lowrank", tmp_path / "bad", options=CompressOptions(energy=1.5))


def test_prune_then_quantize_is_allowed(float_model_dir, data_dir, tmp_path):
    compress(float_model_dir, "prune-magnitude", tmp_path / "p", options=CompressOptions(sparsity=0.3))
    compress(tmp_path / "p", "int8", tmp_path / "pq")
    config = json.loads((tmp_path / "pq" / "config.json").read_text())
    assert config["slmkit_compression"][0]["method"] == "prune-magnitude"
    assert config["quantization_config"]["method"] == "int8"
    load_model(tmp_path / "pq")
