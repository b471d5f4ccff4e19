"""Tasks from JSON lines: multiple choice scored by log-likelihood, generation scored by matching.

A task file holds one example per line, all of one kind:
- multiple choice: ``{"context": str, "choices": [str, ...], "answer": int}``; each choice is scored
  by the log-likelihood of ``choice`` after ``context``; accuracy is reported raw (sum of log-probs)
  and length-normalised (log-prob per UTF-8 byte of the choice);
- generation: ``{"prompt": str, "target": str}`` (optional ``"regex"``); greedy generation up to a
  newline, scored by exact match, contains and (when given) regex search.

Every example is rendered with several prompt templates (the spread across them is reported: a single
format can flatter or hurt a small model by several points), optionally with few-shot examples drawn
from the same file with a fixed seed. Every metric carries a bootstrap 95% confidence interval over
examples.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slmkit.errors import UserError

log = logging.getLogger(__name__)

TaskKind = Literal["multiple_choice", "generation"]


@dataclass(frozen=True)
class Template:
    """How an example becomes text: ``prompt`` formats the question, ``answer`` the continuation."""

    name: str
    prompt: str  # uses {context} (multiple choice) or {prompt} (generation)
    answer: str  # uses {choice} (multiple choice) or {target} (generation)
    separator: str = "\n\n"  # between few-shot examples
    # multiple choice only: the choices are listed in the prompt under letters and the continuations are the
    # letters (OLMES's "MCF" formulation), instead of the choice texts themselves ("cloze")
    lettered: bool = False


# Three formats that differ the way real prompt formats differ (framing words, separators, spacing).
MC_TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "{context}", "{choice}"),
    "instruct": Template("instruct", "Continue the text.\n\n{context}", "{choice}", separator="\n\n###\n\n"),
    "qa": Template("qa", "Question: {context}\nAnswer:", " {choice}"),
    # opt-in (`--template letters`): not in the default set, whose numbers it would change
    "letters": Template("letters", "Question: {context}\n{lettered}\nAnswer:", " {choice}", lettered=True),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GEN_TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "{prompt}", "{target}"),
    "instruct": Template("instruct", "Continue the text.\n\n{prompt}", "{target}", separator="\n\n###\n\n"),
    "qa": Template("qa", "Question: {prompt}\nAnswer:", " {target}"),
}


@dataclass
class Task:
    name: str
    kind: TaskKind
    examples: list[dict[str, Any]]
    source: str = ""
    description: str = ""
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generation stops here


# ---- loading ------------------------------------------------------------------------------------


def _check_mc(record: dict, where: str) -> dict:
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        raise UserError(f'{where}: "context" must be a string')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f'{where}: "choices" must be a list of at least two non-empty strings')
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f'{where}: "answer" must be an integer index into "choices", got {answer!r}')
    if not 0 <= answer < len(choices):
        raise UserError(
            f"{where}: answer index {answer} is out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})"
        )
    return {"context": context, "choices": list(choices), "answer": answer, **_fewshot_mark(record, where)}


def _fewshot_mark(record: dict, where: str) -> dict:
    """`"fewshot": true` marks a curated few-shot example: used as a shot, never scored."""
    if "fewshot" not in record:
        return {}
    if not isinstance(record["fewshot"], bool):
        raise UserError(f'{where}: "fewshot" must be true or false, got {record["fewshot"]!r}')
    return {"fewshot": True} if record["fewshot"] else {}


def _check_gen(record: dict, where: str) -> dict:
    prompt, target = record.get("prompt"), record.get("target")
    if not isinstance(prompt, str) or not prompt:
        raise UserError(f'{where}: "prompt" must be a non-empty string')
    if not isinstance(target, str) or not target.strip():
        raise UserError(f'{where}: "target" must be a non-empty string')
    out = {"prompt": prompt, "target": target, **_fewshot_mark(record, where)}
    if "regex" in record:
        try:
            re.compile(record["regex"])
        except (re.error, TypeError) as exc:
            raise UserError(f'{where}: "regex" is not a valid regular expression ({exc})') from None
        out["regex"] = record["regex"]
    return out


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Read and validate a task file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    kind: TaskKind | None = None
    examples: list[dict] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        this: TaskKind
        if "choices" in record:
            this = "multiple_choice"
        elif "prompt" in record:
            this = "generation"
        else:
            raise UserError(
                f'{where}: not a task example: multiple choice needs "context", "choices", "answer"; '
                f'generation needs "prompt", "target" (fields here: {", ".join(record) or "none"})'
            )
        if kind is None:
            kind = this
        elif this != kind:
            raise UserError(f"{where}: a {this} example in a {kind} task file; keep one kind per file")
        examples.append(_check_mc(record, where) if kind == "multiple_choice" else _check_gen(record, where))
    if not examples or kind is None:
        raise UserError(f"{path}: empty task file (no examples); add one JSON object per line")
    if all(ex.get("fewshot") for ex in examples):
        raise UserError(f'{path}: every example is marked "fewshot": leave at least one to score')
    return Task(name=name or path.stem, kind=kind, examples=examples, source=str(path))


# ---- rendering ----------------------------------------------------------------------------------


def _shots(n: int, index: int, k: int, seed: int) -> list[int]:
    """k example indices other than `index`, the same for a given (seed, index) on every run."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{index}")
    pool = [j for j in range(n) if j != index]
    return rng.sample(pool, k)


