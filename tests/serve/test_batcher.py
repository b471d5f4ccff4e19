"""Continuous batching (slmkit.infer.batcher): every request gives what it gives alone through `Engine.generate`,
whatever joins or leaves the batch around it."""

from __future__ import annotations

import json

import pytest

from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.sampling import SamplingParams

PROMPTS = [
    "The cat",
    "Once upon a time there was a small language model that",
    "A",
    "The dog sat on the mat and",
    "Hello",
    "It was the best of times, it was the worst of times",
    "def fib(n):",
    "Scaling laws",
]


def ids(engine, text):
    return engine.tokenizer.encode(text).ids


def test_greedy_matches_engine_alone_with_requests_joining_at_different_steps(engine):
    lengths = [12, 5, 20, 9, 16, 3, 11, 7]
    alone = [engine.generate(p, max_new_tokens=n)[0] for p, n in zip(PROMPTS, lengths, strict=True)]
    assert len({c.text for c in alone}) == len(PROMPTS)
    # 3 rows for 8 requests: rows are reused (stale keys behind) and rows move when one in the middle leaves;
    # a 4-token prefill chunk spreads the long prompts over several steps while others decode
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=3, prefill_chunk=4)
    seqs = {}
    joins = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 12: [6, 7]}  # step -> requests submitted before it
    sizes = []
    step = 0
    while step <= max(joins) or batcher.has_work:
        for i in joins.get(step, []):
            seqs[i] = batcher.submit(GenerationRequest(ids(engine, PROMPTS[i]), lengths[i]))
        batcher.step()
        sizes.append(len(batcher.rows))
        step += 1
    assert max(sizes) == 3 and batcher.stats.decode_forwards < sum(lengths)
    for i, expected in enumerate(alone):
        assert seqs[i].out == expected.token_ids, i
        assert seqs[i].output_text == expected.text
        assert seqs[i].finish_reason == expected.finish_reason


def test_streamed_text_is_the_final_text(engine):
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=4)
    seqs = [batcher.submit(GenerationRequest(ids(engine, p), 10)) for p in PROMPTS[:4]]
    texts = {id(s): "" for s in seqs}
    finished = set()
    while batcher.has_work:
        for out in batcher.step():
            texts[id(out.seq)] += out.text
            if out.finished:
                finished.add(id(out.seq))
    assert finished == set(texts)
    assert [texts[id(s)] for s in seqs] == [s.output_text for s in seqs]


def test_seeded_sampling_is_independent_of_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    [alone] = engine.generate("The cat", max_new_tokens=12, sampling=params)
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=4)
    others = [
        GenerationRequest(ids(engine, p), 12, SamplingParams(temperature=1.0, seed=None if i else 3))
        for i, p in enumerate(PROMPTS[1:4])
    ]
    batcher.submit(others[0])
    batcher.step()
    seq = batcher.submit(GenerationRequest(ids(engine, "The cat"), 12, params))
    for other in others[1:]:
        batcher.submit(other)
    while batcher.has_work:
        batcher.step()
    assert seq.out == alone.token_ids
    different = ContinuousBatcher(engine.model, engine.tokenizer).run(
        [
            GenerationRequest(ids(engine, "The cat"), 12, SamplingParams(temperature=1.0, top_p=0.9, seed=s))
            for s in range(12, 16)
        ]  # fmt: skip
    )
    assert len({tuple(s.out) for s in different} | {tuple(seq.out)}) > 1


