from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from slmkit.data.prepare import STAGING_DIR, is_val_document, prepare
from slmkit.data.shards import load_data_dir
from slmkit.data.tokenizer import EOT_TOKEN, file_sha256, load_tokenizer
from slmkit.errors import UserError

VOCAB = 300


def split_documents(tokens: np.ndarray, eot: int, tokenizer: Tokenizer) -> list[str]:
    """Decode a token file back into its documents (each one ends with EOT)."""
    assert tokens.size == 0 or tokens[-1] == eot
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else np.array([], dtype=np.int64)
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def many_documents(count: int) -> list[str]:
    return [f"Document number {i}: {'lorem ipsum ' * (i % 5)}ünï {i * i}" for i in range(count)]


def test_end_to_end(tmp_path: Path, corpus_dir: Path, documents: list[str]) -> None:
    out = tmp_path / "data"
    meta = prepare([str(corpus_dir)], out, vocab_size=VOCAB, val_fraction=0.3)
    assert meta == json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.bin",
        "val.bin",
    ]
    assert meta["sources"] == [str(corpus_dir)]
    assert meta["dtype"] == "uint16"
    assert meta["eot_token_id"] == 0
    assert meta["vocab_size"] <= VOCAB
    assert meta["tokenizer_sha256"] == file_sha256(out / "tokenizer.json")
    assert meta["skipped_files"] == 0

    data = load_data_dir(out)
    tokenizer = load_tokenizer(out)
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(documents)
    assert splits["train"]["documents"] > 0 and splits["val"]["documents"] > 0
    decoded: dict[str, list[str]] = {}
    for split, tokens in (("train", data.train), ("val", data.val)):
        counts = splits[split]
        assert (out / f"{split}.bin").stat().st_size == counts["tokens"] * 2
        assert tokens.size == counts["tokens"]
        assert int((tokens == 0).sum()) == counts["documents"]
        assert int(tokens.max()) < meta["vocab_size"]
        decoded[split] = split_documents(np.asarray(tokens), 0, tokenizer)
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in decoded[split])
        assert all(is_val_document(d, 0.3) == (split == "val") for d in decoded[split])
    assert sorted(decoded["train"] + decoded["val"]) == sorted(documents)
    assert data.bytes_per_token("train") == splits["train"]["bytes"] / splits["train"]["tokens"]


def test_result_loads_in_transformers(tmp_path: Path, corpus_dir: Path) -> None:
    from transformers import AutoTokenizer

    prepare([str(corpus_dir)], tmp_path, vocab_size=VOCAB, val_fraction=0.2)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == 0
    text = "Grüße 🙂 def f(x): return x"
    assert hf(text)["input_ids"] == load_tokenizer(tmp_path).encode(text).ids


