"""Token recycling (speculate="recycle"): drafts from an adjacency matrix of each token's top-k next tokens, learnt
from the target's own verification passes; greedy output is plain greedy output, in the engine and the batcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine, EngineStats
from slmkit.infer.speculative import TokenRecycler
from slmkit_testing import run_slm

PROMPTS = [
    "the model and the data and the model and the data and the",
    "Small language models are small. Small language models are",
    "A",
]


def test_recycler_keeps_each_tokens_latest_top_k_and_follows_the_most_likely_path():
    recycler = TokenRecycler(vocab_size=6, top_k=2)
    assert recycler.draft(0, 4) == [] and recycler.known == 0
    logits = torch.full((1, 3, 6), -10.0)
    for j, (best, second) in enumerate([(2, 3), (4, 5), (1, 0)]):
        logits[0, j, best], logits[0, j, second] = 5.0, 4.0
    tokens = torch.tensor([[0, 2, 4]])
    recycler.observe(tokens, logits, widths=[2])  # the third position is padding: not learnt
    assert recycler.successors[0].tolist() == [2, 3] and recycler.successors[2].tolist() == [4, 5]
    assert recycler.successors[4].tolist() == [-1, -1]
    assert recycler.draft(0, 4) == [2, 4]  # stops at a token never seen
    recycler.observe(tokens, logits)  # now every position
    assert recycler.draft(0, 5) == [2, 4, 1]
    assert recycler.known == 3 and np.all(recycler.successors[[1, 3, 5]] == -1)


def test_engine_recycle_greedy_equals_plain_greedy_and_reports_acceptance(lm):
    engine = Engine(lm.model, lm.tokenizer)
    for prompt in PROMPTS:
        [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=32)
        for k in (1, 6):
            stats = EngineStats()
            [spec] = engine.generate(
                prompt, max_new_tokens=32, speculate="recycle", speculate_k=k, min_acceptance=0.0, stats=stats
            )
            assert spec.token_ids == plain.token_ids, (prompt, k)
            assert stats.speculation == "recycle"
            assert stats.rounds > 0 and 0 < stats.accepted <= stats.drafted
            assert stats.tokens_per_forward > 1.0
            assert "speculation (recycle): accepted" in stats.summary()
    assert engine.recycler is not None and engine.recycler.known > 0  # kept across calls


@pytest.fixture(scope="module")
def shaken(lm):
    """The trained tiny model repeats itself (every draft is right); with shaken weights output varies."""
    import copy

    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_engine_recycle_on_a_model_with_varied_output(lm, shaken):
    """Drafts are often wrong here: the output is still plain greedy's."""
    model = shaken
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    plain = Engine(model, lm.tokenizer).generate_ids(prompts, max_new_tokens=40)
    assert len({t for c in plain for t in c.token_ids}) > 10
    engine = Engine(model, lm.tokenizer)
    stats = EngineStats()
    spec = engine.generate_ids(prompts, max_new_tokens=40, speculate="recycle", min_acceptance=0.0, stats=stats)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert stats.drafted > stats.accepted > 0


def test_batcher_recycle_greedy_equals_plain_with_rows_joining(lm, shaken):
    from slmkit_testing import run_batcher

    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS + ["The cat sat", "one two three one two three"]]
    plain_batcher = ContinuousBatcher(shaken, lm.tokenizer, max_batch=3)
    plain = run_batcher(
        plain_batcher, [GenerationRequest(p, 28, detokenize=False) for p in prompts], join_after=2, steps=4
    )
    assert plain_batcher.stats.tokens_per_forward == 1.0
    batcher = ContinuousBatcher(shaken, lm.tokenizer, max_batch=3, speculate="recycle", speculate_k=5)
    spec = run_batcher(batcher, [GenerationRequest(p, 28, detokenize=False) for p in prompts], join_after=2, steps=4)
    assert [s.out for s in spec] == [s.out for s in plain]
    stats = batcher.stats
    assert stats.drafted > 0 and 0 < stats.accepted <= stats.drafted
    assert stats.tokens_per_forward > 1.0
    assert stats.decode_tokens == sum(len(s.out) for s in spec) - len(spec)


def test_batcher_drafts_never_run_a_row_past_the_state():
    """A verification pass feeds every row the widest draft's length: a row near the state's end must not get
    positions past it (the drafts are shortened instead)."""
    from slmkit.config import preset
    from slmkit.models import build_model

    model = build_model(preset("tiny", vocab_size=64, max_seq_len=48))
    model.init_weights(0)
    model.eval()
    repeat = [1, 2, 3, 4] * 8  # 32 tokens: lookup finds long drafts
    short, long = GenerationRequest(repeat[:8], 30, detokenize=False), GenerationRequest(repeat, 15, detokenize=False)
    plain = ContinuousBatcher(model, None, max_batch=2).run([short, long])
    for mode in ("lookup", "recycle"):
        fresh = [GenerationRequest(r.prompt_ids, r.max_new_tokens, detokenize=False) for r in (short, long)]
        spec = ContinuousBatcher(model, None, max_batch=2, speculate=mode, speculate_k=16).run(fresh)
        assert [s.out for s in spec] == [s.out for s in plain], mode


