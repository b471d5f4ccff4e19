"""slmkit's native int8 kernel (slmkit.models.native): built from source at first use, the tiled layout and its
inverse, products against float64 on the dequantized weights (int16 activations: ~1e-5 relative), the int32
chunking at large K, non-finite and zero inputs, embedding rows from a tied head's tiles, state dicts in the
row-major layout, the torch op a compiled step calls, and the fallback when the library cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.compress.quantize import int8_quantize
from slmkit.interop.checkpoint import load_model
from slmkit.models import native
from slmkit.models.quantized import NATIVE_INT8_MAX_ROWS, Int8Embedding, Int8Linear, dequantized_matmuls

needs_native = pytest.mark.skipif(not native.int8_available(), reason="native kernels not built (no C compiler?)")


def tiled_layer(n: int, k: int, bias: bool, gen: torch.Generator, codes: torch.Tensor | None = None) -> Int8Linear:
    layer = Int8Linear(k, n, bias)
    if codes is None:
        codes, scales = int8_quantize(torch.randn(n, k, generator=gen) * 0.05)
    else:
        scales = torch.rand(n, generator=gen) * 0.01 + 1e-3
    state = {"qweight": codes, "scales": scales}
    if bias:
        state["bias"] = torch.randn(n, generator=gen)
    layer.load_state_dict(state, assign=True)
    assert layer.tile() and layer.tiled
    return layer.eval()


def exact(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.codes().double() * layer.scales.double()[:, None]
    bias = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x.double(), weight, bias)


@pytest.mark.parametrize("n,k", [(5, 32), (48, 96), (130, 256)])
def test_tiles_round_trip_and_rows(n, k):
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    tiles = native.tile_int8(codes)
    assert tiles.shape == ((n + 3) // 4, k // 32, 4, 32)
    # element (r, c) at (r/4)*4K + (c/32)*128 + (r%4)*32 + c%32; the padding rows are zero
    flat = tiles.reshape(-1)
    for r, c in [(0, 0), (n - 1, k - 1), (n // 2, 33 % k), (min(3, n - 1), 31)]:
        assert flat[(r // 4) * 4 * k + (c // 32) * 128 + (r % 4) * 32 + c % 32] == codes[r, c]
    assert int(tiles.reshape(-1, k).abs().sum()) == int(codes.abs().sum())  # only zeros added
    assert torch.equal(native.untile_int8(tiles, n), codes)
    assert torch.equal(native.untile_int8(tiles, n, torch.float32), codes.float())
    idx = torch.tensor([[0, n - 1], [n // 2, 0]])
    assert torch.equal(native.tiled_rows(tiles, idx), codes[idx])
    with pytest.raises(ValueError, match="multiple of 32"):
        native.tile_int8(codes[:, : k - 1])


@needs_native
@pytest.mark.parametrize("n,k,bias", [(64, 64, False), (50, 96, True), (7, 32, False), (96, 4096 + 64, True)])
@pytest.mark.parametrize("rows", [1, 3, NATIVE_INT8_MAX_ROWS])
def test_native_matches_float64_product(n, k, bias, rows):
    gen = torch.Generator().manual_seed(n * k + rows)
    layer = tiled_layer(n, k, bias, gen)
    x = torch.randn(1, rows, k, generator=gen) * 3
    with torch.no_grad():
        y = layer(x)
        with dequantized_matmuls():
            widened = layer(x)
    reference = exact(layer, x)
    assert y.shape == (1, rows, n) and y.dtype == torch.float32
    # per output, int16 activations: |error| <= sum |w| x (max |x| of the row) x 2^-16 (plus fp32 sums)
    weight = layer.codes().double().abs() * layer.scales.double()[:, None]
    bound = x.double().abs().amax(-1, keepdim=True) * weight.sum(1) * 2**-16 + 1e-5
    assert ((y.double() - reference).abs() <= bound).all()
    assert not torch.equal(y, widened)  # the kernel ran, not the widening path
    assert torch.allclose(widened.double(), reference, rtol=1e-4, atol=1e-4)  # fp32 GEMM sums


@needs_native
def test_int32_sums_do_not_overflow_at_large_k():
    """Every code at +-127 and every input at its maximum: one row's sum is 127 x 32767 x K in int16 units,
    2^34 at K = 8192, far beyond int32; the kernel flushes its integer sums to fp32 every 2048 columns."""
    n, k = 8, 8192
    codes = torch.full((n, k), 127, dtype=torch.int8)
    codes[1::2] = -127
    layer = tiled_layer(n, k, False, torch.Generator().manual_seed(0), codes=codes)
    x = torch.ones(2, k)
    x[1] *= -2.5
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y.double(), exact(layer, x), rtol=1e-6)


@needs_native
def test_non_finite_and_zero_rows():
    layer = tiled_layer(16, 64, True, torch.Generator().manual_seed(1))
    x = torch.randn(4, 64)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    x[2] = 0.0
    with torch.no_grad():
        y = layer(x)
    assert y[0].isnan().all() and y[1].isnan().all()  # a non-finite row gives no finite-looking answer
    assert torch.equal(y[2], layer.bias.detach())  # a zero row: exactly the bias
    assert torch.isfinite(y[3]).all()


@needs_native
def test_gradients_and_bf16_inputs_take_other_paths():
    layer = tiled_layer(32, 64, False, torch.Generator().manual_seed(2))
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()  # QLoRA: the widening path, which passes gradients back
    dense = layer.codes().float() * layer.scales[:, None]
    assert torch.allclose(x.grad, dense.sum(0), atol=1e-5)
    with torch.no_grad():
        y = layer(x.detach().bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.linear(x.detach().bfloat16().float(), dense), rtol=1e-2, atol=1e-2)


@needs_native
def test_torch_op_for_compiled_steps():
    layer = tiled_layer(48, 64, False, torch.Generator().manual_seed(3))
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.slmkit.int8_linear, (x, layer.qweight, layer.scales, 48))
    y = torch.ops.slmkit.int8_linear(x, layer.qweight, layer.scales, 48)
    with torch.no_grad():
        assert torch.equal(y, layer(x))


@pytest.fixture(scope="module")
def int8_embeddings_dir(tmp_path_factory, data_dir, make_model):
    root = tmp_path_factory.mktemp("native")
    src = make_model(root / "f", data_dir, d_model=64, d_ff=128, n_layers=2, max_seq_len=64)
    out = root / "q8"
    _compress(src, "int8", out, options=CompressOptions(embeddings="int8"), measure=False)
    return out


@needs_native
def test_tied_head_and_embedding_share_one_tiled_copy(int8_embeddings_dir, tmp_path):
    from safetensors.torch import load_file

    from slmkit.interop.checkpoint import save_model

    model = load_model(int8_embeddings_dir)
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, Int8Embedding) and emb.tiled and head.tiled
    assert emb.qweight is head.qweight  # one copy of the vocabulary's codes in memory
    assert all(m.tiled for m in model.modules() if isinstance(m, Int8Linear))
    before = load_file(str(int8_embeddings_dir / "model.safetensors"))
    ids = torch.tensor([[0, 5, emb.num_embeddings - 1]])
    codes, scales = before["model.embed_tokens.qweight"], before["model.embed_tokens.scales"]  # HF names on disk
    expected = codes[ids].float() * scales[ids].unsqueeze(-1)
    assert torch.equal(emb(ids), expected)
    # saved again in the row-major layout, byte for byte
    again = save_model(model, tmp_path / "again", tokenizer_dir=int8_embeddings_dir)
    after = load_file(str(again / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    # loading a state dict into the tiled model copies into the shared tiles (row-major codes in, tiles kept)
    state = model.state_dict()
    assert state["embed_tokens.qweight"].shape == (emb.num_embeddings, emb.embedding_dim)
    for key in ("embed_tokens.qweight", "lm_head.qweight"):
        state[key] = torch.ones_like(state[key])
    model.load_state_dict(state)
    assert emb.qweight is head.qweight and emb.tiled
    assert torch.equal(head.codes(), torch.ones(emb.num_embeddings, emb.embedding_dim, dtype=torch.int8))


@needs_native
def test_greedy_same_as_widened_reference(int8_embeddings_dir):
    from slmkit.infer.core import decode_greedy

    model = load_model(int8_embeddings_dir)
    prompts = [[1, 5, 9, 2, 7, 3], [4, 4, 8]]
    fast, _ = decode_greedy(model, prompts, 24)
    with dequantized_matmuls():
        slow, _ = decode_greedy(model, prompts, 24)
    assert fast == slow  # int16 activations move logits by ~1e-5: no near-tie on a tiny model flips
    tokens = torch.tensor([prompts[0] + fast[0]])
    with torch.no_grad():
        ours = model(tokens)
        with dequantized_matmuls():
            reference = model(tokens)
    assert 0 < (ours - reference).abs().max() < 1e-3


def test_fallback_without_a_compiler(monkeypatch, tmp_path, caplog):
    """A compiler that fails, or the switch off: no library, one log line, and layers keep torch's kernel."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # exits 1 without writing anything
    monkeypatch.setattr(native, "_cache_dirs", lambda: [tmp_path / "cache"])
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="slmkit.models.native"):
            assert native.library() is None and native.simd_level() == -1 and not native.int8_available()
        assert "not built" in caplog.text
        layer = Int8Linear(64, 32)
        codes, scales = int8_quantize(torch.randn(32, 64) * 0.05)
        layer.load_state_dict({"qweight": codes, "scales": scales}, assign=True)
        assert not layer.tile() and layer.qweight is codes
        assert not list((tmp_path / "cache").glob("*.partial"))  # the failed build left nothing behind
        monkeypatch.delenv("CC")
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native.library.cache_clear()
        assert native.library() is None
    finally:
        native.library.cache_clear()


