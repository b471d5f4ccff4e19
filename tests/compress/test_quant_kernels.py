"""The CPU kernels behind Int8Linear / Int4Linear: close to the dequantized matmul they stand for, the same greedy
output as that reference on a small model, the saved layout untouched, and decode threads chosen by the weights a
compressed model stands for (its packed tensors are buffers, not parameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit.compress.pipeline import CompressOptions
from slmkit.compress.pipeline import compress as _compress
from slmkit.compress.quantize import int4_rtn, int8_quantize
from slmkit.interop.checkpoint import load_model
from slmkit.models.quantized import (
    INT8_KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    dequantized_matmuls,
    pack_int4,
    weight_count,
)
from slmkit_testing import rel_err

# bf16 has an 8-bit significand: rounding the input and the output costs ~2^-9 each, relative; measured ~3e-3 rms
KERNEL_RMS = 6e-3


def int8_layer(n: int, k: int, bias: bool, gen: torch.Generator) -> Int8Linear:
    layer = Int8Linear(k, n, bias)
    codes, scales = int8_quantize(torch.randn(n, k, generator=gen) * 0.05)
    state = {"qweight": codes, "scales": scales}
    if bias:
        state["bias"] = torch.randn(n, generator=gen)
    layer.load_state_dict(state, assign=True)
    return layer.eval()


def int4_layer(n: int, k: int, group: int, bias: bool, gen: torch.Generator) -> Int4Linear:
    layer = Int4Linear(k, n, group, bias)
    codes, scales, zeros = int4_rtn(torch.randn(n, k, generator=gen) * 0.05, group)
    state = {"qweight": pack_int4(codes), "scales": scales.half(), "zeros": zeros.half()}
    if bias:
        state["bias"] = torch.randn(n, generator=gen)
    layer.load_state_dict(state)
    return layer.eval()


def dense(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, Int8Linear):
        return layer.codes().float() * layer.scales[:, None]
    return layer.dequantize()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("n,k,group,bias", [(64, 64, 32, False), (48, 128, 64, True), (96, 256, 128, False)])
@pytest.mark.parametrize("rows", [1, 5, INT8_KERNEL_MAX_ROWS + 1])
def test_kernel_matches_dequantized_matmul(kind, n, k, group, bias, rows):
    gen = torch.Generator().manual_seed(n + k + rows)
    layer = int8_layer(n, k, bias, gen) if kind == "int8" else int4_layer(n, k, group, bias, gen)
    assert layer.use_kernel
    x = torch.randn(2, rows, k, generator=gen)[:1]  # (1, rows, K), a view as the model hands in
    with torch.no_grad():
        reference = F.linear(x, dense(layer), layer.bias)
        fast = layer(x)
        with dequantized_matmuls():
            exact = layer(x)
    assert fast.shape == (1, rows, n)
    assert torch.allclose(exact, reference, atol=1e-5, rtol=1e-5)
    error = rel_err(fast, reference)
    if kind == "int8" and rows > INT8_KERNEL_MAX_ROWS:
        assert error < 1e-6  # prefill-sized inputs widen the weight: exact
    else:
        assert 0 < error < KERNEL_RMS  # the kernel ran (bf16 rounding is visible) and is close
        # its input rounded to bf16 as the kernel does: then only the kernel's bf16 output (and int4's bf16
        # scales) differ, each element within a few bf16 ulps of the sum of |x w|
        with torch.no_grad():
            rounded = F.linear(x.bfloat16().float(), dense(layer), layer.bias)
        bound = F.linear(x.bfloat16().float().abs(), dense(layer).abs()) * 2**-7 + 1e-6
        assert ((fast - rounded).abs() <= bound).all()


def test_int8_kernel_only_where_it_is_correct():
    gen = torch.Generator().manual_seed(0)
    layer = int8_layer(32, 40, False, gen)  # torch's kernel reads K in 16-wide vectors with no tail
    assert not layer.use_kernel
    x = torch.randn(1, 40, generator=gen)
    assert torch.allclose(layer(x), F.linear(x, dense(layer)), atol=1e-5)
    # a weight at an unaligned address (as mmap hands out): the kernel would crash on several rows, so the layer
    # moves it to an aligned copy first; the loader aligns every int8 weight (the whole-model tests load files)
    layer = int8_layer(32, 64, False, gen)
    codes = layer.qweight
    storage = torch.empty(codes.numel() + 1, dtype=torch.int8)
    layer.qweight = storage[1:].view_as(codes)
    layer.qweight.copy_(codes)
    assert layer.use_kernel and layer.qweight.data_ptr() % 16
    x = torch.randn(6, 64, generator=gen)
    with torch.no_grad():
        assert rel_err(layer(x), F.linear(x, dense(layer))) < KERNEL_RMS
    assert layer.qweight.data_ptr() % 64 == 0 and torch.equal(layer.qweight, codes)


def test_kernel_path_keeps_gradients_to_the_input():
    """QLoRA: an adapter below a quantized layer needs d(out)/d(x); the kernels have no backward."""
    gen = torch.Generator().manual_seed(1)
    for layer in (int8_layer(32, 64, False, gen), int4_layer(32, 64, 32, False, gen)):
        x = torch.randn(1, 64, generator=gen, requires_grad=True)
        layer(x).sum().backward()
        assert torch.allclose(x.grad, dense(layer).sum(0), atol=1e-5)


def test_bf16_model_takes_the_kernel():
    gen = torch.Generator().manual_seed(2)
    for layer in (int8_layer(32, 64, True, gen), int4_layer(32, 64, 32, True, gen)):
        layer.to(torch.bfloat16)
        x = torch.randn(1, 64, generator=gen)
        with torch.no_grad():
            y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert rel_err(y.float(), F.linear(x, dense(layer).float(), layer.bias.detach().float())) < 2 * KERNEL_RMS


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory, data_dir, make_model):
    """A small model (rows and widths the kernels take) and its int8 and int4 compressions."""
    root = tmp_path_factory.mktemp("qk")
    src = make_model(root / "f", data_dir, d_model=64, d_ff=128, n_layers=2, max_seq_len=64)
    out = {"float": src}
    for method in ("int8", "int4"):
        out[method] = root / method
        _compress(src, method, out[method], options=CompressOptions(group_size=32), measure=False)
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_greedy_output_same_as_dequantized_path(quantized_dirs, method):
    """Whole model, decode core: the kernels' greedy continuation is the reference path's up to a near-tie, and
    the logits are close. The kernels round activations to bf16 (logits move by up to ~0.006 on a trained model),
    so two continuations may part only where the reference's top two logits are within TIE of each other, the
    kernels taking the reference's second choice; whether this tiny model has such a tie depends on the corpus it
    was trained on (it has one with ../shared's, none with the synthetic fallback)."""
    from slmkit.infer.core import decode_greedy

    tie = 0.02
    model = load_model(quantized_dirs[method])
    prompts = [[1, 5, 9, 2, 7, 3], [4, 4, 8]]
    fast, _ = decode_greedy(model, prompts, 24)
    with dequantized_matmuls():
        slow, _ = decode_greedy(model, prompts, 24)
    for prompt, ours, reference in zip(prompts, fast, slow, strict=True):
        if ours == reference:
            continue
        i = next(k for k, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b)
        with torch.no_grad(), dequantized_matmuls():
            top = model(torch.tensor([prompt + reference[:i]]))[0, -1].topk(2)
        assert float(top.values[0] - top.values[1]) < tie, (i, top)
        assert ours[i] == int(top.indices[1]) and reference[i] == int(top.indices[0])
    tokens = torch.tensor([prompts[0] + fast[0]])
    with torch.no_grad():
        fast_logits = model(tokens)
        with dequantized_matmuls():
            slow_logits = model(tokens)
    assert 0 < rel_err(fast_logits, slow_logits) < 1e-2


def test_saved_layout_unchanged_by_kernels(quantized_dirs, tmp_path):
    """The kernels' layouts are made at load: what is saved again is byte-identical to the file."""
    from safetensors.torch import load_file

    from slmkit.interop.checkpoint import save_model

    for method in ("int8", "int4"):
        model = load_model(quantized_dirs[method])
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))  # a forward builds the kernels' cached scales
        again = save_model(model, tmp_path / method, tokenizer_dir=quantized_dirs[method])
        before = load_file(str(quantized_dirs[method] / "model.safetensors"))
        after = load_file(str(again / "model.safetensors"))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before)


def test_decode_threads_count_compressed_weights(quantized_dirs, monkeypatch):
    """A compressed model decodes on as many threads as the float model it came from (its packed weights are
    buffers: counting parameters alone put every quantized model on one thread)."""
    from slmkit.infer import core

    float_model = load_model(quantized_dirs["float"])
    total = sum(p.numel() for p in float_model.parameters())
    for method in ("int8", "int4"):
        model = load_model(quantized_dirs[method])
        assert weight_count(model) == total
        monkeypatch.setattr(core, "SINGLE_THREAD_PARAMS", total)
        assert not core.single_threaded(model)
        monkeypatch.setattr(core, "SINGLE_THREAD_PARAMS", total + 1)
        assert core.single_threaded(model)
