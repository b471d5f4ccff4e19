"""Prefix caching in the continuous batcher (slmkit.infer.prefix_cache): requests that share a prompt prefix take
its keys and values from the cache and give exactly what they give without it; the hit rate counts the tokens
taken; eviction under the byte cap keeps outputs right; models whose state cannot be copied run without it."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.sampling import SamplingParams
from slmkit.models import build_model

VOCAB = 320


def tiny_model(**overrides) -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=VOCAB, max_seq_len=128, **overrides)
    model = build_model(cfg)
    model.init_weights(0)
    with torch.no_grad():  # sharper attention than the init: a wrong key or value would change the output
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def shared_prompts(n: int, system: int = 37, seed: int = 0) -> list[list[int]]:
    """n prompts that start with one system prompt of `system` tokens, then a few tokens of their own."""
    rng = random.Random(seed)
    head = [rng.randrange(1, VOCAB) for _ in range(system)]
    return [head + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 10))] for _ in range(n)]


def requests(prompts, max_new_tokens=12):
    """Greedy and seeded sampled requests, alternating."""
    return [
        GenerationRequest(
            p, max_new_tokens, detokenize=False,
            sampling=SamplingParams(temperature=0.9, top_k=50, seed=i) if i % 2 else SamplingParams(),
        )
        for i, p in enumerate(prompts)
    ]  # fmt: skip


def run(model, prompts, *, max_batch=3, arrive_in=2, **options):
    """Submit the prompts in waves of `arrive_in` (later waves find the earlier ones' blocks), run to the end."""
    batcher = ContinuousBatcher(model, None, max_batch=max_batch, prefill_chunk=16, **options)
    reqs = requests(prompts)
    seqs = []
    for start in range(0, len(reqs), arrive_in):
        seqs += [batcher.submit(r) for r in reqs[start : start + arrive_in]]
        for _ in range(3):  # the next wave joins while this one is still running
            batcher.step()
    while batcher.has_work:
        batcher.step()
    return batcher, [s.out for s in seqs]


def test_outputs_with_the_prefix_cache_equal_outputs_without_it(model):
    prompts = shared_prompts(8)
    _, plain = run(model, prompts)
    batcher, cached = run(model, prompts, prefix_cache=True, prefix_block=8)
    assert cached == plain
    stats = batcher.prefix_stats
    assert stats.hit_tokens >= 4 * 32  # at least the later waves found the 32 tokens of full system-prompt blocks
    assert batcher.stats.prefill_tokens == stats.prompt_tokens - stats.hit_tokens


def test_prefix_cache_with_speculation_keeps_outputs(model):
    """Verification passes write rejected drafts past a row's length: only positions below it are cached."""
    prompts = shared_prompts(6, seed=7)
    _, plain = run(model, prompts)
    batcher, cached = run(model, prompts, prefix_cache=True, prefix_block=4, speculate="recycle")
    # greedy rows only: drafts change how sampled rows use their random streams (the distribution stays the same)
    assert cached[::2] == plain[::2]
    assert batcher.prefix_stats.hit_tokens > 0 and batcher.stats.drafted > 0


def test_hit_rate_counts_the_tokens_taken_from_the_cache(model):
    rng = random.Random(1)
    system = [rng.randrange(1, VOCAB) for _ in range(10)]
    a = system + [5, 6, 7]
    b = system + [8, 9, 10, 11, 12]
    batcher = ContinuousBatcher(model, None, max_batch=2, prefix_cache=True, prefix_block=4)
    batcher.run([GenerationRequest(a, 6, detokenize=False)])  # caches a's blocks: prompt and generated tokens
    assert batcher.prefix_stats.hit_tokens == 0
    # b shares blocks [0, 4) and [4, 8) with a; block [8, 12) holds system[8:10] + a's own tokens: a miss
    batcher.run([GenerationRequest(b, 6, detokenize=False)])
    assert batcher.prefix_stats.hit_tokens == 8
    # a again: 13 prompt tokens, at most 12 from the cache (one is prefilled for the first token's logits)
    again = batcher.run([GenerationRequest(a, 6, detokenize=False)])
    stats = batcher.prefix_stats
    assert (stats.prompt_tokens, stats.hit_tokens) == (13 + 15 + 13, 8 + 12)
    assert stats.hit_rate == pytest.approx(20 / 41)
    fresh = ContinuousBatcher(model, None, max_batch=2).run([GenerationRequest(a, 6, detokenize=False)])
    assert again[0].out == fresh[0].out


def test_a_next_turn_reuses_the_generated_history(model):
    """Blocks of generated tokens are cached too: a chat's next prompt (prompt + answer + more) finds them."""
    prompt = shared_prompts(1, system=20, seed=2)[0]
    batcher = ContinuousBatcher(model, None, max_batch=1, prefix_cache=True, prefix_block=4)
    [first] = batcher.run([GenerationRequest(prompt, 16, detokenize=False)])
    follow = prompt + first.out + [3, 4, 5]
    [second] = batcher.run([GenerationRequest(follow, 8, detokenize=False)])
    cached_state = len(prompt) + len(first.out) - 1  # the last generated token was never fed
    assert batcher.prefix_stats.hit_tokens == cached_state // 4 * 4 > len(prompt)
    [plain] = ContinuousBatcher(model, None, max_batch=1).run([GenerationRequest(follow, 8, detokenize=False)])
    assert second.out == plain.out


def test_eviction_under_the_cap_keeps_outputs_right(model):
    prompts = shared_prompts(4, system=24, seed=3) + shared_prompts(4, system=24, seed=4)
    random.Random(0).shuffle(prompts)
    probe = ContinuousBatcher(model, None, max_batch=1, prefix_cache=True, prefix_block=8)
    cap = 5 * probe.prefix.block_bytes  # five blocks: two system prompts' blocks and their tails do not fit
    _, plain = run(model, prompts, max_batch=2, arrive_in=1)
    batcher, cached = run(model, prompts, max_batch=2, arrive_in=1, prefix_cache=True, prefix_block=8,
                          prefix_cache_bytes=cap)  # fmt: skip
    assert cached == plain
    assert batcher.prefix_stats.evicted_blocks > 0 and batcher.prefix_stats.hit_tokens > 0
    assert batcher.prefix.cached_bytes <= cap
    assert batcher.prefix.cached_blocks == 5


def test_quantized_kv_cache_takes_cached_prefixes(model):
    from slmkit.models.state import KVCacheSpec

    prompts = shared_prompts(6, seed=5)
    spec = KVCacheSpec(dtype="int8")
    _, plain = run(model, prompts, kv_cache=spec)
    batcher, cached = run(model, prompts, kv_cache=spec, prefix_cache=True, prefix_block=8)
    assert batcher.prefix is not None and batcher.prefix_stats.hit_tokens > 0
    assert cached == plain


@pytest.mark.parametrize(
    "overrides, kv, reason",
    [
        ({"layer_pattern": ("attention", "mamba")}, None, "layer 1 keeps a"),
        ({}, {"window": 16}, "cannot be copied"),
    ],
)
def test_states_that_cannot_take_prefixes_run_without_the_cache(overrides, kv, reason, caplog):
    from slmkit.models.state import KVCacheSpec

    model = tiny_model(**overrides)
    spec = KVCacheSpec(**kv) if kv else None
    prompts = shared_prompts(4, seed=6)
    _, plain = run(model, prompts, kv_cache=spec)
    with caplog.at_level(logging.WARNING, logger="slmkit.infer.batcher"):
        batcher, cached = run(model, prompts, kv_cache=spec, prefix_cache=True, prefix_block=8)
    assert batcher.prefix is None and reason in (batcher.prefix_off_reason or "")
    assert "prefix cache off" in caplog.text
    assert cached == plain


def test_bad_prefix_cache_sizes_are_user_errors(model):
    with pytest.raises(UserError, match="prefix cache size"):
        ContinuousBatcher(model, None, prefix_cache=True, prefix_cache_bytes=0)
    with pytest.raises(UserError, match="prefix cache block"):
        ContinuousBatcher(model, None, prefix_cache=True, prefix_block=0)


# ---- the server ------------------------------------------------------------------------------------------------
def metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_server_reports_prefix_hits_and_keeps_completions(engine, shaken_model_dir):
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    system = "You are a careful assistant. Answer in one short sentence, and never repeat the question. "
    prompts = [system + q for q in ("The cat", "Scaling laws", "def fib(n):")]
    expected = [engine.generate(p, max_new_tokens=6)[0].text for p in prompts]
    name = shaken_model_dir.name
    with TestClient(create_app(engine, model_name=name, max_batch=2)) as client:  # the cache is on by default
        for prompt, text in zip(prompts, expected, strict=True):
            body = {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
        metrics = client.get("/metrics").text
        scheduler = client.app.state.scheduler
    prompt_tokens = sum(len(engine.tokenizer.encode(p).ids) for p in prompts)
    hits = metric(metrics, "slm_prefix_cache_hit_tokens_total")
    assert metric(metrics, "slm_prefix_cache_prompt_tokens_total") == prompt_tokens
    assert hits >= 2 * 16  # the later requests found the system prompt's first full block at least
    assert metric(metrics, "slm_prefix_cache_hit_rate") == pytest.approx(hits / prompt_tokens, abs=1e-6)
    assert metric(metrics, "slm_prefix_cache_bytes") == scheduler.batcher.prefix.cached_bytes > 0


def test_server_without_prefix_cache_and_bad_size(engine):
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    with TestClient(create_app(engine, model_name="m", prefix_cache=False, speculate="recycle")) as client:
        body = {"model": "m", "prompt": "The cat", "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
    assert "slm_prefix_cache" not in metrics
    assert "slm_speculative_drafted_tokens_total" in metrics and "slm_decode_tokens_per_forward" in metrics
    with pytest.raises(UserError, match="prefix-cache-mb must be > 0"):
        create_app(engine, prefix_cache_mb=0)
