"""Token-level routing (R2R-style): the small model generates; where it is unsure the large model picks the token.

Greedy. At each step the small model proposes its argmax; when its top-token probability is below `threshold`
the token is taken from the large model's argmax at that position instead. The large model keeps a KV cache of
the accepted text that lags behind: when it is asked, it first reads, in one forward pass (a chunk), every token
accepted since it was last asked, and its logits at the last of them give its choice. Neither model ever has to
go back (the small model has not read the replaced token yet), so no cache is rewound.

- threshold 0: the small model's greedy output, exactly (the large model never runs);
- threshold above 1: the large model's greedy output, exactly (it picks every token);
- in between: the large model runs only at the unsure positions, reading the small model's tokens in chunks.

Both models must share the tokenizer (the same token ids mean the same text): a :class:`UserError` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slmkit.errors import UserError


@dataclass
class TokenRouteStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_from_large: int = 0
    small_forwards: int = 0
    large_forwards: int = 0
    large_tokens_read: int = 0  # prompt + accepted tokens the large model read (its prefill and catch-up chunks)
    seconds: float = 0.0
    stop_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def large_share(self) -> float:
        return self.tokens_from_large / self.new_tokens if self.new_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_ids")
        return {**out, "tokens_per_second": self.tokens_per_second, "large_share": self.large_share}


def check_same_tokenizer(small: Any, large: Any) -> None:
    """UserError unless two LoadedModels share a tokenizer (vocabulary, size and end-of-text id)."""
    small_vocab, large_vocab = small.tokenizer.get_vocab(), large.tokenizer.get_vocab()
    if (
        small_vocab != large_vocab
        or small.config.vocab_size != large.config.vocab_size
        or small.config.eos_token_id != large.config.eos_token_id
    ):
        raise UserError(
            f"token-level routing needs one tokenizer for both models: {small.directory} and {large.directory} have "
            f"different ones ({len(small_vocab)} vs {len(large_vocab)} tokens"
            f"{', other token ids' if len(small_vocab) == len(large_vocab) else ''}); use models trained on the same "
            "tokenizer, or route whole prompts (a cascade or `slm route train`), which works across tokenizers"
        )


def token_route_ids(
    small: Any,
    large: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    threshold: float,
    stop_ids: set[int] | None = None,
    stats: TokenRouteStats | None = None,
) -> list[int]:
    """New token ids (batch 1, greedy) of `small` with unsure tokens from `large` (torch modules with slmkit's
    forward/new_state interface); stops at a stop id (not returned) or `max_new_tokens`."""
    import torch

    stats = stats if stats is not None else TokenRouteStats()
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text")
    if max_new_tokens < 0:
        raise UserError(f"max new tokens must be >= 0, got {max_new_tokens}")
    if threshold < 0:
        raise UserError(f"the token routing threshold must be >= 0, got {threshold}")
    total = len(prompt_ids) + max_new_tokens
    context = min(small.config.max_seq_len, large.config.max_seq_len)
    if total > context:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) = {total} exceeds the smaller "
            f"context of the two models ({context} tokens); shorten the prompt or lower --max-new-tokens"
        )
    stop_ids = stop_ids or set()
    tokens = list(prompt_ids)
    stats.prompt_tokens = len(tokens)
    start = time.perf_counter()
    small_device = next(small.parameters()).device
    large_device = next(large.parameters()).device
    with torch.inference_mode():
        small_state = small.new_state(1, total)
        large_state = large.new_state(1, total)
        large_pos = 0  # the large model's cache holds tokens[:large_pos]
        n = len(tokens)
        feed = torch.tensor([tokens], device=small_device)
        logits = small(feed, state=small_state, pos=torch.arange(n, device=small_device), upto=n, last_only=True)
        stats.small_forwards += 1
        stats.stop_reason = "length"
        for step in range(max_new_tokens):
            probs = torch.softmax(logits[0, -1].float(), dim=-1)
            top_probability, top = probs.max(-1)
            token = int(top)
            if float(top_probability) < threshold:
                n = len(tokens)
                chunk = torch.tensor([tokens[large_pos:n]], device=large_device)
                positions = torch.arange(large_pos, n, device=large_device)
                large_logits = large(chunk, state=large_state, pos=positions, upto=n, last_only=True)
                stats.large_forwards += 1
                stats.large_tokens_read += n - large_pos
                large_pos = n
                token = int(large_logits[0, -1].argmax())
                stats.tokens_from_large += 1
            if token in stop_ids:
                stats.stop_reason = "stop"
                break
            tokens.append(token)
            stats.new_tokens += 1
            if step < max_new_tokens - 1:
                n = len(tokens)
                cur = torch.tensor([[token]], device=small_device)
                slot = torch.tensor([n - 1], device=small_device)
                logits = small(cur, state=small_state, pos=slot, upto=n)
                stats.small_forwards += 1
    stats.seconds = time.perf_counter() - start
    stats.token_ids = tokens[len(prompt_ids) :]
    return stats.token_ids


def token_route_text(
    small: Any,
    large: Any,
    prompt: str,
    max_new_tokens: int = 64,
    threshold: float = 0.5,
    stats: TokenRouteStats | None = None,
) -> str:
    """The continuation of `prompt` (text) by token-level routing between two LoadedModels with one tokenizer."""
    check_same_tokenizer(small, large)
    if not prompt:
        raise UserError("empty prompt: give some text with --prompt")
    ids = small.tokenizer.encode(prompt).ids
    eos = small.config.eos_token_id
    out = token_route_ids(
        small.model, large.model, ids, max_new_tokens, threshold, {eos} if eos is not None else None, stats
    )
    return small.tokenizer.decode(out)


def compare_with_large(
    small: Any,
    large: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    threshold: float,
) -> dict[str, Any]:
    """Token routing vs the large model alone (greedy, same prompts, one run): speed and agreement.

    The large model alone runs on slmkit's own decode path (`slmkit.infer.generate.generate_ids`), not through the
    routing loop. Agreement: the share of the large model's tokens that the routed text repeats before the first
    difference; and the mean log-probability the large model gives the routed text and its own."""
    import torch

    from slmkit.infer.generate import GenerationStats, generate_ids

    check_same_tokenizer(small, large)
    eos = small.config.eos_token_id
    stop = {eos} if eos is not None else None
    routed_seconds = large_seconds = 0.0
    routed_tokens = large_tokens = 0
    totals = TokenRouteStats()
    same_prefix, compared, routed_logprob, large_logprob = 0, 0, 0.0, 0.0
    for prompt in prompts:
        ids = small.tokenizer.encode(prompt).ids
        stats = TokenRouteStats()
        routed = token_route_ids(small.model, large.model, ids, max_new_tokens, threshold, stop, stats)
        routed_seconds += stats.seconds
        routed_tokens += stats.new_tokens
        for key in ("new_tokens", "tokens_from_large", "small_forwards", "large_forwards", "large_tokens_read"):
            setattr(totals, key, getattr(totals, key) + getattr(stats, key))
        start = time.perf_counter()
        alone = list(generate_ids(large.model, ids, max_new_tokens, stop_ids=stop, stats=GenerationStats()))
        large_seconds += time.perf_counter() - start
        large_tokens += len(alone)
        agree = 0
        for a, b in zip(routed, alone, strict=False):
            if a != b:
                break
            agree += 1
        same_prefix += agree
        compared += max(len(alone), 1)
        with torch.inference_mode():
            for seq, acc in ((routed, "routed"), (alone, "large")):
                if not seq:
                    continue
                x = torch.tensor([ids + seq])
                lp = torch.log_softmax(large.model(x)[0, len(ids) - 1 : -1].float(), -1)
                mean = float(lp.gather(1, torch.tensor(seq)[:, None]).mean())
                if acc == "routed":
                    routed_logprob += mean
                else:
                    large_logprob += mean
    totals.seconds = routed_seconds
    routed_rate = routed_tokens / routed_seconds if routed_seconds > 0 else 0.0
    large_rate = large_tokens / large_seconds if large_seconds > 0 else 0.0
    return {
        "threshold": threshold,
        "prompts": len(prompts),
        "routed": totals.to_dict(),
        "large_alone": {"new_tokens": large_tokens, "seconds": large_seconds, "tokens_per_second": large_rate},
        "speedup": routed_rate / large_rate if large_rate > 0 else None,
        "same_as_large_prefix_share": same_prefix / compared if compared else None,
        "large_mean_logprob": {
            "routed_text": routed_logprob / len(prompts),
            "large_text": large_logprob / len(prompts),
        },
    }


def routed_next_token_accuracy(
    small: Any, large: Any, windows: Sequence[Sequence[int]], thresholds: Sequence[float]
) -> dict[str, Any]:
    """Teacher-forced quality of token routing on real text: at every position of every window (token ids), the
    routed prediction is the small model's argmax where its top probability is >= threshold, else the large
    model's; accuracy = the share of positions whose prediction is the true next token. Returns the accuracy of
    the small and the large model alone and, per threshold, the routed accuracy and the share of positions sent
    to the large model (what greedy generation at that threshold would send, had it written this text)."""
    import torch

    small_hits, large_hits, positions = 0, 0, 0
    routed_hits = [0] * len(thresholds)
    routed_large = [0] * len(thresholds)
    with torch.inference_mode():
        for window in windows:
            x = torch.tensor([list(window)])
            targets = x[0, 1:]
            small_probs = torch.softmax(small(x)[0, :-1].float(), -1)
            small_top, small_pick = small_probs.max(-1)
            large_pick = large(x)[0, :-1].argmax(-1)
            small_hits += int((small_pick == targets).sum())
            large_hits += int((large_pick == targets).sum())
            positions += targets.numel()
            for i, t in enumerate(thresholds):
                to_large = small_top < t
                pick = torch.where(to_large, large_pick, small_pick)
                routed_hits[i] += int((pick == targets).sum())
                routed_large[i] += int(to_large.sum())
    if positions == 0:
        raise UserError("no text to score token routing on (windows of at least 2 tokens are needed)")
    return {
        "positions": positions,
        "small_accuracy": small_hits / positions,
        "large_accuracy": large_hits / positions,
        "thresholds": [
            {"threshold": t, "accuracy": h / positions, "large_share": n / positions}
            for t, h, n in zip(thresholds, routed_hits, routed_large, strict=True)
        ],
    }
