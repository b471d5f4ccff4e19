"""Cascades: the first model answers; when it is not confident enough, the next one answers instead.

    from slmkit.serve.cascade import cascade
    answer = cascade({"small": "runs/small", "large": "runs/large"}, "def fib(n):", threshold=-1.0)
    print(answer.model, answer.text, [(s.model, s.confidence) for s in answer.chain])

A model's confidence in its answer is the mean log-probability of the tokens it generated (under its raw logits,
before temperature or penalties; the end-of-text token is not counted). The answer is kept when its confidence is
at least the threshold, else the next model answers; the last model's answer is final. An answer without tokens
has no confidence (None) and is passed on, except at threshold -inf, which keeps every first answer. So a
threshold of -inf reproduces the first model alone and +inf the last one alone.

The server's virtual ``router`` model (`slm serve --model small=DIR --model large=DIR`) decides with the same
`confidence` and `accepts`; `cascade` here is the same decision without a server (one prompt at a time, on
`slmkit.infer.engine.Engine`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import UserError

# mean token log-probability below which an answer is passed on: a geometric-mean token probability of e^-1 (0.37)
DEFAULT_CASCADE_THRESHOLD = -1.0


def confidence(logprobs: Iterable[float]) -> float | None:
    """The mean of the generated tokens' log-probabilities; None when there are none."""
    values = list(logprobs)
    return math.fsum(values) / len(values) if values else None


def accepts(value: float | None, threshold: float) -> bool:
    """Whether an answer of confidence `value` is kept at `threshold` (-inf keeps every answer, +inf none)."""
    if threshold == -math.inf:
        return True
    return value is not None and value >= threshold


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or math.isnan(threshold):
        raise UserError(f"the cascade threshold must be a number (a mean token log-probability), got {threshold!r}")
    return float(threshold)


@dataclass
class RouteStep:
    """One model a request went through: its confidence in its answer and whether that answer was kept."""

    model: str
    confidence: float | None
    accepted: bool
    completion_tokens: int | None = 0  # None: not known yet (a final answer being streamed)

    def to_dict(self) -> dict[str, Any]:
        value = None if self.confidence is None else round(self.confidence, 6)
        return {
            "model": self.model,
            "confidence": value,
            "accepted": self.accepted,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class CascadeAnswer:
    """The kept answer (`model` answered it: the first model whose answer was accepted, or the last one) and the
    chain of models that were called."""

    text: str
    model: str
    chain: list[RouteStep] = field(default_factory=list)
    completion: Any = None  # the answering model's `slmkit.infer.engine.Completion`

    @property
    def strong(self) -> bool:
        """Whether a model past the first one was called."""
        return len(self.chain) > 1


def strong_share(answers: Sequence[CascadeAnswer]) -> float:
    """The share of answers that called a model past the first one (RouteLLM's "strong calls")."""
    if not answers:
        raise UserError("no answers to count")
    return sum(a.strong for a in answers) / len(answers)


def _engine(model: Any) -> Any:
    from slmkit.infer.engine import Engine

    if isinstance(model, Engine):
        return model
    if hasattr(model, "model") and hasattr(model, "tokenizer"):  # a LoadedModel
        return Engine(model.model, model.tokenizer)
    if isinstance(model, str | Path):
        return Engine.load(model, device="cpu")
    raise UserError(f"a cascade model must be an Engine, a loaded model or a model dir, got {type(model).__name__}")


def cascade(
    models: Mapping[str, Any] | Sequence[tuple[str, Any]],
    prompt: str | Sequence[str],
    *,
    threshold: float = DEFAULT_CASCADE_THRESHOLD,
    max_new_tokens: int = 128,
    sampling: Any = None,
    stop: Sequence[str] = (),
) -> CascadeAnswer | list[CascadeAnswer]:
    """Answer `prompt` with the cascade of `models` ({name: Engine, LoadedModel or model dir}, first model first;
    at least two); a list of prompts gives a list of answers. sampling: `slmkit.infer.sampling.SamplingParams`
    (None: greedy). Models may have different tokenizers: each encodes the prompt itself."""
    pairs = list(models.items()) if isinstance(models, Mapping) else [tuple(p) for p in models]
    if len(pairs) < 2:
        raise UserError(f"a cascade needs two or more models, got {len(pairs)}")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"cascade model names must differ, got {names}")
    threshold = check_threshold(threshold)
    engines = [(name, _engine(model)) for name, model in pairs]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    answers = []
    for text in prompts:
        chain: list[RouteStep] = []
        for i, (name, engine) in enumerate(engines):
            [completion] = engine.generate(
                text, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, logprobs=True
            )
            value = confidence(completion.logprobs or [])
            final = i == len(engines) - 1
            kept = final or accepts(value, threshold)
            chain.append(RouteStep(name, value, kept, len(completion.token_ids)))
            if kept:
                answers.append(CascadeAnswer(completion.text, name, chain, completion))
                break
    return answers[0] if isinstance(prompt, str) else answers
