"""Loss, perplexity and bits per byte of a model on a token stream or on text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# the scoring core lives below eval/, in train/, which needs it for `val_loss`; re-exported for eval's callers
from slmkit.train.validation import token_nats

__all__ = ["TextScore", "score", "token_nats"]


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
