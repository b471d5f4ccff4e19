"""Continuous batching: requests join and leave one running batch at every decode step.

    from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
    batcher = ContinuousBatcher(model, tokenizer, max_batch=32)
    seq = batcher.submit(GenerationRequest(prompt_ids, max_new_tokens=64))
    while batcher.has_work:
        for out in batcher.step():     # at most one new token per running sequence
            print(out.seq is seq, out.text, out.finished)

The batcher is a queue in front of the one decode core (`slmkit.infer.core.DecodeCore`): one model state of
``max_batch`` rows holds the running sequences, one row each, packed at the front (when a sequence leaves, the
last row's state moves into its place), so every eager forward pass runs over exactly the running rows. Rows hold
sequences at different lengths: a decode step feeds every row its own token at its own position. With
``compile=True`` (the default on CUDA) the decode step is compiled over all ``max_batch`` rows (CUDA graphs on a
GPU, the C++ wrapper on a CPU). With ``speculate="lookup"`` every step drafts from each row's own text (prompt
lookup) and verifies every row's draft in one pass (`DecodeCore.verify`): greedy output is unchanged.

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

With ``per_row_adapters=True`` the model carries LoRA adapters and each request picks one by index
(``GenerationRequest.adapter``, -1 or None: the base): requests for different adapters share the running batch, the
core selecting each row's adapter before every prefill and decode forward (see `slmkit.infer.core`); a request's
greedy output equals that of the model with only its adapter merged (tests/serve/test_serve_lora.py). The step then
runs eagerly (the compiled step selects no adapters); lookup speculation works as without adapters.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from slmkit.errors import UserError
from slmkit.infer.core import (
    MAX_TOP_LOGPROBS,
    DecodeCore,
    GenerationRequest,
    GenerationSequence,
    StepOutput,
    TokenLogprob,
    check_request,
)
from slmkit.infer.speculative import lookup_draft

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_TOP_LOGPROBS",
    "BatcherStats",
    "ContinuousBatcher",
    "GenerationRequest",
    "GenerationSequence",
    "StepOutput",
    "TokenLogprob",
]


@dataclass
class BatcherStats:
    steps: int = 0
    decode_forwards: int = 0
    prefill_tokens: int = 0
    new_tokens: int = 0
    last_batch_size: int = 0  # sequences in the last decode step
    step_batch_size: int = 0  # sequences decoded by the latest step (0: it only prefilled)


class ContinuousBatcher:
    """Requests joining and leaving one running batch (see the module docstring). Not thread-safe: one
    thread (the server's worker) owns it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool | None = None,
        speculate: Literal["off", "lookup"] = "off",
        speculate_k: int = 8,
        min_acceptance: float = 0.3,
        per_row_adapters: bool = False,
        kv_cache: Any = None,
    ) -> None:
        if max_batch < 1:
            raise UserError(f"max batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise UserError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
        if speculate not in ("off", "lookup"):
            raise UserError(f"the batcher speculates with lookup drafts or not at all (off), got {speculate!r}")
        if not (1 <= speculate_k <= 32):
            raise UserError(f"speculate-k must be in [1, 32], got {speculate_k}")
        self.speculate, self.speculate_k, self.min_acceptance = speculate, speculate_k, min_acceptance
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        context = self.config.max_seq_len
        if max_seq_len is not None and not (1 < max_seq_len <= context):
            raise UserError(f"max sequence length must be in 2..{context} (the model's context), got {max_seq_len}")
        self.max_seq_len = max_seq_len or context
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        if compile is None:  # CUDA graphs pay at once; a CPU compilation costs 15-40 s first (opt in)
            compile = self.device.type == "cuda" and not per_row_adapters  # adapters per row: eager (see above)
        self.core = DecodeCore(
            model, tokenizer, max_batch=max_batch, max_len=self.max_seq_len, compile=compile,
            prefill_chunk=prefill_chunk, per_row_adapters=per_row_adapters, kv_cache=kv_cache,
        )  # fmt: skip
        self.waiting: deque[GenerationSequence] = deque()
        self.stats = BatcherStats()

    @property
    def rows(self) -> list[GenerationSequence]:
        """The running sequences; rows[i] lives in state row i."""
        return self.core.rows

    # ---- queue ------------------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.core.free_rows

    @property
    def has_work(self) -> bool:
        return bool(self.core.rows or self.waiting)

    def submit(self, request: GenerationRequest) -> GenerationSequence:
        """Queue a request; it joins the running batch at the next step with a free row."""
        self.check(request)
        seq = self.core.new_sequence(request)
        self.waiting.append(seq)
        return seq

    def check(self, request: GenerationRequest) -> None:
        """UserError unless the request fits: a non-empty prompt, prompt + max new tokens within the state, an
        adapter index the batcher selects (if any). A bounded cache (--kv-window) takes any length."""
        check_request(request, None if self.core.unbounded else self.max_seq_len)
        self.core.check_adapter(request)

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
        self.core.release()

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
        core = self.core
        while self.waiting and core.free_rows:
            core.admit(self.waiting.popleft())
        before = core.stats.decode_forwards
        prefill_tokens = core.stats.prefill_tokens
        outputs = core.step(self._drafts() if self.speculate == "lookup" else None)
        decoded = core.stats.decode_forwards > before
        self.stats.decode_forwards = core.stats.decode_forwards
        self.stats.prefill_tokens += core.stats.prefill_tokens - prefill_tokens
        self.stats.new_tokens = core.stats.new_tokens
        self.stats.step_batch_size = core.stats.last_batch_size if decoded else 0
        self.stats.last_batch_size = core.stats.last_batch_size
        return outputs

    def _drafts(self) -> dict[GenerationSequence, tuple[list[int], None]]:
        """Prompt-lookup drafts for the rows that can take one: decoding, unconstrained, without top logprobs,
        room left in the state and the token budget, and acceptance still paying for that sequence."""
        drafts: dict[GenerationSequence, tuple[list[int], None]] = {}
        for seq in self.core.rows:
            request = seq.request
            if seq.pending is None or seq.finished or request.constraint is not None or request.top_logprobs:
                continue
            left = self.speculate_k if self.core.unbounded else self.max_seq_len - 1 - seq.length
            room = min(request.max_new_tokens - len(seq.out) - 1, left, self.speculate_k)
            if room < 1 or not seq.speculation_pays(self.min_acceptance):
                continue
            draft = lookup_draft(seq.prompt + seq.out, room)
            if draft:
                drafts[seq] = (draft, None)
        return drafts