def curated_shots(task: Task, k: int) -> list[int]:
    """The fixed few-shot examples of `task` (OLMES: the same curated shots before every item, never scored).

    A task file's examples marked `"fewshot": true` are its curation (the first k, in file order). Without
    marks the shots are picked by a fixed rule: the shortest examples (fewest characters rendered), taken so
    that the answer positions cycle A, B, C, ... (balanced labels: a model biased to one position gains
    nothing from the shots), ties broken by file order."""
    if k <= 0:
        return []
    marked = [i for i, ex in enumerate(task.examples) if ex.get("fewshot")]
    if marked:
        if len(marked) < k:
            raise UserError(
                f'task {task.name!r} marks {len(marked)} "fewshot" example(s), fewer than {k} shots; mark more '
                "or lower --num-fewshot"
            )
        return marked[:k]
    if len(task.examples) <= k:
        raise UserError(
            f"task {task.name!r} has {len(task.examples)} examples, too few for {k} curated shots (they are not "
            "scored); lower --num-fewshot"
        )

    def size(i: int) -> int:
        ex = task.examples[i]
        if task.kind == "multiple_choice":
            return len(ex["context"]) + sum(len(c) for c in ex["choices"])
        return len(ex["prompt"]) + len(ex["target"])

    pool = sorted(range(len(task.examples)), key=lambda i: (size(i), i))
    widest = max(len(ex.get("choices", ())) for ex in task.examples)
    chosen: list[int] = []
    for slot in range(k):
        pick = pool[0]
        if task.kind == "multiple_choice":
            wanted = [i for i in pool if task.examples[i]["answer"] == slot % widest]
            pick = wanted[0] if wanted else pick
        chosen.append(pick)
        pool.remove(pick)
    return chosen


def scored_indices(task: Task, shots: Sequence[int] | None) -> list[int]:
    """The examples scored: all but curated shots (fixed `shots`, or those the file marks)."""
    excluded = set(shots or ()) | {i for i, ex in enumerate(task.examples) if ex.get("fewshot")}
    return [i for i in range(len(task.examples)) if i not in excluded]


def _shot_indices(task: Task, index: int, num_fewshot: int, seed: int, shots: Sequence[int] | None) -> list[int]:
    if shots is not None:
        return list(shots)
    return _shots(len(task.examples), index, num_fewshot, seed)


