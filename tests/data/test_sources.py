from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmkit.data.sources import SourceStats, iter_documents, pystdlib_files, resolve_sources
from slmkit.errors import UserError


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ".py"])
def test_text_like_file_is_one_document(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"doc{suffix}"
    text = "line one\nline two ü\n\nline four\n"
    path.write_text(text, encoding="utf-8")
    stats = SourceStats()
    assert list(iter_documents([str(path)], stats=stats)) == [text]
    assert stats.documents == 1
    assert stats.bytes == len(text.encode("utf-8"))


def test_jsonl_custom_field_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"body": "first", "text": "wrong"}), "", json.dumps({"body": "second ✓"}), "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(iter_documents([str(path)], text_field="body")) == ["first", "second ✓"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "malformed JSON"),
        ('{"body": "no text field"}', "no field 'text'"),
        ('{"text": 12}', "not a string"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"bad\.jsonl:3: .*{message}"):
        list(iter_documents([str(path)]))


def test_parquet_column_read_in_batches(tmp_path: Path) -> None:
    texts = [f"row {i} ünïcode" for i in range(2500)]  # more rows than one record batch
    table = pa.table({"content": texts, "other": list(range(2500))})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=700)
    assert list(iter_documents([str(path)], text_field="content")) == texts


def test_parquet_nulls_skipped_and_bad_column(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), path)
    assert list(iter_documents([str(path)])) == ["a", "b"]
    with pytest.raises(UserError, match="no column 'body'"):
        list(iter_documents([str(path)], text_field="body"))
    with pytest.raises(UserError, match="not string"):
        list(iter_documents([str(path)], text_field="n"))


def test_directory_is_recursive_sorted_and_filtered(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    root = tmp_path / "tree"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    (root / "z.txt").write_text("z", encoding="utf-8")
    (root / "b" / "deep" / "x.md").write_text("x", encoding="utf-8")
    (root / "b" / "c.rst").write_text("c", encoding="utf-8")
    (root / "a" / "m.py").write_text("m", encoding="utf-8")
    write_jsonl(root / "a" / "n.jsonl", ["n1", "n2"])
    (root / "a" / "skip.csv").write_text("not a source", encoding="utf-8")
    (root / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")
    assert list(iter_documents([str(root)])) == ["m", "n1", "n2", "c", "x", "z"]


def test_documents_stream_lazily(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    documents = iter_documents([str(tmp_path)])
    assert next(documents) == "first"
    # b.txt is read only when asked for, so a change made now is seen.
    (tmp_path / "b.txt").write_text("changed", encoding="utf-8")
    assert list(documents) == ["changed"]


def test_several_sources_in_given_order(tmp_path: Path, corpus_dir: Path, documents: list[str]) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("extra document", encoding="utf-8")
    assert list(iter_documents([str(extra), str(corpus_dir)])) == ["extra document", *documents]


def test_pystdlib_listing() -> None:
    files = pystdlib_files()
    assert len(files) > 100
    assert any(p.name == "os.py" for p in files)
    assert all(p.suffix == ".py" for p in files)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    for path in files:
        assert not excluded & set(path.parts), path
    from sysconfig import get_paths

    root = Path(get_paths()["stdlib"])
    relative = [p.relative_to(root).parts for p in files]
    assert relative == sorted(relative)
    assert [f.path for f in resolve_sources(["builtin:pystdlib"])] == files


def test_pystdlib_first_documents() -> None:
    documents = iter_documents(["builtin:pystdlib"])
    first = [next(documents) for _ in range(3)]
    assert all(isinstance(d, str) and d.strip() for d in first)
    assert first[0] == pystdlib_files()[0].read_text(encoding="utf-8-sig")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin:nope", "unknown built-in source 'builtin:nope'.*builtin:pystdlib"),
        ("does/not/exist.txt", "does not exist"),
    ],
)
def test_bad_source_raises_before_reading(source: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        iter_documents([source])  # raised at call time, not at first next()


def test_unsupported_extension_given_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"unsupported source file .*table\.csv.*'\.csv'"):
        iter_documents([str(path)])


def test_no_sources() -> None:
    with pytest.raises(UserError, match="no data sources"):
        iter_documents([])


def test_non_utf8_file_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("good text", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    stats = SourceStats()
    assert list(iter_documents([str(tmp_path)], stats=stats)) == ["good text"]
    assert stats.skipped_files == 1
    assert stats.skipped == [str(tmp_path / "latin1.txt")]
    assert stats.documents == 1
    assert stats.files == 2


def test_non_utf8_jsonl_line_skips_rest_of_file(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "never"}\n')
    stats = SourceStats()
    assert list(iter_documents([str(path)], stats=stats)) == ["ok"]
    assert stats.skipped_files == 1


def test_unreadable_file_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("readable", encoding="utf-8")
    locked = tmp_path / "b.txt"
    locked.write_text("locked", encoding="utf-8")
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        # chmod 0 does not stop root, so the permission error is simulated.
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    stats = SourceStats()
    assert list(iter_documents([str(tmp_path)], stats=stats)) == ["readable"]
    assert stats.skipped_files == 1
    assert stats.skipped == [str(locked)]


def test_all_files_bad_is_empty_corpus_naming_skips(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "b.md").write_bytes(b"\xc3\x28")
    stats = SourceStats()
    with pytest.raises(UserError, match=r"empty corpus.*2 skipped as unreadable or not UTF-8.*a\.txt"):
        list(iter_documents([str(tmp_path)], stats=stats))
    assert stats.skipped_files == 2


def test_whitespace_documents_dropped_and_empty_corpus(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    (tmp_path / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(UserError, match="empty corpus"):
        list(iter_documents([str(tmp_path)]))
    (tmp_path / "real.txt").write_text("content", encoding="utf-8")
    assert list(iter_documents([str(tmp_path)])) == ["content"]


def test_empty_directory_is_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="empty corpus"):
        list(iter_documents([str(tmp_path)]))
