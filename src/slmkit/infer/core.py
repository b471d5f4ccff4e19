"""The one decode core: rows of a model state, each holding one sequence; prefill, step, choose, emit.

Everything that generates text runs through `DecodeCore`: the engine (static batches, compilation, speculation),
the continuous batcher (and so the server), the efficiency probes, the planner's latency and the model card. So
the numbers users read are the code they run.

    core = DecodeCore(model, tokenizer, max_batch=8, max_len=256)
    seq = core.admit(GenerationRequest(prompt_ids, max_new_tokens=32))
    while core.rows:
        outputs = core.choose(core.prefill() + core.decode())   # StepOutput per sequence that got a token
        core.release()

Rows hold sequences at different lengths and never padding: a prefill feeds a row's prompt at positions
0..n-1, a decode step feeds every row its own token at its own position, and each mixer keeps its own state for
its rows (`slmkit.models.state`). Running rows stay packed at the front (a freed row takes the last row's state),
so a step runs over exactly the running rows. A row that has no token to feed this step (still prefilling) gets a
placeholder at its next position and is marked inactive: attention overwrites that slot later, and a recurrent
state keeps what it had.

With ``compile=True`` the decode step runs through ``torch.compile`` over the whole state (fixed shapes): CUDA
graphs on CUDA, inductor's C++ kernels with its C++ wrapper on a CPU. A compilation that fails is logged and
the step runs eagerly.

Adapters per request (``per_row_adapters=True``, what `slm serve --lora` builds): the model carries several LoRA
adapters (`slmkit.models.lora`) and each request names one by its index (``GenerationRequest.adapter``, None or -1:
the base alone). Before every forward the core selects, row by row, the adapter of the sequence in that row
(`set_active_adapters`), for exactly the rows that forward runs over: a prefill group, the running rows of a decode
or verification step. So requests for different adapters share one batch, and each row's output equals the model
with only its adapter merged. Without the flag nothing is selected (and nothing is spent on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.infer.sampling import SamplingParams, apply_penalties, penalty_state, sample
from slmkit.models.decode_layout import use_decode_layout
from slmkit.models.lora import adapter_names, context_of, set_active_adapters

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
# speculation is judged after this many drafted tokens: below the minimum acceptance it is turned off for the sequence
MIN_DRAFTED_TO_JUDGE = 16
# Below this many parameters, decode steps on a CPU run on one intra-op thread. A small model's step is a few
# hundred tiny kernels: a second thread gains little, and when the OS has lent that core to another process,
# every parallel region waits for it (measured on a loaded 2-core machine: a micro step went from 0.9 ms to
# 18 ms with two threads; a 64-token prefill from 9 ms to 470 ms). Longer prefills, and larger models'
# matrix-vector products, keep every thread.
SINGLE_THREAD_PARAMS = 20_000_000
SINGLE_THREAD_PREFILL_TOKENS = 512  # and prefills of up to this many tokens (batch x prompt) of such models
# A core of at most this many rows steps on one thread on a CPU whatever the model's size: a batch-1 step of a
# larger model is matrix-vector products that a second thread did not speed up even on a quiet machine (MKL's
# product streams at the same rate), while on a loaded one every parallel region waits for the borrowed core
# (measured: the 124m step 2.4x slower on two threads than on one, load 9.8; docs/inference.md, fifth round).
SINGLE_THREAD_ROWS = 1
# On a CPU, a core lays its model's fp32 linear weights out for matrix-vector products when it is made
# (`slmkit.models.decode_layout`: same values, shapes and parameters, other strides, q/k/v and gate/up fused;
# measured 1.42x on the 124m preset's eager step, one thread). A benchmark sets this False (and restores the
# layout with `use_decode_layout(model, False)`) to measure the stored layout.
DECODE_LAYOUT = True


class Threads:
    """Context: torch's intra-op threads set to n for the block (None: unchanged)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.saved = n, 0

    def __enter__(self) -> None:
        if self.n is not None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n is not None:
            torch.set_num_threads(self.saved)


def single_threaded(model: torch.nn.Module) -> bool:
    """Whether the model's decode-sized steps run on one intra-op thread (see SINGLE_THREAD_PARAMS)."""
    from slmkit.models.quantized import weight_count  # quantized weights are buffers, not parameters

    device = next(model.parameters()).device
    return device.type == "cpu" and weight_count(model) < SINGLE_THREAD_PARAMS


# ---- text ----------------------------------------------------------------------------------------------------
def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Turns one sequence's tokens into text deltas that never split a UTF-8 character or a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new safe text (``stopped`` turns True at a stop string)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            delta = text[len(self.emitted) : cut] if cut > len(self.emitted) else ""
            self.emitted = text[:cut]
            return delta
        safe = len(text) - partial_stop_len(text, self.stop)
        if safe > len(self.emitted):
            delta = text[len(self.emitted) : safe]
            self.emitted = text[:safe]
            return delta
        return ""

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted) :] if len(text) > len(self.emitted) else ""
        self.emitted = text
        return delta


def finish_reason(text: TextStream | None, grammar: Any, new_tokens: int, max_new_tokens: int) -> str | None:
    """Why a sequence ends after its latest (non-EOS) token: "stop" at a stop string or a finished grammar,
    "length" at max_new_tokens; None while it goes on."""
    if (text is not None and text.stopped) or (grammar is not None and grammar.terminated):
        return "stop"
    return "length" if new_tokens >= max_new_tokens else None


# ---- requests and sequences ------------------------------------------------------------------------------------
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
    detokenize: bool = True  # text deltas per token (off: only token ids, as a batch without stop strings needs)
    ignore_eos: bool = False  # EOS is a token like any other (timing probes: every row runs max_new_tokens)
    # index into adapter_names(model) of the adapter this request runs with; None or -1: the base alone. Only a core
    # built with per_row_adapters takes one (see the module docstring)
    adapter: int | None = None


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
    """A request's state: its output so far, its place in the state and, once finished, its finish reason."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, device: torch.device, vocab_size: int) -> None:
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finished = False
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled"
        needs_text = request.detokenize or bool(request.stop)
        self.text = TextStream(tokenizer, list(request.stop)) if needs_text and tokenizer is not None else None
        self.grammar = None
        if request.constraint is not None:
            from slmkit.infer.constrained import GrammarState

            self.grammar = GrammarState(request.constraint, vocab_size)
        self.generator: torch.Generator | None = None
        if request.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.sampling.seed)
        self.counts: torch.Tensor | None = None  # (1, V) output token counts, with penalties only
        self.seen: torch.Tensor | None = None  # (1, V) tokens in prompt or output, with penalties only
        self.row = -1
        self.prefilled = 0  # prompt tokens in the state
        self.length = 0  # positions fed into the state's row
        self.pending: int | None = None  # the last sampled token, fed at position `length` by the next step
        self.drafted = 0  # speculative tokens proposed for this sequence
        self.accepted = 0  # and kept by verification
        self.submitted_at = time.perf_counter()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def speculation_pays(self, min_acceptance: float) -> bool:
        """False once enough drafted tokens show that too few survive verification."""
        return self.drafted < MIN_DRAFTED_TO_JUDGE or self.accepted >= min_acceptance * self.drafted

    @property
    def output_text(self) -> str:
        """The text so far (cut before a stop string)."""
        return self.text.emitted if self.text is not None else ""

    def __repr__(self) -> str:
        return f"GenerationSequence(row={self.row}, prompt={len(self.prompt)}, out={len(self.out)})"


@dataclass
class CoreStats:
    """What the core did. prefill_seconds: prefill forward passes; decode_seconds: wall time of the steps that
    decoded, past their prefill (forward, choosing and emitting); compile_seconds: first calls of a compiled step."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_forwards: int = 0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    new_tokens: int = 0
    last_batch_size: int = 0  # sequences in the last decode step


