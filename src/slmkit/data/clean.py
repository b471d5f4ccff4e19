"""``slm data clean``: heuristic quality filters, exact dedup and MinHash-LSH near-dedup of a corpus.

Three stages, each document dropped by the first that rejects it (the report counts each reason):

1. quality: the heuristic signals RedPajama-V2 computes for every document (after Gopher, Rae et al. 2021),
   each with a default threshold from those papers (:class:`QualityThresholds`);
2. exact duplicates: documents whose text is equal after light normalisation (Unicode NFKC, case folding,
   whitespace runs collapsed) share a 128-bit content hash; one is kept;
3. near duplicates: MinHash signatures (``datasketch``, fixed seed) over word 5-gram shingles, an LSH index
   tuned for ``near_dup_threshold``, and each candidate pair checked against the signatures' Jaccard estimate.

Determinism whatever the order or sharding of the input: stages 2 and 3 visit the documents in the order of
their content hashes, not in reading order, so the document kept from a group of (near) duplicates is the one
with the smallest hash, and the set kept depends only on the documents. Output files list the kept documents in
reading order.

Memory: the text is read twice (streamed, never held); between the passes each document costs its hashes, its
signature (``num_perm`` 32-bit values, 512 bytes at the default 128) and its entries in datasketch's LSH tables (a
band key and a set per band, most of the cost): about 5 KB per document measured, so 5 GB per million documents.

The output directory holds one JSON-lines file per source (``NAME.jsonl``, ``{"text": ..., "source": NAME}``
per line, NAME the source's file or folder stem) and ``report.json``; `slm data prepare DIR` reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.data.sources import BUILTIN_PREFIX, SourceStats, iter_documents, resolve_sources
from slmkit.errors import UserError
from slmkit.interop.outputs import clean_stale_temporaries, files_per_umask, temp_prefix, use_umask

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
DEFAULT_NEAR_DUP_THRESHOLD = 0.8
DEFAULT_NUM_PERM = 128
MINHASH_SEED = 1  # fixed: signatures, and so the documents kept, must not change between runs
SHINGLE_WORDS = 5
# LSH weights of (false positives, false negatives) when datasketch picks bands and rows: a false positive costs only
# a signature comparison (every candidate is checked), a false negative keeps a duplicate, so recall comes first.
# With equal weights it picks 9 bands of 13 rows at 0.8, whose S-curve rises only at ~0.85 (measured recall 0.44 on
# planted pairs of Jaccard 0.80-0.85 as LSH candidates, 0.79 with these weights).
LSH_WEIGHTS = (0.2, 0.8)
EXAMPLES_PER_REASON = 3
_EXAMPLE_CHARS = 160

_WORD = re.compile(r"\w+")
_WHITESPACE = re.compile(r"\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Bullet marks as RedPajama-V2 lists them, plus the ASCII ones plain text and markdown use.
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25c0", "\u25e6", "\u25a0", "\u25a1", "\u25aa", "\u25ab", "\u2013", "-", "*")
ELLIPSES = ("...", "\u2026")


# ---- quality signals --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityThresholds:
    """Where a quality signal drops a document. The defaults are the Gopher rules (Rae et al. 2021) that
    RedPajama-V2 publishes its signals for; they suit prose (web pages, books, papers). Source code fails
    several of them (``#`` counts as a symbol, few alphabetic words): clean code with ``quality=False``."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1
    max_frac_lines_end_with_ellipsis: float = 0.3
    max_frac_lines_start_with_bullet: float = 0.9
    max_frac_dup_lines: float = 0.3
    max_frac_chars_dup_lines: float = 0.2
    max_frac_dup_paragraphs: float = 0.3
    max_frac_chars_dup_paragraphs: float = 0.2
    max_frac_chars_top_2gram: float = 0.2
    max_frac_chars_top_3gram: float = 0.18
    max_frac_chars_top_4gram: float = 0.16
    min_frac_alphabetic_words: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise UserError(f"quality threshold {f.name} must be a number >= 0, got {value!r}")
            if f.name.startswith(("max_frac", "min_frac")) and value > 1:
                raise UserError(f"quality threshold {f.name} is a fraction: give a value in [0, 1], got {value!r}")
        if self.min_words > self.max_words:
            raise UserError(f"quality thresholds: min_words {self.min_words} > max_words {self.max_words}")

    @classmethod
    def parse(cls, pairs: list[str]) -> QualityThresholds:
        """From NAME=VALUE strings (``--threshold min_words=20``); unknown names and bad values are UserErrors."""
        names = {f.name: f for f in fields(cls)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise UserError(f"--threshold expects NAME=VALUE with NAME one of: {', '.join(names)}; got {pair!r}")
            try:
                changes[name] = int(value) if names[name].type in ("int", int) else float(value)
            except ValueError:
                raise UserError(f"--threshold {name}: {value!r} is not a number") from None
        return cls(**changes)


# (reason, signal, "min"/"max", threshold field): checked in this order, the first that fails is the reason
QUALITY_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("too_few_words", "word_count", "min", "min_words"),
    ("too_many_words", "word_count", "max", "max_words"),
    ("mean_word_length_low", "mean_word_length", "min", "min_mean_word_length"),
    ("mean_word_length_high", "mean_word_length", "max", "max_mean_word_length"),
    ("symbol_to_word_ratio", "symbol_to_word_ratio", "max", "max_symbol_to_word_ratio"),
    ("lines_end_with_ellipsis", "frac_lines_end_with_ellipsis", "max", "max_frac_lines_end_with_ellipsis"),
    ("lines_start_with_bullet", "frac_lines_start_with_bullet", "max", "max_frac_lines_start_with_bullet"),
    ("duplicate_lines", "frac_dup_lines", "max", "max_frac_dup_lines"),
    ("duplicate_line_chars", "frac_chars_dup_lines", "max", "max_frac_chars_dup_lines"),
    ("duplicate_paragraphs", "frac_dup_paragraphs", "max", "max_frac_dup_paragraphs"),
    ("duplicate_paragraph_chars", "frac_chars_dup_paragraphs", "max", "max_frac_chars_dup_paragraphs"),
    ("top_2gram_chars", "frac_chars_top_2gram", "max", "max_frac_chars_top_2gram"),
    ("top_3gram_chars", "frac_chars_top_3gram", "max", "max_frac_chars_top_3gram"),
    ("top_4gram_chars", "frac_chars_top_4gram", "max", "max_frac_chars_top_4gram"),
    ("few_alphabetic_words", "frac_alphabetic_words", "min", "min_frac_alphabetic_words"),
)


def normalized_words(text: str) -> list[str]:
    """Lower-cased word characters, punctuation dropped: the words of the signals, the shingles and the
    contamination n-grams (``"Hello, World!"`` -> ``["hello", "world"]``)."""
    return _WORD.findall(text.lower())


def _duplicate_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in such repeats)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for part in parts:
        if part in seen:
            dup_count += 1
            dup_chars += len(part)
        else:
            seen.add(part)
    total_chars = sum(len(p) for p in parts)
    return dup_count / len(parts), (dup_chars / total_chars if total_chars else 0.0)


