"""Turning logits into the next token.

Order of processing (as in llama.cpp and vLLM): repetition / frequency / presence penalties on the raw
logits, then temperature, then top-k, top-p (nucleus) and min-p filtering, then sampling. Greedy
(temperature 0) takes the argmax of the penalised logits.

Every function works on a batch: logits (B, V). Nothing here calls ``.item()``, so sampling does not
synchronise a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slmkit.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # keep tokens with p >= min_p * p(most likely token)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL / HF rule)
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the output (OpenAI rule)
    presence_penalty: float = 0.0  # subtracted once if the token occurred in the output (OpenAI rule)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise UserError(f"min-p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise UserError(f"repetition penalty must be a positive number (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (-2 <= value <= 2):
                raise UserError(f"{name.replace('_', ' ')} must be in [-2, 2] (0 = off), got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """Penalise logits (B, V) given output token counts (B, V) and a mask of tokens seen in prompt or output.

    Repetition penalty divides positive logits and multiplies negative ones (so it always lowers them);
    frequency and presence penalties subtract ``f * count + p * (count > 0)`` (OpenAI's definition).
    """
    if not params.has_penalties:
        return logits
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def penalty_state(prompts: list[list[int]], vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence state for `apply_penalties`: output token counts (B, V) at zero, and (B, V) marks of the tokens
    seen so far (the prompt's)."""
    counts = torch.zeros(len(prompts), vocab_size, device=device)
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        seen[i, torch.tensor(prompt, device=device)] = True
    return counts, seen


def filter_logits(
    logits: torch.Tensor, top_k: int | None, top_p: float | None, min_p: float | None = None
) -> torch.Tensor:
    """Set logits outside the top-k / top-p / min-p set to -inf. logits: (B, V), already temperature-scaled."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (B, V) that sampling draws from (temperature > 0), after filtering."""
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p, params.min_p)
    return scaled.softmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from (already penalised and masked) logits (B, V)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
