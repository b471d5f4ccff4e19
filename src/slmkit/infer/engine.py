"""The inference engine: batched prefill + decode over a static KV cache, streaming, log-probabilities,
speculative decoding and grammar-constrained output.

    from slmkit.infer.engine import Engine
    engine = Engine.load("runs/quickstart")
    [out] = engine.generate(["def fib(n):"], max_new_tokens=64)
    for delta in engine.stream("import os", max_new_tokens=32, speculate="lookup"):
        print(delta, end="")

Batched prompts of different lengths are left-padded to a common length P: sequence i has ``pad_i`` padding
slots, its rotary positions are ``slot - pad_i`` and a key mask hides the padding slots, so each sequence
decodes exactly as it would alone. Every decode step writes slot P + step for the whole batch.

On CUDA the decode step runs in bf16 and, with ``compile=True`` (the default there), through
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) over a cache of fixed shape. On a CPU it runs eagerly
unless ``compile=True`` asks for inductor's C++ kernels (a one-time compilation of 15-40 s; faster
steps on small models, see docs/inference.md).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from slmkit.errors import UserError
from slmkit.infer.sampling import SamplingParams, apply_penalties, penalty_state, sample

logger = logging.getLogger(__name__)

SpeculateMode = Literal["off", "draft", "lookup"]
# speculation is judged after this many drafted tokens: below `min_acceptance` it is turned off for the request
MIN_DRAFTED_TO_JUDGE = 16
# Below this many parameters, decode steps on a CPU run on one intra-op thread. A small model's step is a few
# hundred tiny kernels: a second thread gains little, and when the OS has lent that core to another process,
# every parallel region waits for it (measured on a loaded 2-core machine: a micro step went from 0.9 ms to
# 18 ms with two threads; a 64-token prefill from 9 ms to 470 ms). Longer prefills, and larger models'
# matrix-vector products, keep every thread.
SINGLE_THREAD_PARAMS = 20_000_000
SINGLE_THREAD_PREFILL_TOKENS = 512  # and prefills of up to this many tokens (batch x prompt) of such models


class _Threads:
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
    device = next(model.parameters()).device
    return device.type == "cpu" and model.config.num_params() < SINGLE_THREAD_PARAMS


@dataclass
class Completion:
    """One prompt's result. ``text`` is cut before a stop string; EOS is in neither text nor token_ids."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop string, or a finished grammar) or "length"
    prompt_tokens: int
    logprobs: list[float] | None = None  # log p(token) under the model (raw logits, before sampling settings)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids),
            "token_ids": self.token_ids,
        }
        if self.logprobs is not None:
            d["logprobs"] = [round(x, 6) for x in self.logprobs]
        return d


