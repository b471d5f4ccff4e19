"""OpenAI's request and response shapes, apart from HTTP: what `slmkit.serve.app`'s routes parse and send.

Requests: pydantic models (`CompletionRequest`, `ChatRequest`) and their validation into the batcher's
`GenerationRequest`s (one per prompt and choice). Responses: completion and chat objects, their streamed chunks
(`StreamShaper` turns the scheduler's events into chunks), logprobs objects, usage and error bodies
(`ApiError`). Everything here is a plain function or object of plain data, so it is tested without a server.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from slmkit import defaults
from slmkit.data.chat import DEFAULT_CHAT_TEMPLATE as DEFAULT_CHAT_TEMPLATE  # the server's, and fine-tuning's
from slmkit.data.chat import compile_chat_template as compile_chat_template
from slmkit.data.chat import eos_text as eos_text
from slmkit.data.chat import load_chat_template as load_chat_template
from slmkit.data.tokenizer import EOT_TOKEN
from slmkit.errors import UserError
from slmkit.infer.batcher import GenerationRequest, TokenLogprob
from slmkit.infer.sampling import SamplingParams
from slmkit.serve.scheduler import Delta, QueueFull, RequestTimeout, Result, ShuttingDown

RETRY_AFTER_SECONDS = 1
MAX_N = 16
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
SSE_DONE = "data: [DONE]\n\n"


# ---- errors -----------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answer: HTTP status, OpenAI's error body and (for 503s) the headers to send with it."""

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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error answer (OpenAI's)."""

    error: ErrorDetail


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in an error's location ("prompt", "str"); that is no parameter."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or any(c in part for c in "[-("))


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """The 400 for pydantic's errors of a request body: the first error, its field as ``param``."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_union_tag(x)]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    return ApiError(400, message, param=".".join(loc) or None)


def http_error(status: int, detail: str, headers: dict[str, str] | None = None) -> ApiError:
    """A routing error (unknown route, wrong method: its ``Allow`` header kept) or an oversized body, in OpenAI's
    shape."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return ApiError(status, detail, type=kind, code=code, headers=headers)


def internal_error(exc: Exception) -> ApiError:
    """A bug: the 500 names the exception's type only (its message may hold the server's internals)."""
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")


def authentication_error() -> ApiError:
    return ApiError(
        401,
        "invalid or missing API key (Authorization: Bearer KEY)",
        type="authentication_error",
        code="invalid_api_key",
    )


def client_closed() -> ApiError:
    return ApiError(499, "the client closed the request")


def model_not_found(requested: str, served: str | Sequence[str]) -> ApiError:
    names = [served] if isinstance(served, str) else list(served)
    return ApiError(
        404,
        f"the model {requested!r} does not exist; this server serves {', '.join(map(repr, names))}",
        type="invalid_request_error",  # what OpenAI's API answers for an unknown model
        param="model",
        code="model_not_found",
    )


def _retry_later(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def submit_error(exc: QueueFull | ShuttingDown) -> ApiError:
    """The 503 (with Retry-After) for a request the scheduler would not queue."""
    if isinstance(exc, QueueFull):
        return _retry_later("the server is busy (request queue full); retry shortly", "queue_full")
    return _retry_later("the server is shutting down", "shutting_down")


def generation_error(exc: Exception) -> ApiError:
    """What a failed generation answers: a queue timeout is a 503, a user error a 400, anything else a 500."""
    if isinstance(exc, RequestTimeout):
        return _retry_later(str(exc), "timeout")
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {type(exc).__name__}", type="server_error")


# ---- requests ---------------------------------------------------------------------------------------------
def unencodable(value: Any) -> bool:
    """Whether a JSON value holds a string that is no Unicode text (a lone surrogate such as "\\ud800", which JSON
    escapes can spell): no tokenizer or response can carry it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(unencodable(k) or unencodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(unencodable(v) for v in value)
    return False


def _text(value: str) -> str:
    if unencodable(value):
        raise ValueError("the string is not valid Unicode (it holds a lone surrogate)")
    return value


def _json_text(value: dict[str, Any]) -> dict[str, Any]:
    if unencodable(value):
        raise ValueError("a string in it is not valid Unicode (it holds a lone surrogate)")
    return value


INTEGER_FIELDS = ("max_tokens", "seed", "n", "logprobs", "top_logprobs")


def integral_floats(data: Any) -> Any:
    """JSON Schema's integers include 1.0: an integral float in an integer field is that int (a string, or 1.5,
    stays an error)."""
    if isinstance(data, dict):
        for key in INTEGER_FIELDS:
            value = data.get(key)
            if isinstance(value, float) and value.is_integer():
                data = {**data, key: int(value)}
    return data


Text = Annotated[str, AfterValidator(_text)]


class OpenAIRequest(BaseModel):
    """The fields completions and chat share, with OpenAI's defaults (`slmkit.defaults`). Types are strict
    (``"max_tokens": "5"`` is a 400, as at OpenAI)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=defaults.OPENAI_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(default=defaults.OPENAI_TOP_P, gt=0, le=1)
    frequency_penalty: float = Field(default=defaults.FREQUENCY_PENALTY, ge=-2, le=2)
    presence_penalty: float = Field(default=defaults.PRESENCE_PENALTY, ge=-2, le=2)
    # any integer, wrapped into int64 (what torch.Generator.manual_seed takes) by `choice_seed`; unbounded in the
    # schema, since bounds at +-2^63 are not exact in the floating point clients and fuzzers compare them with
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    response_format: Annotated[dict[str, Any], AfterValidator(_json_text)] | None = None

    _integral = model_validator(mode="before")(integral_floats)


class CompletionRequest(OpenAIRequest):
    # text, texts, token ids or lists of token ids (as lm-eval's local-completions sends them)
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API: top-k per token (0: the chosen only)
    # the legacy API's scoring mode: the answer starts with the prompt, and `logprobs` covers the prompt's tokens
    # (the first one null: nothing precedes it); with max_tokens 0 nothing is generated
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def check_model(req: OpenAIRequest, served: str | Sequence[str]) -> None:
    """404 (model_not_found) unless the request names the served model (or one of the served names)."""
    if req.model not in ([served] if isinstance(served, str) else served):
        raise model_not_found(req.model, served)


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: texts, or token id lists (a flat list of ints is one prompt); streaming takes one.
    Also refuses what echo cannot do: max_tokens 0 without echo, echo while streaming."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise ApiError(400, "prompt: give at least one prompt", param="prompt")
    if req.stream and len(prompts) != 1:
        raise ApiError(400, "streaming takes a single prompt", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens 0 only scores the prompt: it needs echo: true", param="max_tokens")
    if req.echo and req.stream:
        raise ApiError(400, "echo is not supported with stream: true", param="echo")
    return prompts


def chat_top_logprobs(req: ChatRequest) -> int | None:
    """Alternatives per token to report: None for no logprobs, 0 for the chosen token's only."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_prompt(template: Any, messages: Sequence[ChatMessage], eos_token: str = EOT_TOKEN) -> str:
    """The prompt text of a conversation, ending where the assistant's answer starts."""
    try:
        return template.render(
            messages=[m.model_dump() for m in messages],
            add_generation_prompt=True,
            bos_token="",
            eos_token=eos_token,  # earlier assistant turns end as the model was fine-tuned (slmkit.data.chat)
        )
    except Exception as exc:  # a broken template in the model dir
        raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from None


def response_format_constraint(response_format: dict[str, Any] | None) -> Any:
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


def stop_sequences(req: OpenAIRequest) -> tuple[str, ...]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    return tuple(s for s in stop if s)  # an empty stop string would end every answer at once


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i draws from seed + i, wrapped into int64 (so choice 0 is what ``n: 1`` gives)."""
    return None if seed is None else (seed + choice + 2**63) % 2**64 - 2**63


def sampling_params(req: OpenAIRequest, choice: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p if req.top_p < 1 else None,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            seed=choice_seed(req.seed, choice),
        )
    except UserError as exc:
        raise ApiError(400, str(exc)) from None


def encode_prompts(tokenizer: Any, prompts: Sequence[str | list[int]]) -> list[list[int]]:
    """The token ids of each prompt (texts in one batch call: the tokenizer encodes them in parallel). Prompts
    given as token ids are taken as they are (`generation_requests` checks them against the vocabulary)."""
    texts = [p for p in prompts if isinstance(p, str)]
    if len(texts) == 1:
        encoded = iter([tokenizer.encode(texts[0]).ids])
    else:
        encoded = iter([e.ids for e in tokenizer.encode_batch(texts)] if texts else [])
    out = []
    for p in prompts:
        out.append(next(encoded) if isinstance(p, str) else list(p))
    return out


def generation_requests(
    req: OpenAIRequest,
    prompts: Sequence[str | list[int]],
    tokenizer: Any,
    *,
    context: int,
    max_batch: int,
    default_max_tokens: int | None,
    constraint: Any = None,
    top_logprobs: int | None = None,
    adapter: int | None = None,
    bounded: bool = False,
    vocab_size: int | None = None,
) -> list[GenerationRequest]:
    """One request per (prompt, choice), prompt-major: the list index is the choice's ``index`` in the answer.

    context: the model's context in tokens; default_max_tokens: max_tokens when the request has none (None: the
    rest of the context); top_logprobs: None for no logprobs; adapter: the adapter index the request's `model`
    picked (`GenerationRequest.adapter`). bounded: the server's KV cache keeps a window (--kv-window), so prompt +
    max_tokens may exceed the context (max_tokens defaults to the context then). vocab_size: the bound of prompts
    given as token ids. A request with max_tokens 0 (echo only) is returned with max_new_tokens 0 and is not for the
    scheduler. ApiError (400) for what cannot run.
    """
    if len(prompts) * req.n > max_batch:
        what = "prompts x n" if req.n > 1 else "prompts"
        raise ApiError(
            400, f"at most {max_batch} {what} per request, got {len(prompts) * req.n}",
            param="n" if req.n > 1 else "prompt",
        )  # fmt: skip
    stop = stop_sequences(req)
    requests = []
    for ids in encode_prompts(tokenizer, prompts):
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < (vocab_size if vocab_size is not None else 2**31)]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab_size})", param="prompt")
        room = context if bounded else context - len(ids)
        if room < (0 if req.max_tokens == 0 else 1):
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max_tokens or room, room)
        if len(ids) + max_tokens > context and not bounded:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's context of {context} "
                "tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        for choice in range(req.n):
            requests.append(
                GenerationRequest(
                    ids,
                    max_tokens,
                    sampling_params(req, choice),
                    stop,
                    constraint,
                    logprobs=top_logprobs is not None,
                    top_logprobs=top_logprobs or 0,
                    adapter=adapter,
                )  # fmt: skip
            )
    return requests


# ---- token texts and logprobs -----------------------------------------------------------------------------
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


class TokenText:
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


def completion_logprobs(entries: Sequence[TokenLogprob], pieces: TokenText, prior: Sequence[int]) -> dict[str, Any]:
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


def echo_logprobs(
    prompt: Sequence[int], scored: Sequence[TokenLogprob], generated: Sequence[TokenLogprob], pieces: TokenText
) -> dict[str, Any]:
    """The legacy ``logprobs`` object of an ``echo`` answer: every prompt token, then the generated ones. The
    first prompt token has nothing before it, so its logprob and alternatives are null (as at OpenAI); `scored`
    are the others' (`slmkit.serve.app.score_prompt`)."""
    rest = completion_logprobs([*scored, *generated], pieces, prompt[:1])
    return {
        "tokens": [pieces.piece(prompt[0])[0], *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def echo_response(
    reply: Reply,
    requests: Sequence[GenerationRequest],
    scored: Sequence[Sequence[TokenLogprob]],
    results: Sequence[Result] | None,
    n: int,
    tokenizer: Any,
) -> dict[str, Any]:
    """The ``text_completion`` object of an ``echo`` request: each choice's text is its prompt (decoded) and then
    what was generated (nothing when max_tokens is 0, results None); `scored`: each request's prompt logprobs."""
    choices = []
    for i, request in enumerate(requests):
        result = results[i] if results is not None else None
        generated = list(result.logprobs) if result is not None else []
        choices.append(
            {
                "index": i,
                "text": tokenizer.decode(request.prompt_ids) + (result.text if result is not None else ""),
                "logprobs": echo_logprobs(request.prompt_ids, scored[i], generated, reply.pieces)
                if reply.pieces is not None
                else None,
                "finish_reason": result.finish_reason if result is not None else "length",
            }
        )
    if results is not None:
        counts = usage(results, n)
    else:
        prompt_tokens = sum(len(r.prompt_ids) for r in requests[::n])
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    return {**reply.header("text_completion"), "choices": choices, "usage": counts}


def chat_logprobs(entries: Sequence[TokenLogprob], pieces: TokenText) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text, data = pieces.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


# ---- responses --------------------------------------------------------------------------------------------
def usage(results: Sequence[Result], n: int) -> dict[str, int]:
    """Token counts of a request whose results are prompt-major with `n` choices per prompt."""
    prompt = sum(r.prompt_tokens for r in results[::n])  # the n choices of a prompt share its prompt tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True)
class Reply:
    """What every response object and chunk of one request carries; `pieces` is None when it reports no logprobs."""

    id: str
    created: int
    model: str
    pieces: TokenText | None = None

    @classmethod
    def new(cls, kind: Literal["completion", "chat"], model: str, pieces: TokenText | None = None) -> Reply:
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return cls(f"{prefix}-{secrets.token_hex(12)}", int(time.time()), model, pieces)

    def header(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}


def completion_response(reply: Reply, results: Sequence[Result], n: int) -> dict[str, Any]:
    """The ``text_completion`` object of finished results (prompt-major, `n` choices per prompt)."""
    pieces = reply.pieces
    choices = [
        {
            "index": i,
            "text": r.text,
            "logprobs": completion_logprobs(r.logprobs, pieces, []) if pieces is not None else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return {**reply.header("text_completion"), "choices": choices, "usage": usage(results, n)}


def chat_response(reply: Reply, results: Sequence[Result], n: int) -> dict[str, Any]:
    """The ``chat.completion`` object of finished results (`n` choices)."""
    pieces = reply.pieces
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(r.logprobs, pieces) if pieces is not None else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return {**reply.header("chat.completion"), "choices": choices, "usage": usage(results, n)}


def completion_chunk(
    reply: Reply, index: int, text: str, finish_reason: str | None, entries: Sequence[TokenLogprob], prior: list[int]
) -> dict[str, Any]:
    """A streamed ``text_completion`` chunk: `text` and the logprobs of `entries`, the tokens behind it."""
    pieces = reply.pieces
    choice = {
        "index": index,
        "text": text,
        "logprobs": completion_logprobs(entries, pieces, prior) if pieces is not None else None,
        "finish_reason": finish_reason,
    }
    return {**reply.header("text_completion"), "choices": [choice]}


def chat_chunk(
    reply: Reply, index: int, text: str, finish_reason: str | None, entries: Sequence[TokenLogprob], prior: list[int]
) -> dict[str, Any]:
    """A streamed ``chat.completion.chunk``; the final one has an empty delta and logprobs only if tokens are left."""
    pieces = reply.pieces
    report = pieces is not None and (bool(entries) or finish_reason is None)
    choice = {
        "index": index,
        "delta": {"content": text} if text else {},
        "logprobs": chat_logprobs(entries, pieces) if report else None,
        "finish_reason": finish_reason,
    }
    return {**reply.header("chat.completion.chunk"), "choices": [choice]}


def chat_opening_chunk(reply: Reply, index: int) -> dict[str, Any]:
    """Chat streams open each choice with the assistant's role, as OpenAI's do."""
    choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return {**reply.header("chat.completion.chunk"), "choices": [choice]}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


ChunkMaker = Callable[[Reply, int, str, str | None, Sequence[TokenLogprob], list[int]], dict[str, Any]]


class StreamShaper:
    """The chunks of one streamed request, from the scheduler's events of its choices (`slmkit.serve.scheduler.Job`).

    Text held back by the batcher (a partial UTF-8 character or stop string) has tokens but no text yet: their
    logprobs wait and ride on the choice's next chunk with text, or on its final chunk. The final chunk of the
    last choice to finish carries ``usage``.
    """

    def __init__(self, reply: Reply, chunk: ChunkMaker, indices: Sequence[int], n: int, opening: bool = False) -> None:
        self.reply, self.chunk, self.indices, self.n, self.opens = reply, chunk, list(indices), n, opening
        self.pending: dict[int, list[TokenLogprob]] = {i: [] for i in self.indices}
        self.sent: dict[int, list[int]] = {i: [] for i in self.indices}  # tokens already sent, per choice
        self.results: dict[int, Result] = {}

    @property
    def finished(self) -> bool:
        return len(self.results) == len(self.indices)

    def opening(self) -> list[dict[str, Any]]:
        return [chat_opening_chunk(self.reply, i) for i in self.indices] if self.opens else []

    def delta(self, index: int, delta: Delta) -> dict[str, Any] | None:
        """The chunk for new tokens of a choice; None while the batcher holds their text back."""
        self.pending[index] += delta.logprobs
        if not delta.text:
            return None
        out = self.chunk(self.reply, index, delta.text, None, self.pending[index], self.sent[index])
        self.sent[index] += [e.token for e in self.pending[index]]
        self.pending[index] = []
        return out

    def done(self, index: int, result: Result) -> dict[str, Any]:
        """A choice's final chunk: its finish_reason (and the request's usage when it is the last to finish)."""
        self.results[index] = result
        final = self.chunk(self.reply, index, "", result.finish_reason, self.pending[index], self.sent[index])
        self.pending[index] = []
        if self.finished:
            final["usage"] = usage([self.results[i] for i in self.indices], self.n)
        return final

    @staticmethod
    def error(exc: Exception) -> dict[str, Any]:
        """The event that ends a stream whose generation failed (the status line has been sent already)."""
        error = generation_error(exc)
        return {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}


def completion_stream(reply: Reply, indices: Sequence[int], n: int) -> StreamShaper:
    return StreamShaper(reply, completion_chunk, indices, n)


def chat_stream(reply: Reply, indices: Sequence[int], n: int) -> StreamShaper:
    return StreamShaper(reply, chat_chunk, indices, n, opening=True)
