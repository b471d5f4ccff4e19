"""Deterministic, resumable batches of token windows.

The training stream is cut into windows of seq_len + 1 tokens; each epoch visits them in a permutation
drawn from (seed, epoch). A batch position is one integer, the number of windows consumed, so resuming
needs nothing else, and rank r of a world of size W takes windows r, r + W, r + 2W, ... of the same
global order: disjoint slices whose union is what one process would see.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class EpochOrder:
    """Item `global_index` of an endless stream that visits n items once per epoch, each epoch in the permutation
    drawn from (seed, epoch); the current epoch's permutation is kept (indices arrive in order)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def __getitem__(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        assert self._perm is not None
        return int(self._perm[offset])


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError("too few tokens for one window")
        self.position = 0  # global windows consumed (all ranks together)
        self._order = EpochOrder(self.n_windows, seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, seq_len); y is x shifted by one token."""
        rows = []
        for i in range(batch_size):
            global_index = self.position + i * self.world_size + self.rank
            start = self._order[global_index] * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        self.position += batch_size * self.world_size
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows


def eval_windows(tokens: np.ndarray, seq_len: int, count: int | None = None) -> list[tuple[int, int]]:
    """(start, length) of non-overlapping windows covering the stream; `count` evenly spaced ones if given.

    Each window predicts `length` tokens: tokens[start+1 : start+length+1] from tokens[start : start+length].
    """
    n = len(tokens) - 1
    if n < 1:
        return []
    starts = list(range(0, n, seq_len))
    windows = [(s, min(seq_len, n - s)) for s in starts]
    if count is not None and count < len(windows):
        full = [w for w in windows if w[1] == seq_len] or windows
        picks = np.linspace(0, len(full) - 1, count).round().astype(int)
        windows = [full[i] for i in sorted(set(picks.tolist()))]
    return windows


class RowSampler:
    """Deterministic, resumable batches of prepared rows (packed fine-tuning samples, `slmkit.data.chat`).

    Like `WindowSampler`: each epoch visits the rows in a permutation drawn from (seed, epoch), the position is
    the number of rows consumed, and rank r of W takes rows r, r + W, ... of the global order. A batch is
    (x, y, extra): extra holds the rows' segments and positions when they hold packed samples (so the model
    keeps the samples apart), and is empty for one sample per row (plain causal attention, its fast path).
    """

    def __init__(self, rows: Any, seed: int, rank: int = 0, world_size: int = 1, packed: bool = True) -> None:
        self.rows = rows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.packed = packed
        self.n_rows = len(rows)
        if self.n_rows < 1:
            raise ValueError("no rows")
        self.position = 0
        self._order = EpochOrder(self.n_rows, seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        picks = [self._order[self.position + i * self.world_size + self.rank] for i in range(batch_size)]
        self.position += batch_size * self.world_size
        rows = self.rows
        x, y = torch.from_numpy(rows.inputs[picks]), torch.from_numpy(rows.targets[picks])
        if not self.packed:
            return x, y, {}
        extra = {"segments": torch.from_numpy(rows.segments[picks]), "pos": torch.from_numpy(rows.positions[picks])}
        return x, y, extra

    @property
    def epoch(self) -> float:
        return self.position / self.n_rows


class ReplaySampler:
    """Batches mixing new data with a share of replayed old data (continued pre-training without forgetting).

    Of every batch, the rows that keep the replayed share at `fraction` of all rows so far come from `replay`,
    the rest from `main` (each a `WindowSampler` with its own order and rank split), so the mix is exact over
    any run and the same on every rank. The position is the pair of the two samplers' positions.
    """

    def __init__(self, main: WindowSampler, replay: WindowSampler, fraction: float) -> None:
        if not 0 < fraction < 1:
            raise ValueError("fraction must be in (0, 1)")
        self.main, self.replay, self.fraction = main, replay, fraction

    @property
    def position(self) -> list[int]:
        return [self.main.position, self.replay.position]

    @position.setter
    def position(self, value: list[int]) -> None:
        self.main.position, self.replay.position = int(value[0]), int(value[1])

    @property
    def epoch(self) -> float:
        return self.main.epoch

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        world = self.main.world_size
        rows = (self.main.position + self.replay.position) // world  # rows each process took so far
        replayed = int((rows + batch_size) * self.fraction) - int(rows * self.fraction)
        parts = [s.next_batch(n) for s, n in ((self.main, batch_size - replayed), (self.replay, replayed)) if n]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class MixtureSampler:
    """Batches drawn from named domains at fixed shares (`slm train --mix code=0.7,papers=0.3`).

    Each domain has its own `WindowSampler` (its own order and rank split). Rows are dealt one at a time to the
    domain furthest below its share of the rows dealt so far (ties to the first domain), so after n rows every
    domain has its share of n to within one row: the mix is exact over any run, the same on every rank, and a
    function of the rows each domain gave so far. The position is the list of the domains' positions, which is
    all a resume needs.
    """

    def __init__(self, samplers: dict[str, WindowSampler], shares: dict[str, float]) -> None:
        if set(samplers) != set(shares) or not samplers:
            raise ValueError("one share per domain sampler")
        if not all(share > 0 and math.isfinite(share) for share in shares.values()):
            raise ValueError("shares must be positive")
        total = sum(shares.values())
        self.names = list(samplers)
        self.samplers = [samplers[n] for n in self.names]
        self.shares = np.array([shares[n] / total for n in self.names])
        self.world_size = self.samplers[0].world_size

    @property
    def position(self) -> list[int]:
        return [s.position for s in self.samplers]

    @position.setter
    def position(self, value: list[int]) -> None:
        if len(value) != len(self.samplers):
            raise ValueError(f"a mixture of {len(self.samplers)} domains cannot resume from position {value}")
        for sampler, position in zip(self.samplers, value, strict=True):
            sampler.position = int(position)

    def rows_taken(self) -> np.ndarray:
        """Rows each domain gave to each process so far."""
        return np.array([s.position // self.world_size for s in self.samplers], dtype=np.int64)

    def allocate(self, batch_size: int) -> list[int]:
        """Rows of the next batch from each domain (does not consume them)."""
        taken = self.rows_taken()
        dealt = int(taken.sum())
        counts = np.zeros(len(self.samplers), dtype=np.int64)
        for i in range(batch_size):
            deficit = self.shares * (dealt + i + 1) - (taken + counts)
            counts[int(np.argmax(deficit))] += 1
        return counts.tolist()

    @property
    def epoch(self) -> float:
        """Passes over the domain that has been repeated most."""
        return max(s.epoch for s in self.samplers)

    def realised_shares(self) -> dict[str, float]:
        taken = self.rows_taken()
        total = max(int(taken.sum()), 1)
        return {name: int(n) / total for name, n in zip(self.names, taken, strict=True)}

    def log_metrics(self) -> dict[str, float]:
        """What the training loop adds to each step's record: the realised share of each domain so far."""
        return {f"share/{name}": share for name, share in self.realised_shares().items()}

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [s.next_batch(n) for s, n in zip(self.samplers, self.allocate(batch_size), strict=True) if n]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
