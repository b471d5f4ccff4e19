"""The engine: batching equals one-at-a-time, seeds reproduce, streaming keeps UTF-8 whole, logprobs are exact."""

import pytest
import torch

from slmkit.errors import UserError
from slmkit.infer.engine import Engine, EngineStats
from slmkit.infer.sampling import SamplingParams

PROMPTS = ["Small language models", "The", "Scaling laws for neural language models predict"]


def test_batched_greedy_equals_each_prompt_alone(lm):
    engine = Engine(lm.model, lm.tokenizer)
    batched = engine.generate(PROMPTS, max_new_tokens=16)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        [alone] = engine.generate([prompt], max_new_tokens=16)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
    # and one-at-a-time equals step-by-step argmax without any cache
    ids = lm.tokenizer.encode(PROMPTS[1]).ids
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    assert batched[1].token_ids == ids[-16:]


def test_static_cache_path_equals_dynamic_path(lm):
    # the path torch.compile uses on CUDA (fixed-shape cache, full-length masks), run eagerly here
    dynamic = Engine(lm.model, lm.tokenizer).generate(PROMPTS, max_new_tokens=12)
    static = Engine(lm.model, lm.tokenizer, static_cache=True).generate(PROMPTS, max_new_tokens=12)
    again = Engine(lm.model, lm.tokenizer, static_cache=True).generate(PROMPTS[::-1], max_new_tokens=12)
    assert [c.token_ids for c in static] == [c.token_ids for c in dynamic]
    assert [c.token_ids for c in again] == [c.token_ids for c in dynamic[::-1]]


def test_compiled_decode_step_equals_eager_on_cpu(lm, caplog):
    # inductor's C++ kernels for the decode step (the CUDA-graph path needs CUDA): same greedy tokens as eager
    eager = Engine(lm.model, lm.tokenizer).generate(PROMPTS[:2], max_new_tokens=10)
    engine = Engine(lm.model, lm.tokenizer, compile=True)
    assert engine.compile and engine.static_cache
    stats = EngineStats()
    with caplog.at_level("WARNING", logger="slmkit.infer.engine"):
        compiled = engine.generate(PROMPTS[:2], max_new_tokens=10, stats=stats)
    assert "decoding eagerly" not in caplog.text  # it really compiled (a C++ compiler is part of the setup)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    # the compilation is reported on its own, not folded into the decode rate
    assert stats.compile_seconds > stats.decode_seconds > 0 and "compiling the decode step" in stats.summary()
    again = EngineStats()
    engine.generate(PROMPTS[:2], max_new_tokens=10, stats=again)
    assert again.compile_seconds == 0 and "compiling" not in again.summary()
    # batch 1 (a graph of its own) on sharp random weights: its one query must not see the slots past it, which
    # an earlier, longer sequence left filled
    from slmkit.models import build_model

    sharp = build_model(lm.model.config)
    sharp.init_weights(seed=0)
    with torch.no_grad():
        for p in sharp.parameters():
            if p.dim() == 2:
                p.mul_(3)
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS[:2]]
    expected = [c.token_ids for c in Engine(sharp.eval(), None).generate_ids(prompts, max_new_tokens=40)]
    one = Engine(sharp, None, compile=True)
    assert [one.generate_ids([p], max_new_tokens=40)[0].token_ids for p in prompts] == expected


def test_a_failed_compilation_falls_back_to_eager(lm, monkeypatch, caplog):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    expected = Engine(lm.model, lm.tokenizer).generate("The", max_new_tokens=6)[0].token_ids
    with caplog.at_level("WARNING", logger="slmkit.infer.engine"):
        out = Engine(lm.model, lm.tokenizer, compile=True).generate("The", max_new_tokens=6)[0].token_ids
    assert "decoding eagerly" in caplog.text
    assert out == expected


