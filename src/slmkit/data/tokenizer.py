"""Byte-level BPE tokenizers, saved in the Hugging Face format.

A trained tokenizer is a ``tokenizer.json`` (the ``tokenizers`` library's file) next to a
``tokenizer_config.json``, so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it as it is.
Byte-level means every string is encodable: the 256 byte symbols are always in the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOT_TOKEN,)
BYTE_ALPHABET_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# At least one merge, or the "BPE" is only bytes.
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + 1


# Real tokenizers have 32k-256k tokens; far beyond that the Rust trainer aborts the process (exit 134).
MAX_VOCAB_SIZE = 2**20


def check_vocab_size(vocab_size: int) -> None:
    """UserError unless ``vocab_size`` is an integer from MIN_VOCAB_SIZE to MAX_VOCAB_SIZE."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size!r} is too small: a byte-level BPE tokenizer needs at least "
            f"{MIN_VOCAB_SIZE} ({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special token + 1 merge); "
            f"pass vocab_size >= {MIN_VOCAB_SIZE}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size:,} is too large: slmkit trains tokenizers of at most {MAX_VOCAB_SIZE:,} tokens "
            "(--vocab-size; real ones use 32k-256k)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with ``EOT_TOKEN`` as special token id 0.

    The vocabulary can come out smaller than ``vocab_size`` when the corpus has too few distinct pairs
    to merge; the tokenizer's ``get_vocab_size()`` is the truth.
    """
    check_vocab_size(vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer.token_to_id(EOT_TOKEN) != 0:
        raise RuntimeError(f"{EOT_TOKEN} should be token id 0, got {tokenizer.token_to_id(EOT_TOKEN)}")
    if actual < vocab_size:
        logger.warning(
            "the corpus supports only %d tokens, fewer than the %d asked for; using %d",
            actual,
            vocab_size,
            actual,
        )
    return tokenizer


def eot_token_id(tokenizer: Tokenizer) -> int:
    """The id of ``EOT_TOKEN``, the token that ends every document."""
    token_id = tokenizer.token_to_id(EOT_TOKEN)
    if token_id is None:
        raise UserError(
            f"the tokenizer has no {EOT_TOKEN} token, which slmkit uses to end documents; "
            "train a tokenizer with `slm data prepare --vocab-size N` or add that special token"
        )
    return int(token_id)


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int | None = None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that lets transformers load ``tokenizer.json`` with its specials."""
    token_id = eot_token_id(tokenizer)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # One token plays every role, as in GPT-2: byte-level BPE never needs unk, and padding with an
        # existing id keeps the vocabulary (and the embedding matrix) unchanged.
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": EOT_TOKEN,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return config


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``; returns the json's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    _write_atomic(path, tokenizer.to_str(pretty=True).encode("utf-8"))
    write_tokenizer_config(tokenizer, directory, model_max_length)
    return path


def write_tokenizer_config(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer_config.json`` for ``tokenizer`` into ``directory``."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    text = json.dumps(tokenizer_config(tokenizer, model_max_length), indent=2) + "\n"
    _write_atomic(path, text.encode("utf-8"))
    return path


def tokenizer_file(path_or_dir: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path_or_dir`` names (the file itself or a directory holding it)."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"tokenizer file {path} does not exist; pass a tokenizer.json or a directory that holds one "
            "(a data directory from `slm data prepare` or a model directory)"
        )
    return path


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one inside a directory)."""
    from tokenizers import Tokenizer

    path = tokenizer_file(path_or_dir)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for any parse error
        raise UserError(
            f"tokenizer file {path} is corrupt or not a tokenizers file ({exc}); re-create it with `slm data prepare`"
        ) from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
