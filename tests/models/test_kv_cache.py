"""Bounded and compressed KV caches (`KVCacheSpec`): window + sinks, int8/int4, key-channel pruning."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.models.state import CompactKVState, KVCacheSpec, SinkKVState, dequantize, quantize


def tiny(seed: int = 0, **overrides):
    model = build_model(preset("tiny", vocab_size=97, max_seq_len=64, **overrides)).eval()
    model.init_weights(seed)
    return model


def stepped(model, ids: torch.Tensor, spec: KVCacheSpec, prefill: int) -> torch.Tensor:
    """Logits of ids (B, L) through a state: a prefill of `prefill` tokens, then one token per call."""
    state = model.new_state(ids.shape[0], 64, cache=spec)
    with torch.no_grad():
        out = [model(ids[:, :prefill], state=state, pos=torch.arange(prefill))]
        for p in range(prefill, ids.shape[1]):
            out.append(model(ids[:, p : p + 1], state=state, pos=torch.arange(p, p + 1)))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "spec",
    [KVCacheSpec(window=36, sinks=4), KVCacheSpec(window=40), KVCacheSpec(window=30, sinks=10)],
    ids=["sinks4", "window-only", "sinks10"],
)
@pytest.mark.parametrize("prefill", [1, 20, 40])
def test_budget_covering_the_sequence_equals_full_attention(spec, prefill):
    model = tiny()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    assert float((stepped(model, ids, spec, prefill) - full).abs().max()) < 1e-5


def test_sinks_and_window_attend_as_streaming_llm_beyond_the_budget():
    """One layer: a query's output is the model's on the kept tokens alone (sinks, then the window), at positions
    0..S+N-1 (StreamingLLM's positions inside the cache), however far past the budget and the context it is."""
    model = tiny(n_layers=1)
    sinks, window, length = 2, 8, 100  # past the context of 64 too
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(2))
    out = stepped(model, ids, KVCacheSpec(window=window, sinks=sinks), prefill=1)
    worst = 0.0
    with torch.no_grad():
        for q in range(length):
            kept = list(range(q + 1)) if q < sinks + window else [*range(sinks), *range(q - window + 1, q + 1)]
            worst = max(worst, float((model(ids[:, kept])[0, -1] - out[0, q]).abs().max()))
            if q == length - 1:  # the full-attention answer differs: the check can fail
                assert float((model(ids[:, 40:])[0, -1] - out[0, q]).abs().max()) > 1e-3
    assert worst < 1e-5


def test_long_prefill_equals_token_by_token():
    """A prefill longer than the cache (one call, or chunks) gives the logits of feeding one token at a time."""
    model = tiny(n_layers=3)
    spec = KVCacheSpec(window=8, sinks=2)
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(3))
    steps = stepped(model, ids, spec, prefill=1)
    with torch.no_grad():
        one = model(ids, state=model.new_state(2, 64, cache=spec), pos=torch.arange(100))
        state = model.new_state(2, 64, cache=spec)
        chunks = torch.cat(
            [model(ids[:, p : p + 7], state=state, pos=torch.arange(p, min(p + 7, 100))) for p in range(0, 100, 7)], 1
        )
    assert float((one - steps).abs().max()) < 1e-5
    assert float((chunks - steps).abs().max()) < 1e-5


def test_quantized_round_trip_error_is_bounded():
    x = torch.randn(3, 2, 5, 16)
    for bits, tolerance in ((8, 0.5 / 255), (4, 0.5 / 15)):
        codes, scale, zero = quantize(x, bits)
        assert codes.dtype == torch.uint8 and codes.shape[-1] == 16 * bits // 8
        back = dequantize(codes, scale, zero, bits, torch.float32)
        span = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
        assert bool(((back - x).abs() <= tolerance * span * 1.01 + 1e-3).all())


@pytest.mark.parametrize("dtype, tolerance", [("int8", 5e-3), ("int4", 8e-2)])
def test_quantized_kv_decodes_close_to_float(dtype, tolerance):
    model = tiny()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
    for spec in (KVCacheSpec(dtype=dtype), KVCacheSpec(window=36, sinks=4, dtype=dtype)):
        error = float((stepped(model, ids, spec, prefill=10) - full).abs().max())
        assert 0 < error < tolerance * float(full.abs().max()), (spec, error)


def test_state_kinds_and_bytes():
    model = tiny()
    b = 2
    plain = model.new_state(b, 64)
    int8 = model.new_state(b, 64, cache=KVCacheSpec(dtype="int8"))
    int4 = model.new_state(b, 64, cache=KVCacheSpec(dtype="int4"))
    pruned = model.new_state(b, 64, cache=KVCacheSpec(prune_keys=0.5))
    sinks = model.new_state(b, 64, cache=KVCacheSpec(window=8, sinks=4))
    assert isinstance(int8.layer(0), CompactKVState) and isinstance(sinks.layer(0), SinkKVState)
    d = model.config.dim_per_head  # float32: 4 bytes per channel of k and v; int8 1 + 4 bytes of scales
    assert plain.bytes_per_token() == model.config.n_layers * model.config.n_kv_heads * 2 * d * 4
    assert int8.bytes_per_token() == model.config.n_layers * model.config.n_kv_heads * 2 * (d + 4)
    assert int4.storage_bytes() < int8.storage_bytes() < plain.storage_bytes() / 2
    assert pruned.layer(0).keys.data.nbytes == plain.layer(0).k.nbytes / 2  # half the key channels
    assert pruned.storage_bytes() < plain.storage_bytes() * 0.76  # (+ the kept channels' indices)
    assert sinks.storage_bytes() < plain.storage_bytes()


def test_prune_zero_equals_full_and_pruning_changes_little():
    model = tiny()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
    assert float((stepped(model, ids, KVCacheSpec(prune_keys=0.0), prefill=20) - full).abs().max()) < 1e-5
    # a prune fraction that rounds to no channel keeps the full key: still exact
    assert float((stepped(model, ids, KVCacheSpec(prune_keys=0.01), prefill=20) - full).abs().max()) < 1e-5
    pruned = stepped(model, ids, KVCacheSpec(prune_keys=0.25), prefill=20)
    assert 0 < float((pruned - full).abs().max())


def test_pruned_channels_are_the_most_important():
    """Channels with large |q|·|k| are kept: a key channel zeroed out everywhere is among the pruned."""
    state = CompactKVState(1, 1, 8, 4, prune_keys=0.25)
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 1, 5, 4)
    k[..., 2] = 0
    from slmkit.models.attention import Context

    ctx = Context(torch.arange(5)[None])
    q_kept, keys, _, _, scale = state.attend_inputs(q, k, torch.randn(1, 1, 5, 4), ctx, None)
    assert state.channels.tolist() == [[[0, 1, 3]]]
    assert keys.shape[-1] == 3 and q_kept.shape[-1] == 3 and scale == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "--kv-window must be >= 1"),
        (dict(sinks=4), "--kv-sinks needs --kv-window"),
        (dict(dtype="int2"), "--kv-dtype must be auto, int8 or int4"),
        (dict(prune_keys=1.0), "--kv-prune-keys must be a fraction"),
        (dict(window=8, prune_keys=0.5), "cannot be combined"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(UserError, match=message):
        KVCacheSpec(**kwargs)


def test_window_needs_rotary_positions():
    model = tiny(positions="learned", norm="layernorm", mlp="plain")
    with pytest.raises(UserError, match="learned table"):
        model.new_state(1, 64, cache=KVCacheSpec(window=8))
