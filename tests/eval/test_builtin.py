"""The built-in suite: real text, deterministic, answers right, corpus tasks need a corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalfixtures import one_thread  # noqa: F401

from slmkit.errors import UserError
from slmkit.eval.builtin import (
    BUILTIN_TASKS,
    builtin_suite,
    builtin_task,
    cloze_examples,
    nextline_examples,
    pystdlib_val_documents,
    resolve_tasks,
)


def _check_mc(examples):
    for ex in examples:
        assert 0 <= ex["answer"] < len(ex["choices"]) == 4
        assert len(set(ex["choices"])) == 4


def test_pystdlib_tasks_come_from_the_val_split():
    from slmkit.data.prepare import is_val_document

    docs = pystdlib_val_documents()
    assert docs and all(is_val_document(d, 0.01) for d in docs)
    task = builtin_task("pystdlib-nextline", count=20, seed=0)
    assert task.kind == "multiple_choice" and len(task.examples) == 20
    _check_mc(task.examples)
    for ex in task.examples:
        # the right choice is the line that follows the context in one of the files
        answer = ex["choices"][ex["answer"]]
        assert any(ex["context"] + answer in d for d in docs)
    assert builtin_task("pystdlib-nextline", count=20, seed=0).examples == task.examples
    assert builtin_task("pystdlib-nextline", count=20, seed=1).examples != task.examples


def test_cloze_answer_is_the_next_word():
    docs = pystdlib_val_documents()
    examples = cloze_examples(docs, 15, seed=0)
    assert len(examples) == 15
    _check_mc(examples)
    for ex in examples:
        answer = ex["choices"][ex["answer"]]
        assert any(ex["context"] + answer in d for d in docs)


def test_answer_positions_are_spread():
    examples = nextline_examples(pystdlib_val_documents(), 60, seed=0)
    positions = {ex["answer"] for ex in examples}
    assert len(positions) >= 3  # shuffled, not always the same slot


def test_corpus_tasks():
    import slmkit

    with pytest.raises(UserError, match="--corpus"):
        builtin_task("corpus-nextline")
    source = Path(slmkit.__file__).parent  # real text that ships with the package: its own code
    suite = builtin_suite(count=10, corpus=[str(source)])
    assert [t.name for t in suite] == list(BUILTIN_TASKS)
    docs = [p.read_text() for p in source.rglob("*.py")]
    for task in suite[2:]:
        assert len(task.examples) == 10
        _check_mc(task.examples)
        for ex in task.examples:
            assert any(ex["context"] + ex["choices"][ex["answer"]] in d for d in docs)
    assert [t.name for t in builtin_suite(count=5)] == ["pystdlib-nextline", "pystdlib-cloze"]


def test_prose_is_split_into_sentences(tmp_path):
    topics = ("small language models", "compute budgets", "tokenizers", "scaling laws")
    paragraphs = [
        " ".join(f"Sentence number {i} of this abstract talks about {topic} and nothing else." for i in range(12))
        for topic in topics
    ]
    corpus = tmp_path / "prose.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    task = builtin_task("corpus-nextline", count=5, corpus=[str(corpus)])
    for ex in task.examples:
        answer = ex["choices"][ex["answer"]]
        assert answer.startswith("Sentence number") and answer.endswith(".")
        (source,) = [p for p in paragraphs if ex["context"] + answer in p]
        # distractors come from the other documents, at the same sentence index
        index = answer.split()[2]
        for other in ex["choices"]:
            if other != answer:
                assert other not in source and other.split()[2] == index


def test_unknown_names_and_sizes(tmp_path):
    with pytest.raises(UserError, match="unknown built-in task 'nextword'"):
        builtin_task("nextword")
    with pytest.raises(UserError, match=">= 1"):
        builtin_task("pystdlib-cloze", count=0)
    with pytest.raises(UserError, match="unknown task 'mmlu'"):
        resolve_tasks(["mmlu"])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one short line\n")
    with pytest.raises(UserError, match="too small"):
        builtin_task("corpus-nextline", corpus=[str(tiny)])
