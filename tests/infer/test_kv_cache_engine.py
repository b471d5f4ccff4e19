"""KV cache options through the decode core, the engine, the batcher, the CLI and the server."""

from __future__ import annotations

import pytest
import torch

from slmkit.infer.batcher import ContinuousBatcher
from slmkit.infer.core import DecodeCore, GenerationRequest, decode_greedy
from slmkit.infer.engine import Engine
from slmkit.models.state import KVCacheSpec
from slmkit_testing import PROMPTS, run_batcher, run_slm


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr


def state_bytes_after(model, spec, prompt: list[int], new_tokens: int) -> tuple[int, list[int]]:
    """The state's measured storage after generating `new_tokens` greedy tokens (EOS ignored), and the tokens."""
    core = DecodeCore(model, None, max_batch=1, max_len=len(prompt) + new_tokens, kv_cache=spec)
    seq = core.admit(GenerationRequest(prompt, new_tokens, detokenize=False, ignore_eos=True))
    with torch.inference_mode():
        while core.rows:
            core.step()
    return core.state.storage_bytes(), seq.out


def test_window_state_stops_growing_and_streams_past_the_context(lm):
    model, context = lm.model, lm.config.max_seq_len
    prompt = lm.tokenizer.encode("Small language models trade quality for speed").ids
    spec = KVCacheSpec(window=24, sinks=4)
    sizes = {}
    for new in (16, 64, 3 * context):  # within S + N, past it, past the context (3x)
        sizes[new], out = state_bytes_after(model, spec, prompt, new)
        assert len(out) == new
    assert len(set(sizes.values())) == 1
    full_short, _ = state_bytes_after(model, None, prompt, 16)
    full_long, _ = state_bytes_after(model, None, prompt, context - len(prompt))
    assert full_short < full_long  # the plain cache grows with the sequence: the check above can fail
    assert sizes[16] < full_long


def test_budget_covering_the_sequence_decodes_as_plain(lm):
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    plain, _ = decode_greedy(lm.model, prompts, 24)
    for spec in (KVCacheSpec(window=60, sinks=4), KVCacheSpec(prune_keys=0.0)):
        out, _ = decode_greedy(lm.model, prompts, 24, kv_cache=spec)
        assert out == plain


def test_engine_refuses_past_context_unless_windowed(lm):
    prompt = "Small language models"
    with pytest.raises(Exception, match="exceeds the model's context"):
        Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=lm.config.max_seq_len)
    engine = Engine(lm.model, lm.tokenizer, kv_cache=KVCacheSpec(window=32, sinks=4))
    [out] = engine.generate(prompt, max_new_tokens=lm.config.max_seq_len + 40)
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) > 0
    # lookup speculation verifies through the same cache: greedy output unchanged
    [spec_out] = engine.generate(prompt, max_new_tokens=80, speculate="lookup")
    [plain_out] = engine.generate(prompt, max_new_tokens=80)
    assert spec_out.token_ids == plain_out.token_ids


@pytest.mark.parametrize("spec", [KVCacheSpec(window=16, sinks=4), KVCacheSpec(dtype="int8")], ids=["sinks", "int8"])
def test_batcher_equals_engine_alone(lm, spec):
    """Rows joining at different steps, prefilled in chunks, decode as each prompt alone through the same cache."""
    engine = Engine(lm.model, lm.tokenizer, kv_cache=spec)
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    alone = [engine.generate_ids([p], max_new_tokens=40)[0].token_ids for p in prompts]
    batcher = ContinuousBatcher(lm.model, lm.tokenizer, max_batch=3, prefill_chunk=5, kv_cache=spec)
    requests = [GenerationRequest(p, 40, detokenize=False) for p in prompts]
    seqs = run_batcher(batcher, requests, join_after=2, steps=3)
    assert [s.out for s in seqs] == alone


def test_cli_generate_windowed_past_context_and_bad_values(tiny_model_dir):
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", "Small", "--max-new-tokens", "300", "--kv-window", "32",
        "--kv-sinks", "4", "--kv-dtype", "int8", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for args, message in [
        (["--kv-window", "0"], "--kv-window must be >= 1"),
        (["--kv-sinks", "4"], "--kv-sinks needs --kv-window"),
        (["--kv-dtype", "int3"], "--kv-dtype must be auto, int8 or int4"),
        (["--kv-prune-keys", "1.5"], "--kv-prune-keys must be a fraction"),
    ]:
        assert_user_error(run_slm("generate", tiny_model_dir, "--prompt", "x", *args), message)
    # the server checks its flags before it binds or loads anything
    assert_user_error(run_slm("serve", tiny_model_dir, "--kv-dtype", "int3"), "--kv-dtype must be auto, int8 or int4")


def test_server_with_window_accepts_requests_past_the_context(tiny_model_dir):
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    spec = KVCacheSpec(window=32, sinks=4, dtype="int8")
    with TestClient(create_app(tiny_model_dir, kv_cache=spec, compile=False)) as client:
        body = {"model": tiny_model_dir.name, "prompt": "Small", "max_tokens": 200, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    with TestClient(create_app(tiny_model_dir, compile=False)) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
