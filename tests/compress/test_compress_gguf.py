"""GGUF export of quantized files: float models as q8_0 / q4_0 / q4_1 / q5_0 / q5_1 (read back with
gguf.GGUFReader, dequantized with gguf.quants, checked block by block against the quantization step), and
slmkit-compressed models, whose int8 / int4 codes are written as they are (q8_0 / q4_1) or re-quantized."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.interop.gguf import export_gguf, gguf_tensors
from slmkit_testing import run_slm

BLOCK = 32


def compress(model_dir, method, out, **kwargs):
    return _compress(model_dir, method, out, measure=False, **kwargs)


def read(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(values), np.array(t.data))
    return fields, tensors


def step_bound(want: torch.Tensor, kind: str) -> torch.Tensor:
    """Largest error each weight may have under `kind`, from its block's range (llama.cpp's rounding rules)."""
    blocks = want.reshape(-1, BLOCK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    spread = blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)
    fp16 = 2e-3 * amax  # the block's scale (and minimum) are stored as fp16
    bound = {
        "Q8_0": 0.5 * amax / 127,
        "Q4_0": amax / 8,  # symmetric: the largest magnitude maps to -8, its opposite clips at +7
        "Q5_0": amax / 16,
        "Q4_1": 0.5 * spread / 15,
        "Q5_1": 0.5 * spread / 31,
        "F16": 1e-3 * amax,
    }[kind]
    return (bound + fp16 + 1e-7).expand_as(blocks).reshape(want.shape)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_float_model_as_block_type(float_model_dir, tmp_path, dtype):
    import gguf

    path = export_gguf(float_model_dir, tmp_path / "m.gguf", dtype)
    fields, tensors = read(path)
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}"))
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    reference = gguf_tensors(load_model(float_model_dir))
    assert set(tensors) == set(reference)
    # tied model: the token embedding is the output head, kept at 8 bits in 4/5-bit files as llama.cpp does
    head = "token_embd.weight"
    for name, (kind, values, raw) in tensors.items():
        want = reference[name]
        if want.dim() == 1 or name.endswith("_norm.weight"):
            assert kind == "F32", name
            assert torch.equal(values, want), name
            continue
        assert kind == ("Q8_0" if name == head else dtype.upper()), name
        block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)]
        assert raw.nbytes == want.numel() // block * size, name  # e.g. 18 bytes per 32 weights for q4_0
        error = (values - want).abs()
        assert (error <= step_bound(want, kind)).all(), (name, error.max().item())
        assert error.max() > 0, name  # really quantized

    sizes = {d: export_gguf(float_model_dir, tmp_path / f"{d}.gguf", d).stat().st_size for d in ("f32", "f16")}
    assert path.stat().st_size < sizes["f16"] < sizes["f32"]


def test_row_length_off_the_block_falls_back_to_f16(make_model, data_dir, tmp_path, caplog):
    directory = make_model(tmp_path / "odd", data_dir, d_ff=48)  # ffn_down rows are 48 long
    with caplog.at_level(logging.WARNING, logger="slmkit.interop.gguf"):
        path = export_gguf(directory, tmp_path / "m.gguf", "q8_0")
    _, tensors = read(path)
    assert tensors["blk.0.ffn_down.weight"][0] == "F16"
    assert tensors["blk.0.ffn_up.weight"][0] == "Q8_0"
    assert "blk.0.ffn_down.weight written as f16 (row length 48 is not a multiple of the q8_0 block (32))" in (
        caplog.text
    )
    # the same from an int8 model: its 48-wide int8 rows cannot be q8_0 blocks either
    compress(directory, "int8", tmp_path / "int8")
    _, tensors = read(export_gguf(tmp_path / "int8", tmp_path / "q.gguf", "q8_0"))
    assert tensors["blk.0.ffn_down.weight"][0] == "F16" and tensors["blk.0.ffn_up.weight"][0] == "Q8_0"


def test_int8_model_keeps_its_codes_as_q8_0(float_model_dir, tmp_path):
    out = tmp_path / "int8"
    compress(float_model_dir, "int8", out)
    model = load_model(out)
    path = export_gguf(out, tmp_path / "m.gguf", "q8_0")
    _, tensors = read(path)
    # the q8_0 blocks hold slmkit's own int8 codes (no second rounding): 2 bytes of fp16 scale, 32 codes
    kind, _, raw = tensors["blk.1.ffn_down.weight"]
    assert kind == "Q8_0"
    lin = model.layers[1].mlp.down_proj
    codes = raw.reshape(lin.out_features, -1, 2 + BLOCK)[..., 2:].copy().view(np.int8).reshape(lin.out_features, -1)
    assert np.array_equal(codes, lin.codes().numpy())
    kind, _, raw = tensors["token_embd.weight"]
    emb = model.embed_tokens
    codes = raw.reshape(emb.num_embeddings, -1, 2 + BLOCK)[..., 2:].copy().view(np.int8).reshape(emb.num_embeddings, -1)
    assert np.array_equal(codes, emb.codes().numpy())
    # and every tensor equals the compressed model's weights up to the fp16 rounding of the row scales
    reference = gguf_tensors(model)
    for name, (_, values, _) in tensors.items():
        want = reference[name]
        assert (values - want).abs().max() <= 1e-3 * want.abs().max() + 1e-7, name


def test_int4_model_as_q4_1_is_exact_and_q4_0_is_refused(float_model_dir, tmp_path):
    out = tmp_path / "int4"
    compress(float_model_dir, "int4", out)
    model = load_model(out)
    reference = gguf_tensors(model)
    path = export_gguf(out, tmp_path / "m.gguf", "q4_1")
    _, tensors = read(path)
    for name, (kind, values, _) in tensors.items():
        want = reference[name]
        if name.startswith("blk.") and want.dim() == 2:
            assert kind == "Q4_1", name
        error = (values - want).abs().max().item()
        assert error <= 1e-3 * want.abs().max().item() + 1e-7, (name, error)  # fp16 rounding of m only
    assert tensors["token_embd.weight"][0] == "Q8_0"  # the int8 tied embedding/head keeps its codes

    with pytest.raises(UserError, match="would round its weights a second time at 4 bits"):
        export_gguf(out, tmp_path / "x.gguf", "q4_0")
    assert not (tmp_path / "x.gguf").exists()
    # a wider type re-quantizes from the dequantized weights: within that type's step
    _, tensors = read(export_gguf(out, tmp_path / "q8.gguf", "q8_0"))
    for name, (kind, values, _) in tensors.items():
        want = reference[name]
        if kind == "Q8_0":
            assert ((values - want).abs() <= step_bound(want, kind)).all(), name


def test_int4_with_small_groups_is_refused_as_q4_1(float_model_dir, tmp_path):
    out = tmp_path / "int4-g16"
    compress(float_model_dir, "int4", out, options=CompressOptions(group_size=16))
    with pytest.raises(UserError, match="is int4 with groups below 32 or outliers"):
        export_gguf(out, tmp_path / "x.gguf", "q4_1")
    export_gguf(out, tmp_path / "ok.gguf", "q5_1")


def test_lowrank_model_exports_its_product(float_model_dir, tmp_path):
    out = tmp_path / "lowrank"
    compress(float_model_dir, "lowrank", out, options=CompressOptions(energy=0.8))
    model = load_model(out)
    lin = model.layers[0].mlp.up_proj
    _, tensors = read(export_gguf(out, tmp_path / "m.gguf", "f32"))
    assert torch.allclose(tensors["blk.0.ffn_up.weight"][1], (lin.weight_u @ lin.weight_v).detach(), atol=1e-6)


def test_cli(float_model_dir, tmp_path):
    out = tmp_path / "int8"
    compress(float_model_dir, "int8", out)
    result = run_slm("export", out, "--format", "gguf", "--out", tmp_path / "m.gguf", "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "m.gguf" in result.stdout and (tmp_path / "m.gguf").is_file()
    result = run_slm("export", out, "--format", "gguf", "--out", tmp_path / "x.gguf", "--dtype", "q3_k")
    assert result.returncode == 2
    assert "error: GGUF dtype 'q3_k' is not supported; choose one of: f32, f16, bf16, q8_0, q4_0" in result.stderr
    int4 = tmp_path / "int4"
    compress(float_model_dir, "int4", int4)
    result = run_slm("export", int4, "--format", "gguf", "--out", tmp_path / "y.gguf", "--dtype", "q4_0")
    assert result.returncode == 2
    assert "is int4 with its own 4-bit grid" in result.stderr and "export q4_1" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["m.gguf"]
