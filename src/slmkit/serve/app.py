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
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
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
from slmkit.serve.guards import LOOPBACK_HOSTS, Guards
from slmkit.serve.metrics import Metrics
from slmkit.serve.openai import ApiError, ChatRequest, CompletionRequest, OpenAIRequest, Reply, StreamShaper
from slmkit.serve.scheduler import Job, QueueFull, Result, Scheduler, ShuttingDown

MAX_REQUEST_BYTES = 1 << 20
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


def create_app(
    engine_or_model_path: Engine | str | Path,
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
    prefix_cache: bool = True,
    prefix_cache_mb: float = 256,
) -> FastAPI:
    """The FastAPI app over one model; a path is loaded with `Engine.load` (UserError if it is not a model).

    max_batch: rows of the running batch (sequences decoded together); max_queue: sequences that may wait for a
    row (more get 503); request_timeout: seconds from arrival after which a request stops (see
    `slmkit.serve.scheduler`); prefill_chunk: prompt tokens prefilled per step at most; compile: compile the
    decode step (None: on CUDA only); speculate: "lookup" verifies prompt-lookup drafts of up to speculate_k
    tokens for every row in one pass (greedy output unchanged). max_request_bytes: larger bodies get 413;
    allowed_hosts: the hosts the Host header may name (None: any); cors_origins: the origins whose web pages may
    call the API (requests with any other Origin get 403); see `slmkit.serve.guards`. adapters: {served name:
    PEFT LoRA adapter dir} served per request beside the base (see the module docstring); UserError, before the
    server starts, for a bad name or directory and an adapter for another base. kv_cache: a
    `slmkit.models.state.KVCacheSpec` for every request (None: the engine's). prefix_cache: prompts that start
    like earlier ones reuse the keys and values of their cached blocks, at most prefix_cache_mb MiB of them (see
    `slmkit.infer.prefix_cache`; off, with the reason logged, for models whose state cannot take them).
    """
    directory: Path | None = None
    if not isinstance(engine_or_model_path, Engine):
        from slmkit.interop.checkpoint import resolve_model_dir

        directory = resolve_model_dir(engine_or_model_path)
    if max_queue < 1:
        raise UserError(f"max queue must be >= 1, got {max_queue}")
    if max_request_bytes < 1:
        raise UserError(f"max request bytes must be >= 1, got {max_request_bytes}")
    if prefix_cache and not prefix_cache_mb > 0:
        raise UserError(f"--prefix-cache-mb must be > 0, got {prefix_cache_mb:g} (or turn it off: --no-prefix-cache)")
    name = model_name or (directory.name if directory is not None else "slmkit")
    lora = check_served_adapters(adapters or {}, name)  # before the base loads
    if isinstance(engine_or_model_path, Engine):
        engine = engine_or_model_path
    else:
        assert directory is not None
        engine = Engine.load(directory, kv_cache=kv_cache)
    kv_cache = kv_cache if kv_cache is not None else engine.kv_cache
    bounded = bool(kv_cache is not None and kv_cache.bounded)
    served = {name: -1, **load_served_adapters(engine.model, lora)}  # model name -> adapter index (-1: the base)
    template = openai.compile_chat_template(openai.load_chat_template(directory))
    eos_token = openai.eos_text(directory)  # what ends earlier assistant turns in a conversation
    metrics = Metrics()
    scheduler = Scheduler(
        engine.model, engine.tokenizer, max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk,
        request_timeout=request_timeout, metrics=metrics, compile=compile, speculate=speculate,
        speculate_k=speculate_k, per_row_adapters=bool(lora), kv_cache=kv_cache,
        prefix_cache=prefix_cache, prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)),
    )  # fmt: skip
    pieces = openai.TokenText(engine.tokenizer)
    created = int(time.time())

    app = FastAPI(title="slmkit", version="1")
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.state.model_name = name
    app.state.served_models = list(served)  # the base's name, then each adapter's

    @app.on_event("shutdown")
    def _shutdown() -> None:
        scheduler.close(drain_timeout)

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
        body = {
            "status": "ok" if scheduler.accepting else "shutting_down",
            "model": name,
            "queue_depth": scheduler.queue_depth,
            "running": scheduler.running,
        }
        return JSONResponse(body, status_code=200 if scheduler.accepting else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS_OF["metrics"])
    async def get_metrics() -> str:
        return metrics.render(scheduler)

    @app.get("/v1/models", responses=ERRORS_OF["models"])
    async def models() -> dict[str, Any]:
        # as vLLM: `root` the base model, `parent` None for it and the base's name for each adapter
        return {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "slmkit",
                    "root": name,
                    "parent": None if model == name else name,
                }
                for model in served
            ],
        }

    def adapter_of(req: OpenAIRequest) -> int | None:
        """The adapter the request's model picks (None for the base when no adapters are served); 404 for a model
        this server does not serve."""
        openai.check_model(req, list(served))
        return served[req.model] if lora else None

    async def constraint_of(req: OpenAIRequest) -> Any:
        constraint = openai.response_format_constraint(req.response_format)
        if constraint is None:
            return None
        from slmkit.infer.constrained import compile_constraint

        try:  # compiling takes a while (and xgrammar's first import seconds): off the event loop
            return await asyncio.to_thread(
                compile_constraint, constraint, engine.tokenizer, engine.config.vocab_size, engine.config.eos_token_id
            )
        except UserError as exc:
            raise ApiError(400, str(exc), param="response_format") from None

    def submit(requests: list[GenerationRequest], stream: bool) -> tuple[list[Job], asyncio.Queue, threading.Event]:
        """Queue one job per request (a choice each), sharing one event queue and one cancel flag."""
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

    def streaming(shaper: StreamShaper, events: asyncio.Queue, cancelled: threading.Event) -> StreamingResponse:
        return StreamingResponse(stream_events(shaper, events, cancelled), media_type="text/event-stream")

    @app.post("/v1/completions", responses=ERRORS_OF["generate"])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        adapter = adapter_of(req)
        prompts = openai.completion_prompts(req)
        if req.echo and adapter not in (None, -1):
            raise ApiError(400, "echo scores prompts with the base model only", param="echo")
        compiled = await constraint_of(req)
        requests = await asyncio.to_thread(  # tokenizing a long prompt must not stall the other clients
            openai.generation_requests, req, prompts, engine.tokenizer, context=engine.config.max_seq_len,
            max_batch=max_batch, default_max_tokens=defaults.OPENAI_COMPLETION_MAX_TOKENS, constraint=compiled,
            top_logprobs=req.logprobs, adapter=adapter, bounded=bounded, vocab_size=engine.config.vocab_size,
        )  # fmt: skip
        reply = Reply.new("completion", req.model, pieces if req.logprobs is not None else None)
        if req.echo:
            scored: list[list[TokenLogprob]] = []
            if req.logprobs is not None:
                for r in requests[:: req.n]:  # the n choices of a prompt share its scores
                    prompt_scores = await asyncio.to_thread(score_prompt, engine.model, r.prompt_ids, req.logprobs)
                    scored += [prompt_scores] * req.n
            else:
                scored = [[] for _ in requests]
            results = None
            if req.max_tokens != 0:
                jobs, events, cancelled = submit(requests, False)
                results = await collect(request, jobs, events, cancelled)
            return openai.echo_response(reply, requests, scored, results, req.n, engine.tokenizer)
        jobs, events, cancelled = submit(requests, req.stream)
        if req.stream:
            return streaming(openai.completion_stream(reply, [j.index for j in jobs], req.n), events, cancelled)
        results = await collect(request, jobs, events, cancelled)
        return openai.completion_response(reply, results, req.n)

    @app.post("/v1/chat/completions", responses=ERRORS_OF["generate"])
    async def chat(req: ChatRequest, request: Request) -> Any:
        adapter = adapter_of(req)
        top_logprobs = openai.chat_top_logprobs(req)
        compiled = await constraint_of(req)

        def prepare() -> list[GenerationRequest]:  # templating and tokenizing: off the event loop
            prompt = openai.chat_prompt(template, req.messages, eos_token)
            return openai.generation_requests(
                req, [prompt], engine.tokenizer, context=engine.config.max_seq_len, max_batch=max_batch,
                default_max_tokens=None, constraint=compiled, top_logprobs=top_logprobs, adapter=adapter,
                bounded=bounded,
            )  # fmt: skip

        requests = await asyncio.to_thread(prepare)
        jobs, events, cancelled = submit(requests, req.stream)
        reply = Reply.new("chat", req.model, pieces if req.logprobs else None)
        if req.stream:
            return streaming(openai.chat_stream(reply, [j.index for j in jobs], req.n), events, cancelled)
        results = await collect(request, jobs, events, cancelled)
        return openai.chat_response(reply, results, req.n)

    return app


