"""Quantization: packed on disk and in memory, close to the float model, GPTQ/AWQ/outliers do their job."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.compress.quantize import int4_dequant, int4_gptq, int4_rtn
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.models import native
from slmkit.models.quantized import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantized_matmuls,
    pack_int4,
    unpack_int4,
)
from slmkit_testing import rel_err
from slmkit_testing import seeded_logits as logits

OPTS = dict(calib_samples=8, calib_seq_len=32)


def compress(*args, **kwargs):
    kwargs.setdefault("measure", False)
    kwargs.setdefault("eval_windows", 4)
    return _compress(*args, **kwargs)


def test_pack_roundtrip():
    codes = torch.randint(0, 16, (32, 64))
    assert torch.equal(unpack_int4(pack_int4(codes)).long(), codes)


@pytest.mark.parametrize("method,bits,err", [("int8", 8, 0.05), ("int4", 4, 0.3)])
def test_quantized_dir_is_packed_and_close(float_model_dir, data_dir, tmp_path, method, bits, err):
    from safetensors import safe_open

    out = tmp_path / method
    result = compress(
        float_model_dir, method, out, data=data_dir, options=CompressOptions(group_size=32, **OPTS), measure=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["method"] == method
    assert config["quantization_config"]["bits"] == bits
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert q.shape == (64, 64 if bits == 8 else 32)  # two int4 codes per byte
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()
    # file: int8 ~4x smaller than fp32, int4 more (embedding stays int8 per row)
    ratio = result.before.size_bytes / result.after.size_bytes
    assert ratio > (3.5 if bits == 8 else 4.5)
    q_model, f_model = load_model(out), load_model(float_model_dir)
    layer = q_model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8Linear if bits == 8 else Int4Linear)
    assert isinstance(q_model.embed_tokens, Int8Embedding)
    assert q_model.lm_head.qweight is q_model.embed_tokens.qweight  # tied head shares the packed tensor
    assert not any(p.dim() == 2 for p in q_model.parameters())  # no float matrix left in memory
    assert rel_err(logits(q_model), logits(f_model)) < err
    assert result.after.perplexity is not None and result.before.perplexity is not None


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int4_kernel_layout_roundtrip(float_model_dir, data_dir, tmp_path, kernel, monkeypatch):
    """Either kernel's in-memory layout (slmkit's native tiles, or torch's interleaved one where the native library
    is not built) saves back to the file's plain layout, and the kernel computes the dequantized product."""
    from safetensors.torch import load_file

    if kernel == "native" and not native.int4_available():
        pytest.skip("native kernels not built (no C compiler / no AVX-512)")
    if kernel == "torch":
        monkeypatch.setattr(native, "int4_available", lambda: False)
    out = tmp_path / "q4"
    compress(float_model_dir, "int4", out, data=data_dir, options=CompressOptions(group_size=32), measure=False)
    model = load_model(out)
    layer = model.layers[1].mlp.down_proj
    assert (layer.tiled, layer.use_kernel) == ((True, False) if kernel == "native" else (False, True))
    saved = load_file(str(out / "model.safetensors"))
    state = layer.state_dict()
    assert torch.equal(state["qweight"], saved["model.layers.1.mlp.down_proj.qweight"])
    x = torch.randn(5, layer.in_features)
    expected = x @ layer.dequantize().t()
    with dequantized_matmuls():
        assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    # the native kernel: int16 activations (~3e-5); torch's rounds its input and output to bf16 (test_quant_kernels)
    assert 0 < rel_err(layer(x), expected) < (1e-4 if kernel == "native" else 6e-3)


