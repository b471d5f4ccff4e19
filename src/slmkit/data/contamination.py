"""``slm data contamination``: which evaluation items a model may have seen in its training data.

An item is contaminated when one of its word n-grams (default 13, as GPT-3 and Llama measured it) occurs in a
document of the training split. Words are :func:`slmkit.data.clean.normalized_words` (lower case, punctuation
dropped), so formatting differences do not hide a copy. An item of fewer than ``n`` words is contaminated only
when all its words occur in a row; pass a smaller ``n`` for tasks of short items.

The item's text is what a leak would copy: a multiple-choice item's context followed by its correct choice, a
generation item's prompt followed by its target (the formats of :mod:`slmkit.eval.tasks`).

The training text is the train split of a prepared data dir, decoded with the data dir's own tokenizer: that is
exactly what training reads (the sources named in meta.json may have changed or moved since, and would also hold
the val documents). Tokens are read in chunks and split at end-of-text tokens; a document longer than a window is
decoded in overlapping windows, so memory stays bounded however large the shard. The items' n-grams are held in
memory (a few per word of the tasks), the training text never is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.data.clean import normalized_words
from slmkit.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_N = 13
CHUNK_TOKENS = 1 << 20  # tokens read from the memory map at a time
WINDOW_TOKENS = 1 << 16  # the most tokens decoded at once
OVERLAP_TOKENS = 1024  # windows of one long document overlap by this much: an n-gram across a cut is still seen
_DECODE_BATCH = 64


@dataclass(frozen=True)
class TaskContamination:
    """How many items of one task have an n-gram in the training data."""

    task: str
    items: int
    contaminated: int
    contaminated_items: tuple[int, ...]  # indices into the task's items

    @property
    def rate(self) -> float:
        return self.contaminated / self.items if self.items else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"task", "items", "contaminated", "rate"}``."""
        return {"task": self.task, "items": self.items, "contaminated": self.contaminated, "rate": self.rate}


def item_text(example: dict[str, Any]) -> str:
    """The text of one task item that a leak would copy (see the module docstring)."""
    if "choices" in example:
        return f"{example['context']} {example['choices'][example['answer']]}"
    if "prompt" in example:
        return f"{example['prompt']} {example['target']}"
    raise UserError(f"not a task item: expected context/choices/answer or prompt/target, got {sorted(example)}")


def check_n(n: int, option: str = "--n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{option} must be a whole number of words >= 1 (13 is the usual choice), got {n!r}")


class NgramMatcher:
    """The n-grams of a set of items, and which items each belongs to; :meth:`scan` marks items found in a text."""

    def __init__(self, items: Sequence[str], n: int = DEFAULT_N) -> None:
        check_n(n)
        self.n = n
        self.found: set[int] = set()
        # length -> n-gram -> items; an item shorter than n is one gram of its own length
        self.grams: dict[int, dict[tuple[str, ...], list[int]]] = {}
        for index, text in enumerate(items):
            words = normalized_words(text)
            length = min(n, len(words))
            if length == 0:
                continue  # no words: nothing to find
            table = self.grams.setdefault(length, {})
            for i in range(len(words) - length + 1):
                owners = table.setdefault(tuple(words[i : i + length]), [])
                if not owners or owners[-1] != index:
                    owners.append(index)
        self.first_words = {length: {gram[0] for gram in table} for length, table in self.grams.items()}

    @property
    def remaining(self) -> int:
        return sum(len(table) for table in self.grams.values())

    def scan(self, text: str) -> None:
        """Mark the items with an n-gram in `text`; an n-gram once found is not looked for again."""
        words = normalized_words(text)
        for length, table in self.grams.items():
            if not table:
                continue
            firsts = self.first_words[length]
            for i in range(len(words) - length + 1):
                if words[i] in firsts:
                    owners = table.pop(tuple(words[i : i + length]), None)
                    if owners is not None:
                        self.found.update(owners)