# ---- int4 --------------------------------------------------------------------------------------------------------
needs_native_int4 = pytest.mark.skipif(not native.int4_available(), reason="native int4 kernel needs an AVX-512 build")


@pytest.mark.parametrize("n,k,group", [(5, 64, 32), (48, 256, 128), (130, 512, 64)])
def test_int4_tiles_round_trip(n, k, group):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // group), torch.randn(n, k // group)
    tiles, sz = native.tile_int4(codes, scales, zeros, group)
    assert tiles.shape == ((n + 3) // 4, k // 32, 4, 16) and sz.shape == ((n + 3) // 4, k // group, 2, 4)
    assert torch.equal(native.untile_int4(tiles, n), codes)
    # byte j of a tile row: column j in the low nibble, column j + 16 in the high one
    assert int(tiles[0, 0, 1, 3]) == int(codes[1, 3]) | (int(codes[1, 19]) << 4)
    assert sz[0, -1, 0, 2] == scales[2, -1] and sz[0, -1, 1, 2] == zeros[2, -1]
    with pytest.raises(ValueError, match="multiples of 32"):
        native.tile_int4(codes, scales, zeros, 16)


@needs_native_int4
@pytest.mark.parametrize("n,k,group,rows", [(64, 64, 32, 1), (50, 256, 128, 3), (96, 4096 + 128, 64, 2)])
def test_int4_native_matches_float64_product(n, k, group, rows):
    from slmkit.compress.quantize import int4_rtn
    from slmkit.models.quantized import int4_dequant

    gen = torch.Generator().manual_seed(n + k)
    codes, scales, zeros = int4_rtn(torch.randn(n, k, generator=gen) * 0.05, group)
    tiles, sz = native.tile_int4(codes, scales.float(), zeros.float(), group)
    x = torch.randn(rows, k, generator=gen) * 2
    y = native.int4_linear(x, tiles, sz, n, group)
    dense = int4_dequant(codes.double(), scales.double(), zeros.double(), group)
    reference = F.linear(x.double(), dense)
    bound = x.double().abs().amax(-1, keepdim=True) * dense.abs().sum(1) * 2**-15 + 1e-5
    assert ((y.double() - reference).abs() <= bound).all()
    torch.library.opcheck(torch.ops.slmkit.int4_linear, (x, tiles, sz, n, group))


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, data_dir, make_model):
    root = tmp_path_factory.mktemp("native4")
    src = make_model(root / "f", data_dir, d_model=64, d_ff=128, n_layers=2, max_seq_len=64)
    out = root / "q4"
    _compress(src, "int4", out, options=CompressOptions(group_size=32), measure=False)
    return out


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fused_groups_are_one_kernel_call(kind, int8_embeddings_dir, int4_dir):
    """q/k/v and gate/up of a loaded quantized model run as one call over tiles lying back to back: the same
    outputs, bit for bit, as the three (two) calls (the input row is quantized the same way once); a layer whose
    scales are replaced afterwards sends the group back to one call per linear."""
    from slmkit.models.decode_layout import fused_call

    if not (native.int8_available() if kind == "int8" else native.int4_available()):
        pytest.skip("native kernel not built")
    model = load_model(int8_embeddings_dir if kind == "int8" else int4_dir)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    x = torch.randn(1, 2, attn.q_proj.in_features)
    with torch.no_grad():
        qkv, gate_up = fused_call(attn, x), fused_call(mlp, x)
        assert qkv is not None and gate_up is not None
        assert torch.equal(qkv, torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
        assert torch.equal(gate_up, torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1))
        assert fused_call(attn, torch.randn(1, 40, attn.q_proj.in_features)) is None  # prefill-sized: one by one
    assert fused_call(attn, x) is None  # gradients on
    handle = attn.v_proj.register_forward_hook(lambda module, args, out: out + 1.0)  # as a LoRA adapter adds its own
    with torch.no_grad():
        assert fused_call(attn, x) is None  # the hook must run: the linears one by one
    handle.remove()
    state = {key: value.clone() for key, value in attn.k_proj.state_dict().items()}
    attn.k_proj.load_state_dict(state, assign=True)  # new tensors for k: the fused group no longer applies
    with torch.no_grad():
        assert fused_call(attn, x) is None and fused_call(mlp, x) is not None


