"""Speculative decoding: cheap drafts, verified by the target model in one forward pass, losslessly.

Three drafters:
- :class:`DraftModel`: a smaller model with the same tokenizer proposes k tokens autoregressively.
- :func:`lookup_draft` ("prompt lookup"): the tokens that followed the latest earlier occurrence of the
  context's last n-gram (n = 3, 2, 1), found in the prompt and the generated text. Free, and good on
  repetitive output such as code.
- :class:`TokenRecycler` ("recycle", after Token Recycling, Luo et al. 2024): an adjacency matrix holds, for each
  token, the target's top-k next tokens the last time its logits after that token were seen (every verification
  pass writes the rows of the tokens it fed); a draft follows the most likely successor from the last token. Free,
  training-free, and it learns across requests. `draft` follows the matrix's single most likely path (a linear
  draft, verified as any other; any model). `draft_tree` expands a static tree template from the matrix (as the
  paper does): `widths[d]` children per node at depth d, verified in one forward with a tree attention mask
  (`Transformer.forward(tree=...)`, attention-only models with plain KV caches; greedy only) by
  :func:`accept_tree`, which keeps the longest root-to-leaf path of the target's own argmax choices.

:func:`verify` decides how many drafted tokens to keep. Greedy: keep drafted tokens while they equal the
target's argmax, then append the target's own choice, so the output equals plain greedy decoding token for
token. Sampling: standard speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023): keep
drafted token d with probability min(1, p(d) / q(d)); at the first rejection draw from the residual
max(p - q, 0) (normalised); if all are kept draw one more token from p. The output then follows the target
distribution p exactly. A lookup draft is a point mass (q(d) = 1), so d is kept with probability p(d)
and the residual is p without d.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from slmkit.infer.sampling import SamplingParams, apply_penalties, probabilities


def lookup_draft(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n-gram of `tokens` (longest n first)."""
    arr = np.asarray(tokens)
    length = len(arr)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        pattern = arr[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # windows[i] = arr[i : i + n]
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size == 0:
            continue
        full = hits[hits + n + k <= length]
        start = int(full[-1] if full.size else hits[0]) + n  # the latest match with a full continuation
        return arr[start : start + k].tolist()
    return []


# rounds of speculation timed before `SpeculationClock` judges them against plain decoding
MIN_ROUNDS_TO_TIME = 8


class SpeculationClock:
    """Whether speculation is faster than plain decoding, measured: tokens per second of the speculative rounds
    (drafting and verification timed together) against the rate of the timed plain steps (`plain`, the engine's
    list, which grows while it runs: the calibration steps, then every step that had nothing to draft). Judged
    after MIN_ROUNDS_TO_TIME rounds; `min_speedup` 0 never judges."""

    def __init__(self, plain: list[float], min_speedup: float) -> None:
        self.plain, self.min_speedup = plain, min_speedup
        self.rounds, self.tokens, self.seconds = 0, 0, 0.0

    def round(self, started: float, tokens: int) -> None:
        """One round that began at perf_counter() `started` and produced `tokens` tokens."""
        self.rounds += 1
        self.tokens += tokens
        self.seconds += time.perf_counter() - started

    def speedup(self) -> float:
        """Speculative tokens/s over plain tokens/s (the median plain step); 1.0 before anything is timed."""
        if not self.plain or not self.seconds:
            return 1.0
        return self.tokens / self.seconds * statistics.median(self.plain)

    def pays(self) -> bool:
        return self.min_speedup <= 0 or self.rounds < MIN_ROUNDS_TO_TIME or self.speedup() >= self.min_speedup

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens in {self.rounds} rounds took {self.seconds * 1e3:.1f} ms, "
            f"{self.speedup():.2f}x the rate of plain steps (median {statistics.median(self.plain) * 1e3:.2f} ms); "
            f"below the minimum {self.min_speedup:g}x"
        )


