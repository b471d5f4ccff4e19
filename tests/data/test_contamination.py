"""`slm data contamination`: planted task items are found in a data dir's train split, clean ones (and ones only in
the val split) are not; long documents and chunk boundaries lose nothing; the JSON shape; bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from slmkit.cli import run
from slmkit.data import contamination as contamination_module
from slmkit.data.contamination import NgramMatcher, contamination, item_text, iter_token_documents
from slmkit.data.prepare import is_val_document, prepare
from slmkit.errors import UserError
from slmkit_testing import run_slm

_RNG = random.Random(99)
VOCAB = sorted({"".join(_RNG.choice("abcdefghiklmnoprstu") for _ in range(_RNG.randint(3, 8))) for _ in range(2000)})


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A data dir of 60 documents (10% to val by content hash) and its documents."""
    rng = random.Random(0)
    texts = [sentence(rng, 150).capitalize() + "." for _ in range(60)]
    root = tmp_path_factory.mktemp("contamination")
    source = root / "train.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(source)], root / "data", vocab_size=400, val_fraction=0.1)
    return root / "data", texts


def train_and_val(texts: list[str]) -> tuple[list[str], list[str]]:
    val = [t for t in texts if is_val_document(t, 0.1)]
    return [t for t in texts if t not in val], val


