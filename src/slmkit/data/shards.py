"""Token storage: flat binary arrays of token ids plus a ``meta.json`` that describes them.

A data directory (written by :func:`slmkit.data.prepare.prepare`) holds::

    train.bin  val.bin          token ids, one flat little-endian uint16/uint32 array per split,
                                every document followed by the end-of-text token
    tokenizer.json              the tokenizer that made them (+ tokenizer_config.json)
    meta.json                   counts, dtype, vocabulary size, tokenizer hash, sources, domains

Each source is a domain: one contiguous range of tokens per split, listed in meta.json's ``domains``
(see :class:`Domain`). A directory written before domains existed reads as one domain, ``all``.

Readers memory-map the arrays, so a training loop can sample windows from a corpus larger than RAM.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import numpy as np

from slmkit.errors import UserError

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
META_FILE = "meta.json"
FORMAT_VERSION = 1
TEMP_SUFFIX = ".tmp"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_RERUN = "re-run `slm data prepare` to rebuild the data directory"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary (little-endian)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return _DTYPES["uint16"]
    if vocab_size <= 1 << 32:
        return _DTYPES["uint32"]
    raise UserError(f"vocab_size {vocab_size} does not fit in 32-bit token ids; use a smaller vocabulary")


def bin_path(directory: str | Path, split: Split) -> Path:
    return Path(directory) / f"{split}.bin"


class ShardWriter:
    """Appends token ids to ``train.bin`` / ``val.bin`` in ``directory``.

    Data goes to ``<split>.bin.tmp`` and is renamed to ``<split>.bin`` by :meth:`close`, so an
    interrupted write never leaves a file under the final name. Used as a context manager, an
    exception discards the temporary files instead.
    """

    def __init__(self, directory: str | Path, dtype: np.dtype | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        self.max_id = int(np.iinfo(self.dtype).max)
        self.tokens: dict[Split, int] = dict.fromkeys(SPLITS, 0)
        self._handles: dict[Split, BinaryIO] = {split: self.temp_path(split).open("wb") for split in SPLITS}
        self._closed = False

    def temp_path(self, split: Split) -> Path:
        return self.directory / f"{split}.bin{TEMP_SUFFIX}"

    def append(self, split: Split, ids: np.ndarray | Sequence[int]) -> None:
        """Append ``ids`` to ``split``; ids outside the dtype's range are a bug and raise."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        array = np.asarray(ids)
        if array.size == 0:
            return
        if array.dtype != self.dtype:
            if array.min() < 0 or array.max() > self.max_id:
                raise ValueError(f"token ids outside 0..{self.max_id} cannot be stored as {self.dtype}")
            array = array.astype(self.dtype)
        self._handles[split].write(np.ascontiguousarray(array).tobytes())
        self.tokens[split] += int(array.size)

    def flush(self) -> None:
        for handle in self._handles.values():
            handle.flush()

    def close(self) -> dict[Split, Path]:
        """Finish writing and rename the temporary files to their final names; returns those paths."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        self._closed = True
        paths: dict[Split, Path] = {}
        for split, handle in self._handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            paths[split] = bin_path(self.directory, split)
            os.replace(self.temp_path(split), paths[split])
        return paths

    def abort(self) -> None:
        """Discard everything written; the final file names are left untouched."""
        if self._closed:
            return
        self._closed = True
        for split, handle in self._handles.items():
            handle.close()
            self.temp_path(split).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def open_tokens(path: str | Path, dtype: np.dtype | str, count: int) -> np.ndarray:
    """Memory-map ``count`` tokens of ``dtype`` from ``path`` read-only (an empty array for 0 tokens)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if not path.is_file():
        raise UserError(f"token file {path} is missing; {_RERUN}")
    size = path.stat().st_size
    expected = count * dtype.itemsize
    if size != expected:
        raise UserError(
            f"token file {path} has {size} bytes but meta.json says {count} tokens ({expected} bytes); "
            f"the file is truncated or stale: {_RERUN}"
        )
    if count == 0:
        # numpy cannot map an empty file.
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


UNNAMED_DOMAIN = "all"


@dataclass(frozen=True)
class Domain:
    """One source of a data directory: its tokens are ``tokens[offset : offset + count]`` of each split."""

    name: str
    ranges: dict[str, tuple[int, int]]  # split -> (offset, tokens)
    bytes: dict[str, int]  # split -> UTF-8 bytes of its documents

    def tokens(self, data: DataDir, split: Split) -> np.ndarray:
        offset, count = self.ranges[split]
        return data.split(split)[offset : offset + count]

    def bytes_per_token(self, split: Split) -> float | None:
        count = self.ranges[split][1]
        return self.bytes[split] / count if count else None


