"""Shared fixtures: a tiny prepared corpus and a tiny trained-from-scratch model directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from slmkit_testing import SRC, run_slm  # noqa: F401 - re-exported for older imports

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "seed-papers.jsonl"


def _corpus_texts(limit: int = 200) -> list[str]:
    if SHARED_CORPUS.is_file():
        texts = []
        with SHARED_CORPUS.open() as fh:
            for line in fh:
                record = json.loads(line)
                texts.append(f"{record['title']}\n\n{record['abstract']}")
                if len(texts) >= limit:
                    break
        return texts
    # fallback when the shared folder is absent: synthetic but structured English-like text
    rng = random.Random(0)
    words = "model data train token language small scaling loss compute budget attention layer".split()
    return [" ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(limit)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "papers.jsonl"
    with path.open("w") as fh:
        for text in _corpus_texts():
            fh.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file) -> Path:
    from slmkit.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "papers"
    prepare([str(corpus_file)], out, vocab_size=512, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_dir) -> Path:
    """A tiny model trained for a few steps (weights are not random, so generations are not uniform)."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(
        preset="tiny",
        model={"max_seq_len": 128},
        seq_len=64,
        batch_size=8,
        max_steps=30,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=15,
        eval_batches=2,
        save_interval=1000,
        device="cpu",
    )
    result = train(cfg, data_dir, run)
    assert result.final_dir is not None
    return result.final_dir


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    """Arithmetic chats and prompt/completion pairs: a task the tiny base model has never seen."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    with path.open("w") as f:
        for _ in range(60):
            a = rng.randint(0, 20)
            chat = [{"role": "user", "content": f"double {a}"}, {"role": "assistant", "content": f"{2 * a}"}]
            f.write(json.dumps({"messages": chat}) + "\n")
            f.write(json.dumps({"prompt": f"half of {2 * a} is", "completion": f" {a}"}) + "\n")
    return path