def test_split_is_deterministic_by_content(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    texts = many_documents(60)
    forward = write_jsonl(tmp_path / "forward.jsonl", texts)
    backward = write_jsonl(tmp_path / "backward.jsonl", texts[::-1])
    metas, vals = [], []
    for name, source in (("a", forward), ("b", backward)):
        metas.append(prepare([str(source)], tmp_path / name, vocab_size=VOCAB, val_fraction=0.2))
        data = load_data_dir(tmp_path / name)
        vals.append(sorted(split_documents(np.asarray(data.val), 0, load_tokenizer(tmp_path / name))))
    assert vals[0] == vals[1]
    assert vals[0] == sorted(t for t in texts if is_val_document(t, 0.2))
    assert 0 < len(vals[0]) < len(texts)
    assert metas[0]["splits"] == metas[1]["splits"]


def test_batch_size_does_not_change_output(tmp_path: Path, corpus_dir: Path) -> None:
    prepare([str(corpus_dir)], tmp_path / "big", vocab_size=VOCAB, val_fraction=0.3)
    prepare([str(corpus_dir)], tmp_path / "small", vocab_size=VOCAB, val_fraction=0.3, batch_documents=3)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()


def test_reuse_tokenizer(tmp_path: Path, corpus_dir: Path) -> None:
    first = prepare([str(corpus_dir)], tmp_path / "first", vocab_size=VOCAB, val_fraction=0.3)
    second = prepare(
        [str(corpus_dir)],
        tmp_path / "second",
        vocab_size=None,
        tokenizer=tmp_path / "first",
        val_fraction=0.3,
    )
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"]
    assert second["tokenizer_trained"] is False
    assert (tmp_path / "second" / "train.bin").read_bytes() == (tmp_path / "first" / "train.bin").read_bytes()
    assert (tmp_path / "second" / "tokenizer_config.json").is_file()


def test_document_containing_eot_text_is_not_split(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(f"before {EOT_TOKEN} after {i}", encoding="utf-8")
    meta = prepare([str(tmp_path)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.0)
    data = load_data_dir(tmp_path / "out")
    assert int((data.train == 0).sum()) == meta["splits"]["train"]["documents"] == 4
    decoded = split_documents(np.asarray(data.train), 0, load_tokenizer(tmp_path / "out"))
    assert decoded == [f"before {EOT_TOKEN} after {i}" for i in range(4)]


def test_large_vocabulary_uses_uint32(tmp_path: Path, corpus_dir: Path) -> None:
    # A given tokenizer with more than 65536 ids, built directly (training one would be slow).
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {EOT_TOKEN: 0} | {ch: i + 1 for i, ch in enumerate(sorted(alphabet))}
    vocab |= {f"x{i}": len(vocab) + i for i in range(70_000 - len(vocab))}
    vocab["Ġthe"] = 70_000
    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e")]
    vocab |= {"Ġt": 70_001, "Ġth": 70_002}
    big = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens([EOT_TOKEN])
    big.save(str(tmp_path / "big.json"))
    meta = prepare([str(corpus_dir)], tmp_path / "out", vocab_size=None, tokenizer=tmp_path / "big.json")
    assert meta["dtype"] == "uint32"
    assert meta["vocab_size"] == 70_003
    data = load_data_dir(tmp_path / "out")
    assert data.train.dtype == np.uint32
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    assert 70_000 in data.train  # " the" in "over the lazy dog"


def test_tiny_corpus_moves_one_document_to_val(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, documents: list[str]
) -> None:
    texts = documents[:3]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(text, encoding="utf-8")
    fraction = 1e-9  # nothing lands in val by hash
    assert not any(is_val_document(t, fraction) for t in texts)
    with caplog.at_level(logging.WARNING, logger="slmkit.data"):
        meta = prepare([str(tmp_path)], tmp_path / "out", vocab_size=VOCAB, val_fraction=fraction)
    assert "val split got no documents" in caplog.text
    assert meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["documents"] == 2
    data = load_data_dir(tmp_path / "out")  # sizes agree with meta after the move
    tokenizer = load_tokenizer(tmp_path / "out")
    val_docs = split_documents(np.asarray(data.val), 0, tokenizer)
    train_docs = split_documents(np.asarray(data.train), 0, tokenizer)
    lowest = min(texts, key=lambda t: hashlib.blake2b(t.encode(), digest_size=8).digest())
    assert val_docs == [lowest]
    assert sorted(train_docs) == sorted(t for t in texts if t != lowest)
    assert meta["splits"]["val"]["bytes"] == len(lowest.encode("utf-8"))


def test_single_document_too_small_for_val(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_text("just one document", encoding="utf-8")
    with pytest.raises(UserError, match="too small for a validation split.*--val-fraction 0.*--chunk-chars"):
        prepare([str(tmp_path / "only.txt")], tmp_path / "out", vocab_size=VOCAB)
    assert not (tmp_path / "out" / "meta.json").exists()
    meta = prepare([str(tmp_path / "only.txt")], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.0)
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "bytes": 0}
    assert load_data_dir(tmp_path / "out").val.size == 0


@pytest.mark.parametrize("fraction", [-0.01, 0.51, 1.0, math.nan])
def test_val_fraction_out_of_range(tmp_path: Path, corpus_dir: Path, fraction: float) -> None:
    with pytest.raises(UserError, match="val_fraction .* out of range"):
        prepare([str(corpus_dir)], tmp_path / "out", val_fraction=fraction)
    assert not (tmp_path / "out").exists()


def test_vocab_size_and_tokenizer_both_given(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(UserError, match="not both"):
        prepare([str(corpus_dir)], tmp_path / "out", vocab_size=500, tokenizer=tmp_path / "tok.json")


def test_vocab_too_small(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(UserError, match="at least 258"):
        prepare([str(corpus_dir)], tmp_path / "out", vocab_size=100)


def test_missing_source_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "missing")], tmp_path / "out", vocab_size=VOCAB)


def test_missing_tokenizer(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(UserError, match="tokenizer file .* does not exist"):
        prepare([str(corpus_dir)], tmp_path / "out", vocab_size=None, tokenizer=tmp_path / "none.json")


def test_skipped_files_counted_and_all_bad_is_error(tmp_path: Path, corpus_dir: Path) -> None:
    (corpus_dir / "zz_latin1.txt").write_bytes("na\xefve".encode("latin-1"))
    meta = prepare([str(corpus_dir)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.3)
    assert meta["skipped_files"] == 1
    assert meta["skipped"] == [str(corpus_dir / "zz_latin1.txt")]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="empty corpus.*1 skipped"):
        prepare([str(bad)], tmp_path / "out2", vocab_size=VOCAB)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.md").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty corpus"):
        prepare([str(tmp_path / "blank.md")], tmp_path / "out", vocab_size=VOCAB)


def test_malformed_jsonl_reports_line(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "two"])
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{broken\n")
    with pytest.raises(UserError, match=r"c\.jsonl:3: malformed JSON"):
        prepare([str(path)], tmp_path / "out", vocab_size=VOCAB)


def test_failed_rerun_keeps_previous_output(tmp_path: Path, corpus_dir: Path, write_jsonl: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    prepare([str(corpus_dir)], out, vocab_size=VOCAB, val_fraction=0.3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Fails in the tokenizing pass, after the first batch was written to the staging files.
    path = write_jsonl(tmp_path / "c.jsonl", ["fine document", "another one"])
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{broken\n")
    with pytest.raises(UserError, match=r"c\.jsonl:3"):
        prepare([str(path)], out, vocab_size=None, tokenizer=out, batch_documents=1, val_fraction=0.3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (out / STAGING_DIR).exists()


def test_rerun_overwrites(tmp_path: Path, corpus_dir: Path, write_jsonl: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    prepare([str(corpus_dir)], out, vocab_size=VOCAB, val_fraction=0.3)
    source = write_jsonl(tmp_path / "new.jsonl", many_documents(20), field="body")
    meta = prepare([str(source)], out, vocab_size=VOCAB, val_fraction=0.3, text_field="body")
    assert meta["text_field"] == "body"
    data = load_data_dir(out)
    assert data.meta == meta
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == 20
    assert not list(out.glob("*.tmp")) and not (out / STAGING_DIR).exists()


def test_out_is_a_file(tmp_path: Path, corpus_dir: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="not a directory"):
        prepare([str(corpus_dir)], tmp_path / "file", vocab_size=VOCAB)


def test_progress_bar(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = prepare([str(corpus_dir)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.3, progress=True)
    assert meta["splits"]["train"]["documents"] > 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr, never into piped stdout
    assert "tokenizing" in captured.err


def test_crash_while_committing_leaves_no_stale_meta(
    tmp_path: Path, corpus_dir: Path, documents: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prepare([str(corpus_dir)], out, vocab_size=VOCAB, val_fraction=0.3)
    (corpus_dir / "extra.txt").write_text("one more document " * 50, encoding="utf-8")
    real_replace = os.replace

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == out / "val.bin":  # after train.bin moved in, before meta.json
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        prepare([str(corpus_dir)], out, vocab_size=VOCAB, val_fraction=0.3)
    monkeypatch.undo()
    # train.bin is new but val.bin is old: without a meta.json the directory is refused, not misread.
    with pytest.raises(UserError, match=r"meta\.json is missing"):
        load_data_dir(out)
    assert not (out / STAGING_DIR).exists()
