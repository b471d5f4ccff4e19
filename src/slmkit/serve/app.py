"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    from slmkit.serve.app import create_app
    app = create_app("runs/quickstart")        # then: uvicorn.run(app) or `slm serve runs/quickstart`

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.errors import UserError
from slmkit.infer.engine import Engine
from slmkit.infer.sampling import SamplingParams
from slmkit.serve.scheduler import Job, QueueFull, Result, Scheduler

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RETRY_AFTER_SECONDS = 1


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
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    logprobs: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def render(self, scheduler: Scheduler) -> str:
        lines = ["# HELP slm_requests_total HTTP requests by path and status.", "# TYPE slm_requests_total counter"]
        for (path, status), count in sorted(self.requests.items()):
            lines.append(f'slm_requests_total{{path="{path}",status="{status}"}} {count}')
        lines += [
            "# HELP slm_prompt_tokens_total Prompt tokens processed.",
            "# TYPE slm_prompt_tokens_total counter",
            f"slm_prompt_tokens_total {self.prompt_tokens}",
            "# HELP slm_completion_tokens_total Tokens generated.",
            "# TYPE slm_completion_tokens_total counter",
            f"slm_completion_tokens_total {self.completion_tokens}",
            "# HELP slm_queue_depth Requests waiting for the worker.",
            "# TYPE slm_queue_depth gauge",
            f"slm_queue_depth {scheduler.queue_depth}",
            "# HELP slm_running_requests Requests in the worker's current round.",
            "# TYPE slm_running_requests gauge",
            f"slm_running_requests {scheduler.running}",
            "# HELP slm_last_batch_size Size of the last engine batch.",
            "# TYPE slm_last_batch_size gauge",
            f"slm_last_batch_size {scheduler.last_batch_size}",
        ]
        return "\n".join(lines) + "\n"


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


def create_app(
    engine_or_model_path: Engine | str | Path,
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app over one model; a path is loaded with `Engine.load` (UserError if it is not a model)."""
    directory: Path | None = None
    if isinstance(engine_or_model_path, Engine):
        engine = engine_or_model_path
    else:
        from slmkit.checkpoint import resolve_model_dir

        directory = resolve_model_dir(engine_or_model_path)
        engine = Engine.load(directory)
    if max_queue < 1:
        raise UserError(f"max queue must be >= 1, got {max_queue}")
    name = model_name or (directory.name if directory is not None else "slmkit")
    import jinja2.sandbox

    template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(_load_chat_template(directory))
    scheduler = Scheduler(engine, max_queue=max_queue, max_batch=max_batch)
    metrics = Metrics()
    created = int(time.time())
    context = engine.config.max_seq_len

    app = FastAPI(title="slmkit", version="1")
    app.state.scheduler, app.state.metrics, app.state.engine = scheduler, metrics, engine
    app.state.model_name = name

    @app.on_event("shutdown")
    def _shutdown() -> None:
        scheduler.close()

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
                metrics.requests[(path, 401)] += 1
                return response
        response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.requests[(path, response.status_code)] += 1
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "queue_depth": scheduler.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> str:
        return metrics.render(scheduler)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "slmkit"}]}

    def check(req: _Request) -> None:
        if req.model != name:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves {name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if req.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported by this server yet", param="logprobs")

    def make_job(req: _Request, text: str, default_max: int | None) -> Job:
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
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        try:
            sampling = SamplingParams(
                temperature=req.temperature, top_p=req.top_p if req.top_p < 1 else None, seed=req.seed
            )
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(
            ids,
            max_tokens,
            sampling,
            tuple(s for s in stop if s),
            req.stream,
            asyncio.get_running_loop(),
            constraint=_constraint(req.response_format),
        )

    def enqueue(job: Job) -> None:
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(
                503,
                "the server is busy (request queue full); retry shortly",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    async def wait(job: Job) -> Result:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                metrics.prompt_tokens += value.prompt_tokens
                metrics.completion_tokens += value.completion_tokens
                return value
            if kind == "error":
                raise ApiError(
                    400 if isinstance(value, UserError) else 500,
                    str(value),
                    type="invalid_request_error" if isinstance(value, UserError) else "server_error",
                )

    def usage(results: list[Result]) -> dict[str, int]:
        p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_events(job: Job, chunk: Any) -> AsyncIterator[str]:
        try:
            first = chunk(None, None, True)
            if first is not None:
                yield sse(first)
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield sse(chunk(value, None, False))
                elif kind == "done":
                    metrics.prompt_tokens += value.prompt_tokens
                    metrics.completion_tokens += value.completion_tokens
                    final = chunk("", value.finish_reason, False)
                    final["usage"] = usage([value])
                    yield sse(final)
                    break
                else:
                    yield sse({"error": {"message": str(value), "type": "server_error", "param": None, "code": None}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops its generation

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        check(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        if req.stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes a single prompt", param="prompt")
        if len(prompts) > max_batch:
            raise ApiError(400, f"at most {max_batch} prompts per request, got {len(prompts)}", param="prompt")
        jobs = [make_job(req, p, 16) for p in prompts]
        try:
            for job in jobs:
                enqueue(job)
        except ApiError:
            for job in jobs:
                job.cancelled.set()  # the ones already queued are skipped
            raise
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:

            def chunk(text: str | None, reason: str | None, opening: bool) -> dict[str, Any] | None:
                if opening:
                    return None
                return {
                    "id": rid,
                    "object": "text_completion",
                    "created": now,
                    "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                }

            return StreamingResponse(stream_events(jobs[0], chunk), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(wait(j) for j in jobs))
        finally:
            for job in jobs:
                job.cancelled.set()
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": name,
            "choices": choices,
            "usage": usage(results),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        check(req)
        try:
            prompt = template.render(
                messages=[m.model_dump() for m in req.messages], add_generation_prompt=True, bos_token="", eos_token=""
            )
        except Exception as exc:  # a broken template in the model dir
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        job = make_job(req, prompt, None)
        enqueue(job)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:

            def chunk(text: str | None, reason: str | None, opening: bool) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": now,
                    "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                }

            return StreamingResponse(stream_events(job, chunk), media_type="text/event-stream")
        try:
            result = await wait(job)
        finally:
            job.cancelled.set()
        message = {"role": "assistant", "content": result.text}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage([result]),
        }

    return app


def serve(
    model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 64
) -> None:
    """Run the server until interrupted (`slm serve`)."""
    import uvicorn

    if not (0 < port < 65536):
        raise UserError(f"port must be in 1..65535, got {port}")
    app = create_app(model, api_key=api_key, max_queue=max_queue)
    print(f"serving model {app.state.model_name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
