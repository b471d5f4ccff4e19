from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from slmkit.data.tokenizer import (
    EOT_TOKEN,
    MIN_VOCAB_SIZE,
    eot_token_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from slmkit.errors import UserError

UNSEEN = [
    "Ünïcödé façade — naïve café",
    "中文字符和日本語のかな、한국어",
    "emoji 🧪🚀👩‍💻 and math ∮ E⋅da = Q",
    "  leading spaces\ttabs\r\nwindows newline\n\n",
    "control \x00\x07 chars and a lone combining mark \u0301",
]


TRAINING = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Small language models are trained on small corpora.",
    "Grüße aus München! 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(TRAINING * 3, vocab_size=320)


def test_eot_is_special_token_zero_and_vocab_size(tokenizer: Tokenizer) -> None:
    assert eot_token_id(tokenizer) == 0
    assert tokenizer.token_to_id(EOT_TOKEN) == 0
    assert 256 < tokenizer.get_vocab_size() <= 320
    # The full byte alphabet is present even for bytes the corpus never used.
    assert len(tokenizer.get_vocab()) == tokenizer.get_vocab_size()


@pytest.mark.parametrize("text", UNSEEN)
def test_round_trip_any_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert ids
    assert tokenizer.decode(ids) == text


def test_merges_learned(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox"
    assert len(tokenizer.encode(text).ids) < len(text.encode("utf-8"))


def test_vocab_too_small_names_minimum() -> None:
    assert MIN_VOCAB_SIZE == 258
    with pytest.raises(UserError, match="at least 258"):
        train_tokenizer(["some text"], vocab_size=257)
    assert train_tokenizer(["some text"], vocab_size=258).get_vocab_size() <= 258


def test_save_and_load_with_transformers(tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(tokenizer, tmp_path, model_max_length=512)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == EOT_TOKEN
    assert config["model_max_length"] == 512
    for loader in (PreTrainedTokenizerFast, AutoTokenizer):
        hf = loader.from_pretrained(tmp_path)
        assert hf.eos_token == EOT_TOKEN
        assert hf.eos_token_id == 0
        assert hf.bos_token_id == 0
        assert hf.pad_token_id is not None and hf.pad_token_id < tokenizer.get_vocab_size()
        assert len(hf) == tokenizer.get_vocab_size()  # nothing added beyond the vocabulary
        assert hf.model_max_length == 512
        for text in UNSEEN:
            ids = hf(text, add_special_tokens=True)["input_ids"]
            assert ids == tokenizer.encode(text).ids
            assert hf.decode(ids) == text


def test_save_without_max_length_and_reload(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "new" / "dir")
    config = json.loads((path.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "model_max_length" not in config
    for source in (path, path.parent):
        loaded = load_tokenizer(source)
        assert loaded.encode(UNSEEN[1]).ids == tokenizer.encode(UNSEEN[1]).ids
    assert not list(path.parent.glob("*.tmp"))


def test_load_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"tokenizer file .*tokenizer\.json does not exist"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing.json")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_eot() -> None:
    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(UserError, match="no <\\|endoftext\\|> token"):
        eot_token_id(plain)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # more than one read chunk
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