def _mc_prompt(template: Template, ex: dict[str, Any]) -> tuple[str, list[str]]:
    """One example's prompt and its continuations under `template` (cloze: the choice texts; lettered: the
    choices listed as " A. text" lines in the prompt, the letters as continuations)."""
    if not template.lettered:
        return template.prompt.format(context=ex["context"]), [template.answer.format(choice=c) for c in ex["choices"]]
    if len(ex["choices"]) > len(LETTERS):
        raise UserError(f"the letters template takes at most {len(LETTERS)} choices, got {len(ex['choices'])}")
    listed = "\n".join(f" {LETTERS[k]}. {c.strip()}" for k, c in enumerate(ex["choices"]))
    prompt = template.prompt.format(context=ex["context"].rstrip(), lettered=listed)
    return prompt, [template.answer.format(choice=LETTERS[k]) for k in range(len(ex["choices"]))]


def render_mc(
    task: Task, index: int, template: Template, num_fewshot: int, seed: int, shots: Sequence[int] | None = None
) -> tuple[str, list[str]]:
    """(context text, continuation texts) of one multiple-choice example; `shots`: fixed shot indices (curated),
    else `num_fewshot` drawn per example with `seed`."""
    ex = task.examples[index]
    shot_texts = []
    for s in (task.examples[j] for j in _shot_indices(task, index, num_fewshot, seed, shots)):
        prompt, continuations = _mc_prompt(template, s)
        shot_texts.append(prompt + continuations[s["answer"]])
    prompt, continuations = _mc_prompt(template, ex)
    return "".join(s + template.separator for s in shot_texts) + prompt, continuations


def render_gen(
    task: Task, index: int, template: Template, num_fewshot: int, seed: int, shots: Sequence[int] | None = None
) -> str:
    ex = task.examples[index]
    shot_texts = [
        template.prompt.format(prompt=s["prompt"]) + template.answer.format(target=s["target"])
        for s in (task.examples[j] for j in _shot_indices(task, index, num_fewshot, seed, shots))
    ]
    return "".join(s + template.separator for s in shot_texts) + template.prompt.format(prompt=ex["prompt"])


# ---- scoring ------------------------------------------------------------------------------------


