"""The block memory (--kv-memory) through the decode core, the engine, the batcher, the CLI and the server."""

from __future__ import annotations

from slmkit.infer.batcher import ContinuousBatcher
from slmkit.infer.core import GenerationRequest, decode_greedy
from slmkit.infer.engine import Engine
from slmkit.models.state import KVCacheSpec
from slmkit_testing import PROMPTS, run_batcher, run_slm

# every block retrieved: the same tokens however prompts are split into calls, so the batcher can be compared
FULL = KVCacheSpec(window=16, sinks=4, topk=64, block_size=8)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr


def test_batcher_and_lookup_speculation_equal_the_engine_alone(lm):
    """Rows joining at different steps, chunked prefill, and lookup speculation (which crops the state) decode as
    each prompt alone through the same block memory."""
    engine = Engine(lm.model, lm.tokenizer, kv_cache=FULL)
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    alone = [engine.generate_ids([p], max_new_tokens=40)[0].token_ids for p in prompts]
    batcher = ContinuousBatcher(lm.model, lm.tokenizer, max_batch=3, prefill_chunk=5, kv_cache=FULL)
    requests = [GenerationRequest(p, 40, detokenize=False) for p in prompts]
    assert [s.out for s in run_batcher(batcher, requests, join_after=2, steps=3)] == alone
    [spec_out] = engine.generate(PROMPTS[0], max_new_tokens=60, speculate="lookup")
    [plain_out] = engine.generate(PROMPTS[0], max_new_tokens=60)
    assert spec_out.token_ids == plain_out.token_ids


def test_generates_past_the_context_with_a_small_memory(lm):
    spec = KVCacheSpec(window=16, sinks=4, topk=2, block_size=8, memory_blocks=4)
    out, _ = decode_greedy(lm.model, [lm.tokenizer.encode(PROMPTS[0]).ids], lm.config.max_seq_len + 40, kv_cache=spec)
    assert len(out[0]) > 0


def test_cli_generate_with_memory_and_bad_values(tiny_model_dir):
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", "Small", "--max-new-tokens", "200", "--kv-window", "32",
        "--kv-sinks", "4", "--kv-memory", "2", "--kv-block", "8", "--kv-memory-blocks", "8", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # (every bad value is checked by KVCacheSpec: tests/models/test_kv_memory.py; here that the CLI reports them)
    for args, message in [
        (["--kv-window", "8", "--kv-memory", "0"], "--kv-memory must be >= 1"),
        (["--kv-window", "8", "--kv-block", "4"], "--kv-block needs --kv-memory"),
    ]:
        assert_user_error(run_slm("generate", tiny_model_dir, "--prompt", "x", *args), message)
    assert_user_error(run_slm("serve", tiny_model_dir, "--kv-memory", "2"), "--kv-memory needs --kv-window")
    assert_user_error(run_slm("eval", tiny_model_dir, "--efficiency", "--kv-memory", "2"), "needs --kv-window")


def test_server_with_memory_accepts_requests_past_the_context(tiny_model_dir):
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    spec = KVCacheSpec(window=32, sinks=4, topk=2, block_size=8)
    with TestClient(create_app(tiny_model_dir, kv_cache=spec, compile=False)) as client:
        body = {"model": tiny_model_dir.name, "prompt": "Small", "max_tokens": 200, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
