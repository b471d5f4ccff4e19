from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slmkit.data.shards import FORMAT_VERSION, ShardWriter, dtype_for_vocab, load_data_dir
from slmkit.errors import UserError


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(258, np.uint16), (8192, np.uint16), (65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)],
)
def test_dtype_for_vocab(vocab_size: int, dtype: type) -> None:
    assert dtype_for_vocab(vocab_size) == np.dtype(dtype)


def _write_data_dir(directory: Path, vocab_size: int, train: np.ndarray, val: np.ndarray) -> None:
    dtype = dtype_for_vocab(vocab_size)
    with ShardWriter(directory, dtype) as writer:
        # Appended in pieces, as prepare does batch by batch.
        writer.append("train", train[:5])
        writer.append("train", train[5:].tolist())
        writer.append("val", val)
    (directory / "tokenizer.json").write_text("{}", encoding="utf-8")
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_token_id": 0,
        "splits": {
            "train": {"documents": 2, "tokens": int(train.size), "bytes": 4 * int(train.size)},
            "val": {"documents": 1, "tokens": int(val.size), "bytes": 3 * int(val.size)},
        },
    }
    (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


@pytest.mark.parametrize(("vocab_size", "itemsize"), [(65536, 2), (70000, 4)])
def test_write_and_memmap_round_trip(tmp_path: Path, vocab_size: int, itemsize: int) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, vocab_size, size=1000)
    val = np.array([vocab_size - 1, 0, 7])
    _write_data_dir(tmp_path, vocab_size, train, val)
    assert (tmp_path / "train.bin").stat().st_size == train.size * itemsize
    data = load_data_dir(tmp_path)
    assert isinstance(data.train, np.memmap)
    assert data.train.dtype.itemsize == itemsize
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.val, val)
    assert data.vocab_size == vocab_size
    assert data.eot_token_id == 0
    assert data.tokenizer_path == tmp_path / "tokenizer.json"
    assert data.bytes_per_token("train") == 4.0
    assert data.bytes_per_token("val") == 3.0


def test_writer_uses_temp_names_until_close(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, np.uint16)
    writer.append("train", [1, 2, 3])
    writer.flush()
    assert not (tmp_path / "train.bin").exists()
    assert (tmp_path / "train.bin.tmp").stat().st_size == 6
    paths = writer.close()
    assert paths["train"].read_bytes() == np.array([1, 2, 3], dtype="<u2").tobytes()
    assert paths["val"].stat().st_size == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert writer.tokens == {"train": 3, "val": 0}


def test_writer_crash_leaves_no_final_files(tmp_path: Path) -> None:
    (tmp_path / "val.bin").write_bytes(b"old!")
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, np.uint16) as writer:
        writer.append("train", [1, 2, 3])
        writer.append("val", [4])
        raise RuntimeError("boom")
    assert not (tmp_path / "train.bin").exists()
    assert (tmp_path / "val.bin").read_bytes() == b"old!"  # untouched
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_ids_that_do_not_fit(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, np.uint16) as writer:
        with pytest.raises(ValueError, match="cannot be stored"):
            writer.append("train", [70000])
        with pytest.raises(ValueError, match="cannot be stored"):
            writer.append("train", np.array([-1]))


def test_empty_split_loads_as_empty_array(tmp_path: Path) -> None:
    _write_data_dir(tmp_path, 300, np.arange(10), np.array([], dtype=np.int64))
    data = load_data_dir(tmp_path)
    assert data.val.size == 0
    with pytest.raises(UserError, match="val split .* is empty"):
        data.bytes_per_token("val")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data directory .*nowhere does not exist.*slm data prepare"):
        load_data_dir(tmp_path / "nowhere")


def test_missing_meta(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"meta\.json is missing.*slm data prepare"):
        load_data_dir(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read as JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format_version": 99}', "format_version 99"),
        ('{"format_version": 1, "vocab_size": 300}', "no valid 'eot_token_id'"),
    ],
)
def test_corrupt_meta(tmp_path: Path, content: str, message: str) -> None:
    _write_data_dir(tmp_path, 300, np.arange(10), np.arange(3))
    (tmp_path / "meta.json").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=rf"meta\.json: .*{message}.*slm data prepare"):
        load_data_dir(tmp_path)


def test_meta_with_bad_split_counts(tmp_path: Path) -> None:
    _write_data_dir(tmp_path, 300, np.arange(10), np.arange(3))
    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["val"]["tokens"] = -3
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match="no valid counts for the 'val' split"):
        load_data_dir(tmp_path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_or_stale_bin(tmp_path: Path, split: str) -> None:
    _write_data_dir(tmp_path, 300, np.arange(10), np.arange(3))
    path = tmp_path / f"{split}.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match=rf"{split}\.bin has \d+ bytes but meta\.json says .*slm data prepare"):
        load_data_dir(tmp_path)


def test_missing_bin(tmp_path: Path) -> None:
    _write_data_dir(tmp_path, 300, np.arange(10), np.arange(3))
    (tmp_path / "train.bin").unlink()
    with pytest.raises(UserError, match=r"train\.bin is missing"):
        load_data_dir(tmp_path)