def loglikelihoods(
    model: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of continuation, whether greedy decoding produces it) per (context, continuation).

    Token ids are given; the context should start with a document-start token (slmkit: end-of-text) so
    the first continuation token is predicted from something. Contexts longer than the model's window
    are truncated on the left. Requests are sorted by length and run right-padded in batches.
    """
    import torch

    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            rows, spans = [], []
            for i in group:
                context, continuation = requests[i]
                if not continuation:
                    raise ValueError("empty continuation")
                if len(continuation) > max_len:
                    raise UserError(
                        f"a continuation of {len(continuation)} tokens is longer than the model's context "
                        f"({max_len}); shorten the choices"
                    )
                full = (list(context) + list(continuation))[-(max_len + 1) :]
                inp = full[:-1]
                rows.append(inp)
                spans.append((len(inp) - len(continuation), len(inp), full[-len(continuation) :]))
            width = max(len(r) for r in rows)
            x = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            logits = model(x.to(device))  # (B, T, V); right padding is invisible to causal attention
            for r, (i, (lo, hi, targets)) in enumerate(zip(group, spans, strict=True)):
                logprobs = torch.log_softmax(logits[r, lo:hi].float(), dim=-1)  # (n, V)
                target = torch.tensor(targets, device=logprobs.device)
                total = float(logprobs.gather(1, target[:, None]).sum())
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (total, greedy)
            if on_batch is not None:
                on_batch(len(group))
    model.train(was_training)
    return results  # type: ignore[return-value]


def bootstrap_ci(values: Sequence[float], seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` (resampling examples)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1:
        return (float(arr[0]), float(arr[0]))
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def summarize(per_template: dict[str, list[float]], seed: int = 0) -> dict[str, Any]:
    """One metric: per-template value with CI, spread across templates, and the template-averaged mean.

    The overall CI resamples examples of the per-example average over templates, so it covers example
    sampling; min/max show the format sensitivity.
    """
    by_template = {
        name: {"value": float(np.mean(v)), "ci95": list(bootstrap_ci(v, seed))} for name, v in per_template.items()
    }
    values = [t["value"] for t in by_template.values()]
    per_example = np.mean(np.asarray(list(per_template.values()), dtype=np.float64), axis=0)
    return {
        "mean": float(np.mean(values)),
        "ci95": list(bootstrap_ci(per_example, seed)),
        "min": float(min(values)),
        "max": float(max(values)),
        "by_template": by_template,
    }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text).ids if text else []


def prefix_token_id(lm: Any) -> int:
    """The token every scored sequence starts with: end-of-text (training documents follow one), else BOS, else 0."""
    from slmkit.data.tokenizer import EOT_TOKEN

    token = lm.tokenizer.token_to_id(EOT_TOKEN)
    if token is not None:
        return int(token)
    bos = lm.config.bos_token_id
    return int(bos) if bos is not None else 0


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """The one rule for a context that ends in whitespace (lm-eval's, so `slm eval --tasks`, slmkit's lm-eval
    adapter and lm-eval's own backends score the same tokens): the whitespace moves to the start of the
    continuation before either is tokenised. Byte-level BPE tokenisers attach a space to the word after it
    (" Paris" is one token, "Paris" after a lone " " is two), so scoring "the " + "Paris" would score a token
    sequence the model rarely saw in training."""
    kept = context.rstrip()
    return kept, context[len(kept) :] + continuation


def mc_requests(lm: Any, context: str, continuations: list[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids for scoring: context (after a document-start token) and each continuation, encoded apart, with
    the context's trailing whitespace moved into every continuation (`move_trailing_whitespace`)."""
    kept, _ = move_trailing_whitespace(context, "")
    ctx = [prefix_token_id(lm), *_encode(lm.tokenizer, kept)]
    return [(ctx, _encode(lm.tokenizer, move_trailing_whitespace(context, c)[1])) for c in continuations]


OLMES_SHOTS = 5  # OLMES's few-shot count: the same curated shots before every item


def _resolve_templates(kind: TaskKind, names: Sequence[str] | None, olmes: bool = False) -> list[Template]:
    table = MC_TEMPLATES if kind == "multiple_choice" else GEN_TEMPLATES
    if olmes and not names and kind == "multiple_choice":
        names = ["qa", "letters"]  # OLMES's two formulations: cloze ("Question: ...\nAnswer: choice") and MCF
    names = list(names) if names else [n for n, t in table.items() if not t.lettered]
    if kind == "generation":
        names = [n for n in names if n != "letters"]  # a multiple-choice formulation: generation tasks skip it
        if not names:
            names = list(GEN_TEMPLATES)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"unknown template(s) {unknown}; choose from: {', '.join(table)}")
    chosen = [table[n] for n in names]
    if olmes and kind == "multiple_choice" and len({t.lettered for t in chosen}) < 2:
        raise UserError(
            "--olmes scores every multiple-choice task both as cloze and as lettered choices: give at least one "
            "cloze template (plain, instruct, qa) and 'letters', or no --template"
        )
    return chosen


