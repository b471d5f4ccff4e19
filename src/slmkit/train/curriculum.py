"""Dataset Decomposition (Pouransari et al. 2024): variable-length batches cut from single documents.

The train stream is a sequence of documents, each ending in the end-of-text token. Every document is cut into
chunks whose number of predicted tokens is a power of two, following the binary representation of its length
(a document predicting 300 tokens gives chunks of 256, 32, 8 and 4): no chunk crosses a document boundary, so
no sequence attends across documents, and every token is predicted exactly once per epoch. Chunks are bucketed
by length; a batch holds chunks of one bucket only, and as many of them as keep the tokens per step constant
(`batch_size x seq_len`: 16 rows of 256 or 128 rows of 32). Chunks longer than `seq_len` are not made: a
longer document is cut into `seq_len` chunks first.

Each epoch shuffles every bucket (seeded by seed and epoch) and fills batches; the chunks left over in a bucket
(fewer than one batch) are halved into the next shorter bucket, so nothing is dropped, and the single shortest
bucket's remainder becomes one last batch padded with ignored targets. The batches of an epoch are visited in
a seeded random order (short and long mixed, as the paper's default sampling). The position is the number of
batches consumed, so resuming needs nothing else; rank r of W takes batches r, r + W, ... of the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from slmkit.data.chat import IGNORE  # a target that carries no loss (cross_entropy's ignore_index)


def document_chunks(tokens: np.ndarray, eot_id: int, seq_len: int) -> dict[int, np.ndarray]:
    """Per chunk length L (a power of two <= seq_len), the start offsets of chunks predicting L tokens.

    A chunk at start s with length L is inputs tokens[s : s + L] and targets tokens[s + 1 : s + L + 1]; the chunks
    of a document tile its predicted tokens (all but its first token) without overlap.
    """
    ends = np.flatnonzero(tokens == eot_id)  # each document ends with (and includes) its end-of-text token
    starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else np.zeros(0, dtype=np.int64)
    if len(ends) == 0 or ends[-1] != len(tokens) - 1:  # a last document without its end token
        starts = np.append(starts, ends[-1] + 1 if len(ends) else 0)
        ends = np.append(ends, len(tokens) - 1)
    max_bit = seq_len.bit_length() - 1
    top = 1 << max_bit
    buckets: dict[int, list[np.ndarray]] = {}
    predicted = ends - starts  # tokens each document predicts
    # whole top-size chunks of every document first, then the binary digits of what is left
    full = predicted // top
    rest_at = starts + full * top
    if full.any():
        reps = np.repeat(starts, full)
        within = np.arange(int(full.sum())) - np.repeat(np.cumsum(full) - full, full)
        buckets.setdefault(top, []).append(reps + within * top)
    rest = predicted - full * top
    offset = np.zeros_like(rest)
    for bit in range(max_bit - 1, -1, -1):
        length = 1 << bit
        has = (rest & length) > 0
        if has.any():
            buckets.setdefault(length, []).append(rest_at[has] + offset[has])
        offset = offset + np.where(has, length, 0)
    return {length: np.sort(np.concatenate(parts)) for length, parts in buckets.items()}


class DecompositionSampler:
    """Batches of one chunk length each, `tokens_per_step` predicted tokens per batch (see the module docstring)."""

    def __init__(
        self,
        tokens: np.ndarray,
        eot_id: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = tokens
        self.seq_len = 1 << (seq_len.bit_length() - 1)  # the longest chunk: seq_len rounded down to a power of two
        self.tokens_per_step = batch_size * seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.chunks = document_chunks(np.asarray(tokens), eot_id, self.seq_len)
        self.pad_id = eot_id
        self.position = 0
        self._epoch = -1
        self._plan: list[tuple[int, np.ndarray]] = []
        self.batches_per_epoch = len(self._epoch_plan(0))

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (chunk length, chunk starts), in visiting order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[tuple[int, np.ndarray]] = []
        carry = np.zeros(0, dtype=np.int64)
        length = self.seq_len
        while True:
            starts = np.concatenate((self.chunks.get(length, np.zeros(0, dtype=np.int64)), carry))
            starts = starts[rng.permutation(len(starts))]
            rows = max(1, self.tokens_per_step // length)
            whole = len(starts) // rows
            batches += [(length, starts[i * rows : (i + 1) * rows]) for i in range(whole)]
            left = starts[whole * rows :]
            if length == 1:
                if len(left):  # the one partial batch of the epoch
                    batches.append((1, left))
                break
            # what does not fill a batch moves down a bucket, each chunk as its two halves
            carry = np.concatenate((left, left + length // 2))
            length //= 2
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def _batch(self, global_index: int) -> tuple[int, np.ndarray]:
        epoch, offset = divmod(global_index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._plan = self._epoch_plan(epoch)
            self._epoch = epoch
        return self._plan[offset]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (tokens_per_step // L, L) for this step's chunk length L; `batch_size` is fixed at
        construction (the tokens per step), so the argument only keeps the sampler interface."""
        length, starts = self._batch(self.position + self.rank)
        self.position += self.world_size
        rows = max(1, self.tokens_per_step // length)
        index = starts[:, None] + np.arange(length + 1)[None, :]
        block = np.asarray(self.tokens[index], dtype=np.int64)
        x, y = block[:, :-1], block[:, 1:].copy()
        if len(starts) < rows:  # the epoch's last, partial batch: padding rows carry no loss
            pad = rows - len(starts)
            x = np.concatenate((x, np.full((pad, length), self.pad_id, dtype=np.int64)))
            y = np.concatenate((y, np.full((pad, length), IGNORE, dtype=np.int64)))
        return torch.from_numpy(x), torch.from_numpy(y)

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch
