"""The CPU decode layout (`slmkit.models.decode_layout`, applied by every DecodeCore on a CPU): the weights it re-lays
or fuses keep their values, shapes, Parameter objects and ties; hooked (LoRA) linears are not fused; greedy decoding
through the core gives the tokens of the plain forward of an untouched model, with logits within 1e-5 at every step;
saving, loading and training are unaffected, also when the layout was applied inside torch.inference_mode. Every
test runs with both layouts: the native kernel's (fused groups as row blocks, routed linears row-major, products
through slmkit.models.native) and MKL's (column blocks, wide weights transposed), the one used without a compiler."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.infer import core as core_module
from slmkit.infer.core import decode_greedy
from slmkit.infer.engine import Engine
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model, native
from slmkit.models.attention import QKV
from slmkit.models.decode_layout import (
    decode_product,
    fused_weight,
    is_transposed,
    native_layout,
    prefers_transposed,
    use_decode_layout,
)
from slmkit.models.mlp import GATE_UP


@pytest.fixture(autouse=True, params=["native", "mkl"])
def layout(request, monkeypatch):
    if request.param == "native" and not native.f32_available():
        pytest.skip("native kernels not built (no C compiler?)")
    if request.param == "mkl":
        monkeypatch.setattr(native, "f32_available", lambda: False)
    assert native_layout() == (request.param == "native")
    return request.param


def sharp_model(tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """q/k/v (64->64, 32, 32) and gate/up (64->160 each) fused, o (64->64) and the head (64->256) re-laid, down
    (160->64) as stored; weights sharp enough that greedy paths are not degenerate."""
    cfg = ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=128,
        tie_embeddings=tie, eos_token_id=None,
    )  # fmt: skip
    model = build_model(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return model.eval()


def plain_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits from the full stateless forward (no cache, no core)."""
    ids, out, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids]))[0, -1]
            logits.append(last)
            token = int(last.argmax())
            out.append(token)
            ids.append(token)
    return out, logits


def test_relays_the_picked_weights_in_place(layout):
    model = sharp_model()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    changed = use_decode_layout(model)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    with torch.no_grad():  # the fused products serve forwards without gradients only
        qkv, gate_up = fused_weight(attn, QKV), fused_weight(mlp, GATE_UP)
    assert qkv is not None and qkv.shape == (64 + 32 + 32, 64)
    assert gate_up is not None and gate_up.shape == (2 * 160, 64)
    # in memory one row-major matrix (native) or the transpose of one (MKL's longer rows)
    assert qkv.is_contiguous() == gate_up.is_contiguous() == (layout == "native")
    assert qkv.t().is_contiguous() == (layout == "mkl")
    for linear, row in ((attn.q_proj, 0), (attn.k_proj, 64), (attn.v_proj, 96)):  # views of the fused matrix
        assert linear.weight.data_ptr() == qkv[row:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == gate_up[160:].data_ptr()
    assert prefers_transposed(attn.o_proj) and not prefers_transposed(mlp.down_proj)
    assert mlp.down_proj.weight.is_contiguous()
    if layout == "native":  # o and the head run through decode_linear: row-major, as stored
        assert attn.o_proj.weight.is_contiguous() and model.lm_head.weight.is_contiguous()
        assert changed == 2 * 2  # per layer: q/k/v fused, gate/up fused
    else:
        assert is_transposed(attn.o_proj.weight) and is_transposed(model.lm_head.weight)
        assert changed == 2 * 3 + 1  # per layer: q/k/v fused, gate/up fused, o re-laid; the tied head once
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied: one Parameter
    for name, p in model.named_parameters():
        param, value = before[name]
        assert p is param and p.shape == value.shape and torch.equal(p, value)
    assert use_decode_layout(model) == 0  # idempotent
    with torch.no_grad():
        assert fused_weight(attn, QKV) is qkv
    assert fused_weight(attn, QKV) is None  # gradients on: the linears one by one (they are the parameters)
    use_decode_layout(model, False)
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        assert fused_weight(attn, QKV) is None and fused_weight(mlp, GATE_UP) is None


def test_hooked_linears_are_not_fused():
    """A LoRA adapter adds its update through a forward hook on the linear: the fused product would skip it."""
    model = sharp_model()
    use_decode_layout(model)
    attn = model.layers[0].self_attn
    handle = attn.v_proj.register_forward_hook(lambda module, args, out: out + 1.0)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert fused_weight(attn, QKV) is None
        hooked = attn(x, None, None)
    handle.remove()
    with torch.no_grad():
        assert fused_weight(attn, QKV) is not None
        assert not torch.allclose(hooked, attn(x, None, None))
    fresh = sharp_model()
    fresh.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, out: out)
    use_decode_layout(fresh)
    with torch.no_grad():
        assert fused_weight(fresh.layers[0].mlp, GATE_UP) is None
        assert fused_weight(fresh.layers[1].mlp, GATE_UP) is not None