def evaluate_task(
    lm: Any,
    task: Task,
    templates: Sequence[str] | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int = 32,
    on_progress: Callable[[int], None] | None = None,
    olmes: bool = False,
) -> dict[str, Any]:
    """Score `task` with every template; metrics with bootstrap CIs and the spread across templates.

    Shots: curated (`curated_shots`: the same shots before every item, not scored) when `olmes` is set or the
    task file marks `"fewshot"` examples, else drawn per item from the other examples with `seed`. olmes:
    OLMES-style (Gu et al., 2024) — multiple-choice tasks are scored as cloze and as lettered choices (default
    templates qa + letters) and the primary metric `olmes` is the better formulation's accuracy, both shown."""
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    marked = any(ex.get("fewshot") for ex in task.examples)
    shots = curated_shots(task, num_fewshot) if (olmes or marked) and num_fewshot else None
    if shots is None and num_fewshot >= len(task.examples):
        raise UserError(
            f"task {task.name!r} has {len(task.examples)} examples, too few for {num_fewshot}-shot "
            "(shots are drawn from the other examples); lower --num-fewshot"
        )
    chosen = _resolve_templates(task.kind, templates, olmes)
    indices = scored_indices(task, shots)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        indices = indices[:limit]
    result: dict[str, Any] = {
        "task": task.name,
        "type": task.kind,
        "source": task.source,
        "examples": len(indices),
        "num_fewshot": num_fewshot,
        "seed": seed,
        "templates": [t.name for t in chosen],
    }
    if shots is not None:
        result["shots"] = {"curated": True, "indices": shots}
    if task.description:
        result["description"] = task.description
    if task.kind == "multiple_choice":
        acc: dict[str, list[float]] = {}
        acc_norm: dict[str, list[float]] = {}
        answers: dict[str, list[Any]] = {}
        for template in chosen:
            requests, owners = [], []
            for i in indices:
                context, continuations = render_mc(task, i, template, num_fewshot, seed, shots)
                requests.extend(mc_requests(lm, context, continuations))
                owners.append((i, continuations))
            scores = loglikelihoods(lm.model, requests, batch_size, on_progress)
            pos = 0
            acc[template.name], acc_norm[template.name], answers[template.name] = [], [], []
            for i, continuations in owners:
                logprobs = [s for s, _ in scores[pos : pos + len(continuations)]]
                pos += len(continuations)
                per_byte = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(logprobs, continuations, strict=True)]
                answer = task.examples[i]["answer"]
                acc[template.name].append(float(int(np.argmax(logprobs)) == answer))
                acc_norm[template.name].append(float(int(np.argmax(per_byte)) == answer))
                answers[template.name].append(int(np.argmax(per_byte)))  # the primary metric's pick
        result["metrics"] = {"acc": summarize(acc, seed), "acc_norm": summarize(acc_norm, seed)}
        formulations = _formulations(chosen, acc, acc_norm)
        if formulations:
            result["formulations"] = formulations
        if olmes:
            result["metrics"]["olmes"] = _olmes_metric(chosen, acc, acc_norm, seed)
        # per item, for `slm eval --compare` (answer flips): the choice picked, and whether it was right
        result["items"] = {"answers": answers, "correct": acc_norm}
        result["chance"] = float(np.mean([1 / len(task.examples[i]["choices"]) for i in indices]))
        result["primary_metric"] = "olmes" if olmes else "acc_norm"
    else:
        items: dict[str, dict[str, list[Any]]] = {"answers": {}, "correct": {}}
        result["metrics"] = _evaluate_generation(
            lm, task, chosen, indices, num_fewshot, seed, max_new_tokens, items, shots
        )
        result["items"] = items
        result["primary_metric"] = "exact_match"
        if on_progress is not None:
            on_progress(len(indices) * len(chosen))
    return result


def _formulations(
    templates: list[Template], acc: dict[str, list[float]], acc_norm: dict[str, list[float]]
) -> dict[str, Any] | None:
    """OLMES-style (Gu et al., 2024): when a task was scored both as cloze (choice texts, normalised per byte:
    `acc_norm`) and as lettered choices (MCF, the letter's log-prob: `acc`, no normalisation, every letter being
    one token), both accuracies and the better one. Small models usually do better as cloze; models that learned
    the lettered format do better there, and reporting only one formulation hides which."""
    cloze = [t.name for t in templates if not t.lettered]
    lettered = [t.name for t in templates if t.lettered]
    if not cloze or not lettered:
        return None
    values = {
        "cloze": {"metric": "acc_norm", "normalization": "per UTF-8 byte of the choice", "templates": cloze,
                  "value": float(np.mean([np.mean(acc_norm[n]) for n in cloze]))},
        "mcf": {"metric": "acc", "normalization": "none (one letter token per choice)", "templates": lettered,
                "value": float(np.mean([np.mean(acc[n]) for n in lettered]))},
    }  # fmt: skip
    return {**values, "best": max(values, key=lambda k: values[k]["value"])}


