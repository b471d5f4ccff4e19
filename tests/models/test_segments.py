"""Packed documents: a stateless forward with segments equals each document's own forward."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import preset
from slmkit.models import build_model


def packed_vs_separate(model, lengths: list[int], seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    ids = torch.cat(docs).unsqueeze(0)
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, segments=segments, pos=pos)[0]
        alone = torch.cat([model(doc.unsqueeze(0))[0] for doc in docs])
    return float((packed - alone).abs().max())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": 4}, {"positions": "learned", "norm": "layernorm", "mlp": "plain"}],
    ids=["llama", "sliding-window", "gpt2-like"],
)
def test_packed_documents_do_not_see_each_other(overrides):
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=97, max_seq_len=64, **overrides)).eval()
    assert packed_vs_separate(model, [5, 11, 3, 9]) < 1e-4
    # the same tokens without segments do attend across documents: the check above can fail
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (1, 28), generator=gen)
    with torch.no_grad():
        joined = model(ids)[0, 5:16]
        second = model(ids[:, 5:16])[0]
    assert float((joined - second).abs().max()) > 1e-3


def test_recurrent_mixers_refuse_segments():
    model = build_model(preset("micro-mamba", vocab_size=97, max_seq_len=64))
    assert not model.packs_documents
    with pytest.raises(ValueError, match="segments"):
        model(torch.zeros(1, 4, dtype=torch.long), segments=torch.zeros(1, 4, dtype=torch.long))
