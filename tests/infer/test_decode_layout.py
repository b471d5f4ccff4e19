"""The CPU decode layout (`slmkit.models.decode_layout`, applied by every DecodeCore on a CPU): the weights it re-lays
keep their values, shapes, Parameter objects and ties; greedy decoding through the core gives the tokens of the
plain forward of an untouched model, with logits within 1e-5 at every step; saving, loading and training are
unaffected, also when the layout was applied inside torch.inference_mode."""

from __future__ import annotations

import copy

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.infer import core as core_module
from slmkit.infer.core import decode_greedy
from slmkit.infer.engine import Engine
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit.models.decode_layout import is_transposed, prefers_transposed, use_decode_layout


def sharp_model(tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """Wide enough that q/o (64->64), gate/up (64->160) and the head (64->256) are re-laid and k/v (64->32) and
    down (160->64) are not; weights sharp enough that greedy paths are not degenerate."""
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


def test_relays_the_picked_weights_in_place():
    model = sharp_model()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    changed = use_decode_layout(model)
    layer = model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
        assert prefers_transposed(linear) and is_transposed(linear.weight)
    for linear in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
        assert not prefers_transposed(linear) and linear.weight.is_contiguous()
    assert is_transposed(model.lm_head.weight)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied: one Parameter
    assert changed == 2 * 4 + 1  # q, o, gate, up per layer; the tied head once
    for name, p in model.named_parameters():
        param, value = before[name]
        assert p is param and p.shape == value.shape and torch.equal(p, value)
    assert use_decode_layout(model) == 0  # idempotent
    assert use_decode_layout(model, False) == changed
    assert all(p.is_contiguous() for p in model.parameters())


def test_core_greedy_matches_the_plain_forward():
    plain = sharp_model()
    model = copy.deepcopy(plain)
    prompt, n = [5, 17, 99, 3, 42], 24
    want_tokens, want_logits = plain_greedy(plain, prompt, n)
    (got,), _ = decode_greedy(model, [prompt], n)  # the core re-lays the model's weights
    assert is_transposed(model.lm_head.weight)
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
