"""Loss, perplexity and bits per byte of a model on a token stream or on text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError

# the scoring core lives below eval/, in train/, which needs it for `val_loss`; re-exported for eval's callers
from slmkit.train.validation import token_nats

__all__ = ["TextScore", "evaluate_text", "score", "token_nats"]


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


def evaluate_text(
    lm: Any,
    data: Sequence[str | Path] | str | Path,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
) -> TextScore:
    """Loss, perplexity and bits per byte of a loaded model (`slmkit.loading.LoadedModel`) on a data dir's split
    or on text files (one document each); `slmkit.api.evaluate` is this for a path."""
    seq_len = seq_len or lm.config.max_seq_len
    if seq_len < 1 or seq_len > lm.config.max_seq_len:
        raise UserError(f"--seq-len must be in [1, {lm.config.max_seq_len}] (the model's context), got {seq_len}")
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if not paths:
        raise UserError("nothing to evaluate on: give a data dir or text files with --data")
    if len(paths) == 1 and paths[0].is_dir() and (paths[0] / "meta.json").exists():
        from slmkit.data.shards import load_data_dir
        from slmkit.data.tokenizer import file_sha256

        data_dir = load_data_dir(paths[0])
        if split not in ("train", "val"):
            raise UserError(f"--split must be train or val, got {split!r}")
        model_tok = lm.directory / "tokenizer.json"
        if file_sha256(model_tok) != data_dir.meta.get("tokenizer_sha256"):
            raise UserError(
                f"{paths[0]} was tokenized with a different tokenizer than {lm.directory}; "
                "evaluate on text files instead, or prepare the data with --tokenizer "
                f"{model_tok}"
            )
        tokens = data_dir.train if split == "train" else data_dir.val
        n_bytes = data_dir.meta["splits"][split]["bytes"]
    else:
        from slmkit.data.sources import iter_documents
        from slmkit.data.tokenizer import eot_token_id

        eot = eot_token_id(lm.tokenizer)
        ids: list[int] = [eot]
        n_bytes = 0
        for text in iter_documents([str(p) for p in paths]):
            ids.extend(lm.tokenizer.encode(text).ids)
            ids.append(eot)
            n_bytes += len(text.encode("utf-8"))
        tokens = np.asarray(ids, dtype=np.int64)
    if len(tokens) < 2:
        raise UserError("evaluation text is too short: need at least two tokens")
    nats, count = token_nats(lm.model, tokens, seq_len, batch_size)
    return score(nats, count, n_bytes)
