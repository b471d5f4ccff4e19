"""int8 with dynamic activations (W8A8 on the CPU quantized engine) and int4 token embeddings / output head."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.compress.quantize import int4_dequant, int4_rtn
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.models import native
from slmkit.models.quantized import Int4Embedding, Int4Linear, Int8Linear, dequantized_matmuls, unpack_int4
from slmkit_testing import rel_err, run_slm
from slmkit_testing import seeded_logits as logits

ENGINE = torch.backends.quantized.engine in ("x86", "fbgemm")


def compress(model_dir, method, out, **options):
    return _compress(model_dir, method, out, options=CompressOptions(**options), measure=False)


@pytest.fixture(scope="module")
def int8_dirs(float_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    compress(float_model_dir, "int8", root / "weight-only")
    compress(float_model_dir, "int8", root / "dynamic", activations="dynamic")
    return root / "weight-only", root / "dynamic"


def test_dynamic_int8_same_file_and_close_outputs(int8_dirs):
    from safetensors.torch import load_file

    weight_only, dynamic = int8_dirs
    spec = json.loads((dynamic / "config.json").read_text())["quantization_config"]
    assert spec["activations"] == "dynamic"
    assert json.loads((weight_only / "config.json").read_text())["quantization_config"]["activations"] == "none"
    a, b = load_file(str(weight_only / "model.safetensors")), load_file(str(dynamic / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the file format is unchanged

    plain, fast = load_model(weight_only), load_model(dynamic)
    layers = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert all(m.packed is None for m in plain.modules() if isinstance(m, Int8Linear))
    if not ENGINE:
        pytest.skip(f"quantized engine {torch.backends.quantized.engine} has no fbgemm/x86 dynamic linear")
    assert layers and all(m.packed is not None for m in layers)
    ours, reference = logits(fast), logits(plain)
    assert not torch.equal(ours, reference)  # the activation-quantized kernel really ran
    assert rel_err(ours, reference) < 0.15  # 7-bit activations, per-tensor scale: on this random model ~0.07
    # one layer: the packed kernel against x @ (int8 * scale)^T, within 7-bit activation rounding
    layer = fast.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    exact = x @ (layer.codes().float() * layer.scales[:, None]).t()
    assert rel_err(layer(x), exact) < 0.02


def test_dynamic_int8_falls_back_without_the_engine(int8_dirs, monkeypatch):
    weight_only, dynamic = int8_dirs

    def unavailable(*args, **kwargs):
        raise RuntimeError("no quantized engine here")

    monkeypatch.setattr(torch, "_make_per_channel_quantized_tensor", unavailable)
    fast = load_model(dynamic)
    assert all(m.packed is None for m in fast.modules() if isinstance(m, Int8Linear))
    assert torch.equal(logits(fast), logits(load_model(weight_only)))


@pytest.fixture
def odd_vocab_dir(make_model, data_dir, tmp_path):
    """A model whose vocabulary is not a multiple of 16 (the int4 CPU kernel's row multiple), whatever the
    test tokenizer's size (it depends on whether the shared corpus is there)."""
    from slmkit.data.shards import load_data_dir

    vocab = load_data_dir(data_dir).vocab_size
    vocab = vocab if vocab % 16 else vocab + 5
    return make_model(tmp_path / "odd", data_dir, vocab_size=vocab)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_int4_embeddings(odd_vocab_dir, tmp_path, method):
    from safetensors.torch import load_file

    float_model_dir = odd_vocab_dir
    base, small = tmp_path / "base", tmp_path / "small"
    compress(float_model_dir, method, base)
    compress(float_model_dir, method, small, embeddings="int4")
    spec = json.loads((small / "config.json").read_text())["quantization_config"]
    assert spec["embeddings"] == "int4" and spec["embeddings_group_size"] == 64
    assert spec["format_version"] == 2  # older readers refuse it by name instead of failing on the tensors
    saved = load_file(str(small / "model.safetensors"))
    float_model = load_model(float_model_dir)
    emb_weight = float_model.embed_tokens.weight.detach()
    vocab, width = emb_weight.shape
    assert saved["model.embed_tokens.qweight"].shape == (vocab, width // 2)
    assert saved["model.embed_tokens.qweight"].dtype == torch.uint8
    assert (small / "model.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size

    model = load_model(small)
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, Int4Embedding) and isinstance(head, Int4Linear)
    assert not head.use_kernel  # rows not a multiple of 16, so not torch's CPU int4 kernel for the head
    if head.tiled:  # the native kernel pads rows: the head holds its own tiled copy, the embedding its rows
        assert native.int4_available() and head.qweight.data_ptr() != emb.qweight.data_ptr()
    else:  # no kernel at all: the tied head shares the packed rows
        assert head.qweight.data_ptr() == emb.qweight.data_ptr()
    assert torch.equal(unpack_int4(emb.qweight), int4_rtn(emb_weight, 64)[0].to(torch.uint8))
    expected = int4_dequant(*int4_rtn(emb_weight, 64), 64)
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    assert torch.allclose(emb(ids), expected[ids], atol=1e-6)
    x = torch.randn(2, width)
    assert torch.allclose(head(x), x @ expected.t(), atol=1e-4)
    assert rel_err(logits(model), logits(float_model)) < 0.5  # random weights: 4-bit rounding is far from small


def test_int4_tied_head_with_the_kernel(float_model_dir, tmp_path):
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    small = load_model(float_model_dir)
    vocab = small.config.vocab_size
    rows = (vocab // 16 + 1) * 16  # a multiple of 16 above the vocabulary: the int4 kernel applies
    padded = build_model(small.config.replace(vocab_size=rows))
    state = small.state_dict()
    extra = torch.randn(rows - vocab, small.config.d_model)
    state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], extra])
    state["lm_head.weight"] = state["embed_tokens.weight"]
    padded.load_state_dict(state)
    src = save_model(padded, tmp_path / "padded", tokenizer_dir=float_model_dir)
    compress(src, "int4", tmp_path / "q", embeddings="int4")
    model = load_model(tmp_path / "q")
    emb, head = model.embed_tokens, model.lm_head
    assert head.use_kernel or head.tiled  # torch's int4 kernel, or the native one where it is built
    assert head.qweight.data_ptr() != emb.qweight.data_ptr()  # either way its own copy in the kernel's layout
    x = torch.randn(3, emb.embedding_dim)
    with dequantized_matmuls():
        assert torch.allclose(head(x), x @ emb.dequantize().t(), atol=1e-4, rtol=1e-4)
    expected = x @ emb.dequantize().t()
    assert rel_err(head(x), expected) < 6e-3  # the kernel rounds to bf16
    assert torch.equal(head.plain_packed(), emb.qweight)
    saved = model.state_dict()
    assert torch.equal(saved["embed_tokens.qweight"], emb.qweight)


