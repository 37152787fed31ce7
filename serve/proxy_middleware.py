"""ASGI middlewares that run inside Ray Serve's HTTP proxy, in front of every route.

Ray calls `middlewares()` in each proxy when the proxy starts, because the Ray processes' environment
names it (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set from serve.proxy_limits.proxy_env). Both
middlewares read their settings from that environment too; without them they do nothing.

- BodyLimit: a body over the limit is refused with 413 by the proxy itself, by Content-Length before
  it is read, or once a chunked body passes the limit; the proxy then holds at most the limit, not
  a whole upload queued for a busy replica.
- HeaderGuard: a client's X-Request-Id is echoed by Serve and written to every log line of the
  request; one that is not 1-128 characters of [A-Za-z0-9._-] is dropped, so Serve makes its own. Ray's
  per-request hints for a trusted front proxy (X-Request-Timeout-Seconds: 0 lifts http_options'
  request_timeout_s, X-Request-Disconnect-Disabled: ?1 keeps the work running after the client has gone,
  X-Session-Id and serve_multiplexed_model_id steer routing) are dropped: no client of this API may set them.
- Drain: `python -m serve run` stops by creating the drain flag file: from then on new HTTP requests
  are answered 503 at once, requests in flight may finish for DRAIN_GRACE_S, and those still without
  a response then are answered 503 too, so the service can stop without cutting a connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

from serve.problems import MEDIA_TYPE, Problem

BODY_LIMIT_ENV = "ROREM_PROXY_MAX_BODY_BYTES"
DRAIN_FLAG_ENV = "ROREM_DRAIN_FLAG"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # ray/serve/_private/constants.py
CALLBACK_PATH = "serve.proxy_middleware:middlewares"
DRAIN_PATH = "/-/rorem-drain"  # while draining: {"in_flight": n}, for the stopping CLI
DRAIN_GRACE_S = 4.0
RETRY_AFTER_S = 2
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_REQUEST_ID_HEADER = b"x-request-id"


def middlewares() -> list:
    """The callback Ray's proxy calls: Starlette Middleware objects, outermost last."""
    from starlette.middleware import Middleware

    stack = [Middleware(HeaderGuard)]
    limit = os.environ.get(BODY_LIMIT_ENV)
    if limit:
        stack.append(Middleware(BodyLimit, limit=int(limit)))
    flag = os.environ.get(DRAIN_FLAG_ENV)
    if flag:
        stack.append(Middleware(Drain, flag=flag))
    return stack


async def _problem(send, problem: Problem) -> None:
    """The problem+json answer the app would give, closing the connection."""
    body = json.dumps(problem.body()).encode()
    headers = [
        (b"content-type", MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(name.lower().encode(), value.encode()) for name, value in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def ray_control_headers() -> frozenset[bytes]:
    """The request headers Ray's HTTP proxy turns into routing and lifetime options, by Ray's own names (the
    session one is configurable), lower case with '-' for '_' as Ray compares them."""
    from ray.serve._private import constants

    names = (
        constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,  # 0: no request_timeout_s
        constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,  # ?1: not cancelled when the client goes
        constants.SERVE_SESSION_ID,  # session-affinity routing
        constants.SERVE_MULTIPLEXED_MODEL_ID,  # model-id routing; each new id is remembered by the router
    )
    return frozenset(name.lower().replace("_", "-").encode() for name in names)


class HeaderGuard:
    def __init__(self, app):
        self.app = app
        self.valid = re.compile(REQUEST_ID_PATTERN.encode())
        self.dropped = ray_control_headers()

    def _keep(self, name: bytes, value: bytes) -> bool:
        name = name.lower()
        if name == _REQUEST_ID_HEADER:
            return self.valid.fullmatch(value) is not None
        return name.replace(b"_", b"-") not in self.dropped

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            kept = [(k, v) for k, v in headers if self._keep(k, v)]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"request body is {int(declared)} bytes; the limit is {self.limit}")
        received = 0
        answered = False

        async def bounded_receive():
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                received += len(message.get("body", b""))
                if received > self.limit:
                    answered = True  # the proxy stops reading; whatever the app answers is dropped
                    await self._refuse(send, f"request body exceeds the limit of {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not answered:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    async def _refuse(self, send, detail: str) -> None:
        await _problem(send, Problem("payload-too-large", f"{detail} (at the proxy)"))


class Drain:
    def __init__(self, app, flag: str, grace_s: float = DRAIN_GRACE_S):
        self.app = app
        self.flag = flag
        self.grace_s = grace_s
        self.in_flight: dict[asyncio.Task, list[bool]] = {}  # request task -> [response started]
        self.given_up: set[asyncio.Task] = set()
        self.draining = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining or os.path.exists(self.flag):
            self._begin()
            if scope["path"] == DRAIN_PATH:
                body = json.dumps({"in_flight": len(self.in_flight)}).encode()
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
                )
                return await send({"type": "http.response.body", "body": body})
            return await self._unavailable(send)
        task = asyncio.current_task()
        started = [False]
        self.in_flight[task] = started

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if task not in self.given_up:
                raise
            task.uncancel()
            if not started[0]:
                await self._unavailable(send)
        finally:
            self.in_flight.pop(task, None)
            self.given_up.discard(task)

    def _begin(self) -> None:
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(self.grace_s, self._give_up)

    def _give_up(self) -> None:
        """Past the grace period: answer 503 to every request that has no response yet."""
        for task, started in list(self.in_flight.items()):
            if not started[0]:
                self.given_up.add(task)
                task.cancel()

    async def _unavailable(self, send) -> None:
        detail = "this instance is stopping; retry (another instance)"
        await _problem(send, Problem("overloaded", detail, {"Retry-After": str(RETRY_AFTER_S)}))
