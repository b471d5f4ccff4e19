"""Fixtures for the routing tests: small random models that share a tokenizer (the trained tiny model's), one with
another tokenizer, and a small multiple-choice task file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from slmkit.interop.hf import load_config


def _random_model(tiny_model_dir: Path, out: Path, seed: int, **changes) -> Path:
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    cfg = load_config(tiny_model_dir / "config.json").replace(**changes)
    model = build_model(cfg)
    model.init_weights(seed=seed)
    save_model(model, out, tokenizer_dir=tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def weak_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A 1-layer random model of width 32 with the tiny model's tokenizer."""
    root = tmp_path_factory.mktemp("weak")
    return _random_model(tiny_model_dir, root / "weak", 1, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="session")
def strong_dir(tiny_model_dir) -> Path:
    """The trained tiny model (2 layers, width 64)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def other_weak_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Same shape as weak_dir, other weights."""
    root = tmp_path_factory.mktemp("weak2")
    return _random_model(tiny_model_dir, root / "weak2", 5, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory, tiny_model_dir) -> Path:
    from slmkit.data.tokenizer import save_tokenizer, train_tokenizer
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    cfg = load_config(tiny_model_dir / "config.json")
    tok = train_tokenizer(["completely different text " * 20, "zebra yak quokka " * 30], 300)
    root = tmp_path_factory.mktemp("othertok")
    save_tokenizer(tok, root / "tok")
    model = build_model(cfg.replace(n_layers=1))
    model.init_weights(seed=2)
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory, corpus_file, strong_dir) -> Path:
    """160 multiple-choice items over the corpus (a piece of a document; its true next words and those of three
    other documents) whose answer is the strong model's own pick: the strong model is always right, the weak one
    where it agrees, so routing has something to find whatever the corpus is."""
    from slmkit.api import load
    from slmkit.eval.tasks import load_task
    from slmkit.route.items import score_items, task_items

    rng = random.Random(0)
    texts = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]

    def piece(text: str) -> tuple[str, str]:
        cut = rng.randrange(40, max(41, len(text) - 30))
        cut = text.rfind(" ", 0, cut) if text.rfind(" ", 0, cut) > 20 else cut
        return text[max(0, cut - 120) : cut], text[cut : cut + 24]

    records = []
    for k in range(160):
        context, answer = piece(texts[k % len(texts)])
        choices = [answer]
        while len(choices) < 4:
            other = piece(texts[rng.randrange(len(texts))])[1]
            if other.strip() and other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        records.append({"context": context, "choices": choices, "answer": 0})
    path = tmp_path_factory.mktemp("tasks") / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    picks = score_items(load(strong_dir), task_items([load_task(path)])).answers
    path.write_text("".join(json.dumps({**r, "answer": int(p)}) + "\n" for r, p in zip(records, picks, strict=True)))
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is loaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
