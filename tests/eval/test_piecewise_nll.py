"""The in-length reference of the long-context benchmark: every token of a long sequence scored from scratch on at
most `piece` tokens before it (`slmkit.eval.kv_cache.piecewise_token_nll`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import preset
from slmkit.eval.kv_cache import cached_token_nll, piecewise_token_nll
from slmkit.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(preset("tiny", vocab_size=97, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64))
    net.init_weights(0)
    with torch.no_grad():  # away from init, so that what each token sees changes its prediction clearly
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("piece", [50, 64])
def test_a_piece_covering_the_sequence_is_the_plain_score(model, ids, piece):
    torch.testing.assert_close(piecewise_token_nll(model, ids, piece), cached_token_nll(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("piece", [2, 7, 16, 49])
def test_each_token_is_scored_from_scratch_on_the_piece_before_it(model, ids, piece):
    got = piecewise_token_nll(model, ids, piece)
    assert got.shape == (2, 49)  # aligned with cached_token_nll: token t at column t - 1
    with torch.no_grad():
        for t in range(1, 50):
            first = max(t // piece * piece - 1, 0)  # the run holding t starts its context one token before it
            assert t - first <= piece
            logits = model(ids[:, first:t])[:, -1]
            want = F.cross_entropy(logits.float(), ids[:, t], reduction="none")
            torch.testing.assert_close(got[:, t - 1], want, atol=1e-5, rtol=0)


def test_a_short_piece_forgets_what_came_before(model, ids):
    full, cut = cached_token_nll(model, ids), piecewise_token_nll(model, ids, 7)
    torch.testing.assert_close(cut[:, :6], full[:, :6], atol=1e-5, rtol=0)  # the first run sees what full does
    assert (cut[:, 7:] - full[:, 7:]).abs().max() > 1e-3


def test_a_piece_of_one_token_is_refused(model, ids):
    with pytest.raises(ValueError, match="piece"):
        piecewise_token_nll(model, ids, 1)