class TokenRecycler:
    """The adjacency matrix of Token Recycling: row t holds the `top_k` tokens the target ranked highest after t
    (most likely first; -1: never seen). Shared by every sequence it drafts for (the engine keeps one per model, the
    batcher one for its rows), so what one request taught drafts for the next."""

    def __init__(self, vocab_size: int, top_k: int = 8) -> None:
        if not (1 <= top_k <= 64):
            raise ValueError(f"top_k must be in [1, 64], got {top_k}")
        self.vocab_size, self.top_k = vocab_size, top_k
        self.successors = np.full((vocab_size, top_k), -1, dtype=np.int64)  # (V, k)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, widths: list[int] | None = None) -> None:
        """Learn from one forward pass: tokens (n, w) fed, logits (n, w, V) after each; row i's first widths[i]
        positions are real (None: all). Every fed token's row becomes the top-k of the logits after it."""
        n, w = tokens.shape[:2]
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.cpu().numpy()  # (n, w, k)
        fed = tokens.cpu().numpy()
        if widths is None:
            rows, cols = fed.reshape(-1), top.reshape(n * w, -1)
        else:
            keep = np.arange(w)[None, :] < np.asarray(widths)[:, None]  # (n, w)
            rows, cols = fed[keep], top[keep]
        self.successors[rows, : cols.shape[1]] = cols  # a token fed twice: the later position's successors stay

    def draft(self, last: int, k: int) -> list[int]:
        """Up to k tokens: from `last`, the most likely successor of each token in turn (stops at an unseen one)."""
        out: list[int] = []
        token = last
        for _ in range(k):
            token = int(self.successors[token, 0])
            if token < 0:
                break
            out.append(token)
        return out

    def draft_tree(self, last: int, widths: Sequence[int]) -> tuple[list[int], list[int]]:
        """A draft tree below `last` (the root, node 0): its nodes' tokens and parents (the root's: -1), breadth
        first; a node at depth d gets the top widths[d] successors of its token as children (unseen ones skipped)."""
        tokens, parents = [last], [-1]
        level = [0]
        for width in widths:
            next_level: list[int] = []
            for node in level:
                for token in self.successors[tokens[node], :width].tolist():
                    if token < 0:
                        break
                    tokens.append(int(token))
                    parents.append(node)
                    next_level.append(len(tokens) - 1)
            if not next_level:
                break
            level = next_level
        return tokens, parents

    @property
    def known(self) -> int:
        """Tokens whose successors have been seen."""
        return int((self.successors[:, 0] >= 0).sum())


def parse_tree_widths(text: str | Sequence[int]) -> list[int]:
    """Tree template widths from "4,2,1" (children per node at each depth); ValueError when malformed."""
    if isinstance(text, str):
        try:
            widths = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"tree widths must be comma-separated integers such as 4,2,2,1, got {text!r}") from None
    else:
        widths = [int(w) for w in text]
    if not (1 <= len(widths) <= 16) or not all(1 <= w <= 8 for w in widths):
        raise ValueError(f"tree widths: 1 to 16 depths of 1 to 8 children each, got {text!r}")
    nodes, level = 0, 1
    for w in widths:
        level *= w
        nodes += level
    if nodes > MAX_TREE_NODES:
        raise ValueError(f"tree widths {text!r} make {nodes} draft nodes; at most {MAX_TREE_NODES}")
    return widths


MAX_TREE_NODES = 256
DEFAULT_TREE_WIDTHS = (4, 2, 1, 1, 1, 1)  # speculate="tree": children per node at each depth (44 nodes, 6 deep)


