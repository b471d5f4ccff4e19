"""The inference engine: batched prefill + decode over a static KV cache, streaming, log-probabilities,
speculative decoding and grammar-constrained output.

    from slmkit.infer.engine import Engine
    engine = Engine.load("runs/quickstart")
    [out] = engine.generate(["def fib(n):"], max_new_tokens=64)
    for delta in engine.stream("import os", max_new_tokens=32, speculate="lookup"):
        print(delta, end="")

The engine is a front end to the one decode core (`slmkit.infer.core.DecodeCore`): a batch of prompts becomes
rows of one model state, each at its own length (no padding), prefilled (rows of one prompt length together)
and stepped until every row has finished; speculation verifies drafts in one pass over a row and crops the
rejected positions from the row's state.

On CUDA the decode step runs in bf16 and, with ``compile=True`` (the default there), through
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) over a state of fixed shape. On a CPU it runs eagerly
unless ``compile=True`` asks for inductor's C++ kernels (a one-time compilation of 7-95 s; faster
steps on small models, see docs/inference.md); left to choose (``compile=None``), an engine of a small model
compiles once it has decoded AUTO_COMPILE_TOKENS tokens, where the compilation has paid for itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from slmkit.errors import UserError
from slmkit.infer.core import (  # noqa: F401  (MIN_DRAFTED_TO_JUDGE: the engine's speculation rule, re-exported)
    MAX_TOP_LOGPROBS,
    MIN_DRAFTED_TO_JUDGE,
    DecodeCore,
    GenerationRequest,
    GenerationSequence,
    StepOutput,
    single_threaded,
)
from slmkit.infer.sampling import SamplingParams
from slmkit.models import native_decode

logger = logging.getLogger(__name__)

SpeculateMode = Literal["off", "draft", "lookup", "recycle", "tree"]
# A CPU engine of a small model (`single_threaded`: the step is per-op overhead, which compiling removes) compiles
# its decode step once it has made this many tokens. Measured on a loaded 2-core EPYC (docs/inference.md): the
# compiled micro step saved about 1 ms a token (0.4-0.6 ms against 1.2-1.8 ms eager) and compiling cost 7-15 s
# with inductor's on-disk cache warm, 80-95 s cold; so it pays after roughly 10^4 tokens warm, 10^5 cold.
AUTO_COMPILE_TOKENS = 20_000


@dataclass
class Completion:
    """One prompt's result. ``text`` is cut before a stop string; EOS is in neither text nor token_ids."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop string, or a finished grammar) or "length"
    prompt_tokens: int
    logprobs: list[float] | None = None  # log p(token) under the model (raw logits, before sampling settings)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the k most likely (token, log p)

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
        if self.top_logprobs is not None:
            d["top_logprobs"] = [[[t, round(lp, 6)] for t, lp in top] for top in self.top_logprobs]
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
    turned_off_because: str | None = None  # "low acceptance" or "slower than plain decoding: 0.69x"
    # speculate="tree" on a model or setting a tree cannot run on (recurrent mixers, bounded or compressed caches,
    # sliding windows, sampling, penalties): why it ran linear recycle drafts instead
    tree_fallback: str | None = None
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
                spec += f"; turned off ({self.turned_off_because or 'low acceptance'})"
            if self.tree_fallback:
                spec += f"; linear drafts, no tree: {self.tree_fallback}"
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
        kv_cache: Any = None,
    ) -> None:
        self.model = model.eval()
        # how attention layers keep keys and values (`slmkit.models.state.KVCacheSpec`; None: every position)
        self.kv_cache = kv_cache if kv_cache is not None and not kv_cache.is_default else None
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
        # compile=None on a CPU: eager at first, compiled once the engine has decoded AUTO_COMPILE_TOKENS tokens (a
        # long-lived engine, such as a server's, where the compilation is paid back; see AUTO_COMPILE_TOKENS)
        self._auto_compile = compile is None and self.device.type == "cpu" and single_threaded(self.model)
        self._auto_compile = self._auto_compile and static_cache is None and self.kv_cache is None
        # a model the native decode step runs (slmkit.models.native_decode) decodes batch 1 faster eagerly: measured
        # on micro, one thread, 4066 tokens/s eager against 1450 compiled (docs/inference.md, seventh round)
        self._auto_compile = self._auto_compile and not native_decode.applies(self.model)
        self.decoded_tokens = 0  # new tokens this engine has made (what the CPU compile rule counts)
        # with a static state (compiled steps), one core per batch size lives as long as the engine
        self._static: dict[int, DecodeCore] = {}
        self.recycler: Any = None  # speculate="recycle": the adjacency matrix, kept across calls (it learns)

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
        kv_cache: Any = None,
    ) -> Engine:
        """Load a model dir (or run dir) and optionally a draft model; auto = CUDA + bf16 when available.
        kv_cache: a `slmkit.models.state.KVCacheSpec` (bounded, quantized or pruned keys and values)."""
        from slmkit.loading import load

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
        return cls(lm.model, lm.tokenizer, draft=draft_model, compile=compile, kv_cache=kv_cache)

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
        top_logprobs: int = 0,
        truncate: bool = False,
        constraint: Any = None,
        speculate: SpeculateMode = "off",
        speculate_k: int | None = None,
        min_acceptance: float = 0.3,
        stats: EngineStats | None = None,
        tree_widths: str | Sequence[int] | None = None,
        min_speedup: float = 0.0,
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
            top_logprobs=top_logprobs,
            truncate=truncate,
            constraint=constraint,
            speculate=speculate,
            speculate_k=speculate_k,
            min_acceptance=min_acceptance,
            stats=stats,
            tree_widths=tree_widths,
            min_speedup=min_speedup,
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
        top_logprobs: int = 0,
        truncate: bool = False,
        constraint: Any = None,
        speculate: SpeculateMode = "off",
        speculate_k: int | None = None,
        min_acceptance: float = 0.3,
        stats: EngineStats | None = None,
        tree_widths: str | Sequence[int] | None = None,
        min_speedup: float = 0.0,
    ) -> Iterator[Any]:
        sampling = sampling or SamplingParams()
        stats = stats if stats is not None else EngineStats()
        if isinstance(stop, str):
            stop = [stop]
        if speculate not in ("off", "draft", "lookup", "recycle", "tree"):
            raise UserError(f"speculate must be off, draft, lookup, recycle or tree, got {speculate!r}")
        widths: list[int] = []
        if tree_widths is not None and speculate != "tree":
            raise UserError("tree widths go with speculate='tree' (--speculate tree)")
        if speculate == "tree":
            from slmkit.infer.speculative import DEFAULT_TREE_WIDTHS, parse_tree_widths

            try:
                widths = parse_tree_widths(tree_widths if tree_widths is not None else DEFAULT_TREE_WIDTHS)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if speculate == "draft" and self.draft is None:
            raise UserError("speculate='draft' needs a draft model (--draft MODEL)")
        if speculate == "draft" and self.bounded:
            raise UserError("a draft model keeps a full cache of its own context: use --lookup with --kv-window")
        if speculate_k is None:
            speculate_k = len(widths) if speculate == "tree" else 8 if speculate in ("lookup", "recycle") else 4
        if speculate != "off" and not (1 <= speculate_k <= 32):
            raise UserError(f"speculate-k must be in [1, 32], got {speculate_k}")
        if not (0 <= min_acceptance <= 1):
            raise UserError(f"min acceptance must be in [0, 1], got {min_acceptance}")
        if isinstance(min_speedup, bool) or not (0 <= min_speedup <= 100):
            raise UserError(f"min speedup must be in [0, 100] (0: never judged by time), got {min_speedup}")
        if not (0 <= top_logprobs <= MAX_TOP_LOGPROBS):
            raise UserError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        logprobs = logprobs or top_logprobs > 0
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
            (logprobs, top_logprobs),
            compiled,
            speculate,
            speculate_k,
            (min_acceptance, min_speedup),
            stats,
            widths,
        )

    def _fit_prompt(self, ids: list[int], max_new_tokens: int, truncate: bool, index: int) -> list[int]:
        if not ids:
            raise UserError(f"prompt {index + 1} is empty: give at least one token of text")
        if max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {max_new_tokens}")
        context = self.config.max_seq_len
        total = len(ids) + max_new_tokens
        if total <= context or self.bounded:  # a bounded cache streams past the context at constant memory
            return ids
        if truncate and max_new_tokens < context:
            return ids[-(context - max_new_tokens) :]  # keep the end of the prompt, which the output continues
        raise UserError(
            f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) = {total} exceeds the model's context "
            f"of {context} tokens; shorten the prompt, lower --max-new-tokens, or pass --truncate to drop the "
            "start of the prompt"
        )

    @property
    def bounded(self) -> bool:
        """Whether the KV cache holds a fixed window (generation may then run past the model's context)."""
        return self.kv_cache is not None and self.kv_cache.bounded

    def _core(self, batch_size: int, max_len: int, speculating: bool) -> DecodeCore:
        """A core of `batch_size` rows: the engine's static one (compiled steps) when it fits, else a fresh one."""
        if self.static_cache and not speculating and (max_len <= self.config.max_seq_len or self.bounded):
            if batch_size not in self._static:
                self._static[batch_size] = DecodeCore(
                    self.model, self.tokenizer, max_batch=batch_size, max_len=self.config.max_seq_len,
                    compile=self.compile, dtype=self.dtype, kv_cache=self.kv_cache,
                )  # fmt: skip
            return self._static[batch_size]
        return DecodeCore(self.model, self.tokenizer, max_batch=batch_size, max_len=max_len, kv_cache=self.kv_cache)

    @torch.inference_mode()  # as a decorator it covers each step of the generator only, not the caller's code
    def _iterate(
        self,
        prompt_ids: list[list[int]],
        stream: bool,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: list[str],
        logprob_options: tuple[bool, int],
        compiled: Any,
        speculate: SpeculateMode,
        speculate_k: int,
        judge: tuple[float, float],
        stats: EngineStats,
        widths: list[int],
    ) -> Iterator[Any]:
        stats.speculation = speculate
        logprobs, top_logprobs = logprob_options
        requests = [
            GenerationRequest(
                p, max_new_tokens, sampling, stop, constraint=compiled, logprobs=logprobs, top_logprobs=top_logprobs,
                detokenize=stream or bool(stop),
            )
            for p in prompt_ids
        ]  # fmt: skip
        speculating = speculate != "off"
        groups = [[r] for r in requests] if speculating else [requests]  # speculation: one prompt at a time
        room = speculate_k + 1 if speculating else 0  # slots a verification may feed past the output
        if widths:  # a tree feeds its every node (each at its own slot)
            room = max(room, 1 + sum(math.prod(widths[: d + 1]) for d in range(len(widths))))
        for group in groups:
            longest = max(len(r.prompt_ids) for r in group)
            core = self._core(len(group), longest + max_new_tokens + room, speculating)
            before = dataclasses.replace(core.stats)
            seqs = [core.admit(r) for r in group]
            stats.batch_size = len(seqs)
            stats.sequences += len(seqs)
            stats.prompt_tokens += sum(len(s.prompt) for s in seqs)
            start = time.perf_counter()
            if speculating:
                steps = self._speculative(core, seqs[0], speculate, speculate_k, judge, stats, widths)
            else:
                steps = self._plain(core)
            for outputs in steps:
                if stream:
                    yield from (out.text for out in outputs if out.text)
            wall = time.perf_counter() - start
            prefill = core.stats.prefill_seconds - before.prefill_seconds
            compiling = core.stats.compile_seconds - before.compile_seconds
            stats.prefill_seconds += prefill
            stats.compile_seconds += compiling
            stats.decode_seconds += wall - prefill - compiling  # every step after prefill, choosing included
            stats.decode_forwards += core.stats.decode_forwards - before.decode_forwards
            self._count_decoded(sum(len(s.out) for s in seqs))
            for seq in seqs:
                stats.new_tokens += len(seq.out)
                stats.finish_reasons.append(seq.finish_reason or "")
                if seq.grammar is not None:
                    stats.mask_seconds += seq.grammar.mask_seconds
                if not stream:
                    yield self._completion(seq, logprobs)

    def _count_decoded(self, tokens: int) -> None:
        """Count new tokens; past AUTO_COMPILE_TOKENS a CPU engine left to choose (compile=None) compiles from its
        next batch on (greedy output is the same either way)."""
        self.decoded_tokens += tokens
        if self._auto_compile and self.decoded_tokens >= AUTO_COMPILE_TOKENS:
            logger.info("%d tokens decoded: compiling the decode step from the next batch on", self.decoded_tokens)
            self._auto_compile = False
            self.compile = self.static_cache = True

    def _completion(self, seq: GenerationSequence, logprobs: bool) -> Completion:
        text = seq.text.emitted if seq.text is not None and seq.text.stopped else None
        if text is None:
            text = self.tokenizer.decode(seq.out) if self.tokenizer is not None else ""
        return Completion(
            text=text,
            token_ids=list(seq.out),
            finish_reason=seq.finish_reason or "",
            prompt_tokens=len(seq.prompt),
            logprobs=[lp.logprob for lp in seq.logprobs] if logprobs else None,
            top_logprobs=[lp.top for lp in seq.logprobs] if seq.request.top_logprobs else None,
        )

    @staticmethod
    def _plain(core: DecodeCore) -> Iterator[list[StepOutput]]:
        while core.rows:
            yield core.step()

    # ---- speculative decoding (one sequence) ----------------------------------------------------------------
    def _speculative(
        self,
        core: DecodeCore,
        seq: GenerationSequence,
        mode: SpeculateMode,
        k: int,
        judge: tuple[float, float],
        stats: EngineStats,
        widths: list[int] | None = None,
    ) -> Iterator[list[StepOutput]]:
        """Plain steps first (they time the baseline the speedup is measured against), then rounds of: draft up
        to k tokens, verify them in one pass over the row (`DecodeCore.step` with drafts). mode="tree": a draft
        tree of the template `widths` (at most k deep), verified in one pass with a tree mask (`DecodeCore.step`
        with tree), or linear recycle drafts where a tree cannot run (`EngineStats.tree_fallback` says why).

        judge = (min_acceptance, min_speedup): speculation is turned off for the rest of the sequence once too few
        drafted tokens survive (`GenerationSequence.speculation_pays`), or, with min_speedup > 0, once
        MIN_ROUNDS_TO_TIME rounds have produced fewer tokens per second (drafting and verification timed together)
        than min_speedup times the rate of the timed plain steps (`SpeculationClock`): on a CPU a small model's
        verification pass of k tokens can cost more than the tokens it saves. Greedy output is the same either way;
        seeded sampling is never judged by time (when speculation stops would change its tokens)."""
        from slmkit.infer.speculative import DraftModel, SpeculationClock, TokenRecycler, lookup_draft

        min_acceptance, min_speedup = judge
        sampling = seq.request.sampling
        if sampling.seed is not None and not sampling.greedy:
            min_speedup = 0.0  # seeded sampling must not depend on timing: when speculation stops changes the tokens
        clock = SpeculationClock(stats.plain_step_seconds, min_speedup)
        drafter = DraftModel(self.draft, core.max_len, sampling) if mode == "draft" else None
        use_tree = False
        if mode == "tree":
            reason = None
            if not sampling.greedy:
                reason = "tree verification is greedy only; sampling runs linear recycle drafts"
            elif sampling.has_penalties:
                reason = "tree verification takes no repetition/frequency/presence penalties"
            elif not getattr(self.model, "takes_tree", lambda state: False)(core.state):
                reason = (
                    "the model keeps recurrent state or a bounded, compressed or sliding-window cache, which a "
                    "tree's sibling nodes cannot share"
                )
            use_tree = reason is None
            if reason is not None:
                stats.tree_fallback = reason
                logger.info("speculate tree: %s; running linear recycle drafts", reason)
        if mode in ("recycle", "tree"):  # every verification pass teaches the matrix, empty drafts' too
            if self.recycler is None:
                self.recycler = TokenRecycler(self.config.vocab_size)
            recycler = self.recycler

            def observe(rows: list, tokens: torch.Tensor, logits: torch.Tensor, drafts: dict) -> None:
                with core.step_threads:  # decode-sized work: on the step's threads (see slmkit.infer.core)
                    recycler.observe(tokens, logits, [1 + len(drafts[s][0]) if s in drafts else 1 for s in rows])

            core.on_verify = observe
        calibration_steps = 3
        plain_steps = 0
        yield core.step()  # prefill and the first token
        while not seq.finished:
            tokens = seq.prompt + seq.out  # the row's state holds tokens[:-1]; the last is pending
            budget = seq.request.max_new_tokens - len(seq.out) - 1  # one more token comes from the target
            draft: list[int] = []
            draft_probs = None
            round_start = time.perf_counter()
            if not stats.speculation_turned_off and plain_steps >= calibration_steps and budget > 0:
                if mode == "lookup":
                    draft = lookup_draft(tokens, min(k, budget))
                elif use_tree:
                    assert widths
                    nodes, parents = self.recycler.draft_tree(tokens[-1], widths[: min(k, budget)])
                    if len(nodes) == 1:  # nothing known after the last token: the pending token alone teaches it
                        outputs = core.step({seq: ([], None)})
                        clock.round(round_start, 1)
                        yield outputs
                        continue
                    accepted = seq.accepted
                    drafted = seq.drafted
                    outputs = core.step(tree=(seq, nodes, parents))
                    clock.round(round_start, 1 + seq.accepted - accepted)
                    stats.rounds += 1
                    stats.drafted += seq.drafted - drafted  # the tree's depth: the most a pass can accept
                    stats.accepted += seq.accepted - accepted
                    yield outputs
                    self._judge(seq, min_acceptance, clock, stats)
                    continue
                elif mode in ("recycle", "tree"):
                    draft = self.recycler.draft(tokens[-1], min(k, budget))
                    if not draft:  # a verification pass of the pending token alone: the matrix learns its successors
                        outputs = core.step({seq: ([], None)})
                        clock.round(round_start, 1)
                        yield outputs
                        continue
                else:
                    assert drafter is not None
                    with core.step_threads:
                        draft, draft_probs = drafter.propose(
                            tokens, min(k, budget), seq.generator, seq.counts, seq.seen
                        )
            if not draft:
                step_start = time.perf_counter()
                outputs = core.step()
                stats.plain_step_seconds.append(time.perf_counter() - step_start)
                plain_steps += 1
                yield outputs
                continue
            base, accepted = seq.length, seq.accepted  # base: the pending token's position
            outputs = core.step({seq: (draft, draft_probs)})
            n_accepted = seq.accepted - accepted
            clock.round(round_start, 1 + n_accepted)
            stats.rounds += 1
            stats.drafted += len(draft)
            stats.accepted += n_accepted
            if drafter is not None:  # draft tokens it was fed beyond this were rejected
                drafter.rewind(base + 1 + min(n_accepted, len(draft) - 1))
            yield outputs
            self._judge(seq, min_acceptance, clock, stats)

    @staticmethod
    def _judge(seq: GenerationSequence, min_acceptance: float, clock: Any, stats: EngineStats) -> None:
        """Turn speculation off for the sequence when too few drafts survive or, timed, when it is slower."""
        if stats.speculation_turned_off:
            return
        if not seq.speculation_pays(min_acceptance):  # too few drafted tokens survive verification
            stats.speculation_turned_off = True
            stats.turned_off_because = "low acceptance"
            logger.info("speculation off: %d of %d drafted tokens accepted", seq.accepted, seq.drafted)
        elif not clock.pays():
            stats.speculation_turned_off = True
            stats.turned_off_because = f"slower than plain decoding: {clock.speedup():.2f}x"
            logger.info("speculation off: %s", clock.describe())


def load_draft(target: Any, draft: Any, device: str | None = None, dtype: torch.dtype | None = None):
    """The draft model (a path or LoadedModel) for a loaded target; its tokenizer.json must be the target's."""
    from slmkit.data.tokenizer import file_sha256
    from slmkit.loading import load

    if device is None:
        device = str(next(target.model.parameters()).device)
    dlm = load(draft, device=device, dtype=dtype)
    if file_sha256(dlm.directory / "tokenizer.json") != file_sha256(target.directory / "tokenizer.json"):
        raise UserError(
            f"draft model {dlm.directory} has a different tokenizer than {target.directory}; a draft model must "
            "share the target's tokenizer.json (or use --lookup, which needs no draft model)"
        )
    return dlm.model
