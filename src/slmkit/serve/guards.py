"""The server's gate: what every HTTP request passes before a route sees it (an ASGI middleware, `Guards`).

In order: the Host header must be an allowed host (400 ``invalid_host``: a DNS-rebinding page cannot reach a
loopback server through a name of its own); a request with an ``Origin`` header must come from an allowed origin
(403 ``origin_not_allowed``: a web page cannot post to an unkeyed local server; curl and SDKs send no Origin);
CORS preflights of allowed origins are answered here; /v1/ routes need the API key when there is one (401); the
body may hold at most ``max_request_bytes`` (413 ``request_too_large``), checked against Content-Length up front
and counted while the body is read (chunked bodies too), so an oversized body is never held in memory. Errors
have OpenAI's shape (`slmkit.serve.openai.ApiError`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from slmkit.serve import openai
from slmkit.serve.metrics import Metrics

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = "600"


class BodyTooLarge(HTTPException):
    """Raised from the body's receive() once it passes the limit; FastAPI re-raises HTTPExceptions of body reading,
    so the app's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes")


def host_name(value: str) -> str:
    """The host of a Host header or allow-list entry, lower case, without its port (IPv6 keeps its brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    if value.count(":") > 1:  # a bare IPv6 address
        return f"[{value}]"
    return value.split(":", 1)[0]


def same_key(given: str, expected: str) -> bool:
    """Constant-time comparison (of digests, so the time does not depend on the lengths either)."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


class Guards:
    """ASGI middleware over the app: host allow-list, origin policy + CORS, API key, body size limit, request
    counting (of /v1/ routes, in `metrics`).

    allowed_hosts: host names (any port) the Host header may name; None or an entry "*": any. cors_origins:
    origins (``https://app.example``) whose pages may call the API; "*": any. api_key: None for none.
    """

    def __init__(
        self,
        app: Any,
        *,
        metrics: Metrics,
        api_key: str | None = None,
        max_request_bytes: int = 1 << 20,
        allowed_hosts: Iterable[str] | None = None,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.app, self.metrics, self.api_key, self.limit = app, metrics, api_key, max_request_bytes
        hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.hosts = None if hosts is None or "*" in hosts else hosts
        self.origins = {o.rstrip("/") for o in cors_origins}

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        path: str = scope.get("path", "")
        origin = headers.get("origin")
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin is not None else {}

        async def refuse(error: openai.ApiError, extra: dict[str, str] | None = None) -> None:
            if path.startswith("/v1/"):
                self.metrics.count_request(path, error.status)
            response = JSONResponse(
                error.body(), status_code=error.status, headers={**(error.headers or {}), **(extra or {})}
            )
            await response(scope, receive, send)

        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            await refuse(
                openai.ApiError(400, "the Host header names a host this server does not serve", code="invalid_host")
            )
            return
        if origin is not None and not self.origin_allowed(origin):
            await refuse(
                openai.ApiError(
                    403,
                    f"requests from origin {origin!r} are not allowed (slm serve --cors-origin ORIGIN allows one)",
                    type="permission_error",
                    code="origin_not_allowed",
                )
            )
            return
        if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            preflight = {
                **cors,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            }
            await Response(status_code=204, headers=preflight)(scope, receive, send)
            return
        if self.api_key is not None and path.startswith("/v1/"):
            if not same_key(headers.get("authorization", ""), f"Bearer {self.api_key}"):
                await refuse(openai.authentication_error(), cors)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await refuse(openai.http_error(413, BodyTooLarge(self.limit).detail), {**cors, "Connection": "close"})
            return

        received = 0

        async def counted_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def annotated_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                if path.startswith("/v1/"):
                    self.metrics.count_request(path, message["status"])
                if cors:
                    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cors.items()]
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, counted_receive, annotated_send)