def test_same_seed_same_output_and_seed_matters(lm):
    engine = Engine(lm.model, lm.tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.95, min_p=0.02, repetition_penalty=1.2, seed=7)
    a = engine.generate(PROMPTS, max_new_tokens=24, sampling=params)
    b = engine.generate(PROMPTS, max_new_tokens=24, sampling=params)
    c = engine.generate(PROMPTS, max_new_tokens=24, sampling=SamplingParams(temperature=1.0, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_logprobs_match_a_direct_forward_pass(lm):
    engine = Engine(lm.model, lm.tokenizer)
    params = SamplingParams(temperature=1.0, seed=0)
    outs = engine.generate(PROMPTS, max_new_tokens=10, sampling=params, logprobs=True)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = lm.tokenizer.encode(prompt).ids
        full = torch.tensor([ids + out.token_ids])
        with torch.no_grad():
            logp = lm.model(full)[0].float().log_softmax(-1)
        expected = [float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(out.token_ids)]
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        assert out.logprobs == pytest.approx(expected, abs=1e-4)


def _byte_token_ids(tokenizer) -> dict[int, int]:
    """Token id of every single byte, via GPT-2's byte-to-unicode table (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {b: tokenizer.token_to_id(c) for b, c in chars.items()}


def test_stream_never_splits_a_utf8_character(lm, scripted_model):
    tok = lm.tokenizer
    byte_ids = _byte_token_ids(tok)
    text = "é😀 ok ü"
    script = [byte_ids[b] for b in text.encode("utf-8")]  # one token per byte: characters split across tokens
    prompt = tok.encode("The").ids
    model = scripted_model(script, lm.config.vocab_size, len(prompt))
    engine = Engine(model, tok)
    deltas = list(engine.stream("The", max_new_tokens=len(script)))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(len(d.encode()) > 1 for d in deltas)  # multi-byte characters came out whole
    # stop strings cut the text, also in a batch
    stats = EngineStats()
    [out] = engine.generate(["The"], max_new_tokens=len(script), stop=[" ok"], stats=stats)
    assert out.text == "é😀" and out.finish_reason == "stop"


def test_stream_joins_to_generate(lm):
    engine = Engine(lm.model, lm.tokenizer)
    full = engine.generate("Language", max_new_tokens=30)[0].text
    assert "".join(engine.stream("Language", max_new_tokens=30)) == full


def test_eos_stops_one_sequence_of_a_batch(lm, scripted_model):
    tok = lm.tokenizer
    prompt = tok.encode("The").ids
    eos = 0
    model = scripted_model([5, 6, eos, 7], lm.config.vocab_size, len(prompt))
    [a] = Engine(model, tok).generate_ids([prompt], max_new_tokens=8)
    assert a.token_ids == [5, 6] and a.finish_reason == "stop"
    [b] = Engine(model, tok).generate_ids([prompt], max_new_tokens=1)
    assert b.token_ids == [5] and b.finish_reason == "length"


def test_bad_input_is_a_user_error(lm):
    engine = Engine(lm.model, lm.tokenizer)
    context = lm.config.max_seq_len
    with pytest.raises(UserError, match="empty"):
        engine.generate([""])
    with pytest.raises(UserError, match="exceeds the model's context"):
        engine.generate("word " * context, max_new_tokens=8)
    # truncation only when asked: keeps the end of the prompt
    [out] = engine.generate("word " * context, max_new_tokens=8, truncate=True)
    assert out.prompt_tokens == context - 8
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=-0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="top-p"):
            SamplingParams(temperature=1.0, top_p=bad)
    with pytest.raises(UserError, match="min-p"):
        SamplingParams(min_p=2.0)
    with pytest.raises(UserError, match="repetition penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(UserError, match="needs a draft model"):
        engine.generate("The", speculate="draft")
    with pytest.raises(UserError, match="max new tokens"):
        engine.generate("The", max_new_tokens=0)


def test_draft_with_a_different_tokenizer_is_refused(tiny_model_dir, other_tokenizer_dir):
    with pytest.raises(UserError, match="different tokenizer"):
        Engine.load(tiny_model_dir, draft=other_tokenizer_dir)


def test_public_api_generate(lm):
    import json

    import slmkit

    one = slmkit.generate(lm, "The", max_new_tokens=8)
    many = slmkit.generate(lm, ["The", "Small language models"], max_new_tokens=8)
    assert isinstance(one, str) and many[0] == one
    assert slmkit.generate(lm, "The", max_new_tokens=8, lookup=True) == one
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert isinstance(json.loads(slmkit.generate(lm, "The", max_new_tokens=40, json_schema=schema))["ok"], bool)
    with pytest.raises(UserError, match="at most one"):
        slmkit.generate(lm, "The", regex="a+", grammar='root ::= "a"')


def test_streaming_does_not_leak_inference_mode(lm):
    engine = Engine(lm.model, lm.tokenizer)
    for _ in engine.stream("The", max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("speculate", ["off", "lookup"])
def test_top_logprobs_match_a_direct_forward_pass(lm, speculate):
    engine = Engine(lm.model, lm.tokenizer)
    [out] = engine.generate(PROMPTS[0], max_new_tokens=12, top_logprobs=3, speculate=speculate)
    ids = lm.tokenizer.encode(PROMPTS[0]).ids
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids + out.token_ids]))[0].float().log_softmax(-1)
    assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids)
    for j, top in enumerate(out.top_logprobs):
        values, indices = logp[len(ids) - 1 + j].topk(3)
        assert [t for t, _ in top] == indices.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    with pytest.raises(UserError, match="top logprobs"):
        engine.generate(PROMPTS[0], max_new_tokens=2, top_logprobs=21)


def test_sliding_window_batches_of_different_lengths_equal_each_alone(lm):
    """A short window gets a ring state (window + slack slots); prompts of different lengths prefill together when
    the ring's slack covers the difference and apart otherwise, and each decodes as it would alone."""
    from slmkit.models import build_model
    from slmkit.models.state import RingKVState

    config = lm.model.config.replace(family="mistral", sliding_window=6)
    model = build_model(config)
    model.init_weights(seed=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    model.eval()
    assert isinstance(model.new_state(1, config.max_seq_len).layer(0), RingKVState)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, config.vocab_size, (n,), generator=gen).tolist() for n in (50, 45, 5, 60)]
    engine = Engine(model, None)
    batched = [c.token_ids for c in engine.generate_ids(prompts, max_new_tokens=30)]
    alone = [engine.generate_ids([p], max_new_tokens=30)[0].token_ids for p in prompts]
    assert batched == alone
