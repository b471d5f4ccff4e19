"""The server's Prometheus metrics (text exposition format), kept in plain Python: counters, gauges and
histograms with cumulative ``_bucket{le=...}``, ``_sum`` and ``_count`` series.

Series without a ``model`` label cover the whole server (the gauges sum over every served model's scheduler);
the ``slm_model_*`` series are per model, the ``slm_router_*`` ones per virtual router model."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _label(value: str) -> str:
    """A label value as the exposition format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        self.model_requests: Counter[str] = Counter()  # generation requests each model ran
        self.routed: Counter[tuple[str, str]] = Counter()  # (router, the model that answered)
        self.strong_calls: Counter[str] = Counter()  # router requests that called a model past the first
        self.router_requests: Counter[str] = Counter()

    def model_request(self, model: str) -> None:
        """A generation request ran on `model` (a router's request counts once for every model it called)."""
        with self._lock:
            self.model_requests[model] += 1

    def route(self, router: str, answered_by: str, strong: bool) -> None:
        """A request to a router model was answered by `answered_by`; strong: a model past the first was called."""
        with self._lock:
            self.router_requests[router] += 1
            self.routed[(router, answered_by)] += 1
            self.strong_calls[router] += int(strong)

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

    def render(self, scheduler: Any, models: Mapping[str, Any] | None = None, routers: Sequence[str] = ()) -> str:
        """The exposition text. scheduler: the one model's scheduler, or {model name: scheduler} of every served
        model; models: {name: object with parameter_bytes and kv_cache_bytes} for the per-model memory gauges;
        routers: the router models' names (their series show at 0 before the first request)."""
        schedulers = dict(scheduler) if isinstance(scheduler, Mapping) else {"": scheduler}
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
                f"slm_queue_depth {sum(s.queue_depth for s in schedulers.values())}",
                "# HELP slm_running_requests Sequences in the running batch (each holds a KV cache row).",
                "# TYPE slm_running_requests gauge",
                f"slm_running_requests {sum(s.running for s in schedulers.values())}",
                "# HELP slm_last_batch_size Sequences in the last decode step (the largest over the models).",
                "# TYPE slm_last_batch_size gauge",
                f"slm_last_batch_size {max(s.last_batch_size for s in schedulers.values())}",
            ]
            for histogram in (self.time_to_first_token, self.latency, self.step_batch_size):
                lines += histogram.render()
            # unlabelled with one model, as the single-model series above; labelled by model with several
            several = len(schedulers) > 1
            lines += batcher_lines({n if several else "": getattr(s, "batcher", None) for n, s in schedulers.items()})
            named = {name: s for name, s in schedulers.items() if name}
            if named:
                lines += self._per_model(named, models or {})
            if routers:
                lines += self._routers(routers)
        return "\n".join(lines) + "\n"

    def _per_model(self, schedulers: Mapping[str, Any], models: Mapping[str, Any]) -> list[str]:
        lines = _series(
            "slm_model_requests_total", "counter", "Generation requests each model ran (a router's count for every "
            "model they called).", {m: self.model_requests[m] for m in schedulers},
        )  # fmt: skip
        lines += _series(
            "slm_model_queue_depth", "gauge", "Sequences waiting for a row, per model.",
            {m: s.queue_depth for m, s in schedulers.items()},
        )  # fmt: skip
        lines += _series(
            "slm_model_running_requests", "gauge", "Sequences in the model's running batch.",
            {m: s.running for m, s in schedulers.items()},
        )  # fmt: skip
        if models:
            lines += _series(
                "slm_model_parameter_bytes", "gauge", "Bytes of the model's parameters.",
                {m: models[m].parameter_bytes for m in schedulers if m in models},
            )  # fmt: skip
            lines += _series(
                "slm_model_kv_cache_bytes", "gauge", "Bytes of the model's inference state (KV cache, all rows).",
                {m: models[m].kv_cache_bytes for m in schedulers if m in models},
            )  # fmt: skip
        return lines

    def _routers(self, routers: Sequence[str]) -> list[str]:
        lines = [
            "# HELP slm_router_requests_total Requests to a router model, by the model that answered.",
            "# TYPE slm_router_requests_total counter",
        ]
        for (router, model), count in sorted(self.routed.items()):
            labels = f'router="{_label(router)}",answered_by="{_label(model)}"'
            lines.append(f"slm_router_requests_total{{{labels}}} {count}")
        lines += _series(
            "slm_router_strong_calls_total", "counter", "Router requests that called a model past the first one.",
            {r: self.strong_calls[r] for r in routers}, label="router",
        )  # fmt: skip
        lines += [
            "# HELP slm_router_strong_share Share of a router's requests that called a model past the first one.",
            "# TYPE slm_router_strong_share gauge",
        ]
        for r in routers:
            share = self.strong_calls[r] / self.router_requests[r] if self.router_requests[r] else 0.0
            lines.append(f'slm_router_strong_share{{router="{_label(r)}"}} {share!r}')
        return lines


def _series(name: str, kind: str, help: str, values: Mapping[str, float], label: str = "model") -> list[str]:
    """One family: {label value: value}; the value "" (a single served model) is written without a label."""
    out = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    for key, value in values.items():
        labels = f'{{{label}="{_label(key)}"}}' if key else ""
        out.append(f"{name}{labels} {_number(value)}")
    return out


def batcher_lines(batchers: Mapping[str, Any]) -> list[str]:
    """The prefix cache's and speculation's series, read from each model's batcher (the worker's; plain counters,
    so a read between its steps sees consistent enough numbers); labelled by model when several are served."""
    caches = {m: b.prefix for m, b in batchers.items() if b is not None and getattr(b, "prefix", None) is not None}
    lines: list[str] = []
    if caches:
        lines += _series(
            "slm_prefix_cache_prompt_tokens_total", "counter", "Prompt tokens of requests admitted with the cache on.",
            {m: c.stats.prompt_tokens for m, c in caches.items()},
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose keys and values came from the prefix "
            "cache instead of a prefill.", {m: c.stats.hit_tokens for m, c in caches.items()},
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_hit_rate", "gauge", "Prefix cache hit tokens / prompt tokens since the start.",
            {m: round(c.stats.hit_rate, 6) for m, c in caches.items()},
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_bytes", "gauge", "Bytes of cached prefix blocks.",
            {m: c.cached_bytes for m, c in caches.items()},
        )  # fmt: skip
        lines += _series(
            "slm_prefix_cache_blocks", "gauge", "Cached prefix blocks.", {m: c.cached_blocks for m, c in caches.items()}
        )
        lines += _series(
            "slm_prefix_cache_evicted_blocks_total", "counter", "Prefix blocks evicted to stay under the size cap.",
            {m: c.stats.evicted_blocks for m, c in caches.items()},
        )  # fmt: skip
    speculating = {m: b.stats for m, b in batchers.items() if b is not None and getattr(b, "speculate", "off") != "off"}
    if speculating:
        lines += _series(
            "slm_speculative_drafted_tokens_total", "counter", "Tokens drafted.",
            {m: s.drafted for m, s in speculating.items()},
        )  # fmt: skip
        lines += _series(
            "slm_speculative_accepted_tokens_total", "counter", "Drafted tokens kept by verification.",
            {m: s.accepted for m, s in speculating.items()},
        )  # fmt: skip
        lines += _series(
            "slm_decode_tokens_per_forward", "gauge",
            "Tokens a sequence gains per decode or verification pass (1: no speculation).",
            {m: round(s.tokens_per_forward, 6) for m, s in speculating.items()},
        )  # fmt: skip
    return lines
