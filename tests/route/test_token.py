"""Token-level routing: the threshold extremes reproduce each model's greedy output exactly; one tokenizer."""

from __future__ import annotations

import pytest

from slmkit.errors import UserError
from slmkit.route.token import (
    TokenRouteStats,
    check_same_tokenizer,
    routed_next_token_accuracy,
    token_route_ids,
    token_route_text,
)
from slmkit_testing import PROMPTS, plain_greedy


@pytest.fixture(scope="module")
def pair(weak_dir, strong_dir):
    from slmkit.api import load

    return load(weak_dir), load(strong_dir)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_threshold_extremes_equal_each_model_alone(pair, prompt):
    small, large = pair
    ids = small.tokenizer.encode(prompt).ids
    n = 12
    stats = TokenRouteStats()
    assert token_route_ids(small.model, large.model, ids, n, 0.0, stats=stats) == plain_greedy(small.model, ids, n)
    assert stats.tokens_from_large == 0 and stats.large_forwards == 0 and stats.small_forwards == n
    stats = TokenRouteStats()
    assert token_route_ids(small.model, large.model, ids, n, 1.01, stats=stats) == plain_greedy(large.model, ids, n)
    assert stats.tokens_from_large == n and stats.large_forwards == n
    assert stats.large_tokens_read == len(ids) + n - 1  # the prompt once, then each accepted token once


def test_in_between_the_large_model_reads_the_accepted_tokens_in_chunks(pair):
    small, large = pair
    ids = small.tokenizer.encode(PROMPTS[0]).ids
    # the threshold at the median top probability of the small model's own greedy run sends about half
    stats_all = []
    for threshold in (0.0, 0.05, 0.1, 0.2, 0.5, 1.01):
        stats = TokenRouteStats()
        out = token_route_ids(small.model, large.model, ids, 16, threshold, stats=stats)
        assert len(out) == 16 and stats.large_forwards == stats.tokens_from_large
        assert stats.large_tokens_read <= len(ids) + 15
        stats_all.append(stats)
    shares = [s.tokens_from_large for s in stats_all]
    assert shares[0] == 0 and shares[-1] == 16


def test_teacher_forced_large_share_is_monotone_and_extremes_match(pair):
    small, large = pair
    windows = [small.tokenizer.encode(p).ids for p in PROMPTS if len(small.tokenizer.encode(p).ids) > 1]
    result = routed_next_token_accuracy(small.model, large.model, windows, [0.0, 0.1, 0.3, 0.6, 1.01])
    rows = result["thresholds"]
    assert rows[0]["accuracy"] == result["small_accuracy"] and rows[0]["large_share"] == 0
    assert rows[-1]["accuracy"] == result["large_accuracy"] and rows[-1]["large_share"] == 1
    shares = [r["large_share"] for r in rows]
    assert shares == sorted(shares)


def test_different_tokenizers_are_refused(pair, other_tokenizer_model):
    from slmkit.api import load

    small, _ = pair
    other = load(other_tokenizer_model)
    with pytest.raises(UserError, match="one tokenizer"):
        check_same_tokenizer(small, other)
    with pytest.raises(UserError, match="one tokenizer"):
        token_route_text(small, other, "hello", 4, 0.5)


def test_prompt_past_the_context_is_a_user_error(pair):
    small, large = pair
    with pytest.raises(UserError, match="exceeds"):
        token_route_ids(small.model, large.model, [1] * 10, large.config.max_seq_len, 0.5)