def test_int4_fallback_matches_dequantized(data_dir, tmp_path, make_model):

    src = make_model(tmp_path / "f", data_dir, d_ff=176, max_seq_len=32)  # 176: group size 16 only
    out = tmp_path / "q"
    compress(src, "int4", out, options=CompressOptions(), measure=False)  # auto group sizes
    spec = json.loads((out / "config.json").read_text())["quantization_config"]
    assert spec["group_size"] == 64
    assert spec["group_sizes"] == {"layers.0.mlp.down_proj": 16, "layers.1.mlp.down_proj": 16}
    model = load_model(out)
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.use_kernel or q_proj.tiled  # torch's int4 kernel, or the native one
    layer = model.layers[0].mlp.down_proj
    assert not layer.use_kernel and not layer.tiled  # groups of 16: neither kernel
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(layer(x), x @ layer.dequantize().t(), atol=1e-5)
    assert rel_err(logits(model), logits(load_model(src))) < 0.3


def test_gptq_beats_round_to_nearest():
    gen = torch.Generator().manual_seed(0)
    k, n = 128, 64
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(2048, k, generator=gen) @ mix + 0.1 * torch.randn(2048, k, generator=gen)  # correlated inputs
    w = torch.randn(n, k, generator=gen)
    h = x.t() @ x / len(x)
    rtn = int4_dequant(*int4_rtn(w, 32), 32)
    gptq = int4_dequant(*int4_gptq(w, h, 32), 32)
    err_rtn = (x @ (w - rtn).t()).pow(2).mean()
    err_gptq = (x @ (w - gptq).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_awq_fold_is_exact_in_float(float_model_dir):
    from slmkit.compress.quantize import fold_awq_scales
    from slmkit.interop.families import family_spec

    model = load_model(float_model_dir)
    before = logits(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    block = model.layers[0]
    with torch.no_grad():
        for fold in family_spec(cfg.family).scale_folds:  # qkv, gate_up, o (tied per kv group), down
            width = block.get_submodule(fold.consumers[0]).in_features
            if fold.per_kv_group:
                s = (torch.rand(cfg.n_kv_heads, 1, cfg.dim_per_head, generator=gen) + 0.5).expand(
                    cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.dim_per_head
                )
            else:
                s = torch.rand(width, generator=gen) + 0.5
            fold_awq_scales(block, fold, s.reshape(-1), cfg)
    assert torch.allclose(logits(model), before, atol=1e-4, rtol=1e-4)


def val_logits(model, data_dir) -> torch.Tensor:
    from slmkit.data.shards import load_data_dir

    tokens = torch.from_numpy(load_data_dir(data_dir).val[: 4 * 32].astype("int64")).view(4, 32)
    with torch.no_grad():
        return model(tokens)


def test_gptq_awq_and_outliers_reduce_error(float_model_dir, data_dir, tmp_path):
    """On text like the calibration text (val split), each refinement beats round-to-nearest."""
    f_logits = val_logits(load_model(float_model_dir), data_dir)
    errors = {}
    for name, method, extra in (
        ("rtn", "int4", {}),
        ("gptq", "gptq-int4", {}),
        ("awq", "awq-int4", {}),
        ("outliers", "int4", {"outliers": 0.02}),
    ):
        out = tmp_path / name
        compress(
            float_model_dir,
            method,
            out,
            data=data_dir,
            options=CompressOptions(group_size=64, calib_samples=32, calib_seq_len=32, **extra),
            measure=False,
        )
        errors[name] = rel_err(val_logits(load_model(out), data_dir), f_logits)
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["algorithm"] == "gptq"
    assert errors["gptq"] < errors["rtn"]
    assert errors["awq"] < errors["rtn"]
    assert errors["outliers"] < errors["rtn"]


def test_quantization_bad_input(float_model_dir, data_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(UserError, match="does not divide the input width 64"):
        compress(float_model_dir, "int4", out, options=CompressOptions(group_size=48), measure=False)
    with pytest.raises(UserError, match="needs calibration data"):
        compress(float_model_dir, "gptq-int4", out, measure=False)
    with pytest.raises(UserError, match="calibration needs 100000 windows"):
        compress(float_model_dir, "gptq-int4", out, data=data_dir, options=CompressOptions(calib_samples=100000))
    with pytest.raises(UserError, match="unknown compression method 'int3'"):
        compress(float_model_dir, "int3", out, measure=False)
    with pytest.raises(UserError, match="--outliers"):
        compress(float_model_dir, "int4", out, options=CompressOptions(group_size=32, outliers=0.5), measure=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # no temporary left behind
    compress(float_model_dir, "int8", tmp_path / "q8", measure=False)
    with pytest.raises(UserError, match="already compressed"):
        compress(tmp_path / "q8", "int4", out, measure=False)
    assert not out.exists()


def test_int8_kernel_path_matches_default(float_model_dir, tmp_path):
    compress(float_model_dir, "int8", tmp_path / "q8")
    layer = load_model(tmp_path / "q8").layers[0].mlp.up_proj
    # decode-sized inputs: the native kernel where it is built (int16 activations), else torch's (bf16 ones)
    assert layer.tiled == native.int8_available() and layer.use_kernel
    x = torch.randn(3, layer.in_features)
    reference = x @ (layer.codes().float() * layer.scales[:, None]).t()
    with dequantized_matmuls():
        assert torch.allclose(layer(x), reference, atol=1e-5)
    assert 0 < rel_err(layer(x), reference) < (1e-4 if layer.tiled else 6e-3)


@pytest.mark.parametrize("method", ["int8", "int4", "lowrank"])
def test_linear_biases_survive_compression(make_model, data_dir, tmp_path, method):
    from slmkit.interop.checkpoint import save_model
    from slmkit.interop.gguf import gguf_tensors

    float_model = load_model(make_model(tmp_path / "m", data_dir, family="qwen2", qkv_bias=True))
    with torch.no_grad():  # large biases: dropping them would move the logits far more than rounding does
        for block in float_model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.normal_(0, 3.0)
    src = save_model(float_model, tmp_path / "biased", tokenizer_dir=tmp_path / "m")
    out = tmp_path / method
    compress(src, method, out, options=CompressOptions(energy=0.5), measure=False)
    model = load_model(out)
    layer = model.layers[1].self_attn.v_proj
    assert type(layer).__name__ != "Linear"
    assert layer.bias is not None and torch.equal(layer.bias.detach(), float_model.layers[1].self_attn.v_proj.bias)
    # the compressed forward adds the bias: it matches a float model holding the dequantized weights and biases
    from slmkit.models import build_model
    from slmkit.models.quantized import dense_state_dict

    dense = build_model(model.config)
    dense.load_state_dict(dense_state_dict(model))
    with dequantized_matmuls():  # exact; the CPU kernels round activations to bf16 (tests/compress/test_quant_kernels)
        assert rel_err(logits(model), logits(dense.eval())) < 1e-4
    assert rel_err(logits(model), logits(dense.eval())) < 1e-2
    if method == "int8":
        assert rel_err(logits(model), logits(float_model)) < 0.05
    assert torch.equal(gguf_tensors(model)["blk.1.attn_v.bias"], float_model.layers[1].self_attn.v_proj.bias.detach())


def test_scores_are_taken_at_the_eval_length_not_the_calibration_length(float_model_dir, data_dir, tmp_path):
    """`eval_seq_len` scores before and after on windows of that length (the float model's full context in `slm
    build`, which compares a candidate with the float model scored there): calibrated and scored at 16 tokens,
    int8 read worse than the float model scored at its 64, from the shorter windows alone."""
    from slmkit.data.shards import load_data_dir
    from slmkit.train.validation import token_nats

    val = load_data_dir(data_dir).val
    nats, count = token_nats(load_model(float_model_dir), val, 64, 8, 4)
    short = compress(
        float_model_dir, "int8", tmp_path / "short", data=data_dir, options=CompressOptions(calib_seq_len=16)
    )
    full = compress(
        float_model_dir,
        "int8",
        tmp_path / "full",
        data=data_dir,
        options=CompressOptions(calib_seq_len=16),
        eval_seq_len=64,
    )
    assert full.before.loss == pytest.approx(nats / count, rel=1e-6)
    assert short.before.loss != pytest.approx(full.before.loss, rel=1e-3)
    assert abs(full.after.loss - full.before.loss) < 0.05 * full.before.loss
