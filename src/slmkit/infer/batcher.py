"""Continuous batching: requests join and leave one running batch at every decode step.

    from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
    batcher = ContinuousBatcher(model, tokenizer, max_batch=32)
    seq = batcher.submit(GenerationRequest(prompt_ids, max_new_tokens=64))
    while batcher.has_work:
        for out in batcher.step():     # at most one new token per running sequence
            print(out.seq is seq, out.text, out.finished)

One static KV cache of ``max_batch`` rows holds the running sequences, one row each. The running rows are kept
packed at the front of the cache (rows ``0 .. n-1``): when a sequence leaves, the last row's keys and values move
into its place, so every forward pass runs over exactly the ``n`` running rows (a view of the cache), never over
idle ones. Rows hold sequences at different lengths: a decode step feeds every row its own token at its own slot
(per-row cache positions), and each row attends only to its own slots up to its query, so stale keys a previous
occupant left beyond that are never seen.

Each :meth:`ContinuousBatcher.step`:

1. admits waiting requests into free rows (first come, first served);
2. prefills admitted prompts, at most ``prefill_chunk`` prompt tokens per step in all, so a long prompt is spread
   over several steps and never stalls the running streams for more than one chunk; a prompt whose last chunk is
   in samples its first token;
3. runs one decode step over all rows: each row that has a sampled token feeds it (rows still prefilling feed a
   placeholder at their next free slot, which their next chunk overwrites; their logits are ignored);
4. samples per row with the row's own `SamplingParams`, penalties, grammar mask and ``torch.Generator`` (a seeded
   request gives the same tokens whatever else shares the batch), then applies EOS, stop strings and
   ``max_new_tokens``; finished and cancelled rows free their slots.

Greedy output equals `Engine.generate` of the prompt alone (tests/serve/test_batcher.py checks it with requests joining
at different steps).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.infer.engine import _TextStream, _Threads, finish_reason, single_threaded
from slmkit.infer.sampling import SamplingParams, apply_penalties, penalty_state, sample

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. ``constraint``: a grammar from `slmkit.infer.constrained.compile_constraint`."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    constraint: Any = None
    logprobs: bool = False  # log p(token) of every chosen token (raw logits, before sampling settings)
    top_logprobs: int = 0  # and the k most likely tokens at each step (needs logprobs)
    tag: Any = None  # the caller's, untouched (the server keeps its job here)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first; empty unless top_logprobs > 0


@dataclass
class StepOutput:
    """What one step did for one sequence: a new token (None when the sequence ended on EOS) and its text."""

    seq: GenerationSequence
    token: int | None
    text: str  # new text (may be empty: held back to not split a character or a stop string)
    logprob: TokenLogprob | None
    finished: bool


class GenerationSequence:
    """A submitted request's state: its output so far and, once finished, its finish reason."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, device: torch.device, vocab_size: int) -> None:
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finished = False
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled"
        self.text = _TextStream(tokenizer, list(request.stop))
        self.grammar = None
        if request.constraint is not None:
            from slmkit.infer.constrained import GrammarState

            self.grammar = GrammarState(request.constraint, vocab_size)
        self.generator: torch.Generator | None = None
        if request.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.sampling.seed)
        self.counts: torch.Tensor | None = None  # (1, V) output token counts, with penalties only
        self.seen: torch.Tensor | None = None  # (1, V) tokens in prompt or output, with penalties only
        # place in the cache
        self.row = -1
        self.prefilled = 0  # prompt tokens in the cache
        self.length = 0  # slots filled in the cache row
        self.pending: int | None = None  # the last sampled token, fed at slot `length` by the next decode step
        self.submitted_at = time.perf_counter()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def output_text(self) -> str:
        """The text so far (cut before a stop string)."""
        return self.text.emitted

    def __repr__(self) -> str:
        return f"GenerationSequence(row={self.row}, prompt={len(self.prompt)}, out={len(self.out)})"


@dataclass
class BatcherStats:
    steps: int = 0
    decode_forwards: int = 0
    prefill_tokens: int = 0
    new_tokens: int = 0
    last_batch_size: int = 0  # sequences in the last decode step
    step_batch_size: int = 0  # sequences decoded by the latest step (0: it only prefilled)


