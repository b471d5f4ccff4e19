"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    from slmkit.serve.app import create_app
    app = create_app("runs/quickstart")        # then: uvicorn.run(app) or `slm serve runs/quickstart`

The routes are thin: OpenAI's request and response shapes (validation, response objects, stream chunks, error
bodies) are `slmkit.serve.openai`'s. Generation runs on the continuous-batching scheduler
(`slmkit.serve.scheduler`); each of a request's ``n`` choices is a sequence of its own.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit import defaults
from slmkit.errors import UserError
from slmkit.infer.batcher import GenerationRequest
from slmkit.infer.engine import Engine
from slmkit.serve import openai
from slmkit.serve.metrics import Metrics
from slmkit.serve.openai import ApiError, ChatRequest, CompletionRequest, OpenAIRequest, Reply, StreamShaper
from slmkit.serve.scheduler import Job, QueueFull, Result, Scheduler, ShuttingDown

DISCONNECT_POLL_SECONDS = 0.5


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


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
) -> FastAPI:
    """The FastAPI app over one model; a path is loaded with `Engine.load` (UserError if it is not a model).

    max_batch: rows of the running batch (sequences decoded together); max_queue: sequences that may wait for a
    row (more get 503); request_timeout: seconds from arrival after which a request stops (see
    `slmkit.serve.scheduler`); prefill_chunk: prompt tokens prefilled per step at most; compile: compile the
    decode step (None: on CUDA only); speculate: "lookup" verifies prompt-lookup drafts of up to speculate_k
    tokens for every row in one pass (greedy output unchanged).
    """
    directory: Path | None = None
    if isinstance(engine_or_model_path, Engine):
        engine = engine_or_model_path
    else:
        from slmkit.interop.checkpoint import resolve_model_dir

        directory = resolve_model_dir(engine_or_model_path)
        engine = Engine.load(directory)
    if max_queue < 1:
        raise UserError(f"max queue must be >= 1, got {max_queue}")
    name = model_name or (directory.name if directory is not None else "slmkit")
    template = openai.compile_chat_template(openai.load_chat_template(directory))
    metrics = Metrics()
    scheduler = Scheduler(
        engine.model, engine.tokenizer, max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk,
        request_timeout=request_timeout, metrics=metrics, compile=compile, speculate=speculate,
        speculate_k=speculate_k,
    )  # fmt: skip
    pieces = openai.TokenText(engine.tokenizer)
    created = int(time.time())

    app = FastAPI(title="slmkit", version="1")
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.state.model_name = name

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
        return error_response(openai.http_error(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(openai.internal_error(exc))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key is not None and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.count_request(path, 401)
                return error_response(openai.authentication_error())
        response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.count_request(path, response.status_code)
        return response

    @app.get("/health")
    async def health() -> Any:
        body = {
            "status": "ok" if scheduler.accepting else "shutting_down",
            "model": name,
            "queue_depth": scheduler.queue_depth,
            "running": scheduler.running,
        }
        return JSONResponse(body, status_code=200 if scheduler.accepting else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> str:
        return metrics.render(scheduler)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "slmkit"}]}

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
        """Every job's Result; a client that disconnects cancels them."""
        results: list[Result | None] = [None] * len(jobs)
        try:
            while any(r is None for r in results):
                try:
                    index, kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise openai.client_closed() from None
                    continue
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    raise openai.generation_error(value)
        finally:
            cancelled.set()  # a no-op for finished jobs; stops the others
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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        openai.check_model(req, name)
        prompts = openai.completion_prompts(req)
        compiled = await constraint_of(req)
        requests = openai.generation_requests(
            req, prompts, engine.tokenizer, context=engine.config.max_seq_len, max_batch=max_batch,
            default_max_tokens=defaults.OPENAI_COMPLETION_MAX_TOKENS, constraint=compiled, top_logprobs=req.logprobs,
        )  # fmt: skip
        jobs, events, cancelled = submit(requests, req.stream)
        reply = Reply.new("completion", name, pieces if req.logprobs is not None else None)
        if req.stream:
            return streaming(openai.completion_stream(reply, [j.index for j in jobs], req.n), events, cancelled)
        results = await collect(request, jobs, events, cancelled)
        return openai.completion_response(reply, results, req.n)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        openai.check_model(req, name)
        top_logprobs = openai.chat_top_logprobs(req)
        prompt = openai.chat_prompt(template, req.messages)
        compiled = await constraint_of(req)
        requests = openai.generation_requests(
            req, [prompt], engine.tokenizer, context=engine.config.max_seq_len, max_batch=max_batch,
            default_max_tokens=None, constraint=compiled, top_logprobs=top_logprobs,
        )  # fmt: skip
        jobs, events, cancelled = submit(requests, req.stream)
        reply = Reply.new("chat", name, pieces if req.logprobs else None)
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
) -> None:
    """Run the server until interrupted (`slm serve`). The first Ctrl-C / SIGTERM drains: new requests get 503,
    running ones finish (at most `drain_timeout` s); a second one exits at once."""
    import uvicorn

    if not (0 < port < 65536):
        raise UserError(f"port must be in 1..65535, got {port}")
    if not drain_timeout >= 0:
        raise UserError(f"drain timeout must be >= 0 seconds, got {drain_timeout}")
    app = create_app(
        model, api_key=api_key, max_queue=max_queue, max_batch=max_batch, request_timeout=request_timeout,
        prefill_chunk=prefill_chunk, drain_timeout=drain_timeout, compile=compile, speculate=speculate,
        speculate_k=speculate_k,
    )  # fmt: skip
    scheduler: Scheduler = app.state.scheduler

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            scheduler.begin_shutdown()  # requests on open connections get 503 while the running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout) or None
    )
    print(f"serving model {app.state.model_name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    DrainingServer(config).run()
