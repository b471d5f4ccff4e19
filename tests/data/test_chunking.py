"""One large text file is cut into pieces so it still gets a train and a validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.data.prepare import DEFAULT_CHUNK_CHARS, chunk_document, prepare
from slmkit.data.shards import load_data_dir
from slmkit.data.tokenizer import MAX_VOCAB_SIZE
from slmkit.errors import UserError

VOCAB = 300


def book(paragraphs: int) -> str:
    return "\n\n".join(
        f"Chapter line {i}: the small model reads paragraph {i * 7 % 13} of the book.\nIt has {i} words."
        for i in range(paragraphs)
    )


def test_chunk_document_cuts_at_blank_lines_and_keeps_the_text() -> None:
    text = book(400)
    pieces = list(chunk_document(text, 2000))
    assert len(pieces) > 1
    assert "".join(pieces) == text
    assert all(len(p) <= 2000 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut after a blank line where the window has one
    assert pieces == list(chunk_document(text, 2000))


def test_chunk_document_without_separators_cuts_hard_and_zero_never_cuts() -> None:
    text = "x" * 2500
    assert list(chunk_document(text, 1000)) == ["x" * 1000, "x" * 1000, "x" * 500]
    assert list(chunk_document(text, 0)) == [text]
    assert list(chunk_document("short", 1000)) == ["short"]


def test_one_large_text_file_prepares_with_both_splits(tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_text(book(1500), encoding="utf-8")
    assert source.stat().st_size > 4 * DEFAULT_CHUNK_CHARS
    meta = prepare([str(source)], tmp_path / "out", vocab_size=VOCAB)  # default val_fraction 0.01
    splits = meta["splits"]
    assert splits["train"]["documents"] >= 4 and splits["val"]["documents"] >= 1
    assert meta["chunk_chars"] == DEFAULT_CHUNK_CHARS and meta["chunked_documents"] == 1
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["chunked_documents"] == 1
    data = load_data_dir(tmp_path / "out")
    assert int((data.train == 0).sum()) == splits["train"]["documents"]
    assert int((data.val == 0).sum()) == splits["val"]["documents"]
    again = prepare([str(source)], tmp_path / "again", vocab_size=VOCAB)
    assert again["splits"] == splits  # deterministic


def test_single_small_file_error_names_the_flags(tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_text(book(1500), encoding="utf-8")
    with pytest.raises(UserError, match=r"only 1 document .*--val-fraction 0.*--chunk-chars such as 16384"):
        prepare([str(source)], tmp_path / "out", vocab_size=VOCAB, chunk_chars=0)
    assert not (tmp_path / "out" / "meta.json").exists()
    (tmp_path / "small.txt").write_text("a short note", encoding="utf-8")
    with pytest.raises(UserError, match=r"only 1 document \(12 bytes\).*--chunk-chars below 16384"):
        prepare([str(tmp_path / "small.txt")], tmp_path / "out", vocab_size=VOCAB)


@pytest.mark.parametrize("vocab_size", [1_000_000_000, MAX_VOCAB_SIZE + 1])
def test_huge_vocab_size_is_refused_before_training(tmp_path: Path, vocab_size: int) -> None:
    missing = tmp_path / "not-there.txt"  # refused before the sources are even read
    with pytest.raises(UserError, match=f"too large: .*at most {MAX_VOCAB_SIZE:,}"):
        prepare([str(missing)], tmp_path / "out", vocab_size=vocab_size)


@pytest.mark.parametrize("chunk_chars", [-1, 1.5, True])
def test_bad_chunk_chars(tmp_path: Path, chunk_chars: object) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(UserError, match="chunk_chars"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", vocab_size=VOCAB, chunk_chars=chunk_chars)  # type: ignore[arg-type]