def test_core_greedy_matches_the_plain_forward():
    plain = sharp_model()
    model = copy.deepcopy(plain)
    prompt, n = [5, 17, 99, 3, 42], 24
    want_tokens, want_logits = plain_greedy(plain, prompt, n)
    (got,), _ = decode_greedy(model, [prompt], n)  # the core re-lays the model's weights
    assert is_transposed(model.lm_head.weight) == (not native_layout())
    assert got == want_tokens
    # logits of every step through the state, with the decode layout, against the plain forward's
    state = model.new_state(1, 64)
    ids = prompt + want_tokens
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), state=state, pos=torch.arange(len(prompt)))[0, -1]
        for i in range(n):
            assert (logits - want_logits[i]).abs().max().item() <= 1e-5
            p = len(prompt) + i
            logits = model(torch.tensor([[ids[p]]]), state=state, pos=torch.tensor([p]), upto=p + 1)[0, -1]


def test_engine_with_and_without_the_layout_agree(monkeypatch):
    prompt = [7, 1, 200, 33]
    laid = Engine(sharp_model(tie=False), tokenizer=None).generate_ids([prompt], max_new_tokens=20)[0].token_ids
    monkeypatch.setattr(core_module, "DECODE_LAYOUT", False)
    model = sharp_model(tie=False)
    stored = Engine(model, tokenizer=None).generate_ids([prompt], max_new_tokens=20)[0].token_ids
    assert all(p.is_contiguous() for p in model.parameters())  # switched off: nothing re-laid
    assert laid == stored


def test_save_load_and_training_after_the_layout(tmp_path):
    plain = sharp_model()
    model = copy.deepcopy(plain)
    with torch.inference_mode():  # as an engine run under inference mode lays it out
        use_decode_layout(model)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for (name, a), b in zip(plain.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # one training step on each: the same loss and, up to rounding, the same update
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (plain, model):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        loss = m.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_copy_carries_no_spare_fused_matrix_and_moved_weights_drop_it():
    """The fused matrices are kept outside the modules: a saved (pickled) laid-out model is no bigger than an
    untouched one (no second copy of q/k/v and gate/up), a deep copy computes what the original does; once a
    fused group's weights move to new memory, the group falls back to its linears and its fused matrix is freed."""
    model, fresh = sharp_model(), sharp_model()
    use_decode_layout(model)
    sizes = []
    for m in (fresh, model):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        sizes.append(buffer.tell())
    assert sizes[1] < sizes[0] * 1.05
    attn = model.layers[0].self_attn
    twin = copy.deepcopy(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        alive = weakref.ref(fused_weight(attn, QKV))
        assert alive() is not None
        assert fused_weight(twin.layers[0].self_attn, QKV) is None
        torch.testing.assert_close(twin(ids), model(ids), rtol=0, atol=1e-5)
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # new memory: the fused view is stale
        assert fused_weight(attn, QKV) is None
        gc.collect()
        assert alive() is None  # freed, not kept beside the weights
        torch.testing.assert_close(model(ids), twin(ids), rtol=0, atol=1e-5)


def test_native_products_match_torch(layout):
    """decode_product: the native kernel for decode-sized fp32 inputs without gradients (within fp32 summation
    order of F.linear), torch for anything else."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 200, generator=gen), torch.randn(96, generator=gen)
    for rows in (1, 3, 4, 9):
        x = torch.randn(1, rows, 200, generator=gen)
        with torch.no_grad():
            ours = decode_product(x, weight, bias)
        reference = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
        assert ours.shape == (1, rows, 96)
        assert (ours.double() - reference).abs().max() < 1e-4
    x = torch.randn(2, 200, generator=gen, requires_grad=True)
    decode_product(x, weight).sum().backward()  # with gradients: torch's F.linear, which passes them back
    assert torch.allclose(x.grad, weight.sum(0).expand(2, -1), atol=1e-5)
