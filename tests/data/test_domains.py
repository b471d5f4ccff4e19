"""Domains: each source of `slm data prepare` is a named, contiguous token range per split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slmkit.data.prepare import prepare
from slmkit.data.shards import load_data_dir
from slmkit.data.tokenizer import load_tokenizer
from slmkit.errors import UserError
from slmkit_testing import run_slm


def write_domains(root: Path) -> list[str]:
    """Three sources: a folder of code files, a jsonl of prose, a text file of numbers."""
    code = root / "code"
    code.mkdir(parents=True)
    for i in range(12):
        (code / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n", encoding="utf-8")
    papers = root / "papers.jsonl"
    papers.write_text(
        "".join(json.dumps({"text": f"We study small models, paper {i}: {i % 7} effects."}) + "\n" for i in range(20)),
        encoding="utf-8",
    )
    numbers = root / "numbers.txt"
    numbers.write_text("\n\n".join(f"{i} {i * 3} {i * 7}" for i in range(60)), encoding="utf-8")
    return [str(code), str(papers), str(numbers)]


def test_each_source_is_a_contiguous_domain(tmp_path: Path) -> None:
    sources = write_domains(tmp_path / "src")
    meta = prepare(sources, tmp_path / "data", vocab_size=300, val_fraction=0.3, chunk_chars=64)
    assert [d["name"] for d in meta["domains"]] == ["code", "papers", "numbers"]
    data = load_data_dir(tmp_path / "data")
    tok = load_tokenizer(tmp_path / "data")
    for split in ("train", "val"):
        assert sum(d["splits"][split]["tokens"] for d in meta["domains"]) == meta["splits"][split]["tokens"]
        assert sum(d["splits"][split]["documents"] for d in meta["domains"]) == meta["splits"][split]["documents"]
    for domain, record in zip(data.domains, meta["domains"], strict=True):
        assert record["tokens"] == sum(record["splits"][s]["tokens"] for s in ("train", "val"))
        for split in ("train", "val"):
            text = tok.decode(domain.tokens(data, split).tolist())
            if domain.name == "code":
                assert "def f" in text and "paper" not in text and "return" in text
            elif domain.name == "papers":
                assert "paper" in text and "def " not in text
            else:
                assert "paper" not in text and "def " not in text
            # every range holds whole documents
            tokens = domain.tokens(data, split)
            assert tokens.size == 0 or tokens[-1] == data.eot_token_id
            assert int((tokens == data.eot_token_id).sum()) == record["splits"][split]["documents"]


def test_domains_do_not_change_the_token_files(tmp_path: Path) -> None:
    """One source or several: the same documents in the same order give the same train.bin."""
    sources = write_domains(tmp_path / "src")
    together = tmp_path / "together"
    together.mkdir()
    for prefix, source in zip("abc", sources, strict=True):  # the same files in one folder, in the same order
        path = Path(source)
        target = together / f"{prefix}_{path.name}"
        if path.is_dir():
            target.mkdir()
            for f in sorted(path.iterdir()):
                (target / f.name).write_bytes(f.read_bytes())
        else:
            target.write_bytes(path.read_bytes())
    prepare(sources, tmp_path / "split", vocab_size=300, val_fraction=0.2)
    one = prepare([str(together)], tmp_path / "one", vocab_size=300, val_fraction=0.2)
    assert [d["name"] for d in one["domains"]] == ["together"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_duplicate_stems_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("alpha beta gamma", encoding="utf-8")
    (tmp_path / "b" / "notes.md").write_text("delta epsilon", encoding="utf-8")
    with pytest.raises(UserError, match="both give the domain name 'notes'"):
        prepare([str(tmp_path / "a" / "notes.txt"), str(tmp_path / "b" / "notes.md")], tmp_path / "d", vocab_size=300)
    assert not (tmp_path / "d").exists()
    done = run_slm(
        "data",
        "prepare",
        tmp_path / "a" / "notes.txt",
        tmp_path / "b",
        tmp_path / "b" / "notes.md",
        "--out",
        tmp_path / "e",
        "--vocab-size",
        "300",
    )
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "'notes'" in done.stderr


def test_a_data_dir_without_domains_reads_as_one(tmp_path: Path) -> None:
    sources = write_domains(tmp_path / "src")
    prepare(sources, tmp_path / "data", vocab_size=300, val_fraction=0.2)
    meta_path = tmp_path / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["domains"]
    meta_path.write_text(json.dumps(meta))
    data = load_data_dir(tmp_path / "data")
    assert not data.has_domains
    [domain] = data.domains
    assert domain.name == "all" and np.array_equal(domain.tokens(data, "train"), data.train)
    assert domain.bytes_per_token("val") == pytest.approx(data.bytes_per_token("val"))


def test_inconsistent_domains_are_refused(tmp_path: Path) -> None:
    sources = write_domains(tmp_path / "src")
    prepare(sources, tmp_path / "data", vocab_size=300, val_fraction=0.2)
    meta_path = tmp_path / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["domains"][1]["splits"]["train"]["offset"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="domain 'papers' starting at"):
        load_data_dir(tmp_path / "data")


def test_a_document_moved_to_an_empty_split_keeps_its_domain(tmp_path: Path) -> None:
    sources = write_domains(tmp_path / "src")
    meta = prepare(sources, tmp_path / "data", vocab_size=300, val_fraction=1e-12)  # no val document by hash
    data = load_data_dir(tmp_path / "data")  # the ranges still tile both splits
    assert meta["splits"]["val"]["documents"] == 1
    [holder] = [d for d in data.domains if d.ranges["val"][1]]
    text = load_tokenizer(tmp_path / "data").decode(holder.tokens(data, "val").tolist())
    expected = {"code": "def f", "papers": "paper", "numbers": " "}[holder.name]
    assert expected in text
