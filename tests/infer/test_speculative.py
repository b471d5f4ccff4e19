"""Speculative decoding is lossless: greedy output is identical, sampled output follows the target distribution."""

import pytest
import torch

from slmkit.api import load
from slmkit.infer.engine import MIN_DRAFTED_TO_JUDGE, Engine, EngineStats
from slmkit.infer.sampling import SamplingParams
from slmkit.infer.speculative import lookup_draft, verify

# repetitive prompts give prompt lookup something to find
PROMPTS = [
    "the model and the data and the model and the data and the",
    "Small language models are small. Small language models are",
]


def _always_wrong_draft(lm, scripted_model, prompt, plain_ids):
    """A draft model that proposes, at every position, a token other than the target's greedy choice."""
    v = lm.config.vocab_size
    script = [(t + 1) % v or 1 for t in plain_ids] + [1] * 64
    return scripted_model(script, v, len(lm.tokenizer.encode(prompt).ids))


@pytest.mark.parametrize("mode", ["lookup", "draft-self", "draft-random", "draft-wrong"])
def test_greedy_speculative_equals_plain_greedy(lm, random_draft_dir, scripted_model, mode):
    for prompt in PROMPTS:
        [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=24)
        draft = None
        if mode == "draft-self":
            draft = lm.model  # a perfect draft: everything accepted
        elif mode == "draft-random":
            draft = load(random_draft_dir).model  # a random small model
        elif mode == "draft-wrong":
            draft = _always_wrong_draft(lm, scripted_model, prompt, plain.token_ids)  # every draft rejected
        engine = Engine(lm.model, lm.tokenizer, draft=draft)
        speculate = "lookup" if mode == "lookup" else "draft"
        for k in (1, 4):
            stats = EngineStats()
            [spec] = engine.generate(
                prompt, max_new_tokens=24, speculate=speculate, speculate_k=k, min_acceptance=0.0, stats=stats
            )
            assert spec.token_ids == plain.token_ids, (mode, k)
            assert stats.rounds > 0 and stats.drafted > 0
            if mode == "draft-self":
                assert stats.accepted == stats.drafted
            if mode == "draft-wrong":
                assert stats.accepted == 0


def test_speculation_turns_itself_off_when_acceptance_is_low(lm, scripted_model):
    prompt = PROMPTS[1]
    [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=60)
    engine = Engine(lm.model, lm.tokenizer, draft=_always_wrong_draft(lm, scripted_model, prompt, plain.token_ids))
    stats = EngineStats()
    [spec] = engine.generate(prompt, max_new_tokens=60, speculate="draft", stats=stats)
    assert spec.token_ids == plain.token_ids
    assert stats.speculation_turned_off
    # it stopped drafting as soon as enough drafted tokens showed the acceptance was too low
    assert stats.drafted == MIN_DRAFTED_TO_JUDGE
    assert "turned off" in stats.summary()


def test_sampled_speculative_is_reproducible_and_has_logprobs(lm):
    engine = Engine(lm.model, lm.tokenizer, draft=lm.model)
    params = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=3)
    a = engine.generate(PROMPTS[0], max_new_tokens=30, sampling=params, speculate="draft", logprobs=True)[0]
    b = engine.generate(PROMPTS[0], max_new_tokens=30, sampling=params, speculate="draft", logprobs=True)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    ids = lm.tokenizer.encode(PROMPTS[0]).ids
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids + a.token_ids]))[0].log_softmax(-1)
    expected = [float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(a.token_ids)]
    assert a.logprobs == pytest.approx(expected, abs=1e-4)


def test_lookup_draft_finds_the_continuation():
    assert lookup_draft([1, 2, 3, 4, 5, 9, 1, 2, 3], k=3) == [4, 5, 9]
    assert lookup_draft([7, 8, 9], k=3) == []
    # the latest match with a full continuation wins
    assert lookup_draft([1, 2, 5, 6, 1, 2, 7, 8, 0, 1, 2], k=2) == [7, 8]


def _first_tokens(target_logits, draft_probs, draft_fn, trials, seed):
    """Counts of the 1st and 2nd emitted token over many verification rounds with fresh drafts."""
    gen = torch.Generator().manual_seed(seed)
    v = target_logits.size(-1)
    first, second = torch.zeros(v), torch.zeros(v)
    params = SamplingParams(temperature=1.0)
    for _ in range(trials):
        draft = draft_fn(gen)
        m = len(draft)
        logits = target_logits.expand(m + 1, v)
        probs = draft_probs.expand(m, v) if draft_probs is not None else None
        out, _ = verify(logits, draft, probs, params, gen)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first, second


def _chi_square_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    from scipy.stats import chi2

    n = counts.sum()
    expected = p * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat < chi2.ppf(0.999, df=len(p) - 1)


def test_rejection_sampling_follows_the_target_distribution():
    # tiny vocabulary; target p and a quite different draft q
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    target_logits = p.log()[None]

    def from_q(gen):
        return torch.multinomial(q, 2, replacement=True, generator=gen).tolist()

    first, second = _first_tokens(target_logits, q[None], from_q, trials=1500, seed=0)
    assert _chi_square_ok(first, p), first
    assert _chi_square_ok(second, p), second
    # the test has teeth: always accepting the draft gives q, which it rejects
    assert not _chi_square_ok(torch.bincount(torch.multinomial(q, 4000, replacement=True), minlength=4).float(), p)


def test_rejection_sampling_with_a_point_mass_draft():
    # prompt lookup proposes a fixed token: keep it with probability p(d), else draw from p without d
    p = torch.tensor([0.1, 0.6, 0.2, 0.1])
    first, _ = _first_tokens(p.log()[None], None, lambda gen: [2], trials=1500, seed=1)
    assert _chi_square_ok(first, p), first