class ContinuousBatcher:
    """A slot-based running batch over one static KV cache (see the module docstring). Not thread-safe: one
    thread (the server's worker) owns it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if max_batch < 1:
            raise UserError(f"max batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise UserError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        context = self.config.max_seq_len
        if max_seq_len is not None and not (1 < max_seq_len <= context):
            raise UserError(f"max sequence length must be in 2..{context} (the model's context), got {max_seq_len}")
        self.max_seq_len = max_seq_len or context
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        self.cache = model.new_cache(max_batch, self.max_seq_len)
        self._views: dict[tuple[int, int], Any] = {}
        self.rows: list[GenerationSequence] = []  # running sequences; rows[i] lives in cache row i
        self.waiting: deque[GenerationSequence] = deque()
        self.stats = BatcherStats()
        # small models step on one CPU thread, as the engine's decode steps do (see SINGLE_THREAD_PARAMS)
        self._threads = _Threads(1 if single_threaded(model) else None)

    # ---- queue ------------------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def submit(self, request: GenerationRequest) -> GenerationSequence:
        """Queue a request; it joins the running batch at the next step with a free row."""
        self.check(request)
        seq = GenerationSequence(request, self.tokenizer, self.device, self.config.vocab_size)
        self.waiting.append(seq)
        return seq

    def check(self, request: GenerationRequest) -> None:
        """UserError unless the request fits: a non-empty prompt, prompt + max new tokens within the cache."""
        n = len(request.prompt_ids)
        if n == 0:
            raise UserError("the prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.max_seq_len:
            raise UserError(
                f"prompt ({n} tokens) + max new tokens ({request.max_new_tokens}) exceeds the context of "
                f"{self.max_seq_len} tokens"
            )
        if not (0 <= request.top_logprobs <= MAX_TOP_LOGPROBS):
            raise UserError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.top_logprobs}")

    def cancel(self, seq: GenerationSequence) -> None:
        """Stop a sequence (waiting or running); its row is freed at once."""
        if seq.finished:
            return
        seq.finished, seq.finish_reason = True, "cancelled"
        if seq.row < 0:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release()

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationSequence]:
        """Generate every request to the end (more requests than rows wait for free rows)."""
        seqs = [self.submit(r) for r in requests]
        while self.has_work:
            self.step()
        return seqs

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit, prefill (one chunk budget), one decode step, sample; returns what each sequence got."""
        self.stats.steps += 1
        self.stats.step_batch_size = 0
        while self.waiting and len(self.rows) < self.max_batch:
            seq = self.waiting.popleft()
            seq.row = len(self.rows)
            seq.prefilled = seq.length = 0
            self.rows.append(seq)
        ready: list[tuple[GenerationSequence, torch.Tensor]] = []  # logits (V,) to sample from, per sequence
        with self._threads:
            self._prefill(ready)
            self._decode(ready)
        outputs = self._choose(ready) if ready else []
        self._release()
        return outputs

    def _view(self, start: int, stop: int) -> Any:
        """The cache rows [start, stop) as a cache of their own (views, so writes land in the big cache)."""
        key = (start, stop)
        if key not in self._views:
            self._views[key] = self.cache.rows(start, stop)
        return self._views[key]

    def _prefill(self, ready: list[tuple[GenerationSequence, torch.Tensor]]) -> None:
        budget = self.prefill_chunk
        for seq in self.rows:  # rows are in admission order except after a move; close enough to FIFO
            remaining = len(seq.prompt) - seq.prefilled
            if remaining == 0 or seq.finished:
                continue
            if budget <= 0:
                break
            take = min(remaining, budget)
            start = seq.prefilled
            tokens = torch.tensor([seq.prompt[start : start + take]], device=self.device)  # (1, T)
            logits = self.model(
                tokens,
                cache=self._view(seq.row, seq.row + 1),
                cache_pos=torch.arange(start, start + take, device=self.device),
                upto=start + take,
                last_only=True,
            )  # (1, 1, V)
            budget -= take
            seq.prefilled = seq.length = start + take
            self.stats.prefill_tokens += take
            if seq.prefilled == len(seq.prompt):
                ready.append((seq, logits[0, -1]))

    def _decode(self, ready: list[tuple[GenerationSequence, torch.Tensor]]) -> None:
        decoding = [s for s in self.rows if s.pending is not None and not s.finished]
        if not decoding:
            return
        n = len(self.rows)
        # a row without a token (still prefilling, or just prefilled) feeds a placeholder at its next free slot:
        # its own next write overwrites it, and no other row can see it
        tokens = [s.pending if s.pending is not None else 0 for s in self.rows]
        slots = [s.length for s in self.rows]
        logits = self.model(
            torch.tensor(tokens, device=self.device)[:, None],  # (n, 1)
            cache=self._view(0, n),
            cache_pos=torch.tensor(slots, device=self.device)[:, None],  # (n, 1): each row's own slot
            upto=max(slots) + 1,
        )[:, -1]  # (n, V)
        self.stats.decode_forwards += 1
        self.stats.last_batch_size = self.stats.step_batch_size = len(decoding)
        for seq in decoding:
            seq.length += 1
            seq.pending = None
            ready.append((seq, logits[seq.row]))

    def _choose(self, ready: list[tuple[GenerationSequence, torch.Tensor]]) -> list[StepOutput]:
        """Next token per ready sequence: penalties, grammar mask, then each row's own sampling."""
        seqs = [s for s, _ in ready]
        raw = torch.stack([row for _, row in ready]).float()  # (R, V)
        scores = raw.clone()
        for i, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.has_penalties:
                if seq.counts is None:
                    seq.counts, seq.seen = penalty_state([seq.prompt], self.config.vocab_size, self.device)
                scores[i : i + 1] = apply_penalties(raw[i : i + 1], params, seq.counts, seq.seen)
            if seq.grammar is not None:
                seq.grammar.mask_(scores[i])
        tokens = scores.argmax(-1)  # greedy rows; sampled rows are overwritten below
        groups: dict[SamplingParams, list[int]] = {}
        for i, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.greedy:
                continue
            if seq.generator is not None:  # its own random stream: sampled alone, as it would be alone
                tokens[i] = sample(scores[i : i + 1], params, seq.generator)[0]
            else:
                groups.setdefault(params, []).append(i)
        for params, idx in groups.items():
            index = torch.tensor(idx, device=self.device)
            tokens[index] = sample(scores[index], params, None)
        want = [i for i, s in enumerate(seqs) if s.request.logprobs]
        chosen_lp: list[float] = []
        top_ids: list[list[int]] = []
        top_lp: list[list[float]] = []
        if want:
            index = torch.tensor(want, device=self.device)
            logprobs = raw[index].log_softmax(-1)  # (W, V)
            chosen_lp = logprobs.gather(-1, tokens[index][:, None])[:, 0].tolist()
            k = max(seqs[i].request.top_logprobs for i in want)
            if k:
                top = logprobs.topk(min(k, logprobs.size(-1)), dim=-1)
                top_ids, top_lp = top.indices.tolist(), top.values.tolist()
        token_list = tokens.tolist()
        outputs = []
        lp_at = {i: j for j, i in enumerate(want)}
        for i, seq in enumerate(seqs):
            logprob = None
            if i in lp_at:
                j = lp_at[i]
                k = seq.request.top_logprobs
                top = list(zip(top_ids[j][:k], top_lp[j][:k], strict=True)) if k else []
                logprob = TokenLogprob(token_list[i], chosen_lp[j], top)
            outputs.append(self._emit(seq, token_list[i], logprob))
        return outputs

    def _emit(self, seq: GenerationSequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        """Append a chosen token to a sequence and decide whether it is finished (as `Engine._emit` does)."""
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if token == self.config.eos_token_id:
            seq.finished, seq.finish_reason = True, "stop"
            return StepOutput(seq, None, seq.text.flush(), None, True)
        seq.out.append(token)
        self.stats.new_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.counts is not None and seq.seen is not None:
            seq.counts[0, token] += 1
            seq.seen[0, token] = True
        text = seq.text.push(token)
        reason = finish_reason(seq.text, seq.grammar, len(seq.out), seq.request.max_new_tokens)
        if reason is not None:
            seq.finished, seq.finish_reason = True, reason
            text += seq.text.flush()
        else:
            seq.pending = token
        return StepOutput(seq, token, text, logprob, seq.finished)

    def _release(self) -> None:
        """Free the rows of finished sequences, moving the last rows into the holes (rows stay packed)."""
        done = sorted((s for s in self.rows if s.finished), key=lambda s: s.row, reverse=True)
        for seq in done:
            last = self.rows.pop()
            if last is not seq:
                n = last.length
                self.cache.k[:, seq.row, :, :n] = self.cache.k[:, last.row, :, :n]
                self.cache.v[:, seq.row, :, :n] = self.cache.v[:, last.row, :, :n]
                last.row = seq.row
                self.rows[seq.row] = last
            seq.row = -1
