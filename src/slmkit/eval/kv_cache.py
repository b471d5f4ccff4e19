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
def cached_nll(model: Any, ids: torch.Tensor, cache: Any = None, chunk: int = 32) -> float:
    """Mean next-token negative log-likelihood (nats) of ids (B, L) fed through a state with `cache` (a
    `KVCacheSpec`, None: every position kept) in calls of `chunk` tokens."""
    b, length = ids.shape
    state = model.new_state(b, length, **({"cache": cache} if cache is not None else {}))
    device = next(model.parameters()).device
    ids = ids.to(device)
    total = 0.0
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = model(ids[:, start:stop], state=state, pos=torch.arange(start, stop, device=device))
        targets = ids[:, start + 1 : stop + 1]
        total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum"))
    return total / (b * (length - 1))


def perplexity(nll: float) -> float:
    return math.exp(nll)