def test_cli_generate_speculate_recycle(lm, tiny_model_dir):
    import json

    prompt = PROMPTS[0]
    [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=16)
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", 16, "--json", "--speculate", "recycle",
        "--verbose", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == plain.token_ids
    assert "speculation (recycle): accepted" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--speculate", "bogus"], "--speculate must be off, lookup, recycle, tree or draft"),
        (["--speculate", "recycle", "--lookup"], "conflicts with --lookup"),
    ],
)
def test_cli_generate_bad_speculate(tiny_model_dir, args, message):
    r = run_slm("generate", tiny_model_dir, "--prompt", "x", *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr


def test_verify_of_an_empty_draft_samples_one_token():
    """Recycling sends rows with nothing to draft through verification (the matrix learns from it): sampled too."""
    from slmkit.infer.sampling import SamplingParams
    from slmkit.infer.speculative import verify

    logits = torch.tensor([[0.0, 2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    tokens, accepted = verify(logits, [], None, SamplingParams(temperature=1.0), g)
    assert accepted == 0 and len(tokens) == 1 and 0 <= tokens[0] < 3
    assert verify(logits, [], None, SamplingParams(), None) == ([1], 0)


def test_speculation_clock_judges_measured_rates_after_enough_rounds(monkeypatch):
    from slmkit.infer import speculative

    now = [0.0]
    monkeypatch.setattr(speculative.time, "perf_counter", lambda: now[0])
    plain = [0.001, 0.003, 0.002]  # median 2 ms: 500 tokens/s
    clock = speculative.SpeculationClock(plain, min_speedup=1.0)
    for _ in range(speculative.MIN_ROUNDS_TO_TIME):
        assert clock.pays()  # not judged before MIN_ROUNDS_TO_TIME rounds
        start = now[0]
        now[0] += 0.005  # 2 tokens in 5 ms: 400 tokens/s, 0.8x plain
        clock.round(start, 2)
    assert clock.speedup() == pytest.approx(0.8)
    assert not clock.pays() and "0.80x" in clock.describe()
    lower = speculative.SpeculationClock(plain, min_speedup=0.75)
    lower.rounds, lower.tokens, lower.seconds = clock.rounds, clock.tokens, clock.seconds
    assert lower.pays()
    off = speculative.SpeculationClock(plain, min_speedup=0.0)
    off.rounds, off.tokens, off.seconds = 100, 1, 10.0  # 0.0002x plain, never judged
    assert off.pays()
    plain.append(0.010)  # the engine's list grows with later plain steps: the median moves with it
    plain.append(0.010)  # median now 3 ms
    assert clock.speedup() == pytest.approx(1.2) and clock.pays()


@pytest.mark.parametrize("mode", ["recycle", "lookup"])
def test_engine_turns_speculation_off_when_it_is_slower_and_keeps_greedy_output(lm, mode):
    prompt = PROMPTS[0]
    [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=48)
    timed = EngineStats()
    engine = Engine(lm.model, lm.tokenizer)
    # no pass is 100x faster than a plain step: turned off after MIN_ROUNDS_TO_TIME timed rounds (recycle's passes
    # over the pending token alone count among them, not in stats.rounds); one token drafted a round, so that a
    # model that repeats itself still needs more rounds than that
    [out] = engine.generate(
        prompt, max_new_tokens=48, speculate=mode, speculate_k=1, min_acceptance=0.0, min_speedup=100.0, stats=timed
    )
    from slmkit.infer.speculative import MIN_ROUNDS_TO_TIME

    assert out.token_ids == plain.token_ids
    assert timed.speculation_turned_off and timed.turned_off_because.startswith("slower than plain decoding")
    assert 0 < timed.rounds <= MIN_ROUNDS_TO_TIME
    assert "turned off (slower than plain decoding" in timed.summary()
    free = EngineStats()
    [again] = Engine(lm.model, lm.tokenizer).generate(
        prompt, max_new_tokens=48, speculate=mode, speculate_k=1, min_acceptance=0.0, min_speedup=0.0, stats=free
    )
    assert again.token_ids == plain.token_ids
    assert not free.speculation_turned_off and free.rounds > MIN_ROUNDS_TO_TIME


@pytest.mark.parametrize("bad", [-1.0, 101.0, True])
def test_engine_refuses_a_bad_min_speedup(lm, bad):
    from slmkit.errors import UserError

    with pytest.raises(UserError, match="min speedup"):
        Engine(lm.model, lm.tokenizer).generate("A", max_new_tokens=4, speculate="lookup", min_speedup=bad)


def test_seeded_sampling_is_never_judged_by_time(lm):
    from slmkit.infer.sampling import SamplingParams

    sampling = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        stats = EngineStats()
        [out] = Engine(lm.model, lm.tokenizer).generate(
            PROMPTS[0], max_new_tokens=40, sampling=sampling, speculate="recycle", speculate_k=1,
            min_acceptance=0.0, min_speedup=100.0, stats=stats,
        )  # fmt: skip
        assert not stats.speculation_turned_off  # a time rule here would make the tokens depend on timing
        runs.append(out.token_ids)
    assert runs[0] == runs[1]
