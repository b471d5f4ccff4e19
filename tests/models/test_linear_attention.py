"""The linear-attention mixers (gla, based): the chunked form against a per-token recurrence written here, each
mixer against its definition written out from its parameters, their states through every path of the decode
core (prefill split anywhere, decode, rows of different lengths, speculative rewinds, the continuous batcher),
state sizes, parameter and FLOP counts, initial decays, config errors, training and the model directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine, EngineStats
from slmkit.models import build_model
from slmkit.models.attention import RING_SLACK, Context
from slmkit.models.linear_attention import (
    DECAY_RANGE,
    REWIND,
    BasedAttention,
    BasedState,
    GatedLinearAttention,
    LinearState,
    chunked_linear_attention,
    taylor_features,
)
from slmkit.models.state import RingKVState
from slmkit_testing import PROMPTS, plain_greedy, run_batcher

MIXERS = {"gla": GatedLinearAttention, "based": BasedAttention}


def tiny_config(kind: str, **overrides):
    base = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, linear_window=8,
        linear_chunk_size=8, linear_gate_rank=4, linear_feature_dim=4,
    )  # fmt: skip
    return preset(f"micro-{kind}", **{**base, **overrides})


def perturbed(module, seed=0, scale=0.3):
    """Weights far from the tiny initialisation, so every term of the mixer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def mixer(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return perturbed(MIXERS[kind](tiny_config(kind, **overrides), 0), seed=seed)


# ---- the chunked form ------------------------------------------------------------------------------------
def recurrence(q, k, v, g, s0):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t, one token at a time in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = s0.double() if s0 is not None else q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            s = torch.exp(g[:, :, t].double())[..., None] * s
        s = s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhdv->bhv", q[:, :, t], s))
    return torch.stack(outs, dim=2), s


@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("t", [1, 13, 32])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("start", [False, True])
def test_chunked_form_equals_the_recurrence(chunk, t, decay, start):
    gen = torch.Generator().manual_seed(chunk * 100 + t)
    q, k = torch.randn(2, 3, t, 5, generator=gen), torch.randn(2, 3, t, 5, generator=gen)
    v = torch.randn(2, 3, t, 4, generator=gen)
    g = F.logsigmoid(torch.randn(2, 3, t, 5, generator=gen) * 2) if decay else None
    s0 = torch.randn(2, 3, 5, 4, generator=gen) if start else None
    o, s = chunked_linear_attention(q, k, v, g, chunk, s0)
    o_ref, s_ref = recurrence(q, k, v, g, s0)
    assert o.shape == (2, 3, t, 4) and s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


def test_strong_decays_stay_finite_and_exact():
    """Log decays of -30 per token: a chunk's cumulative decay is far below float32's range, yet every term is
    a difference of cumulative logs and nothing overflows."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 4, generator=gen) for _ in range(3))
    g = -30 * torch.rand(1, 2, 40, 4, generator=gen)
    o, s = chunked_linear_attention(q, k, v, g, 16, None)
    o_ref, s_ref = recurrence(q, k, v, g, None)
    assert bool(torch.isfinite(o).all())
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


def test_taylor_features_give_the_second_order_similarity():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 16, generator=gen), torch.randn(7, 16, generator=gen)
    phi_q, phi_k = taylor_features(q), taylor_features(k)
    assert phi_q.shape == (5, 1 + 16 + 256)
    dot = q @ k.t()
    torch.testing.assert_close(phi_q @ phi_k.t(), 1 + dot / 4 + dot**2 / 32, atol=1e-4, rtol=1e-5)


# ---- each mixer against its definition ---------------------------------------------------------------------
def naive_gla(mx: GatedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """gla from its parameters, token by token: decay = sigmoid(W2 W1 x + b)^(1/16) per key channel."""
    b, t, c = x.shape
    h, dk, dv = mx.n_heads, mx.state_k, mx.state_v
    q = mx.q_proj(x).view(b, t, h, dk) / math.sqrt(dk)
    k, v = mx.k_proj(x).view(b, t, h, dk), mx.v_proj(x).view(b, t, h, dv)
    decay = torch.sigmoid(mx.gk_proj[1](mx.gk_proj[0](x))).pow(1 / 16).view(b, t, h, dk)
    s = torch.zeros(b, h, dk, dv)
    outs = []
    for i in range(t):
        s = decay[:, i, :, :, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhdv->bhv", q[:, i], s))
    o = torch.stack(outs, dim=1)  # (B, T, H, Dv)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mx.o_norm.eps) * mx.o_norm.weight
    return mx.o_proj(o.reshape(b, t, c) * F.silu(mx.g_proj(x)))


def naive_based(mx: BasedAttention, x: torch.Tensor) -> torch.Tensor:
    """based from its parameters, quadratically: weights 1 + q.k/sqrt(d) + (q.k)^2/(2d) over every earlier token,
    normalised; plus softmax attention over the last `window` tokens (no positions: the mixer runs without ctx)."""
    b, t, c = x.shape
    h, d, hd = mx.n_heads, mx.feature_dim, mx.head_dim
    q, k = mx.q_proj(x).view(b, t, h, d), mx.k_proj(x).view(b, t, h, d)
    v = mx.v_proj(x).view(b, t, h, hd)
    dot = torch.einsum("bihd,bjhd->bhij", q, k)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    weight = (1 + dot / math.sqrt(d) + dot**2 / (2 * d)) * causal
    linear = torch.einsum("bhij,bjhd->bihd", weight / weight.sum(-1, keepdim=True), v).reshape(b, t, c)
    att = mx.window_attn
    kv, w = att.n_kv_heads, att.window
    qa = att.q_proj(x).view(b, t, h, hd)
    ka = att.k_proj(x).view(b, t, kv, hd).repeat_interleave(h // kv, dim=2)
    va = att.v_proj(x).view(b, t, kv, hd).repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", qa, ka) / math.sqrt(hd)
    near = causal & ~torch.ones(t, t, dtype=torch.bool).tril(-w)  # keys in (i - w, i]
    probs = scores.masked_fill(~near, -math.inf).softmax(-1)
    window = torch.einsum("bhij,bjhd->bihd", probs, va).reshape(b, t, c)
    return mx.o_proj(linear) + att.o_proj(window)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_gla_equals_its_definition(chunk):
    mx = mixer("gla", linear_chunk_size=chunk)
    x = torch.randn(3, 21, 32)  # not a multiple of the chunk
    with torch.no_grad():
        torch.testing.assert_close(mx(x, None, None), naive_gla(mx, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_based_equals_its_definition(chunk):
    mx = mixer("based", linear_chunk_size=chunk)
    x = torch.randn(3, 21, 32)
    with torch.no_grad():
        torch.testing.assert_close(mx(x, None, None), naive_based(mx, x), atol=1e-5, rtol=1e-5)


# ---- states --------------------------------------------------------------------------------------------
def feed(mx, x: torch.Tensor, state, splits: list[int]) -> torch.Tensor:
    """x fed in calls cut at `splits` (positions), through `state`; the outputs concatenated."""
    bounds = [0, *splits, x.shape[1]]
    outs = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        outs.append(mx(x[:, lo:hi], Context(torch.arange(lo, hi)[None]), state))
    return torch.cat(outs, 1)


# for based (window 8, ring of 8 + 32 slots): calls across the window's edge, one-token steps, a call longer than
# the ring's slack (attends over ring + itself) and one that wraps the ring
SPLITS = [[11] + list(range(12, 30)), [1, 7, 8, 9, 16, 17], [3, 40, 41, 42, 43], [5, 50, 51], [2, 4, 6, 8, 60]]


@pytest.mark.parametrize("kind", ["gla", "based"])
@pytest.mark.parametrize("splits", SPLITS)
def test_prefill_split_anywhere_and_steps_equal_the_parallel_forward(kind, splits):
    mx = mixer(kind)
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(2, 256, None, torch.float32)
        got = feed(mx, x, state, splits)
    if kind == "based":
        assert isinstance(state.window, RingKVState)  # the bounded cache, not one slot per position
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gla", "based"])
def test_inactive_rows_keep_their_state_and_crop_takes_back_a_call(kind):
    mx = mixer(kind)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(2, 64, None, torch.float32)
        mx(x[:, :8], Context(torch.arange(8)[None]), state)
        # row 1 is fed garbage while inactive; row 0 is fed 3 tokens of which 2 are then taken back
        junk = torch.randn(2, 3, 32)
        mx(
            torch.stack((x[0, 8:11], junk[1])),
            Context(torch.tensor([[8, 9, 10]]), active=torch.tensor([True, False])),
            state,
        )
        state.crop(0, 9)
        state.crop(1, 8)  # as the decode core does for rows it fed placeholders
        linear = state.linear if kind == "based" else state
        assert linear.length.tolist() == [9, 8]
        out = mx(torch.stack((x[0, 9:12], x[1, 8:11])), Context(torch.tensor([[9, 10, 11], [8, 9, 10]])), state)
    torch.testing.assert_close(out[0], full[0, 9:12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], full[1, 8:11], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gla", "based"])
def test_crop_goes_back_across_one_token_calls_and_refuses_too_far(kind):
    mx = mixer(kind)
    x = torch.randn(1, 140, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(1, 256, None, torch.float32)
        mx(x[:, :10], Context(torch.arange(10)[None]), state)
        for i in range(10, 130):  # past the ring several times: the checkpoint moves along
            mx(x[:, i : i + 1], Context(torch.tensor([[i]])), state)
        # as far back as promised: the replay's reach, or for based its window cache's (a speculative round)
        back = REWIND if kind == "gla" else RING_SLACK + 1
        if kind == "based":
            with pytest.raises(UserError, match="cannot go back from 130 to 96"):
                state.crop(0, 130 - back - 1)  # keys the window still needs were overwritten
        state.crop(0, 130 - back)
        outs = [mx(x[:, i : i + 1], Context(torch.tensor([[i]])), state) for i in range(130 - back, 140)]
        torch.testing.assert_close(torch.cat(outs, 1), full[:, 130 - back :], atol=1e-5, rtol=1e-5)
        with pytest.raises(UserError, match="cannot go back"):
            state.crop(0, 10)


def state_bytes(state) -> int:
    return sum(b.numel() * b.element_size() for b in state.buffers())


def test_gla_state_size_does_not_grow_with_the_context():
    mx = mixer("gla")
    small, large = mx.new_state(1, 128, None, torch.float32), mx.new_state(1, 16384, None, torch.float32)
    assert isinstance(small, LinearState) and state_bytes(small) == state_bytes(large)


def test_based_state_size_is_bounded_by_the_window():
    narrow, wide = mixer("based", linear_window=8), mixer("based", linear_window=64)
    sizes = {(m.window_attn.window, n): state_bytes(m.new_state(1, n, None, torch.float32)) for m in (narrow, wide)
             for n in (1024, 16384)}  # fmt: skip
    assert sizes[8, 1024] == sizes[8, 16384] and sizes[64, 1024] == sizes[64, 16384]
    kv_bytes = 2 * 1 * 16 * 4 + 8  # per slot: k and v of one kv head of width 16 in float32, its position
    assert sizes[64, 1024] - sizes[8, 1024] == (64 - 8) * kv_bytes  # the ring grows with the window alone
    assert isinstance(narrow.new_state(1, 1024, None, torch.float32), BasedState)


# ---- counts, initialisation, config ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["micro-gla", "small-gla", "micro-based", "small-based"])
def test_parameter_count_matches_the_built_model(name):
    cfg = preset(name, vocab_size=512)
    assert cfg.family == "slmkit"
    assert cfg.num_params() == sum(p.numel() for p in build_model(cfg).parameters())
    assert 0.95 <= cfg.num_params() / preset(name.split("-")[0], vocab_size=512).num_params() <= 1.05
    assert cfg.flops_per_token(256) > 6 * cfg.num_params(include_embeddings=False)


def test_flops_do_not_grow_with_the_context_past_the_window():
    gla, based, attention = preset("micro-gla"), preset("micro-based"), preset("micro")
    assert gla.flops_per_token(64) == gla.flops_per_token(4096)
    assert based.flops_per_token(16) < based.flops_per_token(64) == based.flops_per_token(4096)
    assert attention.flops_per_token(64) < attention.flops_per_token(4096)
    assert based.flops_per_token(4096) < attention.flops_per_token(4096)


def test_gla_decays_start_in_the_intended_range():
    model = build_model(tiny_config("gla"))
    model.init_weights(seed=0)  # zeroes biases, then the mixer's own start
    for block in model.layers:
        gate = block.mixer.gk_proj[1].bias
        decay = torch.exp(F.logsigmoid(gate) / 16)  # at a zero gate input
        low, high = DECAY_RANGE
        assert torch.allclose(decay.min(), torch.tensor(low)) and torch.allclose(decay.max(), torch.tensor(high))
        assert len(set(decay.tolist())) == model.config.d_model // 2 // model.config.n_heads  # spread per head


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("gla", {"linear_chunk_size": 0}, "linear_chunk_size must be a positive integer"),
        ("gla", {"linear_gate_rank": True}, "linear_gate_rank must be an integer, got True"),
        ("based", {"linear_window": -1}, "linear_window must be a positive integer"),
        ("based", {"linear_feature_dim": 2.5}, "linear_feature_dim must be an integer, got 2.5"),
        ("gla", {"d_model": 24, "n_heads": 8, "n_kv_heads": 8, "head_dim": 4}, r"gla layers split d_model / 2 \(12\)"),
        ("based", {"d_model": 30, "n_heads": 4, "n_kv_heads": 4, "head_dim": 8}, "based layers split d_model"),
    ],
)
def test_config_refuses_bad_linear_attention_values(kind, changes, message):
    with pytest.raises(UserError, match=message):
        tiny_config(kind, **changes)


# ---- through the decode core ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["micro-gla", "micro-based", "mixed"])
def model_and_tokenizer(request, tiny_model_dir):
    from slmkit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir / "tokenizer.json")
    name, pattern = request.param, None
    if name == "mixed":  # every kind of layer in one model
        name, pattern = "micro-gla", ("gla", "based", "attention", "mamba2")
    cfg = preset(
        name, vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128,
        linear_window=8, linear_chunk_size=4, linear_feature_dim=4, linear_gate_rank=4, ssm_head_dim=16,
        ssm_state_size=8, ssm_chunk_size=4, layer_pattern=pattern, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    model = build_model(cfg)
    model.init_weights(seed=3)
    perturbed(model, seed=4, scale=0.5)
    return model.eval(), tokenizer


def test_engine_batches_equal_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    outs = Engine(model, tokenizer).generate(PROMPTS, max_new_tokens=12)  # past the window of 8
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 12)


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_speculative_decoding_equals_the_plain_loop(model_and_tokenizer, mode):
    model, tokenizer = model_and_tokenizer
    draft = build_model(model.config)  # another random model: many rejections, so many crops of both states
    draft.init_weights(seed=9)
    engine = Engine(model, tokenizer, draft=perturbed(draft, seed=5, scale=0.5).eval())
    stats = EngineStats()
    prompt = PROMPTS[3]
    [out] = engine.generate(prompt, max_new_tokens=40, speculate=mode, speculate_k=4, min_acceptance=0.0, stats=stats)
    assert stats.drafted > 0 and stats.accepted < stats.drafted
    assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 40)


def test_continuous_batcher_with_speculation_and_rows_joining_equals_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3, prefill_chunk=4, speculate="lookup", speculate_k=4)
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, [20, 9, 25, 14], strict=True)]
    seqs = run_batcher(batcher, requests, join_after=2, steps=5)
    for req, seq in zip(requests, seqs, strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


# ---- training and the model directory -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["micro-gla", "micro-based"])
def test_model_directory_round_trips(name, tmp_path):
    from slmkit.interop.checkpoint import load_model, save_model

    cfg = tiny_config(name.split("-")[1], linear_window=5, linear_chunk_size=6, linear_feature_dim=8)
    model = perturbed(build_model(cfg).eval())
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "slmkit" and saved["mixer"] == cfg.mixer
    assert (saved["linear_window"], saved["linear_chunk_size"], saved["linear_feature_dim"]) == (5, 6, 8)
    again = load_model(tmp_path / "m")
    assert again.config == cfg
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


@pytest.mark.parametrize("name", ["micro-gla", "micro-based"])
def test_training_lowers_the_loss_and_the_saved_model_reloads(name, data_dir, tmp_path):
    from slmkit.loading import load
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    cfg = TrainConfig(
        preset=name, model={"d_model": 64, "n_layers": 2, "linear_window": 16}, seq_len=64, batch_size=8,
        max_steps=25, lr=3e-3, warmup_steps=5, eval_interval=1000, save_interval=1000,
    )  # fmt: skip
    result = train(cfg, data_dir, tmp_path / "run")
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3
    lm = load(tmp_path / "run")
    assert lm.model.config.mixers == {name.split("-")[1]}
    idx = torch.randint(0, lm.model.config.vocab_size, (1, 40))
    state = lm.model.new_state(1, 64)
    with torch.no_grad():
        stepwise = torch.cat([lm.model(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(40)], 1)
        assert torch.allclose(stepwise, lm.model(idx), atol=1e-4)
