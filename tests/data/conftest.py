from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va? 日本語のテキスト 🙂",
    "def add(a, b):\n    return a + b\n",
    "Small language models are trained on small corpora.",
    "Numbers: 3.14159, 2.71828, 1.41421 and 42.",
    "A second paragraph about tokenizers and bytes.",
    "Εν αρχή ην ο λόγος. Привет, мир!",
    "import os\nprint(os.getcwd())\n",
]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), "utf-8")
    return path


@pytest.fixture
def documents() -> list[str]:
    return list(DOCUMENTS)


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture() -> Callable[..., Path]:
    return write_jsonl


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A small directory corpus: one document per .txt file."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root
