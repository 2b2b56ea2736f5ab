"""The endpoint's HTTP ingress: a light deployment in front of the model's replicas, so that a replica's death is
answered, not left to Serve's proxy.

    client -> Serve's proxy -> Speech2TextIngress (guard, whole body) -> Speech2TextServer (the FastAPI app, batches)

A model replica killed mid-batch (out of memory, a lost node, a crashed CUDA driver) fails every request it holds.
Serve's proxy answers those itself with a plain-text 500 ("Internal Server Error", `http_util.
get_http_response_status`: any RayActorError is a 500), which tells a client neither that it may retry nor when. The
ingress holds each request until its answer starts, sees the replica's death as the handle's RayActorError, and
answers 503 with `Retry-After` and an OpenAI-shaped JSON error; clients that retry 503s (the `openai` client does,
honouring Retry-After) get their answer from the replica Serve starts in its place. A full replica queue
(BackPressureError) and a deployment without replicas (DeploymentUnavailableError) get the same 503.

The request goes over unchanged: its ASGI scope and its whole body (read here, under `http_guard.RequestGuard`'s
limits, so a slow upload holds an ingress slot, not a model replica's); the answer comes back as the app's own ASGI
messages, streamed (Server-Sent Events arrive as they are decoded). A client gone mid-request cancels the replica's
request (Serve cancels the handle's stream). What it cannot do: a replica that dies after its answer started (a
stream's first event was sent) cuts that answer short; and the ingress' own replica dying is Serve's 500 again (it
holds no model and no batch, only requests being relayed).
"""

from __future__ import annotations

import asyncio
import logging
import math

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .http_guard import GuardLimits, RequestGuard, error_response

logger = logging.getLogger(__name__)
# What of a request's ASGI scope goes to the model replica (the rest, such as Serve's own state, stays here).
FORWARDED_SCOPE = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "root_path",
    "query_string",
    "headers",
    "client",
    "server",
)
# The handle's errors that mean no replica is there to answer (dead, or none started yet) or none takes more now.
REPLICA_GONE = (RayActorError, DeploymentUnavailableError, BackPressureError)


class Relay(Response):
    """The ingress' answer, as Serve sends it (an ASGI callable given the request's own receive and send): the
    guard, then the model replica's answer relayed."""

    def __init__(self, ingress: "Speech2TextIngress"):
        super().__init__()
        self.ingress = ingress

    async def __call__(self, scope, receive, send) -> None:
        await RequestGuard(self.ingress.relay, lambda: self.ingress.limits)(scope, receive, send)


@serve.deployment
class Speech2TextIngress:
    def __init__(self, server, limits: GuardLimits, retry_after_s: float):
        self.server = server.options(stream=True)
        self.limits, self.retry_after_s = limits, retry_after_s

    async def __call__(self, request: Request) -> Response:
        return Relay(self)

    async def relay(self, scope, receive, send) -> None:
        """ASGI: the request (its body read whole by the guard) to a model replica, its answer back as it comes."""
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        forwarded = {key: scope[key] for key in FORWARDED_SCOPE if key in scope}
        messages = self.server.asgi.remote(forwarded, b"".join(body))
        try:
            try:
                first = await messages.__anext__()
            except REPLICA_GONE as error:
                return await self.unavailable(error)(scope, receive, send)
            await send(first)
            async for message in messages:
                await send(message)
        finally:
            messages.cancel()  # a client gone mid-answer: the replica stops its work too

    def unavailable(self, error: BaseException) -> JSONResponse:
        """503, Retry-After and the reason in OpenAI's error shape."""
        logger.warning("503: the model's replica did not answer: %s: %s", type(error).__name__, error)
        if isinstance(error, BackPressureError):
            message, code = "every model replica is busy: retry after the Retry-After seconds", "overloaded"
        else:
            message = (
                "the model replica holding this request stopped before it answered (Serve starts another): "
                "retry after the Retry-After seconds"
            )
            code = "replica_unavailable"
        return error_response(503, message, code, {"retry-after": str(max(0, math.ceil(self.retry_after_s)))})


async def relay_asgi(app, scope: dict, body: bytes):
    """Run ASGI `app` on a request whose whole `body` is at hand; yield the messages it sends. The request's
    client is the ingress: the request's cancellation is its disconnect."""
    sent: asyncio.Queue = asyncio.Queue()
    finished = object()
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # until cancelled
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        finally:
            sent.put_nowait(finished)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not finished:
            yield message
        await task  # its exception, if it raised one
    finally:
        task.cancel()
