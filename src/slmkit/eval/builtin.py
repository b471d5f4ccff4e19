"""A built-in task suite made from real text on this machine: no download, deterministic.

- ``pystdlib-nextline``: the Python standard library files of the `builtin:pystdlib` validation split
  (content hash below 1%, the split `slm data prepare` holds out by default); the context is a few
  lines of code, the choices are the true next line and three lines of other files (at the same line
  number where possible: lines of the same file tend to be copies of the context or later, more
  generic code, which pushes small models below chance).
- ``pystdlib-cloze``: the same files; the context is the code up to an identifier, the choices are
  that identifier and three other identifiers of the same file.
- ``corpus-nextline`` / ``corpus-cloze``: the same two constructions on a corpus the user names
  (``--corpus``; any source `slm data prepare` reads). Prose is split into sentences, code into lines.

The answer position is shuffled with a fixed seed, so a model biased to one position scores chance.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from slmkit.errors import UserError
from slmkit.eval.tasks import Task

BUILTIN_TASKS = ("pystdlib-nextline", "pystdlib-cloze", "corpus-nextline", "corpus-cloze")
PYSTDLIB_VAL_FRACTION = 0.01  # the default val_fraction of `slm data prepare` (quickstart holds out more)
_CONTEXT_CHARS = 400
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _segments(text: str) -> tuple[list[str], str]:
    """(segments, joiner): lines for code and line-structured text, sentences for prose in long lines."""
    lines = text.split("\n")
    nonblank = [ln for ln in lines if ln.strip()]
    if sum(len(ln) > 200 for ln in nonblank) * 4 > max(len(nonblank), 1):
        sentences: list[str] = []
        for ln in nonblank:
            sentences.extend(s for s in _SENTENCE_END.split(ln.strip()) if s)
        return sentences, " "
    return lines, "\n"


def _good_segment(s: str) -> bool:
    stripped = s.strip()
    return 12 <= len(stripped) <= 160 and not stripped.startswith("#")


def _fits(item: tuple[int, str], doc: int, answer: str, context: str) -> bool:
    return item[0] != doc and item[1].strip() != answer.strip() and item[1].strip() not in context


def nextline_examples(documents: Iterable[str], count: int, seed: int) -> list[dict]:
    """Context: up to 8 lines (sentences) of a document; choices: its next one and three from other documents.

    Distractors come from other documents at the same line (sentence) index where there are such, so
    they are neither copies of the context nor systematically later (more generic) text of the same one.
    """
    rng = random.Random(seed)
    docs = [_segments(doc) for doc in documents]
    by_index: dict[int, list[tuple[int, str]]] = {}
    anywhere: list[tuple[int, str]] = []
    for d, (segs, _) in enumerate(docs):
        for k, seg in enumerate(segs):
            if _good_segment(seg):
                by_index.setdefault(k, []).append((d, seg))
                anywhere.append((d, seg))
    candidates = [(d, k) for d, (segs, _) in enumerate(docs) for k in range(3, len(segs)) if _good_segment(segs[k])]
    rng.shuffle(candidates)
    examples: list[dict] = []
    for d, k in candidates:
        if len(examples) >= count:
            break
        segs, joiner = docs[d]
        context = (joiner.join(segs[max(0, k - 8) : k]) + joiner)[-_CONTEXT_CHARS:]
        answer = segs[k]
        same_index = sorted({item[1] for item in by_index.get(k, []) if _fits(item, d, answer, context)})
        picked = rng.sample(same_index, min(3, len(same_index)))
        if len(picked) < 3:
            rest = sorted({item[1] for item in anywhere if _fits(item, d, answer, context)} - set(picked))
            if len(rest) < 3 - len(picked):
                continue
            picked += rng.sample(rest, 3 - len(picked))
        choices = picked + [answer]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return examples


def cloze_examples(documents: Iterable[str], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    candidates: list[tuple[str, re.Match, list[str]]] = []
    for doc in documents:
        matches = list(_WORD.finditer(doc))
        vocabulary = sorted({m.group() for m in matches})
        if len(vocabulary) < 8:
            continue
        for m in matches:
            if m.start() >= 80:
                candidates.append((doc, m, vocabulary))
    rng.shuffle(candidates)
    examples, seen = [], set()
    for doc, m, vocabulary in candidates:
        if len(examples) >= count:
            break
        word = m.group()
        key = (doc[max(0, m.start() - 40) : m.start()], word)
        if key in seen:
            continue
        seen.add(key)
        context = doc[max(0, m.start() - _CONTEXT_CHARS) : m.start()]
        distractors = [w for w in vocabulary if w != word and not w.startswith(word) and not word.startswith(w)]
        if len(distractors) < 3:
            continue
        choices = rng.sample(distractors, 3) + [word]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "answer": choices.index(word)})
    return examples


def pystdlib_val_documents(val_fraction: float = PYSTDLIB_VAL_FRACTION) -> list[str]:
    from slmkit.data.prepare import is_val_document
    from slmkit.data.sources import iter_documents

    return [t for t in iter_documents(["builtin:pystdlib"]) if is_val_document(t, val_fraction)]


def _corpus_documents(corpus: list[str], text_field: str) -> list[str]:
    from slmkit.data.sources import iter_documents

    docs = []
    for text in iter_documents(corpus, text_field=text_field):
        docs.append(text)
        if len(docs) >= 5000:  # enough to draw a few hundred examples; keeps a huge corpus cheap
            break
    return docs


def builtin_task(
    name: str, count: int = 100, seed: int = 0, corpus: list[str] | None = None, text_field: str = "text"
) -> Task:
    """One built-in task by name (see the module docstring)."""
    if name not in BUILTIN_TASKS:
        raise UserError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    if count < 1:
        raise UserError(f"the built-in task size must be >= 1, got {count}")
    if name.startswith("corpus-"):
        if not corpus:
            raise UserError(f"{name} is built from a corpus you name: pass --corpus FILE (text, .jsonl, ...)")
        docs = _corpus_documents(corpus, text_field)
        source = ", ".join(corpus)
    else:
        docs = pystdlib_val_documents()
        source = f"builtin:pystdlib val split (hash < {PYSTDLIB_VAL_FRACTION})"
    build = nextline_examples if name.endswith("nextline") else cloze_examples
    examples = build(docs, count, seed)
    if len(examples) < 2:
        raise UserError(f"{name}: {source} is too small to build the task (got {len(examples)} examples)")
    what = "next line/sentence out of 4" if name.endswith("nextline") else "missing word/identifier out of 4"
    return Task(name=name, kind="multiple_choice", examples=examples, source=source, description=what)


def builtin_suite(
    count: int = 100, seed: int = 0, corpus: list[str] | None = None, text_field: str = "text"
) -> list[Task]:
    """The pystdlib tasks, plus the corpus tasks when a corpus is named."""
    names = [n for n in BUILTIN_TASKS if corpus or not n.startswith("corpus-")]
    return [builtin_task(n, count, seed, corpus, text_field) for n in names]


def resolve_tasks(
    specs: list[str],
    count: int = 100,
    seed: int = 0,
    corpus: list[str] | None = None,
    text_field: str = "text",
) -> list[Task]:
    """Task files (.jsonl) and built-in task names, in order."""
    from slmkit.eval.tasks import load_task

    tasks = []
    for spec in specs:
        path = Path(spec)
        if path.suffix == ".jsonl" or path.exists():
            tasks.append(load_task(path))
        elif spec in BUILTIN_TASKS:
            tasks.append(builtin_task(spec, count, seed, corpus, text_field))
        else:
            raise UserError(
                f"unknown task {spec!r}: not a task file (.jsonl) and not a built-in task ({', '.join(BUILTIN_TASKS)})"
            )
    return tasks
