"""One background worker thread owns the engine: requests queue up, and every request waiting when the worker
becomes free joins the next round. Within a round, non-streaming requests with the same settings (max_tokens,
sampling, stop) run as one engine batch; streaming requests and seeded sampling requests run one at a time
(a seeded request must not share a random generator with others, or its output would depend on its neighbours).

This is batch-at-a-time, not per-step continuous batching: a request that arrives while a round runs waits for
the round to finish.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from slmkit.errors import UserError
from slmkit.infer.engine import Engine, EngineStats
from slmkit.infer.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Result:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


class QueueFull(Exception):
    """The bounded queue holds `max_queue` requests already."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    loop: asyncio.AbstractEventLoop
    constraint: Any = None  # a slmkit.infer.constrained.Constraint (response_format), hashable
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("delta", str) ... ("done", Completion)|("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one engine batch; None = run alone."""
        if self.stream or (self.sampling.seed is not None and not self.sampling.greedy):
            return None
        sampling = self.sampling if not self.sampling.greedy else SamplingParams()
        return (self.max_tokens, sampling, self.stop, self.constraint)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int = 32) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running = 0
        self.last_batch_size = 0
        self._thread = threading.Thread(target=self._work, name="slm-serve-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull
            self._waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- worker -----------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # finish this round, then stop
                break
            jobs.append(job)
        with self._lock:
            self._waiting -= len(jobs)
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            groups: dict[Any, list[Job]] = {}
            alone: list[Job] = []
            for job in jobs:
                key = job.batch_key
                if key is None:
                    alone.append(job)
                else:
                    groups.setdefault(key, []).append(job)
            self.running = len(jobs)
            for group in groups.values():
                self._run_batch(group)
            for job in alone:
                if not job.cancelled.is_set():
                    self._run_stream(job) if job.stream else self._run_batch([job])
            self.running = 0

    def _run_batch(self, jobs: list[Job]) -> None:
        self.last_batch_size = len(jobs)
        first = jobs[0]
        try:
            results = self.engine.generate_ids(
                [j.prompt_ids for j in jobs],
                max_new_tokens=first.max_tokens,
                sampling=first.sampling,
                stop=first.stop,
                constraint=first.constraint,
            )
        except UserError as exc:
            for job in jobs:
                job.put("error", exc)
            return
        except Exception as exc:  # never let the worker die
            logger.exception("generation failed")
            for job in jobs:
                job.put("error", exc)
            return
        for job, completion in zip(jobs, results, strict=True):
            job.put(
                "done",
                Result(completion.text, len(completion.token_ids), completion.finish_reason, completion.prompt_tokens),
            )

    def _run_stream(self, job: Job) -> None:
        self.last_batch_size = 1
        stats = EngineStats()
        text = []
        try:
            deltas = self.engine._run(
                [job.prompt_ids],
                stream=True,
                max_new_tokens=job.max_tokens,
                sampling=job.sampling,
                stop=job.stop,
                constraint=job.constraint,
                stats=stats,
            )
            for delta in deltas:
                if job.cancelled.is_set():  # the client went away: stop generating
                    deltas.close()
                    return
                text.append(delta)
                job.put("delta", delta)
        except Exception as exc:
            logger.exception("generation failed")
            job.put("error", exc)
            return
        reason = stats.finish_reasons[0] if stats.finish_reasons else "length"
        job.put("done", Result("".join(text), stats.new_tokens, reason, len(job.prompt_ids)))
