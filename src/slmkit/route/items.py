"""Per-item quality and confidence of one model on eval tasks: what routers are trained and judged on.

Items come from slmkit's eval tasks (task files and built-in tasks, :mod:`slmkit.eval.tasks`), rendered with
one prompt template, zero-shot (a router decides on the prompt a user sends, so each item is one prompt):
- multiple choice: scored as `slm eval` scores it (log-likelihood of each choice after the context, the pick
  normalised per byte: ``acc_norm``); quality = 1 if the pick is right; confidence = the model's probability
  of its own pick among the choices (softmax of the choices' log-likelihoods);
- generation: greedy up to the task's stop string; quality = exact match; confidence = the mean log-probability
  of the generated tokens.

Each item has a stable key (a hash of its task and text), so the split of items into the router's training
items and held-out items does not depend on the order or number of items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmkit.errors import UserError


@dataclass(frozen=True)
class Item:
    task: str
    kind: str  # multiple_choice | generation
    prompt: str  # the rendered prompt (context)
    continuations: tuple[str, ...]  # multiple choice: the rendered choices
    answer: int | str  # multiple choice: the right index; generation: the target text
    stop: tuple[str, ...] = ("\n",)

    @property
    def key(self) -> str:
        text = "\x00".join([self.task, self.prompt, *self.continuations, str(self.answer)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def unit(self) -> float:
        """A number in [0, 1) from the key: the item's place in train/held-out splits."""
        return int(self.key[:12], 16) / 16**12


def task_items(tasks: Sequence[Any], template: str = "plain") -> list[Item]:
    """The items of loaded tasks (:class:`slmkit.eval.tasks.Task`) under one template, zero-shot."""
    from slmkit.eval.tasks import GEN_TEMPLATES, MC_TEMPLATES, render_gen, render_mc

    items: list[Item] = []
    for task in tasks:
        table = MC_TEMPLATES if task.kind == "multiple_choice" else GEN_TEMPLATES
        if template not in table:
            raise UserError(f"unknown template {template!r} for {task.kind} tasks; choose from: {', '.join(table)}")
        for i, ex in enumerate(task.examples):
            if task.kind == "multiple_choice":
                prompt, continuations = render_mc(task, i, table[template], 0, 0)
                items.append(Item(task.name, task.kind, prompt, tuple(continuations), int(ex["answer"])))
            else:
                prompt = render_gen(task, i, table[template], 0, 0)
                items.append(Item(task.name, task.kind, prompt, (), ex["target"].strip(), tuple(task.stop)))
    if not items:
        raise UserError("no task items: give --tasks with at least one example")
    return items


def prompt_ids(lm: Any, item: Item) -> list[int]:
    """The token ids a model reads for the item's prompt: a document-start token, then the prompt (trailing
    whitespace moved out, as the scorer does)."""
    from slmkit.eval.tasks import move_trailing_whitespace, prefix_token_id

    text = move_trailing_whitespace(item.prompt, "")[0] if item.kind == "multiple_choice" else item.prompt
    return [prefix_token_id(lm), *(lm.tokenizer.encode(text).ids if text else [])]


@dataclass
class ItemScores:
    quality: np.ndarray  # (N,) in [0, 1]
    confidence: np.ndarray  # (N,) higher: surer (a cascade sends the least sure items to the strong model)
    answers: list[Any]


def score_items(
    lm: Any,
    items: Sequence[Item],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    on_progress: Callable[[int], None] | None = None,
) -> ItemScores:
    """Quality and confidence of `lm` (a LoadedModel) on every item."""
    from slmkit.eval.tasks import loglikelihoods, mc_requests

    quality = np.zeros(len(items))
    confidence = np.zeros(len(items))
    answers: list[Any] = [None] * len(items)
    mc = [i for i, it in enumerate(items) if it.kind == "multiple_choice"]
    if mc:
        requests, owners = [], []
        for i in mc:
            reqs = mc_requests(lm, items[i].prompt, list(items[i].continuations))
            requests.extend(reqs)
            owners.append((i, len(reqs)))
        scores = loglikelihoods(lm.model, requests, batch_size)
        pos = 0
        for i, count in owners:
            logprobs = np.array([s for s, _ in scores[pos : pos + count]])
            pos += count
            per_byte = [
                lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(logprobs, items[i].continuations, strict=True)
            ]
            pick = int(np.argmax(per_byte))
            choice_probs = np.exp(logprobs - logprobs.max())
            choice_probs /= choice_probs.sum()
            quality[i] = float(pick == items[i].answer)
            confidence[i] = float(choice_probs[pick])
            answers[i] = pick
            if on_progress is not None:
                on_progress(1)
    for i, item in enumerate(items):
        if item.kind != "generation":
            continue
        text, mean_logprob = _generate(lm, item, max_new_tokens)
        quality[i] = float(text == item.answer)
        confidence[i] = mean_logprob
        answers[i] = text
        if on_progress is not None:
            on_progress(1)
    return ItemScores(quality, confidence, answers)


def _generate(lm: Any, item: Item, max_new_tokens: int) -> tuple[str, float]:
    """Greedy answer (cut at the stop strings, stripped) and the mean log-probability of its tokens."""
    from slmkit.eval.tasks import greedy_answer, loglikelihoods

    eos = lm.config.eos_token_id
    text, out, ids = greedy_answer(lm, prompt_ids(lm, item), max_new_tokens, item.stop)
    scored = out or ([eos] if eos is not None else [])
    if not scored:
        return text.strip(), 0.0
    [(total, _)] = loglikelihoods(lm.model, [(ids, scored)], 1)
    return text.strip(), total / len(scored)
