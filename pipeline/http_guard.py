"""The endpoint's first line against hostile clients: an ASGI middleware in front of the FastAPI app.

It answers before the app (and its multipart parser) sees anything:
- 401 when a bearer token is required and missing or wrong, checked on the headers alone;
- 413 when the declared Content-Length is over the limit, before a byte of body is read;
- the body is then read here, counted as it arrives and cut with a 413 the moment it passes the limit (a chunked
  upload declares no length), and a body that stops arriving for `body_timeout_s` is dropped with a 408;
- a multipart body without its closing delimiter (cut short on its way) is a 400 `truncated_upload`.
Each rejection carries `Connection: close`, so uvicorn drops the socket instead of draining the rest of the body.

Why here, in the replica, and not in Serve's proxy or uvicorn: Ray Serve 2.60 runs uvicorn in its proxy with only
`timeout_keep_alive` set (`ray/serve/_private/http_util.py`, `start_asgi_http_server`); uvicorn has no body size or
body read timeout, and `HTTPOptions.middlewares` was removed. The one proxy hook left,
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, is read once per cluster from the environment when the proxy starts, and
knows nothing of an application's key or limits. Serve's proxy reads each request body from the socket as fast as it
arrives, whatever the replica does (`HTTPProxy.proxy_asgi_receive`, no backpressure), so what bounds its memory is
that this answer comes early and closes the connection. What this place costs: a body still arriving holds one of
the replica's `max_ongoing_requests` slots until it is complete or timed out, hence that option's high default.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Callable

from starlette.responses import JSONResponse

QUOTE_CHARS = 40  # error messages quote at most this much of what a client sent
EPILOGUE_BYTES = 1024  # text a multipart body may carry after its closing delimiter (clients send none)


def quote(value: object) -> str:
    """`value` as an error message may show it: repr of at most QUOTE_CHARS characters, marked when cut."""
    text = str(value)
    return repr(text) if len(text) <= QUOTE_CHARS else repr(text[:QUOTE_CHARS]) + f"... ({len(text)} characters)"


def error_body(status: int, message: str, code: str) -> dict:
    """The OpenAI API's error object."""
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    """An error answer of the endpoint (the replica's handlers and the ingress'): counted, in OpenAI's shape."""
    from .metrics import inc

    inc("s2t_serve_responses_total", status=str(status), code=code)
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int
    body_timeout_s: float
    api_key_sha256: str | None = None  # None: no token required
    open_paths: frozenset[str] = frozenset({"/healthz"})  # answered without a token (probes)


class Rejected(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class RequestGuard:
    """ASGI middleware; `limits` is called per request (a replica sets its limits when it starts)."""

    def __init__(self, app, limits: Callable[[], GuardLimits]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.limits()
        try:
            self.authorize(scope, limits)
            if not has_body(scope):  # a GET: nothing to read
                return await self.app(scope, receive, send)
            self.check_declared_length(scope, limits)
            body = await self.read_body(receive, limits)
            if body is not None:
                check_multipart_end(scope, body)
        except Rejected as rejection:
            return await self.reject(send, rejection)
        if body is not None:  # None: the client went away, there is nobody to answer
            await self.app(scope, replay(body, receive), send)

    @staticmethod
    def authorize(scope, limits: GuardLimits) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if limits.api_key_sha256 is None or path in limits.open_paths:
            return
        scheme, _, token = header(scope, b"authorization").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, limits.api_key_sha256):
            raise Rejected(
                401,
                "a valid API key is required (Authorization: Bearer <key>)",
                "invalid_api_key",
                {"www-authenticate": "Bearer"},
            )

    @staticmethod
    def check_declared_length(scope, limits: GuardLimits) -> None:
        declared = header(scope, b"content-length")
        if declared.isdigit() and exceeds(declared, limits.max_body_bytes):
            raise Rejected(
                413,
                f"Content-Length {quote(declared)} is over the limit of {limits.max_body_bytes} bytes",
                "upload_too_large",
            )

    @staticmethod
    async def read_body(receive, limits: GuardLimits) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise Rejected(
                    408,
                    f"the request body stopped arriving: nothing for {limits.body_timeout_s} s after {size} bytes",
                    "body_timeout",
                ) from None
            if message["type"] != "http.request":  # http.disconnect
                return None
            size += len(message.get("body", b""))
            if size > limits.max_body_bytes:
                raise Rejected(
                    413, f"the request body is more than the limit of {limits.max_body_bytes} bytes", "upload_too_large"
                )
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def reject(send, rejection: Rejected) -> None:
        from .metrics import inc

        inc("s2t_serve_responses_total", status=str(rejection.status), code=rejection.code)
        body = json.dumps(error_body(rejection.status, rejection.message, rejection.code)).encode()
        headers = {
            "content-type": "application/json",
            "content-length": str(len(body)),
            "connection": "close",
            **rejection.headers,
        }
        await send(
            {
                "type": "http.response.start",
                "status": rejection.status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})


def check_multipart_end(scope, body: bytes) -> None:
    """A multipart body must end with its closing delimiter: one that does not was cut short on its way (a chunked
    upload whose client stopped, a proxy that truncated it). The form parser would take it for a form without the
    file, and the answer would say the file was not sent."""
    kind, _, params = header(scope, b"content-type").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return
    boundary = next(
        (
            value.strip().strip('"')
            for key, _, value in (p.partition("=") for p in params.split(";"))
            if key.strip().lower() == "boundary"
        ),
        "",
    )
    closing = b"--" + boundary.encode("latin-1") + b"--"
    if boundary and closing not in body[-(len(closing) + EPILOGUE_BYTES) :]:
        raise Rejected(
            400,
            f"the multipart body ends before its closing boundary after {len(body)} bytes: the upload "
            f"was cut short; send it again",
            "truncated_upload",
        )


def exceeds(digits: str, limit: int) -> bool:
    """Whether the number `digits` spells is over `limit`; by length first, as int() refuses 5000-digit strings."""
    digits = digits.lstrip("0") or "0"
    return len(digits) > len(str(limit)) or int(digits) > limit


def header(scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), "")


def has_body(scope) -> bool:
    """HTTP/1.1: a request has a body only when it says so, by Content-Length or Transfer-Encoding."""
    return header(scope, b"content-length") not in ("", "0") or bool(header(scope, b"transfer-encoding"))


def replay(body: bytes, receive):
    """An ASGI `receive` that hands over the body read already, then waits on the client (for its disconnect)."""
    sent = False

    async def receive_replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_replayed
