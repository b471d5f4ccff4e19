"""Dataset Decomposition batches (slmkit.train.curriculum) and loss-based sample reweighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmkit.train.curriculum import DecompositionSampler
from slmkit.train.objectives import LanguageModeling
from slmkit_testing import tiny_train_config

EOT = 0


def corpus(seed: int = 0, docs: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 700, size=docs)
    return np.concatenate([np.append(rng.integers(1, 50, size=n), EOT) for n in lengths]).astype(np.int64)


def chunk_starts(sampler: DecompositionSampler, steps: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for _ in range(steps):
        out.append(sampler._batch(sampler.position + sampler.rank))
        sampler.next_batch(0)
    return out


@pytest.mark.parametrize("seq_len", [256, 200])
def test_every_token_once_per_epoch_and_no_document_crossed(seq_len):
    tokens = corpus()
    sampler = DecompositionSampler(tokens, EOT, seq_len, batch_size=4, seed=1)
    predicted = np.zeros(len(tokens), dtype=int)
    lengths = set()
    for _ in range(sampler.batches_per_epoch):
        length, starts = sampler._batch(sampler.position)
        x, y = sampler.next_batch(4)
        assert x.numel() == 4 * seq_len - (4 * seq_len) % length  # constant tokens per step
        real = x[: len(starts)]
        assert not (real == EOT).any()  # an input never holds an end of document: no chunk crosses one
        for s in starts:
            predicted[s + 1 : s + length + 1] += 1
        lengths.add(length)
    first_of_doc = np.concatenate(([0], np.flatnonzero(tokens == EOT)[:-1] + 1))
    expected = np.ones(len(tokens), dtype=int)
    expected[first_of_doc] = 0
    assert np.array_equal(predicted, expected)
    assert max(lengths) == 1 << (seq_len.bit_length() - 1) and len(lengths) > 3


def test_epochs_differ_resume_is_exact_and_ranks_split():
    tokens = corpus(1)
    a = DecompositionSampler(tokens, EOT, 128, batch_size=2, seed=3)
    first = [a.next_batch(2) for _ in range(a.batches_per_epoch + 5)]
    b = DecompositionSampler(tokens, EOT, 128, batch_size=2, seed=3)
    b.position = 7
    for expected in first[7:]:
        assert all(torch.equal(u, v) for u, v in zip(b.next_batch(2), expected, strict=True))
    epoch0 = [x.shape for x, _ in first[:5]]
    epoch1 = [x.shape for x, _ in first[a.batches_per_epoch : a.batches_per_epoch + 5]]
    assert epoch0 != epoch1  # each epoch has its own order
    ranks = [DecompositionSampler(tokens, EOT, 128, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    got = [chunk_starts(s, 3) for s in ranks]
    whole = chunk_starts(DecompositionSampler(tokens, EOT, 128, batch_size=2, seed=3), 6)
    for step in range(3):
        for r in range(2):
            assert got[r][step][0] == whole[2 * step + r][0]
            assert np.array_equal(got[r][step][1], whole[2 * step + r][1])


def test_training_with_decomposition_and_reweighting(data_dir, tmp_path):
    from slmkit.train.loop import train

    cfg = tiny_train_config(max_steps=4, curriculum="decomposition", reweight="loss", reweight_temperature=0.5)
    result = train(cfg, data_dir, tmp_path / "run")
    assert result.final_dir is not None and all(math.isfinite(x) for x in result.losses)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "reweight_max" in lines


def test_reweighting_weights_average_one_and_favour_hard_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 11)
    y = torch.randint(0, 11, (4, 5))
    y[3] = -100  # a padding row carries no loss and no weight

    def forward(x):
        return logits

    plain = LanguageModeling(None, 0.0, reweight_temperature=1e6).loss(forward, None, y)[0]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), reduction="none").view(4, 5)
    per_row = per_token[:3].mean(1)
    assert torch.allclose(plain, per_row.mean(), atol=1e-5)  # a huge temperature is the plain row mean
    sharp, metrics = LanguageModeling(None, 0.0, reweight_temperature=0.1).loss(forward, None, y)
    weights = torch.softmax(per_row / 0.1, 0) * 3
    assert torch.allclose(sharp, (weights * per_row).mean(), atol=1e-5)
    assert sharp > plain and torch.isclose(metrics["reweight_max"], weights.max())
    with pytest.raises(Exception, match="temperature"):
        LanguageModeling(None, 0.0, reweight_temperature=0.0)
