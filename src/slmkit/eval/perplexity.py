"""Loss, perplexity and bits per byte of a model on a token stream or on text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.train.batches import eval_windows


@dataclass
class TextScore:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_byte: float | None  # None when the byte count is unknown
    tokens: int  # tokens predicted
    bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def score(total_nats: float, tokens: int, n_bytes: int | None) -> TextScore:
    loss = total_nats / max(tokens, 1)
    bpb = total_nats / math.log(2) / n_bytes if n_bytes else None
    return TextScore(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=tokens, bytes=n_bytes)


@torch.no_grad()
def token_nats(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    autocast: Callable | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Sum of next-token cross-entropy (nats) and number of predicted tokens over the stream.

    Non-overlapping windows of seq_len; every token but the first is predicted once when
    max_windows is None. The model sees each window without earlier context.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(tokens, seq_len, max_windows)
    total, count = 0.0, 0
    # equal-length windows batch together; the last, shorter one runs alone
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        by_length: dict[int, list[int]] = {}
        for start, length in group:
            by_length.setdefault(length, []).append(start)
        for length, starts in by_length.items():
            block = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
            block_t = torch.from_numpy(block).to(device)
            x, y = block_t[:, :-1], block_t[:, 1:]
            if autocast is not None:
                with autocast():
                    logits = model(x)
            else:
                logits = model(x)
            nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total += float(nats)
            count += y.numel()
        if on_batch is not None:
            on_batch(len(group))
    model.train(was_training)
    return total, count
