"""``slm data prepare``: sources -> tokenizer -> train/val token files + meta.json.

Two streaming passes over the corpus: one to train the tokenizer (skipped when one is given), one to
tokenize. Memory holds one batch of documents and its token ids, never the corpus. Each document goes
to the validation split by a hash of its content, so the split does not depend on the order of files.

A document longer than ``chunk_chars`` characters (default 16,384, ~4k tokens) is first cut into pieces
(see :func:`chunk_document`), and each piece is a document from then on: it gets its own split by the
hash of its text and its own end-of-text token. So one large text file (`slm data prepare input.txt`)
still gives a train and a validation split. The cut is deterministic (it depends only on the text and
``chunk_chars``), and meta.json records ``chunk_chars`` and how many documents were cut
(``chunked_documents``); the split counts count pieces.

Each source is a named **domain** (named after its file or folder stem, see
:func:`slmkit.data.sources.domain_names`). Sources are tokenized one after the other, so a domain's
documents form one contiguous range of tokens in each split file; meta.json's ``domains`` lists, per domain,
its name, source, total tokens and per split the range (``offset``, ``tokens``) with its document and byte
counts. ``train.bin``/``val.bin`` are what they were without domains, so every reader works unchanged, and
``slm train --mix`` samples the ranges at chosen shares.
All files are written into a staging folder first; an existing data directory is replaced only once
the new files are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from slmkit.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    ShardWriter,
    Split,
    bin_path,
    dtype_for_vocab,
)
from slmkit.data.sources import SourceStats, domain_names, iter_tagged_documents, resolve_sources
from slmkit.data.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    check_vocab_size,
    eot_token_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    tokenizer_file,
    train_tokenizer,
    write_tokenizer_config,
)
from slmkit.errors import UserError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

STAGING_DIR = ".prepare-staging"
MAX_VAL_FRACTION = 0.5
DEFAULT_CHUNK_CHARS = 16384
_HASH_RANGE = 2**64
_COPY_CHUNK_TOKENS = 1 << 24


def document_hash(data: bytes) -> int:
    """64-bit content hash of a document's UTF-8 bytes; decides its split."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def is_val_document(text: str, val_fraction: float) -> bool:
    """Whether ``text`` belongs to the validation split (by content, independent of corpus order)."""
    return document_hash(text.encode("utf-8")) / _HASH_RANGE < val_fraction


