"""A deliberately minimal batch-1 decoder: one prefill step, then one decode step per token over a KV cache.

It is the reference the engine is tested against (and what the quickstart, the efficiency probe and the
planner use for a quick greedy continuation): no batching, padding, speculation or compilation, so there is
little in it to get wrong. For anything else use `slmkit.infer.engine.Engine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from slmkit.errors import UserError
from slmkit.infer.sampling import SamplingParams, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes from prefill; the rest from decode steps
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1). Stops at a stop id (not yielded) or the limit."""
    sampling = sampling or SamplingParams()
    stats = stats if stats is not None else GenerationStats()
    config = model.config
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text")
    if max_new_tokens < 0:
        raise UserError(f"max new tokens must be >= 0, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > config.max_seq_len:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {config.max_seq_len} tokens; shorten the prompt or "
            "lower --max-new-tokens"
        )
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stats.prompt_tokens = len(prompt_ids)
    if max_new_tokens == 0:
        stats.stop_reason = "length"
        return
    cache = model.new_cache(1, max_slots=total)
    start = time.perf_counter()
    idx = torch.tensor([prompt_ids], device=device)
    pos = torch.arange(len(prompt_ids), device=device)
    logits = model(idx, cache=cache, cache_pos=pos, last_only=True)[:, -1]
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    position = len(prompt_ids)
    for i in range(max_new_tokens):
        token = int(sample(logits, sampling, generator)[0])
        if stop_ids and token in stop_ids:
            stats.stop_reason = "stop"
            break
        stats.new_tokens += 1
        stats.token_ids.append(token)
        yield token
        if i == max_new_tokens - 1:
            stats.stop_reason = "length"
            break
        cur = torch.tensor([[token]], device=device)
        logits = model(cur, cache=cache, cache_pos=torch.tensor([position], device=device), upto=position + 1)[:, -1]
        position += 1
    stats.decode_seconds = time.perf_counter() - start


def stream_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield text deltas of the continuation of `prompt`.

    A delta never ends inside a UTF-8 character (byte-level BPE tokens can split one): text is held back
    while its decoding ends in U+FFFD. Generation ends at the EOS token, a stop string (not included), or
    `max_new_tokens`.
    """
    if not prompt:
        raise UserError("empty prompt: give some text with --prompt")
    prompt_ids = tokenizer.encode(prompt).ids
    eos = model.config.eos_token_id
    stop = [s for s in (stop or []) if s]
    ids: list[int] = []
    emitted = ""
    for token in generate_ids(
        model, prompt_ids, max_new_tokens, sampling, stop_ids={eos} if eos is not None else None, stats=stats
    ):
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        cut = _first_stop(text, stop)
        if cut is not None:
            if cut > len(emitted):
                yield text[len(emitted) : cut]
            if stats is not None:
                stats.stop_reason = "stop"
            return
        # hold back a tail that could be the start of a stop string
        safe = len(text) - _partial_stop_len(text, stop)
        if safe > len(emitted):
            yield text[len(emitted) : safe]
            emitted = text[:safe]
    text = tokenizer.decode(ids)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
) -> str:
    """The continuation of `prompt` as one string."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, sampling, stop))
