"""The server's scheduler: one worker thread runs the continuous batcher's step loop.

Requests (jobs: one per generated choice) wait in a bounded queue and join the running batch as soon as a row of
the KV cache is free (`slmkit.infer.batcher.ContinuousBatcher`); they leave it at any step. Every step the worker
also drops jobs whose client went away (their row is freed at once) and stops jobs past their deadline:

- a job still waiting at its deadline fails with `RequestTimeout` (the app answers 503 + Retry-After);
- a running job at its deadline finishes with what it has, ``finish_reason "length"`` (as when max_tokens cuts
  it off).

Shutdown is graceful: `begin_shutdown` makes `submit` refuse new jobs (`ShuttingDown`, a 503), the worker drains
the queued and running ones, then `close` returns; past its timeout the rest are cancelled. A server of several
models runs one scheduler per model (each its own worker thread, queue and KV cache); `close_all` drains them
together within one timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest, GenerationSequence, StepOutput, TokenLogprob

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds `max_queue` jobs already."""


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


class RequestTimeout(Exception):
    """The request waited in the queue past its deadline."""


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Result:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)  # jobs are compared by identity (a job's request refers back to it)
class Job:
    """One generated choice. Events go to ``events`` as (index, kind, value): ("delta", Delta) while streaming,
    then ("done", Result) or ("error", exception). The choices of one HTTP request share ``events`` and
    ``cancelled``."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    index: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    seq: GenerationSequence | None = None
    first_token_at: float | None = None
    timed_out: bool = False

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_queue: int = 64,
        max_batch: int = 32,
        prefill_chunk: int = 512,
        request_timeout: float | None = None,
        metrics: Any = None,
        compile: bool | None = None,
        speculate: str = "off",
        speculate_k: int = 8,
        per_row_adapters: bool = False,
        kv_cache: Any = None,
        name: str = "",
        prefix_cache: bool = False,
        prefix_cache_bytes: int = 256 << 20,
    ) -> None:
        if max_queue < 1:
            raise UserError(f"max queue must be >= 1, got {max_queue}")
        if request_timeout is not None and not request_timeout > 0:
            raise UserError(f"request timeout must be > 0 seconds, got {request_timeout}")
        self.batcher = ContinuousBatcher(
            model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, compile=compile,
            speculate=speculate,  # type: ignore[arg-type]  (checked by the batcher)
            speculate_k=speculate_k, per_row_adapters=per_row_adapters, kv_cache=kv_cache,
            prefix_cache=prefix_cache, prefix_cache_bytes=prefix_cache_bytes,
        )  # fmt: skip
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.request_timeout = request_timeout
        self.metrics = metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # jobs with a sequence in the batcher (waiting there or in a row)
        self._accepting = True
        self._stopping = False
        self._abort = False
        self.last_batch_size = 0
        self.name = name  # the served model's (the worker thread carries it)
        thread_name = f"slm-serve-worker-{name}" if name else "slm-serve-worker"
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    # ---- from the event loop ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def check(self, request: GenerationRequest) -> None:
        """UserError if the request cannot run (empty prompt, beyond the context)."""
        self.batcher.check(request)

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none (QueueFull, ShuttingDown)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull
            for job in jobs:
                if self.request_timeout is not None:
                    job.deadline = job.submitted_at + self.request_timeout
                self._waiting.append(job)
        self._wake.set()

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on; queued and running ones go on."""
        self._accepting = False

    def close(self, timeout: float | None = 30) -> None:
        """Stop taking requests, finish the queued and running ones (at most `timeout` s, then cancel), stop."""
        self.begin_shutdown()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("requests still running after %s s of shutdown: cancelling them", timeout)
            self._abort = True
            self._wake.set()
            self._thread.join(10)

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs."""
        return self._thread.is_alive()

    # ---- the worker -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception as exc:  # a bug: fail the running jobs, keep serving
                logger.exception("generation step failed")
                for job in list(self._running):
                    job.put("error", exc)
                    try:
                        self._cancel(job)
                    except Exception:
                        self._running.remove(job)

    def _iteration(self) -> bool:
        """Admit, reap, one batcher step, hand out its tokens; False when the worker should stop."""
        now = time.monotonic()
        self._admit(now)
        self._reap(now)
        if self._abort:
            for job in list(self._running):
                self._cancel(job)
            return False
        if not self.batcher.has_work:
            if self._stopping and not self._waiting:
                return False
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return True
        outputs = self.batcher.step()
        if self.batcher.stats.step_batch_size:
            self.last_batch_size = self.batcher.stats.step_batch_size
            if self.metrics is not None:
                self.metrics.step(self.last_batch_size)
        for out in outputs:
            self._dispatch(out)
        return True

    def _admit(self, now: float) -> None:
        """Hand queued jobs to the batcher while it has free rows."""
        while True:
            with self._lock:
                if not self._waiting or self.batcher.free_rows <= len(self.batcher.waiting):
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            if job.deadline is not None and now >= job.deadline:
                job.put("error", RequestTimeout("the request timed out waiting in the queue"))
                continue
            job.request.tag = job
            try:
                job.seq = self.batcher.submit(job.request)
            except UserError as exc:
                job.put("error", exc)
                continue
            self._running.append(job)

    def _reap(self, now: float) -> None:
        """Cancel the jobs whose client left; stop the ones past their deadline (finish_reason "length")."""
        with self._lock:
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(job)
        for job in list(self._running):
            if job.cancelled.is_set():
                self._cancel(job)
            elif job.deadline is not None and now >= job.deadline:
                job.timed_out = True
                self._cancel(job)
                self._finish(job, "length")

    def _cancel(self, job: Job) -> None:
        assert job.seq is not None
        self.batcher.cancel(job.seq)
        self._running.remove(job)
        if self.metrics is not None and not job.timed_out:
            seconds = time.monotonic() - job.submitted_at
            self.metrics.finish(seconds, "cancelled", job.seq.prompt_tokens, len(job.seq.out))

    def _dispatch(self, out: StepOutput) -> None:
        job: Job = out.seq.request.tag
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_token(job.first_token_at - job.submitted_at)
        if job.stream and (out.text or out.logprob is not None):
            job.put("delta", Delta(out.text, [out.logprob] if out.logprob is not None else []))
        if out.finished:
            self._running.remove(job)
            self._finish(job, out.seq.finish_reason or "stop")

    def _finish(self, job: Job, reason: str) -> None:
        seq = job.seq
        assert seq is not None
        if job.timed_out:  # the batcher did not finish it: release the text it held back
            tail = seq.text.flush()
            if job.stream and tail:
                job.put("delta", Delta(tail, []))
        result = Result(seq.output_text, len(seq.out), reason, seq.prompt_tokens, list(seq.logprobs))
        if self.metrics is not None:
            self.metrics.finish(time.monotonic() - job.submitted_at, reason, seq.prompt_tokens, len(seq.out))
        job.put("done", result)


def close_all(schedulers: list[Scheduler], timeout: float | None = 30) -> None:
    """Close every scheduler: all stop taking requests at once, then each drains within what is left of one shared
    `timeout` (the others keep working meanwhile), so k models take `timeout` at most, not k times it."""
    for scheduler in schedulers:
        scheduler.begin_shutdown()
    deadline = None if timeout is None else time.monotonic() + timeout
    for scheduler in schedulers:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        scheduler.close(left)