def chunk_document(text: str, chunk_chars: int) -> Iterator[str]:
    """``text`` cut into pieces of at most ``chunk_chars`` characters (0: never cut).

    Each cut falls after the last blank line in the second half of the window, else after its last line
    break, else after its last space, else at the window's end. Whitespace-only pieces are dropped.
    """
    if chunk_chars <= 0 or len(text) <= chunk_chars:
        yield text
        return
    start = 0
    while len(text) - start > chunk_chars:
        window = text[start : start + chunk_chars]
        cut = chunk_chars
        for separator in ("\n\n", "\n", " "):
            at = window.rfind(separator, chunk_chars // 2)
            if at != -1:
                cut = at + len(separator)
                break
        if window[:cut].strip():
            yield window[:cut]
        start += cut
    if text[start:].strip():
        yield text[start:]


class _Chunker:
    """The (domain, document) pairs of a stream, documents cut into pieces; counts the documents that were cut."""

    def __init__(self, chunk_chars: int) -> None:
        self.chunk_chars = chunk_chars
        self.chunked_documents = 0

    def __call__(self, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        for domain, text in documents:
            if 0 < self.chunk_chars < len(text):
                self.chunked_documents += 1
            for piece in chunk_document(text, self.chunk_chars):
                yield domain, piece


@dataclass
class SplitCounts:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass
class _Located:
    """Where one document's tokens sit in a split file (tokens include its end-of-text token)."""

    hash: int
    offset: int
    tokens: int
    bytes: int
    domain: int = 0


class _Reporter:
    """A rich progress bar when enabled, nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None

    def __enter__(self) -> _Reporter:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[documents]:,} docs"),
                TextColumn("{task.fields[megabytes]:,.1f} MB"),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str) -> TaskID | None:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=None, documents=0, megabytes=0.0)

    def advance(self, task: TaskID | None, documents: int, num_bytes: int) -> None:
        if self._progress is None or task is None:
            return
        state = self._progress.tasks[self._progress.task_ids.index(task)]
        done = state.fields["documents"] + documents
        self._progress.update(task, advance=num_bytes, documents=done, megabytes=(state.completed + num_bytes) / 1e6)

    def finish(self, task: TaskID | None) -> None:
        if self._progress is not None and task is not None:
            state = self._progress.tasks[self._progress.task_ids.index(task)]
            self._progress.update(task, total=state.completed)

    def track(self, texts: Iterable[str], task: TaskID | None) -> Iterator[str]:
        for text in texts:
            self.advance(task, 1, len(text.encode("utf-8")))
            yield text


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _validate(
    vocab_size: int | None, tokenizer: str | Path | None, val_fraction: float, batch_documents: int, chunk_chars: int
) -> None:
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 0:
        raise UserError(f"chunk_chars (--chunk-chars) must be an integer >= 0 (0: never cut), got {chunk_chars!r}")
    if vocab_size is not None:
        check_vocab_size(vocab_size)
    if vocab_size is not None and tokenizer is not None:
        raise UserError(
            "both a vocab_size and a tokenizer were given; pass vocab_size (--vocab-size) to train a new "
            "tokenizer or tokenizer (--tokenizer) to reuse one, not both (vocab_size=None with a tokenizer)"
        )
    if vocab_size is None and tokenizer is None:
        raise UserError("give a vocab_size to train a tokenizer, or a tokenizer to reuse")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0.0 <= val_fraction <= MAX_VAL_FRACTION
    ):
        raise UserError(
            f"val_fraction {val_fraction!r} is out of range; use a number from 0 to {MAX_VAL_FRACTION} "
            "(e.g. 0.01 for 1% of the documents)"
        )
    if isinstance(batch_documents, bool) or not isinstance(batch_documents, int) or batch_documents < 1:
        raise UserError(f"batch_documents {batch_documents!r} must be a positive integer")


def _move_document(directory: Path, dtype: np.dtype, source: Split, target: Split, where: _Located) -> None:
    """Cut one document's tokens out of ``source``'s file and append them to ``target``'s."""
    source_path = bin_path(directory, source)
    mapped = np.memmap(source_path, dtype=dtype, mode="r")
    end = where.offset + where.tokens
    if end > mapped.size:
        raise RuntimeError(f"document at {where.offset}..{end} lies outside {source_path}")
    with bin_path(directory, target).open("ab") as handle:
        handle.write(mapped[where.offset : end].tobytes())
    # Only tiny corpora get here (a split with no document), but copy in chunks anyway so a large
    # file with a tiny val_fraction stays bounded in memory.
    temp = source_path.with_name(source_path.name + ".move")
    with temp.open("wb") as handle:
        for start, stop in ((0, where.offset), (end, mapped.size)):
            for chunk_start in range(start, stop, _COPY_CHUNK_TOKENS):
                handle.write(mapped[chunk_start : min(stop, chunk_start + _COPY_CHUNK_TOKENS)].tobytes())
    del mapped
    os.replace(temp, source_path)


def _tokenize(
    sources: list[str],
    text_field: str,
    tokenizer: Tokenizer,
    staging: Path,
    dtype: np.dtype,
    val_fraction: float,
    batch_documents: int,
    reporter: _Reporter,
    stats: SourceStats,
    chunker: _Chunker,
) -> tuple[dict[Split, SplitCounts], list[dict[Split, SplitCounts]]]:
    """Token files of both splits in the staging folder; the counts per split and per domain (source)."""
    eot = eot_token_id(tokenizer)
    counts: dict[Split, SplitCounts] = {split: SplitCounts() for split in SPLITS}
    per_domain = [{split: SplitCounts() for split in SPLITS} for _ in sources]
    # Kept in case a split ends up empty: the train document most like a val one, and vice versa.
    lowest_train: _Located | None = None
    highest_val: _Located | None = None
    task = reporter.task("tokenizing")
    with ShardWriter(staging, dtype) as writer:
        for batch in _batched(chunker(iter_tagged_documents(sources, text_field, stats)), batch_documents):
            encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
            flat: dict[Split, list[int]] = {split: [] for split in SPLITS}
            batch_bytes = 0
            for (domain, text), encoding in zip(batch, encodings, strict=True):
                data = text.encode("utf-8")
                batch_bytes += len(data)
                doc_hash = document_hash(data)
                split: Split = "val" if doc_hash / _HASH_RANGE < val_fraction else "train"
                ids = encoding.ids
                located = _Located(doc_hash, counts[split].tokens, len(ids) + 1, len(data), domain)
                if split == "train" and (lowest_train is None or doc_hash < lowest_train.hash):
                    lowest_train = located
                if split == "val" and (highest_val is None or doc_hash > highest_val.hash):
                    highest_val = located
                flat[split].extend(ids)
                flat[split].append(eot)
                for tally in (counts[split], per_domain[domain][split]):
                    tally.documents += 1
                    tally.tokens += located.tokens
                    tally.bytes += located.bytes
            for split in SPLITS:
                writer.append(split, np.array(flat[split], dtype=dtype))
            reporter.advance(task, len(batch), batch_bytes)
        writer.close()
    reporter.finish(task)

    total = counts["train"].documents + counts["val"].documents
    if val_fraction > 0 and total == 1:
        size = counts["train"].bytes + counts["val"].bytes
        chunks = f"below {chunker.chunk_chars}" if chunker.chunk_chars else f"such as {DEFAULT_CHUNK_CHARS}"
        raise UserError(
            f"the corpus is too small for a validation split: it has only 1 document ({size:,} bytes); "
            "pass --val-fraction 0 to skip validation (val_fraction=0 in prepare()), or a --chunk-chars "
            f"{chunks} (chunk_chars in prepare()) to cut it into pieces, or add documents"
        )
    moves: list[tuple[Split, Split, _Located | None]] = []
    if val_fraction > 0 and counts["val"].documents == 0:
        moves.append(("train", "val", lowest_train))
    if counts["train"].documents == 0:
        moves.append(("val", "train", highest_val))
    for source, target, located in moves:
        assert located is not None
        logger.warning(
            "the %s split got no documents (%d in all, val_fraction=%g); moving one document from %s to %s",
            target,
            total,
            val_fraction,
            source,
            target,
        )
        _move_document(staging, dtype, source, target, located)
        # the target split was empty, so the document alone is its domain's range there; in the source split
        # its domain's range just gets shorter
        for split, sign in ((source, -1), (target, 1)):
            for tally in (counts[split], per_domain[located.domain][split]):
                tally.documents += sign
                tally.tokens += sign * located.tokens
                tally.bytes += sign * located.bytes
    return counts, per_domain


def domain_records(names: list[str], sources: list[str], per_domain: list[dict[Split, SplitCounts]]) -> list[dict]:
    """meta.json's ``domains``: per source, in order, its token range in each split (offsets are the sums of
    the earlier domains' tokens, as the sources were tokenized one after the other)."""
    offsets = dict.fromkeys(SPLITS, 0)
    records = []
    for name, source, tallies in zip(names, sources, per_domain, strict=True):
        splits = {}
        for split in SPLITS:
            splits[split] = {"offset": offsets[split], **asdict(tallies[split])}
            offsets[split] += tallies[split].tokens
        records.append(
            {"name": name, "source": source, "tokens": sum(t.tokens for t in tallies.values()), "splits": splits}
        )
    return records


def _commit(staging: Path, out: Path) -> None:
    # meta.json marks a complete directory: remove the old one first and add the new one last, so a
    # crash in between leaves a directory that loaders reject rather than one mixing old and new files.
    (out / META_FILE).unlink(missing_ok=True)
    for name in ("train.bin", "val.bin", TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        os.replace(staging / name, out / name)
    os.replace(staging / META_FILE, out / META_FILE)


def prepare(
    sources: list[str],
    out: str | Path,
    vocab_size: int | None = 8192,
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    batch_documents: int = 256,
    progress: bool = False,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> dict[str, Any]:
    """Tokenize ``sources`` into a data directory ``out``; returns the meta.json contents.

    Trains a byte-level BPE tokenizer of ``vocab_size`` tokens, or reuses ``tokenizer`` (a
    tokenizer.json or a directory holding one; then pass ``vocab_size=None``). Every document ends with
    the end-of-text token. A document goes to the validation split when the hash of its text falls
    below ``val_fraction`` (0 to 0.5), so the split is stable however the corpus is ordered. Documents longer
    than ``chunk_chars`` characters are cut into pieces first, each a document (0: never cut).
    """
    _validate(vocab_size, tokenizer, val_fraction, batch_documents, chunk_chars)
    sources = [str(s) for s in ([sources] if isinstance(sources, str | os.PathLike) else sources)]
    resolve_sources(sources)  # bad paths fail here, before any tokenizer training
    names = domain_names(sources)  # and two sources of one name
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    staging.mkdir()
    try:
        with _Reporter(progress) as reporter:
            if tokenizer is None:
                assert vocab_size is not None
                logger.info("training a %d-token byte-level BPE tokenizer on %s", vocab_size, sources)
                task = reporter.task("training tokenizer")
                pieces = _Chunker(chunk_chars)(iter_tagged_documents(sources, text_field, SourceStats()))
                texts = reporter.track((text for _, text in pieces), task)
                trained = train_tokenizer(texts, vocab_size)
                reporter.finish(task)
                save_tokenizer(trained, staging)
                tok = trained
            else:
                source_file = tokenizer_file(tokenizer)
                tok = load_tokenizer(source_file)
                shutil.copyfile(source_file, staging / TOKENIZER_FILE)
                write_tokenizer_config(tok, staging)
            eot = eot_token_id(tok)
            actual_vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
            dtype = dtype_for_vocab(actual_vocab)
            # Text that happens to contain "<|endoftext|>" must not fake a document boundary.
            tok.encode_special_tokens = True
            # The training pass already warned about skipped files.
            stats = SourceStats(log_skips=tokenizer is not None)
            chunker = _Chunker(chunk_chars)
            counts, per_domain = _tokenize(
                sources, text_field, tok, staging, dtype, val_fraction, batch_documents, reporter, stats, chunker
            )
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "sources": sources,
            "text_field": text_field,
            "vocab_size": actual_vocab,
            "requested_vocab_size": vocab_size,
            "tokenizer_trained": tokenizer is None,
            "dtype": dtype.name,
            "eot_token_id": eot,
            "tokenizer_sha256": file_sha256(staging / TOKENIZER_FILE),
            "val_fraction": val_fraction,
            "chunk_chars": chunk_chars,
            "chunked_documents": chunker.chunked_documents,
            "splits": {split: asdict(counts[split]) for split in SPLITS},
            "domains": domain_records(names, sources, per_domain),
            "skipped_files": stats.skipped_files,
            "skipped": stats.skipped,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _commit(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "wrote %s: %d train tokens (%d documents), %d val tokens (%d documents), vocab %d",
        out,
        counts["train"].tokens,
        counts["train"].documents,
        counts["val"].tokens,
        counts["val"].documents,
        actual_vocab,
    )
    return meta