@dataclass
class EngineStats:
    """What one `generate`/`stream` call did; speculative counters stay 0 without speculation."""

    batch_size: int = 0  # of the last batch
    sequences: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_forwards: int = 0  # target forward passes after prefill
    speculation: str = "off"
    rounds: int = 0  # verification passes
    drafted: int = 0
    accepted: int = 0
    speculation_turned_off: bool = False
    plain_step_seconds: list[float] = field(default_factory=list)  # timed plain decode steps (speedup baseline)
    mask_seconds: float = 0.0  # grammar mask computation (constrained decoding overhead)
    compile_seconds: float = 0.0  # torch.compile of the decode step (its first call), kept out of decode_seconds
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        # the first token of each sequence comes from prefill; the rest from decode steps
        steps = max(self.new_tokens - self.sequences, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        steps = max(self.new_tokens - self.sequences, 0)
        return steps / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def estimated_speedup(self) -> float | None:
        """Decode rate / the rate of a plain decode step (median of the timed plain steps of this call)."""
        if not self.plain_step_seconds or self.batch_size != 1 or self.decode_tokens_per_second == 0:
            return None
        return self.decode_tokens_per_second * statistics.median(self.plain_step_seconds)

    def summary(self) -> str:
        """One line for humans (`slm generate --verbose`)."""
        reasons = ", ".join(f"{r} {self.finish_reasons.count(r)}" for r in sorted(set(self.finish_reasons)))
        parts = [
            f"{self.sequences} sequence(s), {self.prompt_tokens} prompt tokens, {self.new_tokens} new",
            f"prefill {self.prefill_seconds * 1e3:.1f} ms",
            f"decode {self.decode_tokens_per_second:.1f} tokens/s",
            f"finish: {reasons or 'n/a'}",
        ]
        if self.compile_seconds:
            parts.insert(3, f"compiling the decode step {self.compile_seconds:.1f} s")
        if self.speculation != "off":
            spec = (
                f"speculation ({self.speculation}): accepted {self.accepted}/{self.drafted} drafted tokens "
                f"({self.acceptance_rate:.0%}), {self.tokens_per_forward:.2f} tokens per target pass"
            )
            speedup = self.estimated_speedup
            if speedup is not None:
                spec += f", speedup {speedup:.2f}x vs plain decode steps"
            if self.speculation_turned_off:
                spec += "; turned off (low acceptance)"
            parts.append(spec)
        if self.mask_seconds:
            share = self.mask_seconds / self.decode_seconds if self.decode_seconds else 0.0
            parts.append(f"grammar masks {self.mask_seconds * 1e3:.1f} ms ({share:.0%} of decode time)")
        return "; ".join(parts)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (field "prompt" or "text") or a text file (one per non-empty line)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    prompts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc})") from None
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text:
                raise UserError(f'{path}:{number}: expected an object with a non-empty "prompt" string')
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


class _TextStream:
    """Turns one sequence's tokens into text deltas that never split a UTF-8 character or a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new safe text (``stopped`` turns True at a stop string)."""
        from slmkit.infer.generate import _first_stop, _partial_stop_len

        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            delta = text[len(self.emitted) : cut] if cut > len(self.emitted) else ""
            self.emitted = text[:cut]
            return delta
        safe = len(text) - _partial_stop_len(text, self.stop)
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


def finish_reason(text: _TextStream | None, grammar: Any, new_tokens: int, max_new_tokens: int) -> str | None:
    """Why a sequence ends after its latest (non-EOS) token: "stop" at a stop string or a finished grammar,
    "length" at max_new_tokens; None while it goes on."""
    if (text is not None and text.stopped) or (grammar is not None and grammar.terminated):
        return "stop"
    return "length" if new_tokens >= max_new_tokens else None


class _Seq:
    def __init__(self, prompt: list[int], text: _TextStream | None, grammar: Any) -> None:
        self.prompt = prompt
        self.out: list[int] = []
        self.logprobs: list[float] = []
        self.finished = False
        self.finish_reason = ""
        self.text = text
        self.grammar = grammar
        self.deltas: list[str] = []