def _top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters (of words) covered by the most frequent word n-gram, over all word characters; 0 when no
    n-gram occurs twice. As Gopher and RedPajama-V2 define it, occurrences are counted with overlaps."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = max(counts.items(), key=lambda item: (item[1] * sum(map(len, item[0])), item[1]))
    if count < 2:
        return 0.0
    total = sum(len(w) for w in words)
    return min(1.0, count * sum(len(w) for w in gram) / total) if total else 0.0


def quality_signals(text: str) -> dict[str, float]:
    """The heuristic signals of one document, named as in :data:`QUALITY_RULES`.

    Words for counts, lengths and n-grams are :func:`normalized_words`; the symbol ratio and the alphabetic
    fraction look at whitespace-separated raw words (punctuation is what they measure); line signals use
    non-blank lines, stripped; paragraphs are separated by blank lines.
    """
    words = normalized_words(text)
    raw_words = text.split()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    dup_lines, dup_line_chars = _duplicate_fractions(lines)
    dup_paragraphs, dup_paragraph_chars = _duplicate_fractions(paragraphs)
    return {
        "word_count": len(words),
        "mean_word_length": sum(len(w) for w in words) / len(words) if words else 0.0,
        "symbol_to_word_ratio": symbols / len(raw_words) if raw_words else 0.0,
        "frac_lines_end_with_ellipsis": sum(line.endswith(ELLIPSES) for line in lines) / len(lines) if lines else 0.0,
        "frac_lines_start_with_bullet": sum(line.startswith(BULLETS) for line in lines) / len(lines) if lines else 0.0,
        "frac_dup_lines": dup_lines,
        "frac_chars_dup_lines": dup_line_chars,
        "frac_dup_paragraphs": dup_paragraphs,
        "frac_chars_dup_paragraphs": dup_paragraph_chars,
        "frac_chars_top_2gram": _top_ngram_char_fraction(words, 2),
        "frac_chars_top_3gram": _top_ngram_char_fraction(words, 3),
        "frac_chars_top_4gram": _top_ngram_char_fraction(words, 4),
        "frac_alphabetic_words": (
            sum(any(c.isalpha() for c in w) for w in raw_words) / len(raw_words) if raw_words else 0.0
        ),
    }


