"""Batch-1 generation in a few lines, over the one decode core (`slmkit.infer.core.DecodeCore`).

What the quickstart, the task evaluator, the lm-eval adapter, the efficiency probes and the planner use for a
quick continuation: the same prefill, decode step, single-thread policy and stop rules as the engine and the
server, without the engine's options. For batches, speculation, constraints or compilation use
`slmkit.infer.engine.Engine`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.infer.core import DecodeCore, GenerationRequest, TextStream
from slmkit.infer.sampling import SamplingParams


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


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
    kv_cache: Any = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1). Stops at a stop id (not yielded) or the limit. kv_cache: a
    `KVCacheSpec` (a bounded one lets prompt + new tokens exceed the context)."""
    sampling = sampling or SamplingParams()
    stats = stats if stats is not None else GenerationStats()
    config = model.config
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text")
    if max_new_tokens < 0:
        raise UserError(f"max new tokens must be >= 0, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > config.max_seq_len and not (kv_cache is not None and kv_cache.bounded):
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {config.max_seq_len} tokens; shorten the prompt or "
            "lower --max-new-tokens"
        )
    stats.prompt_tokens = len(prompt_ids)
    if max_new_tokens == 0:
        stats.stop_reason = "length"
        return
    yield from _decode(model, prompt_ids, max_new_tokens, sampling, stop_ids or set(), stats, kv_cache)


def _decode(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_ids: set[int],
    stats: GenerationStats,
    kv_cache: Any = None,
) -> Iterator[int]:
    core = DecodeCore(model, None, max_batch=1, max_len=len(prompt_ids) + max_new_tokens, kv_cache=kv_cache)
    # the caller's stop ids decide the end, so EOS is an ordinary token to the core
    seq = core.admit(GenerationRequest(list(prompt_ids), max_new_tokens, sampling, detokenize=False, ignore_eos=True))
    while not seq.finished:
        with torch.inference_mode():
            [out] = core.step()
        stats.prefill_seconds, stats.decode_seconds = core.stats.prefill_seconds, core.stats.decode_seconds
        assert out.token is not None
        if out.token in stop_ids:
            stats.stop_reason = "stop"
            return
        stats.new_tokens += 1
        stats.token_ids.append(out.token)
        yield out.token
    stats.stop_reason = "length"


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

    A delta never ends inside a UTF-8 character (byte-level BPE tokens can split one) nor inside what may be the
    start of a stop string. Generation ends at the EOS token, a stop string (not included), or `max_new_tokens`.
    """
    if not prompt:
        raise UserError("empty prompt: give some text with --prompt")
    prompt_ids = tokenizer.encode(prompt).ids
    eos = model.config.eos_token_id
    text = TextStream(tokenizer, stop or [])
    for token in generate_ids(
        model, prompt_ids, max_new_tokens, sampling, stop_ids={eos} if eos is not None else None, stats=stats
    ):
        delta = text.push(token)
        if delta:
            yield delta
        if text.stopped:
            if stats is not None:
                stats.stop_reason = "stop"
            return
    tail = text.flush()
    if tail:
        yield tail


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
