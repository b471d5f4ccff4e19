"""What compressed KV caches cost in perplexity on the trained tiny model's val split (bounds are generous: the
measured figures are in docs/long-context.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmkit.eval.kv_cache import cached_nll
from slmkit.models.state import KVCacheSpec


@pytest.fixture(scope="module")
def scored(tiny_model_dir, data_dir):
    from slmkit.api import load
    from slmkit.data.shards import load_data_dir

    lm = load(tiny_model_dir)
    length = lm.config.max_seq_len
    val = load_data_dir(data_dir).val
    windows = torch.from_numpy(np.asarray(val[: 4 * length], dtype=np.int64)).view(4, length)
    return lm, windows, cached_nll(lm.model, windows)


@pytest.mark.parametrize(
    "spec, bound",
    [
        (KVCacheSpec(dtype="int8"), 0.005),  # the goal: < 0.5% at (less than) half the memory
        (KVCacheSpec(dtype="int4"), 0.05),
        (KVCacheSpec(prune_keys=0.5), 0.05),
        (KVCacheSpec(dtype="int8", prune_keys=0.25), 0.05),
        (KVCacheSpec(window=32, sinks=4), 0.05),
    ],
    ids=["int8", "int4", "prune50", "int8-prune25", "window32-sinks4"],
)
def test_perplexity_change_is_small(scored, spec, bound):
    lm, windows, base = scored
    nll = cached_nll(lm.model, windows, spec)
    assert nll != base  # the cache really changed what attention saw
    assert abs(math.exp(nll - base) - 1) < bound
    full = lm.model.new_state(1, lm.config.max_seq_len).bytes_per_token()
    if spec.dtype != "auto" or spec.prune_keys:
        assert lm.model.new_state(1, lm.config.max_seq_len, cache=spec).bytes_per_token() < full