def _olmes_metric(
    templates: list[Template], acc: dict[str, list[float]], acc_norm: dict[str, list[float]], seed: int
) -> dict[str, Any]:
    """The OLMES score: per item, cloze correctness (acc_norm, averaged over the cloze templates) and lettered
    correctness (acc over the lettered ones); the value is the better formulation's mean, its CI over items;
    min-max spans the two formulations, `by_template` holds both."""
    cloze = np.mean([acc_norm[t.name] for t in templates if not t.lettered], axis=0)
    mcf = np.mean([acc[t.name] for t in templates if t.lettered], axis=0)
    both = {"cloze": cloze, "mcf": mcf}
    best = max(both, key=lambda k: float(both[k].mean()))
    return {
        "mean": float(both[best].mean()),
        "ci95": list(bootstrap_ci(both[best], seed)),
        "min": float(min(v.mean() for v in both.values())),
        "max": float(max(v.mean() for v in both.values())),
        "by_template": {k: {"value": float(v.mean()), "ci95": list(bootstrap_ci(v, seed))} for k, v in both.items()},
        "formulation": best,
    }


def greedy_answer(lm: Any, ids: list[int], max_new: int, stop: Sequence[str]) -> tuple[str, list[int], list[int]]:
    """A generation task's answer: greedy from `ids` (left-truncated so `max_new` new tokens fit the window) until
    EOS or a stop string; (text cut before the first stop string, the generated ids, the prompt ids used)."""
    from slmkit.infer.generate import generate_ids

    eos = lm.config.eos_token_id
    window = lm.config.max_seq_len
    new = min(max_new, window - 1)
    ids = ids[-(window - new) :]
    out: list[int] = []
    text = ""
    for token in generate_ids(lm.model, ids, new, stop_ids={eos} if eos is not None else None):
        out.append(token)
        text = lm.tokenizer.decode(out)
        if any(s in text for s in stop):
            break
    for s in stop:
        text = text.split(s)[0]
    return text, out, ids


def _evaluate_generation(
    lm: Any,
    task: Task,
    templates: list[Template],
    indices: list[int],
    num_fewshot: int,
    seed: int,
    max_new: int,
    items: dict[str, dict[str, list[Any]]] | None = None,
    shots: Sequence[int] | None = None,
) -> dict[str, Any]:
    has_regex = any("regex" in task.examples[i] for i in indices)
    metrics: dict[str, dict[str, list[float]]] = {"exact_match": {}, "contains": {}}
    if has_regex:
        metrics["regex"] = {}
    for template in templates:
        for values in metrics.values():
            values[template.name] = []
        if items is not None:
            items["answers"][template.name], items["correct"][template.name] = [], []
        for i in indices:
            ex = task.examples[i]
            ids = [prefix_token_id(lm), *_encode(lm.tokenizer, render_gen(task, i, template, num_fewshot, seed, shots))]
            text, _, _ = greedy_answer(lm, ids, max_new, task.stop)
            target = ex["target"].strip()
            metrics["exact_match"][template.name].append(float(text.strip() == target))
            if items is not None:
                items["answers"][template.name].append(text.strip())
                items["correct"][template.name].append(float(text.strip() == target))
            metrics["contains"][template.name].append(float(target in text))
            if has_regex:
                hit = "regex" in ex and re.search(ex["regex"], text) is not None
                metrics["regex"][template.name].append(float(hit))
    return {name: summarize(values, seed) for name, values in metrics.items()}