def copied_item(text: str, start: int, words: int, kind: str = "mc") -> dict:
    """A task item whose context (or prompt) is `words` words of `text`, with changed case and punctuation."""
    span = text.rstrip(".").split()[start : start + words]
    context = ", ".join(span[: words // 2]).upper() + "; " + " ".join(span[words // 2 :])
    if kind == "mc":
        return {"context": context, "choices": ["alpha", "beta"], "answer": 0}
    return {"prompt": context, "target": "gamma"}


def fresh_item(rng: random.Random, kind: str = "mc") -> dict:
    words = " ".join(f"zz{rng.randint(0, 10**6)}" for _ in range(20))  # words no document has
    return {"context": words, "choices": ["a", "b"], "answer": 1} if kind == "mc" else {"prompt": words, "target": "c"}


def test_planted_items_found_clean_items_not(corpus):
    data, texts = corpus
    train, val = train_and_val(texts)
    assert train and val
    rng = random.Random(1)
    mc = [copied_item(train[i], 10 * i % 100, 20) for i in range(6)] + [fresh_item(rng) for _ in range(14)]
    gen = [copied_item(train[-1], 40, 16, "gen"), fresh_item(rng, "gen"), copied_item(val[0], 5, 20, "gen")]
    mc_result, gen_result = contamination(data, [("mc", mc), ("gen", gen)], n=13)
    assert mc_result.to_dict() == {"task": "mc", "items": 20, "contaminated": 6, "rate": 0.3}
    assert mc_result.contaminated_items == tuple(range(6))
    # the item copied from a val document is clean: training never read it
    assert gen_result.contaminated_items == (0,) and gen_result.rate == pytest.approx(1 / 3)


def test_short_items_match_whole_and_smaller_n(corpus):
    data, texts = corpus
    train, _ = train_and_val(texts)
    words = train[3].split()
    short = {"prompt": " ".join(words[20:25]), "target": " ".join(words[25:27])}  # 7 words, all in a row
    scrambled = {"prompt": " ".join(words[27:32]), "target": words[20]}  # 6 words, not in a row
    [result] = contamination(data, [("short", [short, scrambled])], n=13)
    assert result.contaminated_items == (0,)
    # with n=4 the scrambled item's first five words (4-grams of them) are found too
    [result] = contamination(data, [("short", [short, scrambled])], n=4)
    assert result.contaminated_items == (0, 1)


def test_long_documents_and_chunk_edges_lose_no_ngram(corpus, monkeypatch):
    data, texts = corpus
    train, _ = train_and_val(texts)
    items = [copied_item(t, 130, 15) for t in train]  # the tail of every train document
    expected = contamination(data, [("tails", items)], n=13)[0]
    assert expected.contaminated == len(train)
    # tiny chunks and windows: documents (about 600 tokens) cross chunk boundaries and are decoded in overlapping
    # pieces; the overlap must hold an n-gram (13 of these made-up words take up to ~60 tokens)
    monkeypatch.setattr(contamination_module, "CHUNK_TOKENS", 97)
    monkeypatch.setattr(contamination_module, "WINDOW_TOKENS", 160)
    monkeypatch.setattr(contamination_module, "OVERLAP_TOKENS", 100)
    assert contamination(data, [("tails", items)], n=13)[0] == expected


def test_iter_token_documents_splits_and_windows():
    eot = 0
    docs = [np.arange(1, 6), np.arange(10, 40), np.arange(50, 53)]
    tokens = np.concatenate([np.concatenate([d, [eot]]) for d in docs]).astype(np.uint16)
    whole = [list(p) for p in iter_token_documents(tokens, eot, chunk_tokens=7, window_tokens=100, overlap_tokens=0)]
    assert whole == [list(d) for d in docs]
    pieces = [list(p) for p in iter_token_documents(tokens, eot, chunk_tokens=7, window_tokens=8, overlap_tokens=3)]
    assert all(len(p) <= 8 for p in pieces)
    # every run of 4 tokens (at most overlap + 1) of every document lies inside one piece
    for d in docs:
        for i in range(len(d) - 3):
            assert any(list(d[i : i + 4]) == p[j : j + 4] for p in pieces for j in range(len(p))), (d, i)
    # a last document without an end-of-text token still comes out
    assert [list(p) for p in iter_token_documents(tokens[:-1], eot, 5, 100, 0)][-1] == [50, 51, 52]


def test_item_text_and_matcher_normalise():
    assert item_text({"context": "Q: 2+2?", "choices": ["3", "4"], "answer": 1}) == "Q: 2+2? 4"
    assert item_text({"prompt": "Say", "target": "hi"}) == "Say hi"
    matcher = NgramMatcher(["The Quick, brown fox!"], n=3)
    matcher.scan("we saw the quick brown... fox")
    assert matcher.found == {0}


def test_cli_json_shape_and_bad_input(tmp_path, corpus, capsys):
    data, texts = corpus
    train, _ = train_and_val(texts)
    rng = random.Random(2)
    mc = tmp_path / "arc_easy.jsonl"
    mc.write_text("".join(json.dumps(x) + "\n" for x in [copied_item(train[0], 0, 20), fresh_item(rng)]))
    gen = tmp_path / "gsm.jsonl"
    gen.write_text("".join(json.dumps(fresh_item(rng, "gen")) + "\n" for _ in range(3)))
    r = run_slm("data", "contamination", data, "--tasks", mc, "--tasks", gen, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 13 and out["tasks"] == [
        {"task": "arc_easy", "items": 2, "contaminated": 1, "rate": 0.5},
        {"task": "gsm", "items": 3, "contaminated": 0, "rate": 0.0},
    ]
    r = run_slm("data", "contamination", data, "--tasks", mc)
    assert r.returncode == 0 and "arc_easy" in r.stdout and "50.0%" in r.stdout

    def refused(*args, fragment):  # in this process (a fresh one per case costs seconds): the same `run`
        code = run(["data", "contamination", *map(str, args)])
        result = capsys.readouterr()
        assert code == 2, result.out + result.err
        [line] = result.err.strip().splitlines()
        assert line.startswith("error: ") and fragment in line, line

    refused(tmp_path / "nowhere", "--tasks", mc, fragment="does not exist")
    refused(tmp_path, "--tasks", mc, fragment="meta.json")  # a folder that is not a data dir
    refused(data, fragment="no tasks")
    refused(data, "--tasks", tmp_path / "missing.jsonl", fragment="task file not found")
    refused(data, "--tasks", mc, "--n", "0", fragment="--n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    refused(data, "--tasks", bad, fragment="not a task example")


def test_python_api_refusals(corpus):
    data, _ = corpus
    with pytest.raises(UserError, match="no tasks"):
        contamination(data, [])
    with pytest.raises(UserError, match="--n"):
        contamination(data, [("t", [{"prompt": "a", "target": "b"}])], n=-1)
    with pytest.raises(UserError, match="split"):
        contamination(data, [("t", [{"prompt": "a", "target": "b"}])], split="test")