def test_int4_embeddings_untied_and_gguf(make_model, data_dir, tmp_path):
    from slmkit.interop.gguf import export_gguf, gguf_tensors

    src = make_model(tmp_path / "untied", data_dir, tie_embeddings=False)
    out = tmp_path / "q"
    compress(src, "int4", out, embeddings="int4")
    model = load_model(out)
    assert (
        isinstance(model.lm_head, Int4Linear)
        and model.lm_head.qweight.data_ptr() != model.embed_tokens.qweight.data_ptr()
    )
    head = load_model(src).lm_head.weight.detach()
    x = torch.randn(3, head.shape[1])
    expected = x @ int4_dequant(*int4_rtn(head, 64), 64).t()
    from slmkit.models.quantized import dequantized_matmuls

    with dequantized_matmuls():  # the exact int4 matmul (the CPU kernel rounds inputs to bf16)
        assert torch.allclose(model.lm_head(x), expected, atol=1e-4)  # the untied head: its own int4 rows
    import gguf

    reader = gguf.GGUFReader(export_gguf(out, tmp_path / "m.gguf", "q4_1"))
    reference = gguf_tensors(model)
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            assert t.tensor_type.name == "Q4_1"  # int4 in the source: written with its own codes
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert (values - reference[t.name]).abs().max() <= 1e-3 * reference[t.name].abs().max()


def test_bad_options(float_model_dir, tmp_path):
    with pytest.raises(UserError, match="--activations dynamic applies to --method int8 only"):
        compress(float_model_dir, "int4", tmp_path / "a", activations="dynamic")
    with pytest.raises(UserError, match="--activations must be none or dynamic"):
        compress(float_model_dir, "int8", tmp_path / "b", activations="static")
    with pytest.raises(UserError, match="--embeddings must be int8 or int4"):
        compress(float_model_dir, "int4", tmp_path / "c", embeddings="int2")
    with pytest.raises(UserError, match="--embeddings int4 applies to the quantization methods only"):
        compress(float_model_dir, "lowrank", tmp_path / "d", embeddings="int4")
    result = run_slm(
        "compress", float_model_dir, "--method", "int4", "--activations", "dynamic", "--out", tmp_path / "e"
    )
    assert result.returncode == 2 and "error: --activations dynamic applies to --method int8 only" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_version_is_refused(float_model_dir, tmp_path):
    import shutil

    compress(float_model_dir, "int4", tmp_path / "q", embeddings="int4")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "q", bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="format_version 3 is not supported"):
        load_model(bad)