@pytest.mark.parametrize("flags", [("-mavx2", "-mfma", "-mno-avx512f"), ("-mno-avx2", "-mno-avx512f", "-mno-fma")])
def test_other_simd_paths_compute_the_same(flags, tmp_path):
    """The AVX2 and portable-C paths (what a CPU without AVX-512 builds) against float64, for each kernel."""
    import ctypes
    import platform
    import shutil
    import subprocess

    from slmkit.compress.quantize import int4_rtn, int8_quantize
    from slmkit.models.quantized import int4_dequant

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler on x86-64")
    target = tmp_path / "variant.so"
    cmd = [compiler, "-O2", *flags, "-shared", "-fPIC", "-std=c11", "-o", str(target), str(native.SOURCE), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(target))
    lib.slm_simd_level.restype = ctypes.c_int
    assert lib.slm_simd_level() == (1 if "-mavx2" in flags else 0)
    p = ctypes.c_void_p
    gen = torch.Generator().manual_seed(7)
    n, k, group, m = 37, 256, 64, 3
    x = torch.randn(m, k, generator=gen)
    y = torch.empty(m, n)
    # fp32
    w = torch.randn(n, k, generator=gen)
    lib.slm_f32_linear.argtypes = [p] * 4 + [ctypes.c_int64] * 3
    lib.slm_f32_linear(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), m, n, k)
    assert torch.allclose(y.double(), F.linear(x.double(), w.double()), atol=1e-4)
    # int8
    codes, scales = int8_quantize(w * 0.05)
    tiles = native.tile_int8(codes)
    lib.slm_q8_linear.argtypes = [p] * 5 + [ctypes.c_int64] * 3
    assert lib.slm_q8_linear(x.data_ptr(), tiles.data_ptr(), scales.data_ptr(), None, y.data_ptr(), m, n, k) == 0
    reference = F.linear(x.double(), codes.double() * scales.double()[:, None])
    assert (y.double() - reference).abs().max() < 1e-4 * reference.abs().max()
    # int4
    codes4, s4, z4 = int4_rtn(w * 0.05, group)
    tiles4, sz = native.tile_int4(codes4, s4.float(), z4.float(), group)
    lib.slm_q4_linear.argtypes = [p] * 4 + [ctypes.c_int64] * 4
    assert lib.slm_q4_linear(x.data_ptr(), tiles4.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group) == 0
    reference = F.linear(x.double(), int4_dequant(codes4.double(), s4.double(), z4.double(), group))
    assert (y.double() - reference).abs().max() < 1e-4 * reference.abs().max()
