"""Where documents come from: text files, JSON lines, parquet, directories and built-in corpora.

Everything streams: a corpus is read one document (or one parquet record batch) at a time, so its
size is bounded by disk, not memory. The order of documents is deterministic (directories are walked
in sorted order), which keeps tokenizer training and token shards reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slmkit.errors import UserError

logger = logging.getLogger(__name__)

SourceKind = Literal["text", "jsonl", "parquet"]

TEXT_EXTENSIONS = frozenset({".txt", ".md", ".rst", ".py"})
JSONL_EXTENSIONS = frozenset({".jsonl"})
PARQUET_EXTENSIONS = frozenset({".parquet"})
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS | JSONL_EXTENSIONS | PARQUET_EXTENSIONS

BUILTIN_PREFIX = "builtin:"
BUILTIN_SOURCES = ("pystdlib",)

# Directories of the standard library that hold tests or third-party code rather than the library.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "testing", "__pycache__"}
)
_PARQUET_BATCH_ROWS = 1024
_MAX_SKIPPED_NAMES = 10


@dataclass
class SourceStats:
    """Counts gathered while reading sources; pass one to :func:`iter_documents` to fill it."""

    documents: int = 0
    bytes: int = 0
    files: int = 0
    skipped_files: int = 0
    skipped: list[str] = field(default_factory=list)
    log_skips: bool = field(default=True, repr=False, compare=False)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped_files += 1
        if len(self.skipped) < _MAX_SKIPPED_NAMES:
            self.skipped.append(str(path))
        if self.log_skips:
            logger.warning("skipping %s: %s", path, reason)


@dataclass(frozen=True)
class SourceFile:
    """One file to read and how to read it."""

    path: Path
    kind: SourceKind


def _kind_for(path: Path) -> SourceKind | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        return "text"
    if suffix in JSONL_EXTENSIONS:
        return "jsonl"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    return None


def _walk_sorted(root: Path, excluded_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Supported files under ``root``, recursively, sorted by relative path; hidden entries skipped."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; hidden dirs are VCS/tool metadata.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if _kind_for(path) is not None and path.is_file():
                found.append((path.relative_to(root).parts, path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def pystdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(
            f"builtin:pystdlib: the standard library directory {root} does not exist; "
            "use a Python installation that ships its standard library sources, or pass your own files"
        )
    return [p for p in _walk_sorted(root, _STDLIB_EXCLUDED_DIRS) if p.suffix == ".py"]


def _as_list(sources: list[str] | str | os.PathLike[str]) -> list[str]:
    # A lone path is an easy mistake in the Python API; treat it as a one-element list.
    if isinstance(sources, str | os.PathLike):
        return [os.fspath(sources)]
    return [os.fspath(s) for s in sources]


def resolve_sources(sources: list[str]) -> list[SourceFile]:
    """Expand ``sources`` into the files to read, in order; raises :class:`UserError` on a bad source."""
    sources = _as_list(sources)
    if not sources:
        raise UserError("no data sources given; pass one or more files, directories or builtin:pystdlib")
    files: list[SourceFile] = []
    for source in sources:
        source = str(source)
        if source.startswith(BUILTIN_PREFIX):
            name = source[len(BUILTIN_PREFIX) :]
            if name != "pystdlib":
                known = ", ".join(BUILTIN_PREFIX + b for b in BUILTIN_SOURCES)
                raise UserError(f"unknown built-in source {source!r}; the built-in sources are: {known}")
            files.extend(SourceFile(p, "text") for p in pystdlib_files())
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            files.extend(SourceFile(p, k) for p in _walk_sorted(path) if (k := _kind_for(p)) is not None)
        elif path.is_file():
            kind = _kind_for(path)
            if kind is None:
                supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
                raise UserError(
                    f"unsupported source file {path}: extension {path.suffix or '(none)'!r} is not one of "
                    f"{supported}; convert it or pass a directory"
                )
            files.append(SourceFile(path, kind))
        else:
            raise UserError(f"data source {source!r} does not exist; check the path")
    return files


def _read_text(path: Path, stats: SourceStats) -> Iterator[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        stats.skip(path, f"unreadable ({exc.strerror or exc})")
        return
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise become a token.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        stats.skip(path, f"not UTF-8 (byte {exc.start})")
        return
    yield text


def _read_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        stats.skip(path, f"unreadable ({exc.strerror or exc})")
        return
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                # Documents before this line were already yielded; the rest of the file is dropped.
                stats.skip(path, f"not UTF-8 at line {line_number}; the rest of the file is ignored")
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_number}: malformed JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise UserError(
                    f"{path}:{line_number}: expected a JSON object with a {text_field!r} field, "
                    f"got {type(record).__name__}; fix that line"
                )
            if text_field not in record:
                raise UserError(
                    f"{path}:{line_number}: no field {text_field!r} (fields: {', '.join(map(str, record))}); "
                    "pass the right field name with text_field / --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string; "
                    "fix that line or choose another field with text_field / --text-field"
                )
            yield text


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        stats.skip(path, f"unreadable parquet ({exc})")
        return
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
            "pass the right column with text_field / --text-field"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(
            f"{path}: column {text_field!r} has type {column_type}, not string; "
            "choose a text column with text_field / --text-field"
        )
    with parquet:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def _read_file(source: SourceFile, text_field: str, stats: SourceStats) -> Iterator[str]:
    if source.kind == "text":
        return _read_text(source.path, stats)
    if source.kind == "jsonl":
        return _read_jsonl(source.path, text_field, stats)
    return _read_parquet(source.path, text_field, stats)


def _generate(
    sources: list[str], files: list[tuple[int, SourceFile]], text_field: str, stats: SourceStats
) -> Iterator[tuple[int, str]]:
    for index, source in files:
        stats.files += 1
        for text in _read_file(source, text_field, stats):
            if not text.strip():
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield index, text
    if stats.documents == 0:
        detail = f"{stats.files} file(s) read"
        if stats.skipped_files:
            examples = ", ".join(stats.skipped)
            detail += f", {stats.skipped_files} skipped as unreadable or not UTF-8 (e.g. {examples})"
        raise UserError(
            f"empty corpus: no non-empty documents in {', '.join(map(str, sources))} ({detail}); "
            f"check the paths, the file encodings (UTF-8) and the text field ({text_field!r})"
        )


def iter_documents(sources: list[str], text_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """Stream the documents of ``sources`` in a deterministic order.

    A ``.txt``/``.md``/``.rst``/``.py`` file is one document; a ``.jsonl`` file gives one document per line
    (from ``text_field``); a ``.parquet`` file one per row of column ``text_field``; a directory is read
    recursively in sorted order; ``builtin:pystdlib`` is the standard library's ``.py`` files.
    Files that are unreadable or not UTF-8 are skipped and counted in ``stats``; whitespace-only
    documents are dropped. Bad sources raise :class:`UserError` at once; an empty corpus raises it when
    the stream ends.
    """
    return (text for _, text in iter_tagged_documents(sources, text_field, stats))


def iter_tagged_documents(
    sources: list[str], text_field: str = "text", stats: SourceStats | None = None
) -> Iterator[tuple[int, str]]:
    """:func:`iter_documents` with each document's source: (index of the source in ``sources``, text).

    Sources are read one after the other, so the documents of one source form one run of the stream (what
    keeps a domain's tokens contiguous). A source without documents is allowed when another one has some.
    """
    sources = _as_list(sources)
    if not sources:
        resolve_sources(sources)  # the error for no sources at all
    files = [(index, file) for index, source in enumerate(sources) for file in resolve_sources([source])]
    return _generate(sources, files, text_field, stats if stats is not None else SourceStats())


def domain_name(source: str) -> str:
    """The domain a source's documents belong to: its file or folder stem (``code/`` -> code, ``papers.jsonl``
    -> papers, ``builtin:pystdlib`` -> pystdlib)."""
    source = os.fspath(source)
    if source.startswith(BUILTIN_PREFIX):
        return source[len(BUILTIN_PREFIX) :]
    path = Path(source).expanduser()
    if not path.name or path.name in (".", ".."):
        path = path.resolve()
    return path.stem if path.is_file() else path.name


def domain_names(sources: list[str]) -> list[str]:
    """The domain name of each source; two sources with the same stem are an error (their documents would
    merge into one domain silently), as is a name that cannot be written in ``--mix NAME=SHARE,...``."""
    names = [domain_name(s) for s in _as_list(sources)]
    seen: dict[str, str] = {}
    for source, name in zip(_as_list(sources), names, strict=True):
        if not name or any(c in name for c in ",=:") or name != name.strip():
            raise UserError(
                f"source {source!r} gives the domain name {name!r}, which --mix cannot name (empty, or with "
                "',', '=', ':' or outer spaces); rename the file or folder"
            )
        if name in seen:
            raise UserError(
                f"sources {seen[name]!r} and {source!r} both give the domain name {name!r} (a domain is named "
                "after its source's file or folder stem); rename one of them, or put both in one folder to make "
                "them one domain"
            )
        seen[name] = source
    return names