class _StaticDecoder(torch.nn.Module):
    """Model + a fixed-shape cache as one module, so torch.compile sees the cache as static buffers."""

    def __init__(self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        # the engine's eager prefill over this cache builds the model's rotary table for every slot before the
        # first (compiled) step, so the compiled graph only reads it
        self.cache = model.new_cache(batch_size, model.config.max_seq_len, dtype=dtype)

    def forward(
        self, tokens: torch.Tensor, cache_pos: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        # upto=None: attend over all slots (masked), so every step has the same shapes (CUDA-graph friendly)
        return self.model(tokens, cache=self.cache, cache_pos=cache_pos, positions=positions, key_mask=key_mask)[:, -1]


def _compiled_step(decoder: _StaticDecoder, device: torch.device) -> _CompiledStep:
    """The decode step through torch.compile: CUDA graphs on CUDA; C++ kernels with a C++ wrapper on a CPU
    (the Python wrapper's per-kernel overhead is most of a small model's step). A compilation that fails (no C++
    compiler, an unsupported op) is logged and the step runs eagerly instead."""
    import torch._dynamo.config as dynamo_config

    # every batch size (and every Engine) compiles the same code again; the default limit of 8 would then
    # turn into a hard error under fullgraph=True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if device.type == "cuda":
        compiled = torch.compile(decoder, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:
        compiled = torch.compile(decoder, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return _CompiledStep(decoder, compiled)


class _CompiledStep:
    """Calls the compiled step; its first call compiles (timed: `take_compile_seconds`) and, if compilation
    fails (before the cache is touched), logs it and falls back to the eager decoder for good."""

    def __init__(self, decoder: _StaticDecoder, compiled: Callable[..., torch.Tensor]) -> None:
        self.decoder, self.fn, self.checked, self.compile_seconds = decoder, compiled, False, 0.0

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
            self.fn = self.decoder
            out = self.decoder(*args)
        self.compile_seconds = time.perf_counter() - start
        self.checked = True
        return out

    def take_compile_seconds(self) -> float:
        """Seconds the first call took (compiling), once; 0 afterwards."""
        seconds, self.compile_seconds = self.compile_seconds, 0.0
        return seconds


class Engine:
    """Generation over one model (and optionally a draft model with the same tokenizer)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        draft: torch.nn.Module | None = None,
        compile: bool | None = None,
        static_cache: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.draft = draft.eval() if draft is not None else None
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.draft is not None:
            self._check_draft(self.draft)
        # compile by default on CUDA only: on a CPU the first call costs 15-40 s of compilation (seconds once
        # inductor's on-disk cache holds the graph), which pays off for long runs and servers, not one-shot use
        self.compile = bool(self.device.type == "cuda" if compile is None else compile)
        self.static_cache = self.compile if static_cache is None else static_cache or self.compile
        self._static: dict[int, tuple[_StaticDecoder, Callable[..., torch.Tensor]]] = {}
        self._single_thread = single_threaded(self.model)
        self._step_threads = _Threads(1 if self._single_thread else None)

    def _prefill_threads(self, tokens: int) -> _Threads:
        """Short prefills of small models are decode-like (see SINGLE_THREAD_PARAMS); long ones use every thread."""
        return _Threads(1 if self._single_thread and tokens <= SINGLE_THREAD_PREFILL_TOKENS else None)

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        draft: str | Path | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = "auto",
        compile: bool | None = None,
    ) -> Engine:
        """Load a model dir (or run dir) and optionally a draft model; auto = CUDA + bf16 when available."""
        from slmkit.api import load

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else None
        elif isinstance(dtype, str):
            names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
            if dtype not in names:
                raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
            dtype = names[dtype]
        lm = load(path, device=device, dtype=dtype)
        draft_model = load_draft(lm, draft, device=device, dtype=dtype) if draft is not None else None
        return cls(lm.model, lm.tokenizer, draft=draft_model, compile=compile)

    def _check_draft(self, draft: torch.nn.Module) -> None:
        if draft.config.vocab_size != self.config.vocab_size or draft.config.eos_token_id != self.config.eos_token_id:
            raise UserError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens, eos {draft.config.eos_token_id}) "
                f"differs from the target's ({self.config.vocab_size}, eos {self.config.eos_token_id}); "
                "a draft model must share the target's tokenizer"
            )

    # ---- public API -------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        truncate: bool = False,
        constraint: Any = None,
        speculate: SpeculateMode = "off",
        speculate_k: int | None = None,
        min_acceptance: float = 0.3,
        stats: EngineStats | None = None,
    ) -> list[Completion]:
        """Completions of one or more prompts (a batch; speculation runs them one at a time)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise UserError("no prompts given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise UserError(f"prompt {i + 1} is empty: give some text to continue")
        ids = [self.tokenizer.encode(t).ids for t in texts]
        return self.generate_ids(
            ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stop,
            logprobs=logprobs,
            truncate=truncate,
            constraint=constraint,
            speculate=speculate,
            speculate_k=speculate_k,
            min_acceptance=min_acceptance,
            stats=stats,
        )

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Text deltas of one prompt's continuation (same options as `generate`); never splits a character."""
        if not isinstance(prompt, str) or not prompt:
            raise UserError("empty prompt: give some text to continue")
        ids = self.tokenizer.encode(prompt).ids
        return self._run([ids], stream=True, **kwargs)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[Completion]:
        """Like `generate`, on token ids."""
        return list(self._run([list(p) for p in prompt_ids], stream=False, **kwargs))

    # ---- request handling -------------------------------------------------------------------------------
    def _run(
        self,
        prompt_ids: list[list[int]],
        *,
        stream: bool,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        truncate: bool = False,
        constraint: Any = None,
        speculate: SpeculateMode = "off",
        speculate_k: int | None = None,
        min_acceptance: float = 0.3,
        stats: EngineStats | None = None,
    ) -> Iterator[Any]:
        sampling = sampling or SamplingParams()
        stats = stats if stats is not None else EngineStats()
        if isinstance(stop, str):
            stop = [stop]
        if speculate not in ("off", "draft", "lookup"):
            raise UserError(f"speculate must be off, draft or lookup, got {speculate!r}")
        if speculate == "draft" and self.draft is None:
            raise UserError("speculate='draft' needs a draft model (--draft MODEL)")
        if speculate_k is None:
            speculate_k = 8 if speculate == "lookup" else 4
        if speculate != "off" and not (1 <= speculate_k <= 32):
            raise UserError(f"speculate-k must be in [1, 32], got {speculate_k}")
        if not (0 <= min_acceptance <= 1):
            raise UserError(f"min acceptance must be in [0, 1], got {min_acceptance}")
        prompt_ids = [self._fit_prompt(p, max_new_tokens, truncate, i) for i, p in enumerate(prompt_ids)]
        compiled = None
        if constraint is not None:
            if speculate != "off":
                raise UserError("constrained output (JSON schema, regex, grammar) cannot be combined with speculation")
            from slmkit.infer.constrained import compile_constraint

            compiled = compile_constraint(constraint, self.tokenizer, self.config.vocab_size, self.config.eos_token_id)
        return self._iterate(
            prompt_ids,
            stream,
            max_new_tokens,
            sampling,
            list(stop),
            logprobs,
            compiled,
            speculate,
            speculate_k,
            min_acceptance,
            stats,
        )

    def _fit_prompt(self, ids: list[int], max_new_tokens: int, truncate: bool, index: int) -> list[int]:
        if not ids:
            raise UserError(f"prompt {index + 1} is empty: give at least one token of text")
        if max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {max_new_tokens}")
        context = self.config.max_seq_len
        total = len(ids) + max_new_tokens
        if total <= context:
            return ids
        if truncate and max_new_tokens < context:
            return ids[-(context - max_new_tokens) :]  # keep the end of the prompt, which the output continues
        raise UserError(
            f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) = {total} exceeds the model's context "
            f"of {context} tokens; shorten the prompt, lower --max-new-tokens, or pass --truncate to drop the "
            "start of the prompt"
        )

    @torch.inference_mode()  # as a decorator it covers each step of the generator only, not the caller's code
    def _iterate(
        self,
        prompt_ids: list[list[int]],
        stream: bool,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: list[str],
        logprobs: bool,
        compiled: Any,
        speculate: SpeculateMode,
        speculate_k: int,
        min_acceptance: float,
        stats: EngineStats,
    ) -> Iterator[Any]:
        from slmkit.infer.constrained import GrammarState

        stats.speculation = speculate
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        need_text = stream or bool(stop)

        def new_seq(p: list[int]) -> _Seq:
            text = _TextStream(self.tokenizer, stop) if need_text else None
            grammar = GrammarState(compiled, self.config.vocab_size) if compiled is not None else None
            return _Seq(p, text, grammar)

        if speculate == "off":
            groups = [[new_seq(p) for p in prompt_ids]]
        else:
            groups = [[new_seq(p)] for p in prompt_ids]  # speculation runs one prompt at a time
        for seqs in groups:
            stats.batch_size = len(seqs)
            stats.sequences += len(seqs)
            stats.prompt_tokens += sum(len(s.prompt) for s in seqs)
            if speculate == "off":
                steps = self._decode_batch(seqs, max_new_tokens, sampling, generator, logprobs, stats)
            else:
                steps = self._decode_speculative(
                    seqs[0], max_new_tokens, sampling, generator, logprobs, speculate, speculate_k,
                    min_acceptance, stats,
                )  # fmt: skip
            for _ in steps:
                for seq in seqs:
                    if stream:
                        yield from (delta for delta in seq.deltas if delta)
                    seq.deltas.clear()
            for seq in seqs:
                stats.new_tokens += len(seq.out)
                stats.finish_reasons.append(seq.finish_reason)
                if seq.grammar is not None:
                    stats.mask_seconds += seq.grammar.mask_seconds
                if stream:
                    tail = seq.text.flush() if seq.text is not None else ""
                    if tail:
                        yield tail
                else:
                    text = seq.text.emitted if seq.text is not None and seq.text.stopped else None
                    if text is None:
                        text = self.tokenizer.decode(seq.out) if self.tokenizer is not None else ""
                    yield Completion(
                        text=text,
                        token_ids=list(seq.out),
                        finish_reason=seq.finish_reason,
                        prompt_tokens=len(seq.prompt),
                        logprobs=list(seq.logprobs) if logprobs else None,
                    )

    # ---- one token for every sequence ---------------------------------------------------------------------
    def _emit(self, seq: _Seq, token: int, logprob: float | None, max_new_tokens: int) -> None:
        """Append a chosen token to a sequence and decide whether it is finished."""
        eos = self.config.eos_token_id
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if token == eos:
            seq.finished, seq.finish_reason = True, "stop"
            return
        seq.out.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.text is not None:
            seq.deltas.append(seq.text.push(token))
        reason = finish_reason(seq.text, seq.grammar, len(seq.out), max_new_tokens)
        if reason is not None:
            seq.finished, seq.finish_reason = True, reason

    def _choose(
        self,
        logits: torch.Tensor,
        seqs: list[_Seq],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        logprobs: bool,
        counts: torch.Tensor | None,
        seen: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[float] | None]:
        """Next tokens (B,) for logits (B, V): penalties, grammar masks, then sampling."""
        raw = logits.float()
        chosen_logprobs = None
        scores = apply_penalties(raw, sampling, counts, seen)
        if any(s.grammar is not None and not s.finished for s in seqs):
            scores = scores.clone() if scores is raw else scores
            for i, seq in enumerate(seqs):
                if seq.grammar is not None and not seq.finished:
                    seq.grammar.mask_(scores[i])
        tokens = sample(scores, sampling, generator)
        if logprobs:
            chosen_logprobs = raw.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()
        return tokens, chosen_logprobs

    def _penalty_state(
        self, seqs: list[_Seq], sampling: SamplingParams
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not sampling.has_penalties:
            return None, None
        return penalty_state([seq.prompt for seq in seqs], self.config.vocab_size, self.device)

    # ---- plain batched decoding ---------------------------------------------------------------------------
    def _decode_batch(
        self,
        seqs: list[_Seq],
        max_new_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        logprobs: bool,
        stats: EngineStats,
    ) -> Iterator[None]:
        b = len(seqs)
        lengths = [len(s.prompt) for s in seqs]
        p = max(lengths)
        pads = torch.tensor([p - n for n in lengths], device=self.device)  # (B,)
        padded = any(n != p for n in lengths)
        idx = torch.tensor([[0] * (p - len(s.prompt)) + s.prompt for s in seqs], device=self.device)  # (B, P)
        static = self.static_cache and p + max_new_tokens <= self.config.max_seq_len
        step_fn: Callable[..., torch.Tensor] | None = None
        if static:
            decoder, step_fn = self._static_decoder(b)
            cache = decoder.cache
        else:
            cache = self.model.new_cache(b, p + max_new_tokens)
        slots = torch.arange(cache.max_slots, device=self.device)
        key_mask = slots[None, :] >= pads[:, None] if padded or static else None  # (B, S)
        positions = (torch.arange(p, device=self.device)[None, :] - pads[:, None]).clamp(min=0) if padded else None
        # every decode step's slot and positions as views of two tensors made once (no per-step host->device copy)
        step_positions = slots[None, :] - pads[:, None] if padded or static else None  # (B, S)
        counts, seen = self._penalty_state(seqs, sampling)

        start = time.perf_counter()
        with self._prefill_threads(b * p):
            logits = self.model(
                idx, cache=cache, cache_pos=torch.arange(p, device=self.device), positions=positions,
                key_mask=key_mask, upto=p, last_only=True,
            )[:, -1]  # fmt: skip
        stats.prefill_seconds += time.perf_counter() - start
        start = time.perf_counter()
        for step in range(max_new_tokens):
            tokens, chosen = self._choose(logits, seqs, sampling, generator, logprobs, counts, seen)
            if counts is not None and seen is not None:
                counts.scatter_add_(1, tokens[:, None], torch.ones(b, 1, device=self.device))
                seen.scatter_(1, tokens[:, None], True)
            token_list = tokens.tolist()
            for i, seq in enumerate(seqs):
                if not seq.finished:
                    self._emit(seq, token_list[i], chosen[i] if chosen is not None else None, max_new_tokens)
            yield
            if all(s.finished for s in seqs):
                break
            slot = p + step
            cache_pos = slots[slot : slot + 1]
            pos = step_positions[:, slot : slot + 1] if step_positions is not None else None  # (B, 1)
            with self._step_threads:
                if static:
                    logits = step_fn(tokens[:, None], cache_pos, pos, key_mask)
                else:
                    logits = self.model(
                        tokens[:, None], cache=cache, cache_pos=cache_pos, positions=pos, key_mask=key_mask,
                        upto=slot + 1,
                    )[:, -1]  # fmt: skip
            stats.decode_forwards += 1
        compiling = step_fn.take_compile_seconds() if isinstance(step_fn, _CompiledStep) else 0.0
        stats.compile_seconds += compiling
        stats.decode_seconds += time.perf_counter() - start - compiling

    def _static_decoder(self, batch_size: int) -> tuple[_StaticDecoder, Callable[..., torch.Tensor]]:
        if batch_size not in self._static:
            decoder = _StaticDecoder(self.model, batch_size, self.dtype)
            step_fn: Callable[..., torch.Tensor] = decoder
            if self.compile:  # a _CompiledStep
                step_fn = _compiled_step(decoder, self.device)
            self._static[batch_size] = (decoder, step_fn)
        return self._static[batch_size]

    # ---- speculative decoding (one sequence) ----------------------------------------------------------------
    def _decode_speculative(
        self,
        seq: _Seq,
        max_new_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        logprobs: bool,
        mode: SpeculateMode,
        k: int,
        min_acceptance: float,
        stats: EngineStats,
    ) -> Iterator[None]:
        from slmkit.infer.speculative import DraftModel, lookup_draft, verify

        device = self.device
        prompt = seq.prompt
        p = len(prompt)
        slots = p + max_new_tokens + k + 1
        cache = self.model.new_cache(1, slots)
        counts, seen = self._penalty_state([seq], sampling)
        tokens = list(prompt)
        drafter = DraftModel(self.draft, slots, sampling) if mode == "draft" else None

        start = time.perf_counter()
        with self._prefill_threads(p):
            logits = self.model(
                torch.tensor([prompt], device=device), cache=cache, cache_pos=torch.arange(p, device=device),
                last_only=True,
            )[:, -1]  # fmt: skip
        stats.prefill_seconds += time.perf_counter() - start

        start = time.perf_counter()
        calibration_steps = 3  # plain steps first: they time the baseline that the speedup is measured against
        speculating = True
        drafted = accepted = 0

        def take(token: int, logprob: float | None) -> None:
            tokens.append(token)
            if counts is not None and seen is not None:
                counts[0, token] += 1
                seen[0, token] = True
            self._emit(seq, token, logprob, max_new_tokens)

        token, chosen = self._choose(logits, [seq], sampling, generator, logprobs, counts, seen)
        take(int(token[0]), chosen[0] if chosen else None)
        yield
        plain_steps = 0
        while not seq.finished:
            n = len(tokens)  # the target's cache holds tokens[:n-1]; tokens[n-1] is not fed yet
            budget = max_new_tokens - len(seq.out) - 1  # draft at most this many (one more comes from the target)
            draft: list[int] = []
            draft_probs = None
            if speculating and plain_steps >= calibration_steps and budget > 0:
                kk = min(k, budget)
                if mode == "lookup":
                    draft = lookup_draft(tokens, kk)
                else:
                    assert drafter is not None
                    with self._step_threads:
                        draft, draft_probs = drafter.propose(tokens, kk, generator, counts, seen)
            if not draft:
                step_start = time.perf_counter()
                with self._step_threads:
                    logits = self.model(
                        torch.tensor([[tokens[-1]]], device=device), cache=cache,
                        cache_pos=torch.tensor([n - 1], device=device), upto=n,
                    )[:, -1]  # fmt: skip
                token, chosen = self._choose(logits, [seq], sampling, generator, logprobs, counts, seen)
                take(int(token[0]), chosen[0] if chosen else None)
                stats.decode_forwards += 1
                stats.plain_step_seconds.append(time.perf_counter() - step_start)
                plain_steps += 1
                yield
                continue
            m = len(draft)
            feed = torch.tensor([[tokens[-1], *draft]], device=device)  # (1, m+1)
            with self._step_threads:  # m+1 tokens: still a decode-sized step
                logits = self.model(feed, cache=cache, cache_pos=torch.arange(n - 1, n + m, device=device), upto=n + m)[
                    0
                ]  # (m+1, V): row j predicts the token after draft[:j]
            stats.decode_forwards += 1
            stats.rounds += 1
            new_tokens, n_accepted = verify(logits, draft, draft_probs, sampling, generator, counts, seen)
            raw_logprobs = logits.float().log_softmax(-1) if logprobs else None
            drafted += m
            accepted += n_accepted
            stats.drafted += m
            stats.accepted += n_accepted
            for j, t in enumerate(new_tokens):
                take(t, float(raw_logprobs[j, t]) if raw_logprobs is not None else None)
                if seq.finished:
                    break
            if drafter is not None:
                drafter.rewind(n + min(n_accepted, m - 1))  # draft tokens fed beyond this were rejected
            yield
            # turn speculation off when it does not pay: too few drafted tokens survive verification
            if drafted >= MIN_DRAFTED_TO_JUDGE and accepted < min_acceptance * drafted:
                speculating = False
                stats.speculation_turned_off = True
                logger.info("speculation off: %d of %d drafted tokens accepted", accepted, drafted)
        stats.decode_seconds += time.perf_counter() - start


def load_draft(target: Any, draft: Any, device: str | None = None, dtype: torch.dtype | None = None):
    """The draft model (a path or LoadedModel) for a loaded target; its tokenizer.json must be the target's."""
    from slmkit.api import load
    from slmkit.data.tokenizer import file_sha256

    if device is None:
        device = str(next(target.model.parameters()).device)
    dlm = load(draft, device=device, dtype=dtype)
    if file_sha256(dlm.directory / "tokenizer.json") != file_sha256(target.directory / "tokenizer.json"):
        raise UserError(
            f"draft model {dlm.directory} has a different tokenizer than {target.directory}; a draft model must "
            "share the target's tokenizer.json (or use --lookup, which needs no draft model)"
        )
    return dlm.model