def test_stop_penalties_and_logprobs_match_engine(engine):
    [full] = engine.generate("The cat", max_new_tokens=20)
    stop = next(ch for ch in full.text[2:] if ch.isalnum())
    penalised = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)
    expected = [
        engine.generate("The cat", max_new_tokens=20, stop=[stop])[0],
        engine.generate("Hello", max_new_tokens=15, sampling=penalised)[0],
        engine.generate("It was", max_new_tokens=8, logprobs=True)[0],
    ]
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=2)
    seqs = batcher.run(
        [
            GenerationRequest(ids(engine, "The cat"), 20, stop=[stop]),
            GenerationRequest(ids(engine, "Hello"), 15, penalised),
            GenerationRequest(ids(engine, "It was"), 8, logprobs=True, top_logprobs=3),
        ]
    )
    assert seqs[0].output_text == expected[0].text == full.text[: full.text.index(stop)]
    assert seqs[0].finish_reason == "stop"
    assert seqs[1].out == expected[1].token_ids
    lp = seqs[2].logprobs
    assert [x.token for x in lp] == expected[2].token_ids
    assert [x.logprob for x in lp] == pytest.approx(expected[2].logprobs, abs=1e-4)
    for x in lp:  # greedy: the chosen token is the most likely one
        assert len(x.top) == 3 and x.top[0][0] == x.token and x.top[0][1] == pytest.approx(x.logprob, abs=1e-5)
        assert x.top[0][1] >= x.top[1][1] >= x.top[2][1]


def test_cancel_frees_the_row_for_a_waiting_request(engine):
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=1)
    long = batcher.submit(GenerationRequest(ids(engine, "The cat"), 100))
    waiting = batcher.submit(GenerationRequest(ids(engine, "Hello"), 5))
    for _ in range(3):
        batcher.step()
    assert batcher.rows == [long] and list(batcher.waiting) == [waiting]
    batcher.cancel(long)
    assert long.finish_reason == "cancelled" and batcher.free_rows == 1
    while batcher.has_work:
        batcher.step()
    assert waiting.out == engine.generate("Hello", max_new_tokens=5)[0].token_ids


def test_grammar_constrained_rows_parse(engine):
    from slmkit.infer.constrained import Constraint, compile_constraint

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    compiled = compile_constraint(
        Constraint.json_schema(schema), engine.tokenizer, engine.config.vocab_size, engine.config.eos_token_id
    )
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=4)
    seqs = batcher.run(
        [GenerationRequest(ids(engine, p), 30, constraint=compiled) for p in PROMPTS[:2]]
        + [GenerationRequest(ids(engine, PROMPTS[2]), 30)]
    )
    for seq in seqs[:2]:
        assert set(json.loads(seq.output_text)) == {"ok"}
    assert seqs[2].out == engine.generate(PROMPTS[2], max_new_tokens=30)[0].token_ids


def test_requests_that_do_not_fit_are_user_errors(engine):
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=2, max_seq_len=64)
    with pytest.raises(UserError, match="context of 64"):
        batcher.submit(GenerationRequest([1] * 60, 10))
    with pytest.raises(UserError, match="empty"):
        batcher.submit(GenerationRequest([], 10))
    with pytest.raises(UserError, match="max batch"):
        ContinuousBatcher(engine.model, engine.tokenizer, max_batch=0)


def test_lookup_speculation_keeps_greedy_output(engine):
    """Drafts verified in one pass over every row (rows joining as others leave) change no greedy token."""
    requests = [GenerationRequest(ids(engine, p), 40) for p in PROMPTS]
    plain = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=2).run(requests)
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=2, speculate="lookup", speculate_k=6)
    fresh = [GenerationRequest(r.prompt_ids, r.max_new_tokens) for r in requests]
    spec = batcher.run(fresh)
    assert sum(s.drafted for s in spec) > 0
    assert [s.out for s in spec] == [s.out for s in plain]


def test_compiled_batcher_step_equals_eager(engine, caplog):
    """The batcher's compiled step (inductor's C++ kernels on a CPU) runs over every row of its state, idle rows
    fed an inactive placeholder: rows joining and leaving give the eager batcher's greedy tokens."""
    requests = [GenerationRequest(ids(engine, p), n) for p, n in zip(PROMPTS, [12, 5, 9, 7], strict=False)]
    eager = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=3, prefill_chunk=8).run(requests)
    batcher = ContinuousBatcher(engine.model, engine.tokenizer, max_batch=3, prefill_chunk=8, compile=True)
    assert batcher.core.compiled
    with caplog.at_level("WARNING"):
        compiled = batcher.run([GenerationRequest(r.prompt_ids, r.max_new_tokens) for r in requests])
    assert "decoding eagerly" not in caplog.text
    assert [s.out for s in compiled] == [s.out for s in eager]
    assert batcher.core.stats.compile_seconds > 0