def quality_verdict(signals: dict[str, float], thresholds: QualityThresholds) -> tuple[str, str] | None:
    """(reason, "signal=value, limit") of the first rule the signals fail, or None when the document passes."""
    for reason, signal, kind, name in QUALITY_RULES:
        value, limit = signals[signal], getattr(thresholds, name)
        if (kind == "min" and value < limit) or (kind == "max" and value > limit):
            shown = f"{value:g}" if isinstance(value, int) else f"{value:.3f}"
            return reason, f"{signal}={shown} ({'<' if kind == 'min' else '>'} {limit:g})"
    return None


# ---- hashes and MinHash -----------------------------------------------------------------------------------


def normalize_for_hash(text: str) -> str:
    """The light normalisation of exact dedup: NFKC, case folded, whitespace runs as one space, trimmed."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def content_hash(text: str) -> int:
    """128-bit hash of the normalised text: equal for exact duplicates, and the order stages 2 and 3 visit."""
    return int.from_bytes(hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=16).digest(), "big")


def raw_hash(text: str) -> int:
    """64-bit hash of the exact text: breaks ties between exact duplicates, checks the second read."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    """The set MinHash estimates Jaccard similarity over: word ``size``-grams of :func:`normalized_words`
    (a document of fewer words is one shingle of all of them; one without words, its normalised text)."""
    words = normalized_words(text)
    if len(words) < size:
        return {(" ".join(words) if words else normalize_for_hash(text)).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| (1 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _datasketch() -> Any:
    from slmkit.optional import require

    return require("datasketch", "clean")


class NearDuplicateIndex:
    """MinHash LSH over documents, with each LSH candidate checked against the signatures' Jaccard estimate.

    The LSH bands come from datasketch's choice for ``threshold`` with false negatives weighted above false
    positives (:data:`LSH_WEIGHTS`); the check drops the candidates whose estimate falls below ``threshold``.
    Pairs within about 0.05 of the threshold are decided by the estimate's noise (its standard deviation is
    sqrt(J(1-J)/num_perm), 0.035 at 0.8 with 128 permutations).
    """

    def __init__(self, threshold: float = DEFAULT_NEAR_DUP_THRESHOLD, num_perm: int = DEFAULT_NUM_PERM) -> None:
        check_threshold(threshold)
        self.datasketch = _datasketch()
        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = self.datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        self.signatures: dict[Any, np.ndarray] = {}
        self._scheme = getattr(self.datasketch.MinHash(num_perm=num_perm, seed=MINHASH_SEED), "scheme", None)

    def signature(self, text: str) -> np.ndarray:
        """The document's MinHash values (``num_perm`` of them, seed :data:`MINHASH_SEED`)."""
        minhash = self.datasketch.MinHash(num_perm=self.num_perm, seed=MINHASH_SEED)
        minhash.update_batch(sorted(shingles(text)))
        return np.asarray(minhash.hashvalues)

    def _lean(self, signature: np.ndarray) -> Any:
        scheme = {"scheme": self._scheme} if self._scheme is not None else {}  # datasketch >= 2.0 names it
        return self.datasketch.LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, **scheme)

    def add(self, key: Any, signature: np.ndarray) -> None:
        self.lsh.insert(key, self._lean(signature), check_duplication=False)
        self.signatures[key] = signature

    def query(self, signature: np.ndarray) -> list[tuple[Any, float]]:
        """(key, estimated Jaccard) of the indexed documents at or above the threshold, best first."""
        found = []
        for key in self.lsh.query(self._lean(signature)):
            estimate = float(np.mean(self.signatures[key] == signature))
            if estimate >= self.threshold:
                found.append((key, estimate))
        return sorted(found, key=lambda item: (-item[1], str(item[0])))


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise UserError(f"--near-dup-threshold must be a Jaccard similarity in (0, 1), e.g. 0.8; got {threshold!r}")


