"""The server's Prometheus metrics (text exposition format), kept in plain Python: counters, gauges and
histograms with cumulative ``_bucket{le=...}``, ``_sum`` and ``_count`` series."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            total += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
        lines += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Everything /metrics shows; updated from the event loop (HTTP statuses) and the worker (the rest)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finished: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.time_to_first_token = Histogram(
            "slm_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token (per choice).",
            LATENCY_BUCKETS,
        )
        self.latency = Histogram(
            "slm_request_latency_seconds", "Seconds from a request's arrival to its last token (per choice).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.step_batch_size = Histogram(
            "slm_step_batch_size", "Sequences decoded together, per decode step.", BATCH_BUCKETS
        )

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def finish(self, seconds: float, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.latency.observe(seconds)
            self.finished[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def step(self, batch_size: int) -> None:
        with self._lock:
            self.step_batch_size.observe(batch_size)

    def render(self, scheduler: Any) -> str:
        with self._lock:
            lines = ["# HELP slm_requests_total HTTP requests by path and status.", "# TYPE slm_requests_total counter"]
            for (path, status), count in sorted(self.requests.items()):
                lines.append(f'slm_requests_total{{path="{path}",status="{status}"}} {count}')
            lines += [
                "# HELP slm_generations_total Generated choices by finish reason (cancelled: the client left).",
                "# TYPE slm_generations_total counter",
            ]
            for reason, count in sorted(self.finished.items()):
                lines.append(f'slm_generations_total{{finish_reason="{reason}"}} {count}')
            lines += [
                "# HELP slm_prompt_tokens_total Prompt tokens processed.",
                "# TYPE slm_prompt_tokens_total counter",
                f"slm_prompt_tokens_total {self.prompt_tokens}",
                "# HELP slm_completion_tokens_total Tokens generated.",
                "# TYPE slm_completion_tokens_total counter",
                f"slm_completion_tokens_total {self.completion_tokens}",
                "# HELP slm_queue_depth Requests waiting for a row of the running batch.",
                "# TYPE slm_queue_depth gauge",
                f"slm_queue_depth {scheduler.queue_depth}",
                "# HELP slm_running_requests Sequences in the running batch (each holds a KV cache row).",
                "# TYPE slm_running_requests gauge",
                f"slm_running_requests {scheduler.running}",
                "# HELP slm_last_batch_size Sequences in the last decode step.",
                "# TYPE slm_last_batch_size gauge",
                f"slm_last_batch_size {scheduler.last_batch_size}",
            ]
            for histogram in (self.time_to_first_token, self.latency, self.step_batch_size):
                lines += histogram.render()
        lines += batcher_lines(getattr(scheduler, "batcher", None))
        return "\n".join(lines) + "\n"


def _series(name: str, kind: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def batcher_lines(batcher: Any) -> list[str]:
    """The prefix cache's and speculation's series, read from the batcher (the worker's; plain counters, so a
    read between its steps sees consistent enough numbers)."""
    if batcher is None:
        return []
    lines: list[str] = []
    cache = getattr(batcher, "prefix", None)
    if cache is not None:
        stats = cache.stats
        lines += _series(
            "slm_prefix_cache_prompt_tokens_total", "counter", "Prompt tokens of requests admitted with the cache on.",
            stats.prompt_tokens,
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose keys and values came from the prefix "
            "cache instead of a prefill.", stats.hit_tokens,
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_hit_rate", "gauge", "Prefix cache hit tokens / prompt tokens since the start.",
            round(stats.hit_rate, 6),
        )  # fmt: skip
        lines += _series("slm_prefix_cache_bytes", "gauge", "Bytes of cached prefix blocks.", cache.cached_bytes)
        lines += _series("slm_prefix_cache_blocks", "gauge", "Cached prefix blocks.", cache.cached_blocks)
        lines += _series(
            "slm_prefix_cache_evicted_blocks_total", "counter", "Prefix blocks evicted to stay under the size cap.",
            stats.evicted_blocks,
        )  # fmt: skip
    if getattr(batcher, "speculate", "off") != "off":
        stats = batcher.stats
        lines += _series("slm_speculative_drafted_tokens_total", "counter", "Tokens drafted.", stats.drafted)
        lines += _series(
            "slm_speculative_accepted_tokens_total", "counter", "Drafted tokens kept by verification.", stats.accepted
        )
        lines += _series(
            "slm_decode_tokens_per_forward", "gauge",
            "Tokens a sequence gains per decode or verification pass (1: no speculation).",
            round(stats.tokens_per_forward, 6),
        )  # fmt: skip
    return lines