def serve(
    model: str | Path,
    *,
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
    prefix_cache: bool = True,
    prefix_cache_mb: float = 256,
) -> None:
    """Run the server until interrupted (`slm serve`). allowed_hosts None: the loopback names when `host` is a
    loopback address, else any (`default_allowed_hosts`). The address is bound before the model loads, so a bad
    host or a busy port is a UserError at once. The first Ctrl-C / SIGTERM drains: new requests get 503,
    running ones finish (at most `drain_timeout` s); a second one exits at once. lora: `NAME=DIR` values (--lora),
    adapters served per request (`create_app`'s adapters): malformed values fail before the address is bound, the
    adapters are checked and loaded before the server starts."""
    import uvicorn

    if not (0 < port < 65536):
        raise UserError(f"port must be in 1..65535, got {port}")
    if not drain_timeout >= 0:
        raise UserError(f"drain timeout must be >= 0 seconds, got {drain_timeout}")
    if max_request_bytes < 1:
        raise UserError(f"max request bytes must be >= 1, got {max_request_bytes}")
    if prefix_cache and not prefix_cache_mb > 0:
        raise UserError(f"--prefix-cache-mb must be > 0, got {prefix_cache_mb:g} (or turn it off: --no-prefix-cache)")
    adapters = parse_lora(lora)
    sock = bind_socket(host, port)
    try:
        app = create_app(
            model, api_key=api_key, max_queue=max_queue, max_batch=max_batch, request_timeout=request_timeout,
            prefill_chunk=prefill_chunk, drain_timeout=drain_timeout, compile=compile, speculate=speculate,
            speculate_k=speculate_k, max_request_bytes=max_request_bytes,
            allowed_hosts=default_allowed_hosts(host) if allowed_hosts is None else allowed_hosts,
            cors_origins=cors_origins, adapters=adapters, kv_cache=kv_cache,
            prefix_cache=prefix_cache, prefix_cache_mb=prefix_cache_mb,
        )  # fmt: skip
    except BaseException:
        sock.close()
        raise
    scheduler: Scheduler = app.state.scheduler

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            scheduler.begin_shutdown()  # requests on open connections get 503 while the running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout) or None
    )
    extra = app.state.served_models[1:]
    with_adapters = f" with adapters {', '.join(map(repr, extra))}" if extra else ""
    print(
        f"serving model {app.state.model_name!r}{with_adapters} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True
    )
    DrainingServer(config).run(sockets=[sock])