# ---- the pipeline -----------------------------------------------------------------------------------------


def source_names(sources: list[str]) -> list[str]:
    """One output name per source: its file or folder stem (``builtin:pystdlib`` -> ``pystdlib``), made unique
    with ``-2``, ``-3``, ... in the order given."""
    names: list[str] = []
    for source in sources:
        base = source[len(BUILTIN_PREFIX) :] if source.startswith(BUILTIN_PREFIX) else Path(source).stem
        base = re.sub(r"[^\w.-]+", "_", base).strip("._") or "source"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


@dataclass
class _Doc:
    """What the first pass keeps of a document (its text is read again to write it)."""

    source: int
    hash: int
    raw: int


@dataclass
class CleanReport:
    """What `slm data clean` kept and dropped, and why (written as report.json)."""

    sources: list[dict[str, Any]]
    documents: int
    kept: int
    dropped: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    near_dup_threshold: float
    num_perm: int
    quality: bool
    thresholds: dict[str, float]
    outputs: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # unreadable or not UTF-8 (the first 10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXAMPLE_CHARS else flat[: _EXAMPLE_CHARS - 3] + "..."


def _read(sources: list[str], text_field: str, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(source index, text) of every document, source by source, in reading order."""
    for index, source in enumerate(sources):
        for text in iter_documents([source], text_field, stats):
            yield index, text


def clean(
    sources: list[str],
    out: str | Path,
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD,
    quality: bool = True,
    thresholds: QualityThresholds | None = None,
    text_field: str = "text",
    num_perm: int = DEFAULT_NUM_PERM,
    on_status: Callable[[str], None] | None = None,
) -> CleanReport:
    """Filter, dedup and near-dedup ``sources`` into the directory ``out`` (replaced whole when it exists: check
    it with :func:`slmkit.interop.outputs.check_output` first); returns the report (also ``out/report.json``)."""
    check_threshold(near_dup_threshold)
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 16:
        raise UserError(f"num_perm must be an integer >= 16, got {num_perm!r}")
    thresholds = thresholds or QualityThresholds()
    status = on_status or (lambda _msg: None)
    sources = [str(s) for s in sources]
    resolve_sources(sources)  # a missing or unsupported source fails before any reading
    index = NearDuplicateIndex(near_dup_threshold, num_perm)  # and a missing datasketch
    names = source_names(sources)

    # pass 1: signals, hashes and signatures of every document, in reading order
    status("reading and scoring documents")
    docs: list[_Doc] = []
    verdicts: list[tuple[str, str] | None] = []
    signatures: list[np.ndarray | None] = []
    per_source = [0] * len(sources)
    stats = SourceStats()  # the first read warns of unreadable and non-UTF-8 files, the second is quiet
    for source, text in _read(sources, text_field, stats):
        per_source[source] += 1
        docs.append(_Doc(source, content_hash(text), raw_hash(text)))
        verdict = quality_verdict(quality_signals(text), thresholds) if quality else None
        verdicts.append(verdict)
        signatures.append(index.signature(text) if verdict is None else None)

    # stages 2 and 3 in content-hash order: what is kept depends on the documents, not on their order
    status(f"deduplicating {len(docs):,} documents")
    reasons: list[tuple[str, str] | None] = list(verdicts)
    partner: dict[int, int] = {}  # dropped duplicate -> the kept document it duplicates
    order = sorted(range(len(docs)), key=lambda i: (docs[i].hash, docs[i].raw, names[docs[i].source], i))
    first_of_hash: dict[int, int] = {}
    for i in order:
        if reasons[i] is not None:
            continue
        kept = first_of_hash.setdefault(docs[i].hash, i)
        if kept != i:
            reasons[i] = ("exact_duplicate", "same normalised text")
            partner[i] = kept
            continue
        signature = signatures[i]
        assert signature is not None
        matches = index.query(signature)
        if matches:
            key, estimate = matches[0]
            reasons[i] = ("near_duplicate", f"estimated Jaccard {estimate:.2f} >= {near_dup_threshold:g}")
            partner[i] = key
            continue
        index.add(i, signature)
    del signatures, index

    # examples: the first few of each reason in content-hash order (stable across runs and input orders)
    wanted: dict[int, tuple[str, str]] = {}
    counts: Counter[str] = Counter()
    for i in order:
        if reasons[i] is not None:
            reason = reasons[i][0]  # type: ignore[index]
            counts[reason] += 1
            if counts[reason] <= EXAMPLES_PER_REASON:
                wanted[i] = reasons[i]  # type: ignore[assignment]
    wanted_partners = {partner[i] for i in wanted if i in partner}

    # pass 2: write the kept documents, in reading order
    status("writing kept documents")
    texts: dict[int, str] = {}
    kept_per_source = [0] * len(sources)
    out = Path(out).expanduser()
    with _replacing(out) as tmp:
        handles = {}
        try:
            for number, (source, text) in enumerate(_read(sources, text_field, SourceStats(log_skips=False))):
                if number >= len(docs) or docs[number].raw != raw_hash(text):
                    raise UserError(f"{sources[source]} changed while it was being cleaned; run the command again")
                if number in wanted or number in wanted_partners:
                    texts[number] = text
                if reasons[number] is not None:
                    continue
                if source not in handles:
                    handles[source] = (tmp / f"{names[source]}.jsonl").open("w", encoding="utf-8")
                record = {"text": text, "source": names[source]}
                handles[source].write(json.dumps(record, ensure_ascii=False) + "\n")
                kept_per_source[source] += 1
        finally:
            for handle in handles.values():
                handle.close()
        examples: dict[str, list[dict[str, Any]]] = {}
        for i in order:
            if i in wanted:
                reason, detail = wanted[i]
                example = {"source": names[docs[i].source], "detail": detail, "text": _snippet(texts[i])}
                if i in partner:
                    example["kept"] = {"source": names[docs[partner[i]].source], "text": _snippet(texts[partner[i]])}
                examples.setdefault(reason, []).append(example)
        report = CleanReport(
            sources=[
                {"source": s, "name": n, "documents": d, "kept": k}
                for s, n, d, k in zip(sources, names, per_source, kept_per_source, strict=True)
            ],
            documents=len(docs),
            kept=sum(kept_per_source),
            dropped={reason: counts[reason] for reason in _reason_order() if counts[reason]},
            examples=examples,
            near_dup_threshold=near_dup_threshold,
            num_perm=num_perm,
            quality=quality,
            thresholds=asdict(thresholds),
            outputs=[f"{names[s]}.jsonl" for s in sorted(handles)],
            skipped_files=list(stats.skipped),
        )
        if report.kept == 0:
            raise UserError(
                f"every one of the {len(docs):,} documents was dropped ({_describe(report.dropped)}); nothing to "
                "write. Lower the quality thresholds (--threshold NAME=VALUE), skip them (--no-quality) or check "
                "the sources"
            )
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    logger.info("cleaned %d documents into %s: %d kept", len(docs), out, report.kept)
    return report


@contextlib.contextmanager
def _replacing(final: Path) -> Iterator[Path]:
    """A temporary directory beside `final` that replaces it on success (a killed run leaves `final` as it was).
    Like slmkit.interop.checkpoint.atomic_directory, without the torch that module imports."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
    try:
        use_umask(tmp, directory=True)
        yield tmp
        files_per_umask(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _reason_order() -> list[str]:
    return [rule[0] for rule in QUALITY_RULES] + ["exact_duplicate", "near_duplicate"]


def _describe(dropped: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count:,}" for reason, count in dropped.items()) or "none"