# ---- the compiled step ------------------------------------------------------------------------------------------
class StaticStep(torch.nn.Module):
    """Model + its state as one module, so torch.compile sees the state's tensors as static buffers."""

    def __init__(self, model: torch.nn.Module, state: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.state = model, state

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        # every row, every slot (masked): the same shapes at every step
        return self.model(tokens, state=self.state, pos=pos, active=active)[:, -1]


class CompiledStep:
    """Calls the compiled step; its first call compiles (timed: `take_compile_seconds`) and, if compilation
    fails (before the state is touched), logs it and falls back to the eager step for good."""

    def __init__(self, step: StaticStep, device: torch.device) -> None:
        import torch._dynamo.config as dynamo_config

        # every batch size (and every engine) compiles the same code again; the default limit of 8 would then
        # turn into a hard error under fullgraph=True
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        if device.type == "cuda":
            fn = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:  # the Python wrapper's per-kernel overhead is most of a small model's step
            fn = torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        self.step, self.fn, self.checked, self.compile_seconds = step, fn, False, 0.0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as exc:
            logger.warning(
                "torch.compile of the decode step failed (%s: %s); decoding eagerly", type(exc).__name__, exc
            )
            self.fn = self.step
            out = self.step(*args)
        self.compile_seconds = time.perf_counter() - start
        self.checked = True
        return out

    def take_compile_seconds(self) -> float:
        """Seconds the first call took (compiling), once; 0 afterwards."""
        seconds, self.compile_seconds = self.compile_seconds, 0.0
        return seconds


Ready = list[tuple[list[GenerationSequence], torch.Tensor]]  # sequences and their logits (R, V) to choose from
# per sequence: drafted tokens and the draft's distributions (m, V), or None for a point-mass draft
Drafts = dict[GenerationSequence, tuple[list[int], torch.Tensor | None]]


class DecodeCore:
    """Rows of one model state (see the module docstring). Not thread-safe: one thread owns it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch: int,
        max_len: int,
        compile: bool = False,
        prefill_chunk: int | None = None,
        dtype: torch.dtype | None = None,
        per_row_adapters: bool = False,
        kv_cache: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        if DECODE_LAYOUT and self.device.type == "cpu":
            use_decode_layout(model)
        # kv_cache (a `slmkit.models.state.KVCacheSpec`): how attention layers keep keys and values; a bounded one
        # holds a fixed number of positions, so rows may run past max_len (and the model's context)
        self.kv_cache = kv_cache
        self.state = model.new_state(max_batch, max_len, dtype=dtype, **({"cache": kv_cache} if kv_cache else {}))
        self.rows: list[GenerationSequence] = []  # running sequences; rows[i] lives in state row i
        self.stats = CoreStats()
        self._views: dict[tuple[int, int], Any] = {}
        self._single_thread = single_threaded(model)
        one_row = self.device.type == "cpu" and max_batch <= SINGLE_THREAD_ROWS
        self.step_threads = Threads(1 if self._single_thread or one_row else None)
        self.adapters = adapter_names(model) if per_row_adapters else []  # what request.adapter indexes
        self._selected: tuple[tuple[int, ...], torch.Tensor | None] = ((), None)  # the latest selection, its tensor
        if per_row_adapters:
            check_adapter_rows(model, compile)
        self._step: CompiledStep | None = None
        if compile:
            self._step = CompiledStep(StaticStep(model, self.state), self.device)
        # the compiled step's inputs (tokens (B, 1), positions (B, 1), active rows (B,)), made once and updated in
        # place; _fed: the rows the last step fed (every one active), at positions _fed_lengths
        self._inputs = (
            torch.zeros(max_batch, 1, dtype=torch.long, device=self.device),
            torch.zeros(max_batch, 1, dtype=torch.long, device=self.device),
            torch.zeros(max_batch, dtype=torch.bool, device=self.device),
        )
        self._fed: list[GenerationSequence] = []
        self._fed_lengths: list[int] = []
        self._chosen: tuple[list[GenerationSequence], torch.Tensor] = ([], torch.empty(0))  # the latest choices
        # hooks (None: off): on_verify(rows, tokens (n, w) on the CPU, logits (n, w, V), drafts) sees every verification
        # pass (token recycling learns from it); on_release(seqs) sees finished sequences while their rows still hold
        # their state (the prefix cache keeps their blocks)
        self.on_verify: Any = None
        self.on_release: Any = None
        # positions 0..max_len as a device tensor made once: each step's positions are views of it (grown when a
        # bounded cache lets a row run further)
        self._positions = torch.arange((min(max_len, 4096) if self.unbounded else max_len) + 1, device=self.device)

    @property
    def unbounded(self) -> bool:
        """Whether rows may run past max_len (a bounded cache keeps only its window)."""
        return bool(self.kv_cache is not None and self.kv_cache.bounded)

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) as a view of one device tensor."""
        if stop > self._positions.shape[0]:
            self._positions = torch.arange(max(stop, 2 * self._positions.shape[0]), device=self.device)
        return self._positions[start:stop]

    @property
    def compiled(self) -> bool:
        return self._step is not None

    def prefill_threads(self, tokens: int) -> Threads:
        """Short prefills of small models are decode-like (see SINGLE_THREAD_PARAMS); long ones use every thread."""
        return Threads(1 if self._single_thread and tokens <= SINGLE_THREAD_PREFILL_TOKENS else None)

    # ---- rows ----------------------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    def new_sequence(self, request: GenerationRequest) -> GenerationSequence:
        return GenerationSequence(request, self.tokenizer, self.device, self.config.vocab_size)

    def admit(self, seq: GenerationSequence | GenerationRequest) -> GenerationSequence:
        """Put a sequence into the next free row (its prompt is fed by the next `prefill`)."""
        if isinstance(seq, GenerationRequest):
            seq = self.new_sequence(seq)
        self.check_adapter(seq.request)
        if not self.free_rows:
            raise RuntimeError("no free row")
        seq.row = len(self.rows)
        self._chosen = ([], self._chosen[1][:0])
        seq.prefilled = seq.length = 0
        seq.pending = None
        self.state.reset(seq.row, seq.row + 1)
        self.rows.append(seq)
        return seq

    def check_adapter(self, request: GenerationRequest) -> None:
        """UserError unless the request's adapter is one this core selects (any request without one is fine)."""
        index = request.adapter
        if index is None or (index == -1 and (self.adapters or not adapter_names(self.model))):
            return  # no choice, or the base where the base is what runs
        if not self.adapters:
            raise UserError(
                "this generator runs the model as it is and selects no adapter per request; serve the adapters "
                "(slm serve BASE --lora NAME=DIR) or merge the adapter into the model (slm merge-adapter)"
            )
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.adapters):
            raise UserError(f"adapter index {index!r}: the model carries {len(self.adapters)} adapter(s); -1: the base")

    def select_adapters(self, seqs: Sequence[GenerationSequence]) -> None:
        """Row i of the next forwards runs with seqs[i]'s adapter. A no-op without per-row adapters, and when the
        selection is the one already set (a decode step over the same rows as the last one)."""
        if not self.adapters:
            return
        key = tuple(-1 if s.request.adapter is None else s.request.adapter for s in seqs)
        context = context_of(self.model)
        if key == self._selected[0] and context is not None and context.rows is self._selected[1]:
            return
        set_active_adapters(self.model, torch.tensor(key, dtype=torch.long))  # on the CPU: checked without a sync
        self._selected = (key, context.rows if context is not None else None)

    def view(self, start: int, stop: int) -> Any:
        """State rows [start, stop) as a state of their own (views, so writes land in the whole state)."""
        key = (start, stop)
        if key not in self._views:
            self._views[key] = self.state.rows(start, stop)
        return self._views[key]

    def release(self) -> None:
        """Free the rows of finished sequences, moving the last rows into the holes (rows stay packed)."""
        done = sorted((s for s in self.rows if s.finished), key=lambda s: s.row, reverse=True)
        if done and self.on_release is not None:
            self.on_release(done)
        for seq in done:
            last = self.rows.pop()
            if last is not seq:
                self.state.move(last.row, seq.row, last.length)
                last.row = seq.row
                self.rows[seq.row] = last
            seq.row = -1

    # ---- forward passes --------------------------------------------------------------------------------------
    def prefill(self) -> Ready:
        """Feed prompt tokens, at most `prefill_chunk` in all (None: every prompt whole); sequences whose prompt
        is then complete get logits to choose their first token from. Consecutive rows at the same stage prefill in
        one pass; shorter ones are padded at the end when the state can crop what they were fed past it."""
        ready: Ready = []
        pending = [s for s in self.rows if not s.finished and s.prefilled < len(s.prompt)]
        if not pending:  # every decode step asks: nothing else to do then
            return ready
        budget = self.prefill_chunk
        room = self.state.pad_room()
        i = 0
        while i < len(pending) and (budget is None or budget > 0):
            seq = pending[i]
            start = seq.prefilled
            group, takes = [seq], [_chunk(seq, budget)]
            while i + len(group) < len(pending):
                other = pending[i + len(group)]
                width = max(*takes, _chunk(other, budget))
                if (
                    other.row != seq.row + len(group)
                    or other.prefilled != start
                    or width - min(*takes, _chunk(other, budget)) > room
                    or (budget is not None and (len(group) + 1) * width > budget)
                ):
                    break
                group.append(other)
                takes.append(_chunk(other, budget))
            i += len(group)
            width = max(takes)
            feed = [s.prompt[start : start + take] + [0] * (width - take) for s, take in zip(group, takes, strict=True)]
            tokens = torch.tensor(feed, device=self.device)  # (G, T)
            padded = any(take != width for take in takes)
            begin = time.perf_counter()
            self.select_adapters(group)
            with self.prefill_threads(len(group) * width):
                logits = self.model(
                    tokens,
                    state=self.view(seq.row, seq.row + len(group)),
                    pos=self.positions(start, start + width),
                    upto=start + width,
                    last_only=not padded,
                    logits_at=torch.tensor(takes, device=self.device) - 1 if padded else None,
                )[:, -1]  # (G, V)
            self.stats.prefill_seconds += time.perf_counter() - begin
            self.stats.prefill_tokens += sum(takes)
            if budget is not None:
                budget -= len(group) * width
            done: list[int] = []
            for j, (s, take) in enumerate(zip(group, takes, strict=True)):
                s.prefilled = s.length = start + take
                if take != width:
                    self.state.crop(s.row, s.length)  # forget the padding
                if s.prefilled == len(s.prompt):
                    done.append(j)
            if done:
                index = torch.tensor(done, device=self.device) if len(done) < len(group) else None
                ready.append(([group[j] for j in done], logits[index] if index is not None else logits))
        return ready

    def decode(self) -> Ready:
        """One step over the running rows: every row with a sampled token feeds it at its own position."""
        rows = self.rows
        decoding = [s for s in rows if s.pending is not None and not s.finished]
        if not decoding:
            return []
        if self._step is not None:
            logits = self._compiled_decode()
            self.stats.compile_seconds += self._step.take_compile_seconds()
        else:
            logits = self._eager_decode(len(decoding) == len(rows))
        self.stats.decode_forwards += 1
        self.stats.last_batch_size = len(decoding)
        if len(decoding) < len(rows):
            self._forget_placeholders(s for s in rows if s.pending is None)
        for seq in decoding:
            seq.length += 1
            seq.pending = None
        if len(decoding) == len(rows):
            return [(decoding, logits if logits.shape[0] == len(rows) else logits[: len(rows)])]
        index = torch.tensor([s.row for s in decoding], device=self.device)
        return [(decoding, logits[index])]

    def _forget_placeholders(self, idle: Any) -> None:
        """Rows fed a placeholder forget it (a ring cache must not keep its position tagged)."""
        for seq in idle:
            self.state.crop(seq.row, seq.length)

    def _eager_decode(self, all_active: bool) -> torch.Tensor:
        rows = self.rows
        n = len(rows)
        chosen_seqs, chosen = self._chosen
        if all_active and len(chosen_seqs) == n and all(a is b for a, b in zip(chosen_seqs, rows, strict=True)):
            tokens = chosen[:, None]  # the tokens just chosen, in row order: no host-to-device copy
        else:  # a row without a token (still prefilling) feeds a placeholder at its next position, inactive
            tokens = torch.tensor([[s.pending if s.pending is not None else 0] for s in rows], device=self.device)
        lengths = [s.length for s in rows]
        longest = max(lengths)
        if longest == min(lengths):  # one position for every row: no per-row mask at all
            pos = self.positions(longest, longest + 1)
        else:
            pos = torch.tensor(lengths, device=self.device)[:, None]  # (n, 1)
        active = None if all_active else torch.tensor([s.pending is not None for s in rows], device=self.device)
        self.select_adapters(rows)
        with self.step_threads:
            return self.model(tokens, state=self.view(0, n), pos=pos, active=active, upto=longest + 1)[:, -1]

    def _compiled_decode(self) -> torch.Tensor:
        """Every row of the state (idle ones feed a placeholder, inactive), so the compiled graph never changes."""
        assert self._step is not None
        rows = self.rows
        tokens, pos, active = self._inputs
        chosen_seqs, chosen = self._chosen
        fed, lengths, n = self._fed, self._fed_lengths, len(rows)
        if (
            len(fed) == n == len(chosen_seqs)
            and all(a is b is c for a, b, c in zip(fed, rows, chosen_seqs, strict=True))
            and all(s.pending is not None and s.length == k + 1 for s, k in zip(rows, lengths, strict=True))
        ):
            # the steady state (the same rows as the last step, each feeding the token just chosen for it at its
            # next position): the inputs are updated in place, no tensor made, no host-to-device copy
            tokens[:n, 0].copy_(chosen)
            pos[:n].add_(1)
        else:
            b = self.max_batch
            new_tokens, new_pos, new_active = [0] * b, [0] * b, [False] * b
            for seq in rows:
                new_tokens[seq.row] = seq.pending if seq.pending is not None else 0
                new_pos[seq.row] = seq.length
                new_active[seq.row] = seq.pending is not None
            tokens.copy_(torch.tensor(new_tokens)[:, None])
            pos.copy_(torch.tensor(new_pos)[:, None])
            active.copy_(torch.tensor(new_active))
            self._fed = list(rows) if all(new_active[:n]) else []
        self._fed_lengths = [s.length for s in self._fed]
        with self.step_threads:
            return self._step(tokens, pos, active)

    def verify(self, drafts: Drafts) -> list[StepOutput]:
        """One speculative step over every running row: rows in `drafts` feed their pending token and their draft
        tokens (with the draft's distributions (m, V), or None for a point-mass draft), verified by rejection
        sampling (`slmkit.infer.speculative.verify`: greedy output equals plain greedy decoding); the other rows
        decode one token as in `decode`. Rejected positions are cropped from each row's state."""
        from slmkit.infer.speculative import verify

        self._chosen = ([], self._chosen[1][:0])  # tokens come from verification here, not from `choose`
        rows = self.rows
        n = len(rows)
        width = 1 + max(len(d) for d, _ in drafts.values())
        tokens = torch.zeros(n, width, dtype=torch.long)
        for seq in rows:
            draft = drafts[seq][0] if seq in drafts else []
            if seq.pending is not None:
                tokens[seq.row, : 1 + len(draft)] = torch.tensor([seq.pending, *draft])
        lengths = torch.tensor([s.length for s in rows])
        pos = (lengths[:, None] + torch.arange(width)).to(self.device)  # (n, width): each row's own positions
        active = torch.tensor([s.pending is not None and not s.finished for s in rows], device=self.device)
        self.select_adapters(rows)
        with self.step_threads:  # a few tokens per row: still a decode-sized step
            logits = self.model(
                tokens.to(self.device), state=self.view(0, n), pos=pos, active=active, upto=int(lengths.max()) + width
            )  # (n, width, V)
        if self.on_verify is not None:
            self.on_verify(list(rows), tokens, logits, drafts)
        self.stats.decode_forwards += 1
        plain: list[GenerationSequence] = []
        outputs: list[StepOutput] = []
        for seq in rows:
            if seq.pending is None or seq.finished:
                self.state.crop(seq.row, seq.length)  # placeholders only
                continue
            base = seq.length  # the pending token's position
            seq.pending = None
            if seq not in drafts:
                seq.length += 1
                self.state.crop(seq.row, seq.length)
                plain.append(seq)
                continue
            draft, draft_probs = drafts[seq]
            params = seq.request.sampling
            new_tokens, n_accepted = verify(
                logits[seq.row, : 1 + len(draft)], draft, draft_probs, params, seq.generator, seq.counts, seq.seen
            )
            seq.drafted += len(draft)
            seq.accepted += n_accepted
            seq.length = base + 1 + n_accepted  # the pending token and the accepted drafts stay
            self.state.crop(seq.row, seq.length)
            raw = logits[seq.row].float().log_softmax(-1) if seq.request.logprobs else None
            k = seq.request.top_logprobs
            for j, token in enumerate(new_tokens):
                lp = None
                if raw is not None:
                    top = raw[j].topk(k) if k else None
                    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
                    lp = TokenLogprob(token, float(raw[j, token]), pairs)
                outputs.append(self.emit(seq, token, lp))
                if seq.finished:
                    break
        if plain:
            index = torch.tensor([s.row for s in plain], device=self.device)
            outputs += self.choose([(plain, logits[index, 0])])
        self.stats.last_batch_size = len(plain) + len(drafts)
        return outputs

    def verify_tree(self, seq: GenerationSequence, tokens: list[int], parents: list[int]) -> list[StepOutput]:
        """One greedy verification of a draft tree over one row (`slmkit.infer.speculative.draft_tree`: tokens[0]
        is the row's pending token, the root; parents[0] = -1). Every node is fed in one forward with a tree
        attention mask (`Transformer.forward(tree=...)`), node i at slot length + i; the longest path of the
        target's own argmax choices is kept (`accept_tree`: the output equals plain greedy decoding), its nodes'
        keys and values moved to consecutive slots, the rest cropped. Other rows do not step."""
        from slmkit.infer.speculative import accept_tree, tree_mask

        assert seq.pending is not None and tokens[0] == seq.pending and parents[0] == -1
        self._chosen = ([], self._chosen[1][:0])
        base, t = seq.length, len(tokens)
        feed = torch.tensor([tokens])
        mask = tree_mask(parents, self.device)
        self.select_adapters([seq])
        with self.step_threads:
            logits = self.model(
                feed.to(self.device), state=self.view(seq.row, seq.row + 1), pos=self.positions(base, base + t),
                upto=base + t, tree=mask,
            )  # fmt: skip  # (1, T, V)
        if self.on_verify is not None:
            self.on_verify([seq], feed, logits, {seq: (tokens[1:], None)})
        self.stats.decode_forwards += 1
        with self.step_threads:  # small ops: on the step's threads (see SINGLE_THREAD_PARAMS)
            target = logits[0].argmax(-1).tolist()
        path, new_tokens = accept_tree(target, tokens, parents)
        depth = int(mask.sum(-1).max()) - 1  # the most a path could have accepted
        seq.drafted += depth
        seq.accepted += len(path)
        seq.pending = None
        if path != list(range(1, len(path) + 1)):  # accepted nodes not already in place: make them consecutive
            src = torch.tensor(path, device=self.device) + base
            self.state.keep_slots(seq.row, src, base + 1)
        seq.length = base + 1 + len(path)
        self.state.crop(seq.row, seq.length)
        raw = logits[0].float().log_softmax(-1) if seq.request.logprobs else None
        k = seq.request.top_logprobs
        outputs: list[StepOutput] = []
        for node, token in zip([0, *path], new_tokens, strict=True):
            lp = None
            if raw is not None:
                top = raw[node].topk(k) if k else None
                pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
                lp = TokenLogprob(token, float(raw[node, token]), pairs)
            outputs.append(self.emit(seq, token, lp))
            if seq.finished:
                break
        self.stats.last_batch_size = 1
        return outputs

    # ---- choosing and emitting ----------------------------------------------------------------------------------
    def choose(self, ready: Ready) -> list[StepOutput]:
        """Next token per ready sequence: penalties, grammar mask, then each sequence's own sampling."""
        if not ready:
            return []
        seqs = [s for group, _ in ready for s in group]
        raw = ready[0][1] if len(ready) == 1 else torch.cat([logits for _, logits in ready])
        raw = raw.float()  # (R, V)
        scores = raw
        if any(s.request.sampling.has_penalties or s.grammar is not None for s in seqs):
            scores = raw.clone()
            for i, seq in enumerate(seqs):
                params = seq.request.sampling
                if params.has_penalties:
                    if seq.counts is None:
                        seq.counts, seq.seen = penalty_state([seq.prompt], self.config.vocab_size, self.device)
                    scores[i : i + 1] = apply_penalties(raw[i : i + 1], params, seq.counts, seq.seen)
                if seq.grammar is not None:
                    seq.grammar.mask_(scores[i])
        tokens = self._sample(seqs, scores)
        self._chosen = (seqs, tokens)
        want = [i for i, s in enumerate(seqs) if s.request.logprobs]
        logprobs: dict[int, TokenLogprob] = {}
        if want:
            index = torch.tensor(want, device=self.device)
            log_probs = raw[index].log_softmax(-1)  # (W, V)
            chosen = log_probs.gather(-1, tokens[index][:, None])[:, 0].tolist()
            k = max(seqs[i].request.top_logprobs for i in want)
            top_ids: list[list[int]] = []
            top_lp: list[list[float]] = []
            if k:
                top = log_probs.topk(min(k, log_probs.size(-1)), dim=-1)
                top_ids, top_lp = top.indices.tolist(), top.values.tolist()
            token_list = tokens[index].tolist()
            for j, i in enumerate(want):
                kk = seqs[i].request.top_logprobs
                pairs = list(zip(top_ids[j][:kk], top_lp[j][:kk], strict=True)) if kk else []
                logprobs[i] = TokenLogprob(token_list[j], chosen[j], pairs)
        chosen_tokens = tokens.tolist()
        return [self.emit(seq, chosen_tokens[i], logprobs.get(i)) for i, seq in enumerate(seqs)]

    def _sample(self, seqs: list[GenerationSequence], scores: torch.Tensor) -> torch.Tensor:
        if all(s.request.sampling.greedy for s in seqs):
            return scores.argmax(-1)
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
        return tokens

    def emit(self, seq: GenerationSequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        """Append a chosen token to a sequence and decide whether it is finished (EOS, stop string, grammar, length)."""
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if token == self.config.eos_token_id and not seq.request.ignore_eos:
            seq.finished, seq.finish_reason = True, "stop"
            return StepOutput(seq, None, seq.text.flush() if seq.text is not None else "", None, True)
        seq.out.append(token)
        self.stats.new_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.counts is not None and seq.seen is not None:
            seq.counts[0, token] += 1
            seq.seen[0, token] = True
        text = seq.text.push(token) if seq.text is not None else ""
        reason = finish_reason(seq.text, seq.grammar, len(seq.out), seq.request.max_new_tokens)
        if reason is not None:
            seq.finished, seq.finish_reason = True, reason
            text += seq.text.flush() if seq.text is not None else ""
        else:
            seq.pending = token
        return StepOutput(seq, token, text, logprob, seq.finished)

    def step(
        self,
        drafts: dict[GenerationSequence, tuple[list[int], torch.Tensor | None]] | None = None,
        tree: tuple[GenerationSequence, list[int], list[int]] | None = None,
    ) -> list[StepOutput]:
        """Prefill (one chunk budget), one decode step (a verification pass when some rows have `drafts`, a tree
        verification of one row with `tree` = (sequence, tokens, parents)), choose and emit; finished rows are
        released."""
        begin = time.perf_counter()
        prefill_before, compile_before = self.stats.prefill_seconds, self.stats.compile_seconds
        ready = self.prefill()
        if tree is not None:
            outputs = self.choose(ready) + self.verify_tree(*tree)
            decoded: Ready | bool = True
        elif drafts:
            outputs = self.choose(ready) + self.verify(drafts)
            decoded = True
        else:
            decoded = self.decode()
            outputs = self.choose(ready + decoded)
        self.release()
        if decoded:  # the step's wall time past prefill and compilation: forward, choosing and emitting
            spent = time.perf_counter() - begin
            spent -= self.stats.prefill_seconds - prefill_before + self.stats.compile_seconds - compile_before
            self.stats.decode_seconds += spent
        return outputs


def check_adapter_rows(model: torch.nn.Module, compile: bool) -> None:
    """UserError unless the model's adapters can be selected per row by an eager core: it carries some, none sits
    where per-row selection cannot reach (mixture-of-experts experts), and the step is not compiled."""
    if not adapter_names(model):
        raise UserError("adapters per request: the model carries no adapter (load some with load_adapter first)")
    if compile:
        raise UserError(
            "adapters per request run eagerly: the compiled decode step does not select adapters per row; "
            "drop --compile, or merge one adapter into the model (slm merge-adapter) and compile that"
        )
    set_active_adapters(model, torch.tensor([-1]))  # the checks of a real selection (e.g. MoE experts), up front
    set_active_adapters(model, None)


def _chunk(seq: GenerationSequence, budget: int | None) -> int:
    """Prompt tokens a sequence feeds in this prefill: the rest of its prompt, within the token budget."""
    remaining = len(seq.prompt) - seq.prefilled
    return remaining if budget is None else min(remaining, budget)


def check_request(request: GenerationRequest, max_len: int | None) -> None:
    """UserError unless the request fits: a non-empty prompt, prompt + max new tokens within `max_len` (None: any
    length, as with a bounded cache)."""
    n = len(request.prompt_ids)
    if n == 0:
        raise UserError("the prompt is empty: give at least one token")
    if request.max_new_tokens < 1:
        raise UserError(f"max new tokens must be >= 1, got {request.max_new_tokens}")
    if max_len is not None and n + request.max_new_tokens > max_len:
        raise UserError(
            f"prompt ({n} tokens) + max new tokens ({request.max_new_tokens}) exceeds the context of {max_len} tokens"
        )
    if not (0 <= request.top_logprobs <= MAX_TOP_LOGPROBS):
        raise UserError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.top_logprobs}")


def decode_greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    compile: bool = False,
    ignore_eos: bool = True,
    kv_cache: Any = None,
) -> tuple[list[list[int]], CoreStats]:
    """Greedy continuations of `prompts` as one batch through the core (the efficiency probes time this: by
    default EOS does not end a row, so every row runs `max_new_tokens` steps)."""
    requests = [GenerationRequest(p, max_new_tokens, detokenize=False, ignore_eos=ignore_eos) for p in prompts]
    core = DecodeCore(
        model, None, max_batch=len(prompts), max_len=max(len(p) for p in prompts) + max_new_tokens, compile=compile,
        kv_cache=kv_cache,
    )  # fmt: skip
    seqs = [core.admit(r) for r in requests]
    with torch.inference_mode():
        while core.rows:
            core.step()
    return [s.out for s in seqs], core.stats
