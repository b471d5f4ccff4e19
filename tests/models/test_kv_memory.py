"""InfLLM-style block memory (`KVCacheSpec(topk=..., block_size=...)`, `BlockMemoryKVState`)."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.models.attention import Context
from slmkit.models.state import BlockMemoryKVState, KVCacheSpec


def tiny(seed: int = 0, **overrides):
    model = build_model(preset("tiny", vocab_size=97, max_seq_len=64, **overrides)).eval()
    model.init_weights(seed)
    return model


def stepped(model, ids: torch.Tensor, spec: KVCacheSpec, prefill: int, max_len: int = 64) -> torch.Tensor:
    """Logits of ids (B, L) through a state: a prefill of `prefill` tokens, then one token per call."""
    state = model.new_state(ids.shape[0], max_len, cache=spec)
    with torch.no_grad():
        out = [model(ids[:, :prefill], state=state, pos=torch.arange(prefill))]
        for p in range(prefill, ids.shape[1]):
            out.append(model(ids[:, p : p + 1], state=state, pos=torch.arange(p, p + 1)))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "spec",
    [
        KVCacheSpec(window=8, sinks=2, topk=8, block_size=4, distance_cap=64),
        KVCacheSpec(window=6, topk=13, block_size=3, reps=2, distance_cap=64),
    ],
    ids=["sinks2-block4", "block3"],
)
@pytest.mark.parametrize("prefill", [1, 20, 40])
def test_budget_covering_the_sequence_equals_full_attention(spec, prefill):
    """topk x block covers every evicted position and the distance cap every distance: exactly full attention,
    with most of the sequence read from the memory (40 positions, a window of 6-8), prefilled in one call or in
    parts (a 40-token prefill is attended in parts of 33)."""
    model = tiny()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    assert float((stepped(model, ids, spec, prefill) - full).abs().max()) < 1e-5
    # fewer blocks than the sequence needs: no longer full attention (the check above can fail)
    small = KVCacheSpec(window=spec.window, sinks=spec.sinks, topk=1, block_size=spec.block_size, distance_cap=64)
    assert float((stepped(model, ids, small, prefill) - full).abs().max()) > 1e-3


def test_full_budget_is_the_same_however_the_prompt_is_split():
    """With every block retrieved, which positions are local or in the memory does not matter: one call, chunks of 7
    and one token at a time agree, past the model's context too (with InfLLM's distance cap, the window)."""
    model = tiny(n_layers=2)
    spec = KVCacheSpec(window=8, sinks=2, topk=40, block_size=4)
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(3))
    steps = stepped(model, ids, spec, prefill=1, max_len=100)
    with torch.no_grad():
        one = model(ids, state=model.new_state(2, 100, cache=spec), pos=torch.arange(100))
        state = model.new_state(2, 100, cache=spec)
        chunks = [model(ids[:, p : p + 7], state=state, pos=torch.arange(p, min(p + 7, 100))) for p in range(0, 100, 7)]
    assert float((one - steps).abs().max()) < 1e-5
    assert float((torch.cat(chunks, 1) - steps).abs().max()) < 1e-5
    assert bool(torch.isfinite(steps).all())


def test_retrieves_the_blocks_that_match_the_query():
    """One kv head, no rotary positions: blocks 2 and 5 hold keys along the query; they are the two retrieved,
    and the output is attention over the sinks, the open positions and exactly those blocks."""
    torch.manual_seed(0)
    d, block, sinks, window, length = 8, 4, 1, 4, 41
    state = BlockMemoryKVState(1, 1, sinks, window, 32, d, block, topk=2, memory_blocks=16, reps=2, distance=window)
    direction = torch.zeros(d)
    direction[0] = 1.0
    keys = torch.randn(1, 1, length, d) * 0.1
    for j in (2, 5):  # positions of blocks 2 and 5 (after one sink)
        keys[0, 0, sinks + j * block : sinks + (j + 1) * block] += 3 * direction
    values = torch.randn(1, 1, length, d)
    # feed all but the last position; then the query along `direction`
    for p in range(length - 1):
        q = torch.randn(1, 1, 1, d) * 0.1
        state.attend(q, keys[:, :, p : p + 1], values[:, :, p : p + 1], Context(torch.tensor([[p]])))
    closed = int(state.closed[0])
    assert closed == (length - 1 - window - sinks) // block  # blocks wholly out of the window of position 39
    query = 2 * direction.view(1, 1, 1, d)
    p = length - 1
    y = state.attend(query, keys[:, :, p:], values[:, :, p:], Context(torch.tensor([[p]])))
    retrieved = state.block_id[0][state.last_retrieved[0, 0, 0]].tolist()
    assert sorted(retrieved) == [2, 5]
    # the same output by hand: sinks, every position not in a closed block, and blocks 2 and 5
    seen = [*range(sinks), *range(sinks + closed * block, length)]
    seen += [sinks + j * block + i for j in (2, 5) for i in range(block)]
    k, v = keys[0, 0, sorted(seen)], values[0, 0, sorted(seen)]
    expected = torch.softmax(query[0, 0] @ k.T / d**0.5, dim=-1) @ v
    assert float((y[0, 0] - expected).abs().max()) < 1e-5


def test_memory_is_bounded_by_memory_blocks():
    """With memory_blocks M the state's storage is the same whatever the sequence length (measured), the newest M
    closed blocks are kept, and streaming runs past the model's context; without M it grows with max_len."""
    model = tiny()
    spec = KVCacheSpec(window=8, sinks=2, topk=2, block_size=4, memory_blocks=3)
    sizes = {n: model.new_state(1, n, cache=spec).storage_bytes() for n in (64, 256, 4096)}
    assert len(set(sizes.values())) == 1
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(4))  # past the context of 64
    state = model.new_state(1, 150, cache=spec)
    before = state.storage_bytes()
    with torch.no_grad():
        for p in range(0, 150, 10):
            logits = model(ids[:, p : p + 10], state=state, pos=torch.arange(p, p + 10))
    assert bool(torch.isfinite(logits).all())
    assert state.storage_bytes() == before
    layer = state.layer(0)
    closed = (149 + 1 - 8 - 2) // 4
    assert int(layer.closed[0]) == closed and sorted(layer.block_id[0].tolist()) == [closed - 3, closed - 2, closed - 1]
    unbounded = KVCacheSpec(window=8, sinks=2, topk=2, block_size=4)
    short, long = (model.new_state(1, n, cache=unbounded).storage_bytes() for n in (64, 256))
    assert short < long


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=8, topk=0), "--kv-memory must be >= 1"),
        (dict(topk=2), "--kv-memory needs --kv-window"),
        (dict(window=8, topk=2, block_size=0), "--kv-block must be >= 1"),
        (dict(window=8, block_size=4), "--kv-block needs --kv-memory"),
        (dict(window=8, memory_blocks=4), "--kv-memory-blocks needs --kv-memory"),
        (dict(window=8, topk=4, memory_blocks=2), "fewer than the 4 blocks"),
        (dict(window=8, topk=2, reps=0), "reps"),
        (dict(window=8, topk=2, distance_cap=0), "distance_cap must be >= 1"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(UserError, match=message):
        KVCacheSpec(**kwargs)
