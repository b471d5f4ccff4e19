"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    from slmkit.serve.app import create_app
    app = create_app("runs/quickstart")        # then: uvicorn.run(app) or `slm serve runs/quickstart`

The routes are thin: OpenAI's request and response shapes (validation, response objects, stream chunks, error
bodies) are `slmkit.serve.openai`'s. Generation runs on the continuous-batching scheduler
(`slmkit.serve.scheduler`); each of a request's ``n`` choices is a sequence of its own.

Adapters per request (``adapters={"sql": "adapters/sql", ...}``, `slm serve BASE --lora sql=adapters/sql`): every
PEFT LoRA adapter is loaded onto the one base model and served as a model of its own name; a request's ``model``
picks the adapter (or the base, under its usual name), and requests for different adapters share the running batch
(`slmkit.infer.batcher`, ``per_row_adapters``). /v1/models lists the base and each adapter, an adapter with the
base as its ``parent`` (as vLLM lists LoRA modules).

Several models (``create_app({"small": "runs/small", "large": "runs/large"})``, `slm serve --model small=DIR --model
large=DIR`): each model has its own scheduler (worker thread, queue and KV cache); a request's ``model`` picks one.
With two or more, the virtual model ``router`` (`Router`) answers by a cascade (`slmkit.serve.cascade`: the first
model answers, the next one when the answer's mean token log-probability is below the threshold), and the
response's ``model`` names the model that answered, ``slmkit_route`` (and the ``slmkit-route`` header) the chain.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import ipaddress
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit import defaults
from slmkit.errors import UserError
from slmkit.infer.batcher import GenerationRequest, TokenLogprob
from slmkit.infer.engine import Engine
from slmkit.serve import openai
from slmkit.serve.cascade import DEFAULT_CASCADE_THRESHOLD, RouteStep, accepts, check_threshold, confidence
from slmkit.serve.guards import LOOPBACK_HOSTS, Guards
from slmkit.serve.metrics import Metrics
from slmkit.serve.openai import ApiError, ChatRequest, CompletionRequest, OpenAIRequest, Reply, StreamShaper
from slmkit.serve.scheduler import Delta, Job, QueueFull, Result, Scheduler, ShuttingDown, close_all

MAX_REQUEST_BYTES = 1 << 20
DEFAULT_ROUTER_NAME = "router"
API_KEY_ENV = "SLM_API_KEY"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": openai.ErrorBody, "description": description}
    if retry:
        doc["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return doc


_GUARDED = {
    400: _error("Invalid request (a body that does not validate, or a Host header not allowed: invalid_host)"),
    403: _error("An Origin header of an origin not allowed (origin_not_allowed)"),
}
_KEYED = {**_GUARDED, 401: _error("Missing or wrong API key (with --api-key)")}
ERRORS_OF: dict[str, dict[int | str, dict[str, Any]]] = {
    "health": {**_GUARDED, 503: _error("The server is shutting down")},
    "metrics": _GUARDED,
    "models": _KEYED,
    "generate": {
        200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "The answer (SSE: stream)"},
        **_KEYED,
        404: _error("No such model"),
        413: _error("The request body is larger than --max-request-bytes"),
        503: _error("The queue is full, the request waited too long, or the server is shutting down", retry=True),
    },
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document without its 422s: validation errors are 400s here (documented per route)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (call once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def resolve_api_key(
    api_key: str | None, api_key_file: str | Path | None, environ: dict[str, str] | None = None
) -> str | None:
    """The server's API key: --api-key, else the first line of --api-key-file, else $SLM_API_KEY, else none.
    UserError for a key file that is missing, unreadable or empty (a server meant to be keyed must not run open)."""
    if api_key is not None:
        if not api_key:
            raise UserError("the API key is empty")
        return api_key
    if api_key_file is not None:
        try:
            text = Path(api_key_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"cannot read the API key file {str(api_key_file)!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise UserError(f"the API key file {str(api_key_file)!r} is empty")
        return key
    key = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return key or None


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host names a server bound to `host` accepts by default: the loopback names (any port) for a loopback
    address, else any (None)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); UserError with the reason when it cannot be."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {host!r} is not an address of this machine ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def parse_lora(values: Sequence[str]) -> dict[str, Path]:
    """`--lora NAME=DIR` values -> {NAME: DIR}, in order; UserError for a value not of that shape, or a name given
    twice. The directories are checked by `check_served_adapters`."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise UserError(f"--lora {value!r}: give NAME=DIR (the model name requests use = the adapter directory)")
        if name in adapters:
            raise UserError(f"--lora: the name {name!r} is given twice; each adapter needs a name of its own")
        adapters[name] = Path(directory)
    return adapters


def check_served_adapters(adapters: Mapping[str, str | Path], base_name: str) -> dict[str, Path]:
    """The adapters to serve, checked before the base loads: names that are not empty, contain no whitespace and
    differ from the base's served name; directories that hold a LoRA adapter (`check_adapter_dir`). UserError
    naming the adapter otherwise. Whether an adapter fits the base (its layers and shapes) shows when it loads."""
    from slmkit.interop.adapters import check_adapter_dir

    checked: dict[str, Path] = {}
    for name, directory in adapters.items():
        if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name):
            raise UserError(f"adapter name {name!r}: give a non-empty name without spaces")
        if name == base_name:
            raise UserError(
                f"adapter name {name!r} is the base model's served name; give the adapter another name (requests "
                "for the base use that one)"
            )
        try:
            check_adapter_dir(directory)
        except UserError as exc:
            raise UserError(f"adapter {name!r}: {exc}") from None
        checked[name] = Path(directory)
    return checked


def load_served_adapters(model: Any, adapters: Mapping[str, Path]) -> dict[str, int]:
    """Load each adapter onto the model; {served name: adapter index} (what `GenerationRequest.adapter` takes).
    Loaded under names of their own ("served-0", ...), so a served name may hold dots or slashes."""
    from slmkit.interop.adapters import load_adapter
    from slmkit.models.lora import adapter_names

    indices: dict[str, int] = {}
    for i, (name, directory) in enumerate(adapters.items()):
        internal = f"served-{i}"
        try:
            load_adapter(model, directory, name=internal)
        except UserError as exc:
            raise UserError(f"adapter {name!r}: {exc}") from None
        indices[name] = adapter_names(model).index(internal)
    return indices


def score_prompt(model: Any, ids: list[int], top: int) -> list[TokenLogprob]:
    """log p(token | the tokens before it) for every prompt token after the first, with the `top` most likely
    alternatives at each position: what ``echo`` reports for a prompt. Raw logits (no temperature), one full
    forward without a cache; the model's forward keeps no state, so it may run beside the scheduler's worker."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device))[0, :-1].float()  # (T-1, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            pairs = zip(indices.tolist(), values.tolist(), strict=True)
            alternatives = [list(zip(i, v, strict=True)) for i, v in pairs]
        else:
            alternatives = [[] for _ in chosen]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(ids[1:], chosen, alternatives, strict=True)]


def parse_models(values: Sequence[str]) -> dict[str, Path]:
    """`--model NAME=DIR` values -> {NAME: DIR}, in order; UserError for a value not of that shape, a name with
    whitespace or a name given twice. The directories are checked by `check_served_models`."""
    models: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise UserError(f"--model {value!r}: give NAME=DIR (the model name requests use = the model directory)")
        if any(c.isspace() for c in name):
            raise UserError(f"--model {value!r}: the name {name!r} has whitespace; give a name without spaces")
        if name in models:
            raise UserError(f"--model: the name {name!r} is given twice; each model needs a name of its own")
        models[name] = Path(directory)
    return models


def check_served_models(models: Mapping[str, str | Path]) -> dict[str, Path]:
    """Each model's directory resolved (a run dir to its latest checkpoint), before anything loads: UserError naming
    the model for a missing or wrong directory."""
    from slmkit.interop.checkpoint import resolve_model_dir

    checked: dict[str, Path] = {}
    for name, directory in models.items():
        try:
            checked[name] = resolve_model_dir(directory)
        except UserError as exc:
            raise UserError(f"model {name!r}: {exc}") from None
    return checked


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters, each storage once (tied embeddings count once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def json_number(value: float | None) -> float | str | None:
    """A float for a JSON body: rounded, and -inf / inf as strings (JSON has no infinities)."""
    if value is None:
        return None
    return round(value, 6) if math.isfinite(value) else str(value)


@dataclass(eq=False)
class ServedModel:
    """One model of the server: its engine, its own scheduler (a worker thread, a queue and a KV cache of
    max_batch rows) and what its routes need."""

    name: str
    engine: Engine
    scheduler: Scheduler
    directory: Path | None
    template: Any  # the compiled chat template
    eos_token: str  # what ends earlier assistant turns in a conversation
    pieces: openai.TokenText
    bounded: bool  # the KV cache keeps a window (prompt + max_tokens may pass the context)
    parameter_bytes: int
    kv_cache_bytes: int

    def memory(self) -> dict[str, int]:
        return {"parameter_bytes": self.parameter_bytes, "kv_cache_bytes": self.kv_cache_bytes}

    def describe_memory(self) -> str:
        return (
            f"parameters {format_bytes(self.parameter_bytes)}, KV cache {format_bytes(self.kv_cache_bytes)} "
            f"({self.scheduler.max_batch} rows)"
        )


@dataclass(eq=False)
class Router:
    """The virtual router model: a cascade over `models` (first model first) at `threshold`, or, with `learned`
    (a router of `slmkit.route`), the weak model (models[0]) or the strong one (models[1]) chosen per prompt."""

    name: str
    models: list[ServedModel]
    threshold: float
    learned: Any = None
    reader: torch.nn.Module | None = None  # the weak model's weights for the learned router (`shared_weights_copy`)

    @property
    def kind(self) -> str:
        return "cascade" if self.learned is None else "learned"

    def describe(self) -> dict[str, Any]:
        threshold = self.threshold if self.learned is None else getattr(self.learned, "threshold", None)
        return {"kind": self.kind, "models": [m.name for m in self.models], "threshold": json_number(threshold)}


def load_served_model(
    name: str,
    source: Engine | Path,
    *,
    kv_cache: Any,
    scheduling: Mapping[str, Any],
    metrics: Metrics,
    adapters: Mapping[str, Path],
) -> tuple[ServedModel, dict[str, int]]:
    """Load one model (unless an Engine is given) and its adapters (checked ones: `check_served_adapters`), then
    start its scheduler; the model and {adapter's served name: adapter index}."""
    directory = None if isinstance(source, Engine) else source
    engine = source if isinstance(source, Engine) else Engine.load(source, kv_cache=kv_cache)
    indices = load_served_adapters(engine.model, adapters)
    kv = kv_cache if kv_cache is not None else engine.kv_cache
    scheduler = Scheduler(
        engine.model, engine.tokenizer, metrics=metrics, per_row_adapters=bool(adapters), kv_cache=kv, name=name,
        **scheduling,
    )  # fmt: skip
    served = ServedModel(
        name=name, engine=engine, scheduler=scheduler, directory=directory,
        template=openai.compile_chat_template(openai.load_chat_template(directory)),
        eos_token=openai.eos_text(directory), pieces=openai.TokenText(engine.tokenizer),
        bounded=bool(kv is not None and kv.bounded), parameter_bytes=parameter_bytes(engine.model),
        kv_cache_bytes=scheduler.batcher.core.state.storage_bytes(),
    )  # fmt: skip
    return served, indices


def create_app(
    engine_or_model_path: Engine | str | Path | Mapping[str, Engine | str | Path],
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    model_name: str | None = None,
    request_timeout: float | None = None,
    prefill_chunk: int = 512,
    drain_timeout: float = 30,
    compile: bool | None = None,
    speculate: str = "off",
    speculate_k: int = 8,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_hosts: Iterable[str] | None = None,
    cors_origins: Sequence[str] = (),
    adapters: Mapping[str, str | Path] | None = None,
    kv_cache: Any = None,
    router_name: str | None = DEFAULT_ROUTER_NAME,
    cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
    router: Any = None,
    prefix_cache: bool = True,
    prefix_cache_mb: float = 256,
) -> FastAPI:
    """The FastAPI app over one model, or over several: {served name: Engine or model dir}, in order (the first is
    the router's first model). A path is loaded with `Engine.load` (UserError if it is not a model).

    max_batch: rows of the running batch (sequences decoded together); max_queue: sequences that may wait for a
    row (more get 503); request_timeout: seconds from arrival after which a request stops (see
    `slmkit.serve.scheduler`); prefill_chunk: prompt tokens prefilled per step at most; compile: compile the
    decode step (None: on CUDA only); speculate: "lookup" verifies prompt-lookup drafts of up to speculate_k
    tokens for every row in one pass (greedy output unchanged). max_request_bytes: larger bodies get 413;
    allowed_hosts: the hosts the Host header may name (None: any); cors_origins: the origins whose web pages may
    call the API (requests with any other Origin get 403); see `slmkit.serve.guards`. adapters: {served name:
    PEFT LoRA adapter dir} served per request beside the base (one model only; see the module docstring);
    UserError, before the server starts, for a bad name or directory and an adapter for another base. kv_cache: a
    `slmkit.models.state.KVCacheSpec` for every request (None: the engine's). Each model gets its own scheduler
    with these settings (its own queue of max_queue and KV cache of max_batch rows). prefix_cache: prompts that
    start like earlier ones reuse the keys and values of their cached blocks, at most prefix_cache_mb MiB of them
    per model (see `slmkit.infer.prefix_cache`; off, with the reason logged, for models whose state cannot take
    them).

    With two or more models, the virtual model `router_name` (None: none) answers through a cascade at
    `cascade_threshold` (`slmkit.serve.cascade`), or with `router` (a learned router of `slmkit.route`, or its
    directory; exactly two models: weak, strong) by the router's decision on the prompt.
    """
    if max_queue < 1:
        raise UserError(f"max queue must be >= 1, got {max_queue}")
    if max_request_bytes < 1:
        raise UserError(f"max request bytes must be >= 1, got {max_request_bytes}")
    if prefix_cache and not prefix_cache_mb > 0:
        raise UserError(f"--prefix-cache-mb must be > 0, got {prefix_cache_mb:g} (or turn it off: --no-prefix-cache)")
    sources: dict[str, Engine | Path] = {}
    if isinstance(engine_or_model_path, Mapping):
        if model_name is not None:
            raise UserError("model_name names a single model; several models are named by their keys")
        if not engine_or_model_path:
            raise UserError("no models to serve")
        paths = {k: v for k, v in engine_or_model_path.items() if not isinstance(v, Engine)}
        for name in engine_or_model_path:
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise UserError(f"model name {name!r}: give a non-empty name without spaces")
        checked = check_served_models(paths)  # type: ignore[arg-type]
        sources = {k: v if isinstance(v, Engine) else checked[k] for k, v in engine_or_model_path.items()}
    elif isinstance(engine_or_model_path, Engine):
        sources = {model_name or "slmkit": engine_or_model_path}
    else:
        from slmkit.interop.checkpoint import resolve_model_dir

        directory = resolve_model_dir(engine_or_model_path)
        sources = {model_name or directory.name: directory}
    names = list(sources)
    first = names[0]
    if adapters and len(names) > 1:
        raise UserError(
            "LoRA adapters (--lora) are served on one model; with several models (--model) give no adapters"
        )
    threshold = check_threshold(cascade_threshold)
    routed = len(names) > 1 and router_name is not None
    if routed:
        if not router_name or any(c.isspace() for c in router_name):
            raise UserError(f"router name {router_name!r}: give a non-empty name without spaces")
        if router_name in sources:
            raise UserError(
                f"the router's name {router_name!r} is also a model's; give the router another name (--router-name)"
            )
    if router is not None:
        if not routed:
            raise UserError("a learned router (--router) needs two models (--model weak=DIR --model strong=DIR)")
        if len(names) != 2:
            raise UserError(
                f"a learned router chooses between two models (weak, strong); got {len(names)} models: give two "
                "--model, the weak one first"
            )
        router = load_learned_router(router, sources[names[0]], sources[names[1]])
    lora = check_served_adapters(adapters or {}, first)  # before the base loads
    metrics = Metrics()
    scheduling = dict(
        max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk, request_timeout=request_timeout,
        compile=compile, speculate=speculate, speculate_k=speculate_k, prefix_cache=prefix_cache,
        prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)),
    )  # fmt: skip
    models: dict[str, ServedModel] = {}
    try:
        indices: dict[str, int] = {}
        for name, source in sources.items():
            models[name], loaded = load_served_model(
                name, source, kv_cache=kv_cache, scheduling=scheduling, metrics=metrics,
                adapters=lora if name == first else {},
            )  # fmt: skip
            indices.update(loaded)
        base = models[first]
        # served name -> (model, adapter index: -1 the base, None when the model serves no adapters)
        served: dict[str, tuple[ServedModel, int | None]] = {n: (m, -1 if lora else None) for n, m in models.items()}
        served.update({n: (base, i) for n, i in indices.items()})
    except BaseException:
        close_all([m.scheduler for m in models.values()], 0)
        raise
    virtual = Router(router_name, list(models.values()), threshold, router) if routed else None  # type: ignore[arg-type]
    if virtual is not None and router is not None:
        virtual.reader = shared_weights_copy(models[first].engine.model)
    schedulers = [m.scheduler for m in models.values()]
    created = int(time.time())

    app = FastAPI(title="slmkit", version="1")
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    # the first model's scheduler and engine (what a one-model server has)
    app.state.scheduler, app.state.metrics, app.state.engine = base.scheduler, metrics, base.engine
    app.state.model_name = first
    app.state.models = models  # every model: name -> ServedModel
    app.state.schedulers = schedulers
    app.state.router = virtual
    app.state.adapters = [n for n, (_, i) in served.items() if i is not None and i >= 0]
    app.state.served_models = list(served) + ([virtual.name] if virtual else [])  # what /v1/models lists

    @app.on_event("shutdown")
    def _shutdown() -> None:
        close_all(schedulers, drain_timeout)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(openai.validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(openai.http_error(exc.status_code, str(exc.detail), exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(openai.internal_error(exc))

    app.add_middleware(
        Guards, metrics=metrics, api_key=api_key, max_request_bytes=max_request_bytes, allowed_hosts=allowed_hosts,
        cors_origins=cors_origins,
    )  # fmt: skip

    @app.get("/health", responses=ERRORS_OF["health"])
    async def health() -> Any:
        accepting = all(s.accepting for s in schedulers)
        body: dict[str, Any] = {
            "status": "ok" if accepting else "shutting_down",
            "model": first,
            "queue_depth": sum(s.queue_depth for s in schedulers),
            "running": sum(s.running for s in schedulers),
            "models": {
                n: {
                    "status": "ok" if m.scheduler.accepting else "shutting_down",
                    "queue_depth": m.scheduler.queue_depth,
                    "running": m.scheduler.running,
                    **m.memory(),
                }
                for n, m in models.items()
            },
        }
        if virtual is not None:
            body["router"] = {"name": virtual.name, **virtual.describe()}
        return JSONResponse(body, status_code=200 if accepting else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS_OF["metrics"])
    async def get_metrics() -> str:
        return metrics.render(
            {n: m.scheduler for n, m in models.items()}, models, [virtual.name] if virtual is not None else []
        )

    @app.get("/v1/models", responses=ERRORS_OF["models"])
    async def list_models() -> dict[str, Any]:
        # as vLLM: `root` the base model, `parent` None for it and the base's name for each adapter
        def entry(model_id: str, root: str, **extra: Any) -> dict[str, Any]:
            return {
                "id": model_id, "object": "model", "created": created, "owned_by": "slmkit", "root": root,
                "parent": None if model_id == root else root, **extra,
            }  # fmt: skip

        data = [entry(n, m.name) for n, (m, _) in served.items()]
        if virtual is not None:
            data.append(entry(virtual.name, virtual.name, slmkit_router=virtual.describe()))
        return {"object": "list", "data": data}

    def target_of(req: OpenAIRequest) -> tuple[ServedModel, int | None] | Router:
        """The model (and adapter) the request's model names, or the router; 404 for a model this server does not
        serve."""
        if virtual is not None and req.model == virtual.name:
            return virtual
        if req.model not in served:
            raise openai.model_not_found(req.model, app.state.served_models)
        return served[req.model]

    async def constraint_of(model: ServedModel, req: OpenAIRequest) -> Any:
        constraint = openai.response_format_constraint(req.response_format)
        if constraint is None:
            return None
        from slmkit.infer.constrained import compile_constraint

        engine = model.engine
        try:  # compiling takes a while (and xgrammar's first import seconds): off the event loop
            return await asyncio.to_thread(
                compile_constraint, constraint, engine.tokenizer, engine.config.vocab_size, engine.config.eos_token_id
            )
        except UserError as exc:
            raise ApiError(400, str(exc), param="response_format") from None

    async def requests_of(
        model: ServedModel, req: OpenAIRequest, prompts: list[str | list[int]] | None, adapter: int | None,
        top_logprobs: int | None,
    ) -> list[GenerationRequest]:  # fmt: skip
        """The batcher requests of a completion (its prompts) or chat request for one model: templating and
        tokenizing off the event loop (a long prompt must not stall the other clients)."""
        compiled = await constraint_of(model, req)
        engine = model.engine

        def prepare() -> list[GenerationRequest]:
            if prompts is not None:
                return openai.generation_requests(
                    req, prompts, engine.tokenizer, context=engine.config.max_seq_len, max_batch=max_batch,
                    default_max_tokens=defaults.OPENAI_COMPLETION_MAX_TOKENS, constraint=compiled,
                    top_logprobs=top_logprobs, adapter=adapter, bounded=model.bounded,
                    vocab_size=engine.config.vocab_size,
                )  # fmt: skip
            assert isinstance(req, ChatRequest)
            prompt = openai.chat_prompt(model.template, req.messages, model.eos_token)
            return openai.generation_requests(
                req, [prompt], engine.tokenizer, context=engine.config.max_seq_len, max_batch=max_batch,
                default_max_tokens=None, constraint=compiled, top_logprobs=top_logprobs, adapter=adapter,
                bounded=model.bounded,
            )  # fmt: skip

        return await asyncio.to_thread(prepare)

    def submit(
        model: ServedModel, requests: list[GenerationRequest], stream: bool
    ) -> tuple[list[Job], asyncio.Queue, threading.Event]:
        """Queue one job per request (a choice each) on the model's scheduler, sharing one event queue and one
        cancel flag."""
        scheduler = model.scheduler
        for request in requests:
            try:
                scheduler.check(request)
            except UserError as exc:
                raise ApiError(400, str(exc), code="context_length_exceeded") from None
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        jobs = [Job(request, loop, stream, i, events, cancelled) for i, request in enumerate(requests)]
        try:
            scheduler.submit(jobs)
        except (QueueFull, ShuttingDown) as exc:
            raise openai.submit_error(exc) from None
        metrics.model_request(model.name)
        return jobs, events, cancelled

    async def collect(request: Request, jobs: list[Job], events: asyncio.Queue, cancelled: threading.Event):
        """Every job's Result; a client that disconnects cancels them at once (the worker frees their rows at its
        next step)."""
        results: list[Result | None] = [None] * len(jobs)
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            while any(r is None for r in results):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    cancelled.set()
                    raise openai.client_closed()
                index, kind, value = getter.result()
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    raise openai.generation_error(value)
        finally:
            cancelled.set()  # a no-op for finished jobs; stops the others
            watcher.cancel()
        return results

    async def stream_events(
        shaper: StreamShaper, events: asyncio.Queue, cancelled: threading.Event
    ) -> AsyncIterator[str]:
        """SSE for all choices of one request, as the scheduler's events arrive."""
        try:
            for chunk in shaper.opening():
                yield openai.sse(chunk)
            while not shaper.finished:
                index, kind, value = await events.get()
                if kind == "delta":
                    chunk = shaper.delta(index, value)
                    if chunk is not None:
                        yield openai.sse(chunk)
                elif kind == "done":
                    yield openai.sse(shaper.done(index, value))
                else:
                    yield openai.sse(shaper.error(value))
                    break
            yield openai.SSE_DONE
        finally:
            cancelled.set()  # a client that went away stops its generation

    def streaming(
        shaper: StreamShaper, events: asyncio.Queue, cancelled: threading.Event, headers: dict[str, str] | None = None
    ) -> StreamingResponse:
        return StreamingResponse(
            stream_events(shaper, events, cancelled), media_type="text/event-stream", headers=headers
        )

    def shaper_of(req: OpenAIRequest, reply: Reply, indices: list[int]) -> StreamShaper:
        if isinstance(req, ChatRequest):
            return openai.chat_stream(reply, indices, req.n)
        return openai.completion_stream(reply, indices, req.n)

    def respond(req: OpenAIRequest, reply: Reply, results: list[Result]) -> dict[str, Any]:
        if isinstance(req, ChatRequest):
            return openai.chat_response(reply, results, req.n)
        return openai.completion_response(reply, results, req.n)

    async def route(req: OpenAIRequest, request: Request, router: Router) -> Any:
        """A request to the router model: the cascade (or the learned router's choice) answers; the response's
        `model` is the model that answered, `slmkit_route` (and the `slmkit-route` header) the chain."""
        prompts: list[str | list[int]] | None = None
        if isinstance(req, CompletionRequest):
            prompts = openai.completion_prompts(req)
            if req.echo:
                raise ApiError(
                    400, f"echo scores the prompt with one model: name a model, not the router {router.name!r}",
                    param="echo",
                )  # fmt: skip
            wanted = req.logprobs
        else:
            assert isinstance(req, ChatRequest)
            wanted = openai.chat_top_logprobs(req)
        kind = "chat" if isinstance(req, ChatRequest) else "completion"
        chain: list[RouteStep] = []
        candidates = router.models
        ready: dict[str, list[GenerationRequest]] = {}
        strong_choice: bool | None = None
        if router.learned is not None:  # the learned decision on the weak model's reading of the prompt
            weak, strong = router.models
            ready[weak.name] = await requests_of(weak, req, prompts, None, wanted if wanted is not None else 0)
            strong_choice = await asyncio.to_thread(
                decide_learned, router.learned, router.reader, [r.prompt_ids for r in ready[weak.name][:: req.n]]
            )
            candidates = [strong if strong_choice else weak]
        answered: ServedModel | None = None
        results: list[Result] = []
        for i, model in enumerate(candidates):
            final = i == len(candidates) - 1
            requests = ready.get(model.name) or await requests_of(
                model, req, prompts, None, wanted if wanted is not None else 0
            )
            if final and req.stream:  # the last model streams as it generates
                jobs, events, cancelled = submit(model, requests, True)
                chain.append(RouteStep(model.name, None, True, None))
                info = route_info(router, chain, strong_choice)
                metrics.route(router.name, model.name, strong_choice if strong_choice is not None else len(chain) > 1)
                reply = Reply.new(kind, model.name, model.pieces if wanted is not None else None)
                shaper = shaper_of(req, reply, [j.index for j in jobs])
                return streaming(shaper, events, cancelled, headers={ROUTE_HEADER: route_header(info)})
            jobs, events, cancelled = submit(model, requests, False)
            results = await collect(request, jobs, events, cancelled)
            value = confidence(e.logprob for r in results for e in r.logprobs)
            kept = final or accepts(value, router.threshold)
            chain.append(RouteStep(model.name, value, kept, sum(r.completion_tokens for r in results)))
            if kept:
                answered = model
                break
        assert answered is not None
        info = route_info(router, chain, strong_choice)
        metrics.route(router.name, answered.name, strong_choice if strong_choice is not None else len(chain) > 1)
        reply = Reply.new(kind, answered.name, answered.pieces if wanted is not None else None)
        headers = {ROUTE_HEADER: route_header(info)}
        if req.stream:  # a buffered answer, sent as a stream
            events = asyncio.Queue()
            for index, result in enumerate(results):
                events.put_nowait((index, "delta", Delta(result.text, list(result.logprobs))))
                events.put_nowait((index, "done", result))
            return streaming(shaper_of(req, reply, list(range(len(results)))), events, threading.Event(), headers)
        return JSONResponse({**respond(req, reply, results), "slmkit_route": info}, headers=headers)

    @app.post("/v1/completions", responses=ERRORS_OF["generate"])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        target = target_of(req)
        if isinstance(target, Router):
            return await route(req, request, target)
        model, adapter = target
        prompts = openai.completion_prompts(req)
        if req.echo and adapter not in (None, -1):
            raise ApiError(400, "echo scores prompts with the base model only", param="echo")
        requests = await requests_of(model, req, prompts, adapter, req.logprobs)
        reply = Reply.new("completion", req.model, model.pieces if req.logprobs is not None else None)
        if req.echo:
            scored: list[list[TokenLogprob]] = []
            if req.logprobs is not None:
                for r in requests[:: req.n]:  # the n choices of a prompt share its scores
                    prompt_scores = await asyncio.to_thread(
                        score_prompt, model.engine.model, r.prompt_ids, req.logprobs
                    )
                    scored += [prompt_scores] * req.n
            else:
                scored = [[] for _ in requests]
            results = None
            if req.max_tokens != 0:
                jobs, events, cancelled = submit(model, requests, False)
                results = await collect(request, jobs, events, cancelled)
            return openai.echo_response(reply, requests, scored, results, req.n, model.engine.tokenizer)
        jobs, events, cancelled = submit(model, requests, req.stream)
        if req.stream:
            return streaming(openai.completion_stream(reply, [j.index for j in jobs], req.n), events, cancelled)
        results = await collect(request, jobs, events, cancelled)
        return openai.completion_response(reply, results, req.n)

    @app.post("/v1/chat/completions", responses=ERRORS_OF["generate"])
    async def chat(req: ChatRequest, request: Request) -> Any:
        target = target_of(req)
        if isinstance(target, Router):
            return await route(req, request, target)
        model, adapter = target
        top_logprobs = openai.chat_top_logprobs(req)
        requests = await requests_of(model, req, None, adapter, top_logprobs)
        jobs, events, cancelled = submit(model, requests, req.stream)
        reply = Reply.new("chat", req.model, model.pieces if req.logprobs else None)
        if req.stream:
            return streaming(openai.chat_stream(reply, [j.index for j in jobs], req.n), events, cancelled)
        results = await collect(request, jobs, events, cancelled)
        return openai.chat_response(reply, results, req.n)

    return app


ROUTE_HEADER = "slmkit-route"


def route_info(router: Router, chain: Sequence[RouteStep], strong: bool | None = None) -> dict[str, Any]:
    """What a routed response says of its route: the router, the models called in order with their confidences
    (mean token log-probability; null for a streamed final answer and one without tokens), and the one that
    answered; a learned router adds its decision."""
    answered = next((s.model for s in chain if s.accepted), chain[-1].model)
    info: dict[str, Any] = {
        "router": router.name,
        **router.describe(),
        "answered_by": answered,
        "chain": [{**s.to_dict(), "confidence": json_number(s.confidence)} for s in chain],
    }
    if strong is not None:
        info["strong"] = strong
    return info


def route_header(info: dict[str, Any]) -> str:
    """The route as a header value: compact JSON, ASCII (names outside ASCII are escaped)."""
    return json.dumps(info, separators=(",", ":"), ensure_ascii=True)


def load_learned_router(router: Any, weak: Engine | Path, strong: Engine | Path) -> Any:
    """A learned router (`slmkit.route.load_router` for a directory; or one loaded already), checked against the
    two served models' directories (UserError for a router trained for other models; models given as Engines have
    no directory to check)."""
    if isinstance(router, str | Path):
        from slmkit.route.router import load_router

        router = load_router(router)
    if isinstance(weak, Path) and isinstance(strong, Path):
        router.check_models(weak, strong)
    return router


def shared_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Other module objects over the same parameters and buffers (no weights copied). The learned router reads the
    weak model's hidden states through a hook on its head while the weak model's worker runs forwards of its own:
    on its own modules the hook sees only the router's passes."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def decide_learned(router: Any, weak_model: torch.nn.Module, prompts: Sequence[list[int]]) -> bool:
    """Whether the learned router sends the request to the strong model: when it does for any of its prompts
    (token ids of the weak model's tokenizer)."""
    return any(router.decide(weak_model, list(ids)) for ids in prompts)


def serve(
    model: str | Path | None = None,
    *,
    models: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    request_timeout: float | None = None,
    prefill_chunk: int = 512,
    drain_timeout: float = 30,
    compile: bool | None = None,
    speculate: str = "off",
    speculate_k: int = 8,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] = (),
    lora: Sequence[str] = (),
    kv_cache: Any = None,
    router_name: str = DEFAULT_ROUTER_NAME,
    cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
    router: str | Path | None = None,
    prefix_cache: bool = True,
    prefix_cache_mb: float = 256,
) -> None:
    """Run the server until interrupted (`slm serve`). allowed_hosts None: the loopback names when `host` is a
    loopback address, else any (`default_allowed_hosts`). The address is bound before the model loads, so a bad
    host or a busy port is a UserError at once. The first Ctrl-C / SIGTERM drains: new requests get 503,
    running ones finish (at most `drain_timeout` s); a second one exits at once. lora: `NAME=DIR` values (--lora),
    adapters served per request (`create_app`'s adapters): malformed values fail before the address is bound, the
    adapters are checked and loaded before the server starts.

    models: `NAME=DIR` values (--model), instead of `model`: several models in one server, each with its own
    scheduler; malformed values, names given twice and missing directories fail before the address is bound.
    With two or more, the virtual model `router_name` answers by a cascade at `cascade_threshold`, or by the
    learned `router` (a directory of `slmkit.route`)."""
    import uvicorn

    if not (0 < port < 65536):
        raise UserError(f"port must be in 1..65535, got {port}")
    if not drain_timeout >= 0:
        raise UserError(f"drain timeout must be >= 0 seconds, got {drain_timeout}")
    if max_request_bytes < 1:
        raise UserError(f"max request bytes must be >= 1, got {max_request_bytes}")
    if model is not None and models:
        raise UserError("give the model as MODEL or as --model NAME=DIR (repeatable), not both")
    if model is None and not models:
        raise UserError("give a model to serve: MODEL, or --model NAME=DIR (repeatable)")
    if prefix_cache and not prefix_cache_mb > 0:
        raise UserError(f"--prefix-cache-mb must be > 0, got {prefix_cache_mb:g} (or turn it off: --no-prefix-cache)")
    adapters = parse_lora(lora)
    source: str | Path | dict[str, Path] = model if model is not None else check_served_models(parse_models(models))
    if adapters and len(models) > 1:
        raise UserError("--lora serves adapters on one model; with several --model give no --lora")
    if router is not None and len(models) < 2:
        raise UserError("--router (a learned router) needs two models: --model weak=DIR --model strong=DIR")
    if len(models) > 1 and router_name in source:
        raise UserError(f"--router-name {router_name!r} is also a model's name; give the router another name")
    check_threshold(cascade_threshold)
    if router is not None:  # a router trained for other models fails before the address is bound
        assert isinstance(source, dict)
        weak, strong = source.values() if len(source) == 2 else (None, None)
        if weak is None or strong is None:
            raise UserError(f"--router chooses between two models (weak, strong); got {len(source)} --model")
        router = load_learned_router(router, weak, strong)
    sock = bind_socket(host, port)
    try:
        app = create_app(
            source, api_key=api_key, max_queue=max_queue, max_batch=max_batch, request_timeout=request_timeout,
            prefill_chunk=prefill_chunk, drain_timeout=drain_timeout, compile=compile, speculate=speculate,
            speculate_k=speculate_k, max_request_bytes=max_request_bytes,
            allowed_hosts=default_allowed_hosts(host) if allowed_hosts is None else allowed_hosts,
            cors_origins=cors_origins, adapters=adapters, kv_cache=kv_cache, router_name=router_name,
            cascade_threshold=cascade_threshold, router=router,
            prefix_cache=prefix_cache, prefix_cache_mb=prefix_cache_mb,
        )  # fmt: skip
    except BaseException:
        sock.close()
        raise
    schedulers: list[Scheduler] = app.state.schedulers

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            for scheduler in schedulers:  # requests on open connections get 503 while the running ones finish
                scheduler.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout) or None
    )
    served_models: dict[str, ServedModel] = app.state.models
    for served_model in served_models.values():
        print(f"model {served_model.name!r}: {served_model.describe_memory()}", flush=True)
    virtual: Router | None = app.state.router
    if virtual is not None:
        what = (
            f"cascade over {', '.join(repr(m.name) for m in virtual.models)} at mean token "
            f"log-probability {virtual.threshold:g}"
            if virtual.learned is None
            else f"learned router: {virtual.models[0].name!r} or {virtual.models[1].name!r}"
        )
        print(f"router {virtual.name!r}: {what}", flush=True)
    extra = app.state.adapters
    with_adapters = f" with adapters {', '.join(map(repr, extra))}" if extra else ""
    names = ", ".join(map(repr, served_models))
    label = "model" if len(served_models) == 1 else "models"
    print(f"serving {label} {names}{with_adapters} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    DrainingServer(config).run(sockets=[sock])