def iter_token_documents(
    tokens: np.ndarray,
    eot_token_id: int,
    chunk_tokens: int = CHUNK_TOKENS,
    window_tokens: int = WINDOW_TOKENS,
    overlap_tokens: int = OVERLAP_TOKENS,
) -> Iterator[np.ndarray]:
    """The documents of a token array (split at `eot_token_id`), as arrays of at most `window_tokens` tokens: a
    longer document comes as windows that overlap by `overlap_tokens`. Reads `chunk_tokens` at a time."""
    if not 0 <= overlap_tokens < window_tokens:
        raise ValueError("overlap_tokens must be below window_tokens")
    carry = np.zeros(0, dtype=tokens.dtype)
    for start in range(0, len(tokens), chunk_tokens):
        chunk = np.asarray(tokens[start : start + chunk_tokens])
        ends = np.flatnonzero(chunk == eot_token_id)
        begin = 0
        for end in ends:
            piece = chunk[begin:end]
            begin = end + 1
            document = np.concatenate([carry, piece]) if len(carry) else piece
            carry = carry[:0]
            yield from _windows(document, window_tokens, overlap_tokens)
        carry = np.concatenate([carry, chunk[begin:]])
        while len(carry) > window_tokens:  # a document still open: emit full windows, keep the tail
            yield carry[:window_tokens]
            carry = carry[window_tokens - overlap_tokens :].copy()
    if len(carry):
        yield carry


def _windows(document: np.ndarray, window: int, overlap: int) -> Iterator[np.ndarray]:
    if len(document) <= window:
        if len(document):
            yield document
        return
    step = window - overlap
    for start in range(0, len(document) - overlap, step):
        yield document[start : start + window]


def contamination(
    data: str | Path,
    tasks: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    n: int = DEFAULT_N,
    split: str = "train",
    on_progress: Callable[[int, int], None] | None = None,
) -> list[TaskContamination]:
    """For each (name, items) in `tasks`, the items with an `n`-gram in the `split` split of the data dir `data`.

    `on_progress(tokens_read, tokens_total)` is called as the split is read.
    """
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import load_tokenizer

    check_n(n)
    if not tasks:
        raise UserError("no tasks given; pass one or more task files with --tasks")
    directory = load_data_dir(data)
    tokens = directory.split(split)  # type: ignore[arg-type]
    if len(tokens) == 0:
        raise UserError(f"the {split} split of {directory.path} is empty: there is nothing to check the tasks against")
    tokenizer = load_tokenizer(directory.tokenizer_path)
    texts: list[str] = []
    owners: list[tuple[int, int]] = []  # (task, item) of each text
    for t, (_name, items) in enumerate(tasks):
        for i, example in enumerate(items):
            texts.append(item_text(example))
            owners.append((t, i))
    matcher = NgramMatcher(texts, n)
    read = 0
    batch: list[list[int]] = []

    def flush() -> None:
        for text in tokenizer.decode_batch(batch, skip_special_tokens=False):
            matcher.scan(text)
        batch.clear()

    for document in iter_token_documents(tokens, directory.eot_token_id, CHUNK_TOKENS, WINDOW_TOKENS, OVERLAP_TOKENS):
        batch.append(document.tolist())
        read += len(document)
        if len(batch) >= _DECODE_BATCH:
            flush()
            if on_progress is not None:
                on_progress(min(read, len(tokens)), len(tokens))
            if matcher.remaining == 0:
                break
    if batch:
        flush()
    found: list[list[int]] = [[] for _ in tasks]
    for index in sorted(matcher.found):
        t, i = owners[index]
        found[t].append(i)
    results = [
        TaskContamination(name, len(items), len(found[t]), tuple(found[t])) for t, (name, items) in enumerate(tasks)
    ]
    for r in results:
        logger.info("%s: %d of %d items share a %d-gram with %s", r.task, r.contaminated, r.items, n, directory.path)
    return results
