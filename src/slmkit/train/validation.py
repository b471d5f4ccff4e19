"""Validation loss of a model on a token stream: what the training loop reports as `val_loss`.

It lives in train/ (not eval/) because the loop needs it and layers only point down: `slmkit.eval`
builds its perplexity and bits-per-byte scores on `token_nats`, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from slmkit.train.batches import eval_windows
from slmkit.train.losses import next_token_cross_entropy


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
            total += float(next_token_cross_entropy(logits, y, reduction="sum"))
            count += y.numel()
        if on_batch is not None:
            on_batch(len(group))
    model.train(was_training)
    return total, count