@dataclass
class DataDir:
    """A prepared data directory, its token arrays memory-mapped read-only.

    ``train`` and ``val`` are ``np.memmap`` arrays (a plain empty array for an empty split).
    """

    path: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    tokenizer_path: Path
    vocab_size: int
    eot_token_id: int

    def split(self, split: Split) -> np.ndarray:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return self.train if split == "train" else self.val

    def bytes_per_token(self, split: Split = "val") -> float:
        """UTF-8 bytes of text per token in ``split``: turns loss per token into bits per byte."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        counts = self.meta["splits"][split]
        if counts["tokens"] == 0:
            raise UserError(
                f"the {split} split of {self.path} is empty; re-run `slm data prepare` with a larger corpus "
                "or a larger val_fraction"
            )
        return counts["bytes"] / counts["tokens"]

    @property
    def has_domains(self) -> bool:
        """Whether meta.json records the domains (directories prepared before domains existed do not)."""
        return "domains" in self.meta

    @property
    def domains(self) -> list[Domain]:
        """The domains in order; one domain named ``all`` holding everything when none are recorded."""
        records = self.meta.get("domains")
        if records is None:
            splits = self.meta["splits"]
            return [
                Domain(
                    UNNAMED_DOMAIN,
                    {split: (0, splits[split]["tokens"]) for split in SPLITS},
                    {split: splits[split]["bytes"] for split in SPLITS},
                )
            ]
        return [
            Domain(
                r["name"],
                {split: (r["splits"][split]["offset"], r["splits"][split]["tokens"]) for split in SPLITS},
                {split: r["splits"][split]["bytes"] for split in SPLITS},
            )
            for r in records
        ]

    def domain(self, name: str) -> Domain:
        for domain in self.domains:
            if domain.name == name:
                return domain
        known = ", ".join(d.name for d in self.domains)
        raise UserError(f"{self.path} has no domain {name!r}; its domains are: {known}")


def _meta_error(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; {_RERUN}")


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing, so this is not a prepared data directory; {_RERUN}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _meta_error(meta_path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _meta_error(meta_path, "is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _meta_error(meta_path, f"has format_version {version!r}, this slmkit reads {FORMAT_VERSION}")
    for key, kind in (("vocab_size", int), ("eot_token_id", int), ("dtype", str), ("splits", dict)):
        if not isinstance(meta.get(key), kind):
            raise _meta_error(meta_path, f"has no valid {key!r}")
    if meta["dtype"] not in _DTYPES:
        raise _meta_error(meta_path, f"has unknown dtype {meta['dtype']!r}")
    for split in SPLITS:
        counts = meta["splits"].get(split)
        if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k), int) and counts[k] >= 0 for k in ("documents", "tokens", "bytes")
        ):
            raise _meta_error(meta_path, f"has no valid counts for the {split!r} split")
    if "domains" in meta:
        _check_domains(meta_path, meta)
    return meta


def _check_domains(meta_path: Path, meta: dict[str, Any]) -> None:
    """meta.json's domains tile each split: in order, every range starts where the one before ends."""
    domains = meta["domains"]
    if not isinstance(domains, list) or not domains:
        raise _meta_error(meta_path, "has a 'domains' entry that is not a non-empty list")
    names = set()
    ends = dict.fromkeys(SPLITS, 0)
    for record in domains:
        name = record.get("name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name or name in names:
            raise _meta_error(meta_path, f"has a domain without a name or with a repeated name ({name!r})")
        names.add(name)
        splits = record.get("splits")
        for split in SPLITS:
            part = splits.get(split) if isinstance(splits, dict) else None
            if not isinstance(part, dict) or not all(
                isinstance(part.get(k), int) and part[k] >= 0 for k in ("offset", "tokens", "documents", "bytes")
            ):
                raise _meta_error(meta_path, f"has no valid {split!r} range for domain {name!r}")
            if part["offset"] != ends[split]:
                raise _meta_error(meta_path, f"has domain {name!r} starting at {part['offset']}, not {ends[split]}")
            ends[split] += part["tokens"]
    for split in SPLITS:
        if ends[split] != meta["splits"][split]["tokens"]:
            raise _meta_error(meta_path, f"has domains covering {ends[split]} {split} tokens, not all of them")


def load_data_dir(path: str | Path) -> DataDir:
    """Open a directory written by ``slm data prepare``; checks meta.json against the token files."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist; create it with `slm data prepare`")
    meta = _read_meta(path / META_FILE)
    dtype = _DTYPES[meta["dtype"]]
    arrays = {split: open_tokens(bin_path(path, split), dtype, meta["splits"][split]["tokens"]) for split in SPLITS}
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer file {tokenizer_path} is missing; {_RERUN}")
    return DataDir(
        path=path,
        meta=meta,
        train=arrays["train"],
        val=arrays["val"],
        tokenizer_path=tokenizer_path,
        vocab_size=meta["vocab_size"],
        eot_token_id=meta["eot_token_id"],
    )
