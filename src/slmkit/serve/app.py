"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    from slmkit.serve.app import create_app
    app = create_app("runs/quickstart")        # then: uvicorn.run(app) or `slm serve runs/quickstart`

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. Generation runs on the
continuous-batching scheduler (`slmkit.serve.scheduler`); each of a request's ``n`` choices is a sequence of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.errors import UserError
from slmkit.infer.batcher import GenerationRequest, TokenLogprob
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.serve.metrics import Metrics
from slmkit.serve.scheduler import Delta, Job, QueueFull, RequestTimeout, Result, Scheduler, ShuttingDown

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RETRY_AFTER_SECONDS = 1
MAX_N = 16
DISCONNECT_POLL_SECONDS = 0.5


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API: top-k per token (0: the chosen only)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in an error's location ("prompt", "str"); that is no parameter."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or any(c in part for c in "[-("))


def _constraint(response_format: dict[str, Any] | None) -> Any:
    """The engine constraint for OpenAI's response_format: text (none), json_object, json_schema."""
    from slmkit.infer.constrained import Constraint

    kind = (response_format or {"type": "text"}).get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400, "response_format.json_schema.schema: give a JSON schema object", param="response_format"
            )
        return Constraint.json_schema(schema)
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def _load_chat_template(directory: Path | None) -> str:
    if directory is not None:
        path = Path(directory) / "tokenizer_config.json"
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                template = None
            if isinstance(template, str) and template:
                return template
    return DEFAULT_CHAT_TEMPLATE


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (as GPT-2 defines it), inverted: char -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class _TokenText:
    """A token's bytes and its text as OpenAI shows it ("bytes:\\xe2\\x80" for a piece of a UTF-8 character)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.piece = lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token: int) -> tuple[str, tuple[int, ...]]:
        raw = self.tokenizer.id_to_token(token) or ""
        table = _byte_level_decoder()
        if raw and all(c in table for c in raw):
            data = bytes(table[c] for c in raw)
        else:
            data = self.tokenizer.decode([token]).encode()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return text, tuple(data)


def _completion_logprobs(entries: list[TokenLogprob], pieces: _TokenText, prior: list[int]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for some tokens; `prior`: the choice's tokens before them."""
    ids = list(prior)
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        offsets.append(len(pieces.tokenizer.decode(ids)) if ids else 0)  # where the token's text starts
        ids.append(e.token)
        tokens.append(pieces.piece(e.token)[0])
        token_logprobs.append(e.logprob)
        top.append({pieces.piece(t)[0]: lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprob], pieces: _TokenText) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text, data = pieces.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


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
) -> FastAPI:
    """The FastAPI app over one model; a path is loaded with `Engine.load` (UserError if it is not a model).

    max_batch: rows of the running batch (sequences decoded together); max_queue: sequences that may wait for a
    row (more get 503); request_timeout: seconds from arrival after which a request stops (see
    `slmkit.serve.scheduler`); prefill_chunk: prompt tokens prefilled per step at most.
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
    import jinja2.sandbox

    template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(_load_chat_template(directory))
    metrics = Metrics()
    scheduler = Scheduler(
        engine.model, engine.tokenizer, max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk,
        request_timeout=request_timeout, metrics=metrics,
    )  # fmt: skip
    pieces = _TokenText(engine.tokenizer)
    created = int(time.time())
    context = engine.config.max_seq_len

    app = FastAPI(title="slmkit", version="1")
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.state.model_name = name

    @app.on_event("shutdown")
    def _shutdown() -> None:
        scheduler.close(drain_timeout)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return ApiError(400, message, param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key is not None and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = ApiError(
                    401,
                    "invalid or missing API key (Authorization: Bearer KEY)",
                    type="authentication_error",
                    code="invalid_api_key",
                ).response()
                metrics.count_request(path, 401)
                return response
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

    def check_model(req: _Request) -> None:
        if req.model != name:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves {name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def constraint_of(req: _Request) -> Any:
        constraint = _constraint(req.response_format)
        if constraint is None:
            return None
        from slmkit.infer.constrained import compile_constraint

        try:  # compiling takes a while (and xgrammar's first import seconds): off the event loop
            return await asyncio.to_thread(
                compile_constraint, constraint, engine.tokenizer, engine.config.vocab_size, engine.config.eos_token_id
            )
        except UserError as exc:
            raise ApiError(400, str(exc), param="response_format") from None

    def make_jobs(
        req: _Request,
        texts: list[str],
        default_max: int | None,
        compiled: Any,
        top_logprobs: int | None,
    ) -> tuple[list[Job], asyncio.Queue, threading.Event]:
        """One job per (prompt, choice), sharing one event queue and one cancel flag."""
        if len(texts) * req.n > max_batch:
            what = "prompts x n" if req.n > 1 else "prompts"
            raise ApiError(
                400, f"at most {max_batch} {what} per request, got {len(texts) * req.n}",
                param="n" if req.n > 1 else "prompt",
            )  # fmt: skip
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        jobs = []
        for text in texts:
            ids = engine.tokenizer.encode(text).ids
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            room = context - len(ids)
            if room < 1:
                raise ApiError(
                    400,
                    f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                    param="prompt",
                    code="context_length_exceeded",
                )
            max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max or room, room)
            if len(ids) + max_tokens > context:
                raise ApiError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                    f"context of {context} tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            for i in range(req.n):
                seed = None
                if req.seed is not None:  # choice i draws from seed + i (wrapped into int64)
                    seed = (req.seed + i + 2**63) % 2**64 - 2**63
                try:
                    sampling = SamplingParams(
                        temperature=req.temperature,
                        top_p=req.top_p if req.top_p < 1 else None,
                        frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty,
                        seed=seed,
                    )
                except UserError as exc:
                    raise ApiError(400, str(exc)) from None
                request = GenerationRequest(
                    ids, max_tokens, sampling, tuple(s for s in stop if s), compiled,
                    logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0,
                )  # fmt: skip
                try:
                    scheduler.check(request)
                except UserError as exc:
                    raise ApiError(400, str(exc), code="context_length_exceeded") from None
                jobs.append(Job(request, loop, req.stream, len(jobs), events, cancelled))
        return jobs, events, cancelled

    def enqueue(jobs: list[Job]) -> None:
        try:
            scheduler.submit(jobs)
        except QueueFull:
            raise ApiError(
                503,
                "the server is busy (request queue full); retry shortly",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except ShuttingDown:
            raise ApiError(
                503,
                "the server is shutting down",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    def failure(exc: Exception) -> ApiError:
        if isinstance(exc, RequestTimeout):
            return ApiError(
                503, str(exc), type="server_error", code="timeout", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
        if isinstance(exc, UserError):
            return ApiError(400, str(exc))
        return ApiError(500, f"generation failed: {type(exc).__name__}", type="server_error")

    async def collect(request: Request, jobs: list[Job], events: asyncio.Queue, cancelled: threading.Event):
        """Every job's Result; a client that disconnects cancels them."""
        results: list[Result | None] = [None] * len(jobs)
        try:
            while any(r is None for r in results):
                try:
                    index, kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "the client closed the request") from None
                    continue
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    raise failure(value)
        finally:
            cancelled.set()  # a no-op for finished jobs; stops the others
        return results

    def usage(results: list[Result], n: int) -> dict[str, int]:
        p = sum(r.prompt_tokens for r in results[::n])  # the n choices of a prompt share its prompt tokens
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_events(
        jobs: list[Job],
        events: asyncio.Queue,
        cancelled: threading.Event,
        chunk: Callable[[int, str | None, str | None, list[TokenLogprob], list[int]], dict[str, Any]],
        opening: Callable[[int], dict[str, Any]] | None,
        n: int,
    ) -> AsyncIterator[str]:
        """SSE for all choices of one request; logprobs of tokens whose text is held back ride on the next chunk."""
        try:
            if opening is not None:
                for job in jobs:
                    yield sse(opening(job.index))
            pending: dict[int, list[TokenLogprob]] = {j.index: [] for j in jobs}
            earlier: dict[int, list[int]] = {i: [] for i in pending}  # tokens already sent, per choice
            results: dict[int, Result] = {}
            while len(results) < len(jobs):
                index, kind, value = await events.get()
                if kind == "delta":
                    assert isinstance(value, Delta)
                    pending[index] += value.logprobs
                    if value.text:
                        yield sse(chunk(index, value.text, None, pending[index], earlier[index]))
                        earlier[index] += [e.token for e in pending[index]]
                        pending[index] = []
                elif kind == "done":
                    results[index] = value
                    final = chunk(index, "", value.finish_reason, pending[index], earlier[index])
                    if len(results) == len(jobs):
                        final["usage"] = usage([results[j.index] for j in jobs], n)
                    yield sse(final)
                else:
                    error = failure(value)
                    body = {"message": error.message, "type": error.type, "param": None, "code": error.code}
                    yield sse({"error": body})
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away stops its generation

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        if req.stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes a single prompt", param="prompt")
        compiled = await constraint_of(req)
        jobs, events, cancelled = make_jobs(req, prompts, 16, compiled, req.logprobs)
        enqueue(jobs)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def logprobs_of(entries: list[TokenLogprob], prior: list[int]) -> dict[str, Any] | None:
            return _completion_logprobs(entries, pieces, prior) if req.logprobs is not None else None

        if req.stream:

            def chunk(
                index: int, text: str | None, reason: str | None, entries: list[TokenLogprob], prior: list[int]
            ) -> dict[str, Any]:
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs_of(entries, prior),
                    "finish_reason": reason,
                }
                return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": [choice]}

            return StreamingResponse(
                stream_events(jobs, events, cancelled, chunk, None, req.n), media_type="text/event-stream"
            )
        results = await collect(request, jobs, events, cancelled)
        choices = [
            {"index": i, "text": r.text, "logprobs": logprobs_of(r.logprobs, []), "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": name,
            "choices": choices,
            "usage": usage(results, req.n),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        check_model(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            prompt = template.render(
                messages=[m.model_dump() for m in req.messages], add_generation_prompt=True, bos_token="", eos_token=""
            )
        except Exception as exc:  # a broken template in the model dir
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        compiled = await constraint_of(req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        jobs, events, cancelled = make_jobs(req, [prompt], None, compiled, top)
        enqueue(jobs)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def logprobs_of(entries: list[TokenLogprob]) -> dict[str, Any] | None:
            return _chat_logprobs(entries, pieces) if req.logprobs else None

        if req.stream:

            def base(index: int, delta: dict[str, Any], reason: str | None, lp: Any) -> dict[str, Any]:
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": now,
                    "model": name,
                    "choices": [choice],
                }

            def opening(index: int) -> dict[str, Any]:
                return base(index, {"role": "assistant", "content": ""}, None, None)

            def chunk(
                index: int, text: str | None, reason: str | None, entries: list[TokenLogprob], prior: list[int]
            ) -> dict[str, Any]:
                lp = logprobs_of(entries) if entries or reason is None else None
                return base(index, {"content": text} if text else {}, reason, lp)

            return StreamingResponse(
                stream_events(jobs, events, cancelled, chunk, opening, req.n), media_type="text/event-stream"
            )
        results = await collect(request, jobs, events, cancelled)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs_of(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": name,
            "choices": choices,
            "usage": usage(results, req.n),
        }

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
        prefill_chunk=prefill_chunk, drain_timeout=drain_timeout,
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
