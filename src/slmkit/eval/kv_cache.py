"""Perplexity through an inference state: what a KV cache (bounded, quantized, pruned) costs in quality.

`evaluate_text` scores windows with full causal attention; here the tokens go through ``model.new_state(cache=...)``
in calls of `chunk` tokens, as generation feeds them, so each token is predicted from what the cache kept. With a
window + sinks cache a sequence may be longer than the model's context.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


@torch.inference_mode()
def cached_token_nll(model: Any, ids: torch.Tensor, cache: Any = None, chunk: int = 32) -> torch.Tensor:
    """Negative log-likelihood (nats, (B, L - 1)) of each next token of ids (B, L) fed through a state with `cache`
    (a `KVCacheSpec`, None: every position kept) in calls of `chunk` tokens."""
    b, length = ids.shape
    state = model.new_state(b, length, **({"cache": cache} if cache is not None else {}))
    device = next(model.parameters()).device
    ids = ids.to(device)
    losses = []
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = model(ids[:, start:stop], state=state, pos=torch.arange(start, stop, device=device))
        targets = ids[:, start + 1 : stop + 1]
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none"))
    return torch.cat(losses, dim=1).cpu()


def piecewise_token_nll(model: Any, ids: torch.Tensor, piece: int, chunk: int = 32) -> torch.Tensor:
    """Negative log-likelihood (nats, (B, L - 1), aligned as `cached_token_nll`'s) of each next token of ids (B, L)
    predicted from at most the `piece` tokens before it: the predicted tokens are cut into runs of `piece` (the
    first run `piece - 1`, as a `piece`-token sequence has), and each run is scored from scratch (a fresh state,
    positions from 0) on the `piece` tokens before its end, so every token is scored by the model at (at most) its
    trained length when `piece` is that length: the in-length reference on exactly the tokens of a long sequence."""
    if piece < 2:
        raise ValueError(f"piece must be at least 2 tokens, got {piece}")
    length = ids.shape[1]
    parts = []
    for start in range(0, length, piece):  # run j predicts tokens j*piece .. (j+1)*piece - 1 (token 0: none)
        stop = min(start + piece, length)
        parts.append(cached_token_nll(model, ids[:, max(start - 1, 0) : stop], None, chunk))
    return torch.cat(parts, dim=1)


def cached_nll(model: Any, ids: torch.Tensor, cache: Any = None, chunk: int = 32) -> float:
    """Mean of `cached_token_nll` over every predicted token."""
    return float(cached_token_nll(model, ids, cache, chunk).double().mean())


def perplexity(nll: float) -> float:
    return math.exp(nll)