def tree_mask(parents: list[int], device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool: [i, j] True when node j is node i or one of its ancestors (parents: -1 for the root, a parent
    before its children)."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask.to(device) if device is not None else mask


def accept_tree(target: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """Greedy verification of a draft tree: target[i] is the model's argmax after node i (its ancestors and itself).
    Walk from the root, each time to the child whose token is the target's choice. Returns the accepted nodes (the
    path below the root) and the tokens to append: the accepted nodes' tokens, then the target's choice after the
    last one, exactly what plain greedy decoding would append."""
    children: dict[int, dict[int, int]] = {}
    for i, parent in enumerate(parents):
        if parent >= 0:
            children.setdefault(parent, {}).setdefault(tokens[i], i)
    path: list[int] = []
    node = 0
    while (child := children.get(node, {}).get(target[node])) is not None:
        path.append(child)
        node = child
    return path, [tokens[i] for i in path] + [target[node]]


class DraftModel:
    """A small model that drafts tokens over its own state, kept in step with the accepted text."""

    def __init__(self, model: torch.nn.Module, max_len: int, sampling: SamplingParams) -> None:
        self.model = model
        self.state = model.new_state(1, max_len)
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.pos = 0  # the draft state holds tokens[:pos]

    def rewind(self, pos: int) -> None:
        """Forget positions from `pos` on (they held rejected tokens)."""
        if pos < self.pos:
            self.state.crop(0, pos)
            self.pos = pos

    def propose(
        self,
        tokens: list[int],
        k: int,
        generator: torch.Generator | None,
        counts: torch.Tensor | None,
        seen: torch.Tensor | None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after `tokens`, and their draft distributions (k, V) when sampling."""
        n = len(tokens)
        feed = torch.tensor([tokens[self.pos : n]], device=self.device)
        pos = torch.arange(self.pos, n, device=self.device)
        logits = self.model(feed, state=self.state, pos=pos, upto=n, last_only=True)[:, -1]
        self.pos = n
        counts = counts.clone() if counts is not None else None
        seen = seen.clone() if seen is not None else None
        draft: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            scores = apply_penalties(logits.float(), self.sampling, counts, seen)
            if self.sampling.greedy:
                token = int(scores.argmax(-1)[0])
            else:
                q = probabilities(scores, self.sampling)  # (1, V)
                token = int(torch.multinomial(q, 1, generator=generator)[0, 0])
                probs.append(q[0])
            draft.append(token)
            if counts is not None and seen is not None:
                counts[0, token] += 1
                seen[0, token] = True
            if i < k - 1:
                cur = torch.tensor([[token]], device=self.device)
                slot = torch.tensor([self.pos], device=self.device)
                logits = self.model(cur, state=self.state, pos=slot, upto=self.pos + 1)[:, -1]
                self.pos += 1
        return draft, torch.stack(probs) if probs else None


def _penalised_rows(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingParams,
    counts: torch.Tensor | None,
    seen: torch.Tensor | None,
) -> torch.Tensor:
    """Penalties for rows (m+1, V): row j sees the output so far plus draft[:j]."""
    if counts is None or seen is None:
        return logits.float()
    m = len(draft)
    onehot = torch.zeros(m + 1, logits.size(-1), device=logits.device)
    if m:
        rows = torch.arange(1, m + 1, device=logits.device)
        onehot[rows, torch.tensor(draft, device=logits.device)] = 1.0
    cumulative = onehot.cumsum(0)
    return apply_penalties(logits.float(), sampling, counts + cumulative, seen | (cumulative > 0))


def verify(
    logits: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    counts: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> tuple[list[int], int]:
    """Tokens to append (accepted drafts + one from the target) and how many drafts were accepted.

    logits (m+1, V): the target's logits after each draft prefix; draft_probs (m, V): the draft's
    distributions, or None for a point-mass draft (prompt lookup, or a greedy draft model under greedy).
    """
    m = len(draft)
    scores = _penalised_rows(logits, draft, sampling, counts, seen)
    if sampling.greedy:
        target = scores.argmax(-1).tolist()
        for j in range(m):
            if target[j] != draft[j]:
                return draft[:j] + [target[j]], j
        return draft + [target[m]], m
    probs = probabilities(scores, sampling)  # (m+1, V)
    draft_t = torch.tensor(draft, dtype=torch.long, device=logits.device)  # (an empty draft: still indices)
    p_draft = probs[torch.arange(m, device=logits.device), draft_t]  # (m,)
    q_draft = draft_probs[torch.arange(m, device=logits.device), draft_t] if draft_probs is not None else None
    uniforms = torch.rand(m, generator=generator, device=logits.device)
    # accept d_j iff u_j * q(d_j) < p(d_j), i.e. with probability min(1, p/q)
    keep = (uniforms * q_draft < p_draft) if q_draft is not None else (uniforms < p_draft)
    keep_list = keep.tolist()
    for j in range(m):
        if not keep_list[j]:
            if draft_probs is not None:
                residual = (probs[j] - draft_probs[j]).clamp(min=0)
            else:
                residual = probs[j].clone()
                residual[draft[j]] = 0.0
            if float(residual.sum()) <= 0:  # p == q (or p is the point mass): the residual is p itself
                residual = probs[j]
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator)[0])
            return draft[:j] + [token], j
    bonus = int(torch.multinomial(probs[m], 1, generator=generator)[0])
    return draft + [bonus], m
