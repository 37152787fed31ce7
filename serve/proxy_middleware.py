"""ASGI middlewares that run inside Ray Serve's HTTP proxy, in front of every route.

Ray calls `middlewares()` in each proxy when the proxy starts, because the Ray processes' environment
names it (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set from serve.proxy_limits.proxy_env). BodyBuffer
and Drain read their settings from that environment too; without them they are not installed. One proxy
serves every application of the cluster, so the body settings come per route prefix (ROREM_PROXY_ROUTES):
ByRoutePrefix hands each request to the BodyBuffer of the application Ray will route it to.

- BodyBuffer: the proxy reads the whole body before the request goes on. Ray's proxy picks a replica
  as soon as the headers are in and lets it pull the body as it arrives, so a client trickling its
  upload would hold one of the Ingress replica's `max_ongoing_requests` for up to `body_timeout_s`,
  and a few dozen such clients would starve every other request, the health probes included. A body
  over the limit is refused with 413, by Content-Length before it is read or once it passes the
  limit; one not in within the app's `overload.body_timeout_s` gets 408; a client that hangs up
  first reaches no replica at all. Arriving bodies are held to the app's `overload.proxy_buffer_bytes`
  in all: a request whose body (its Content-Length; the limit for a chunked one; nothing for a request
  without a body, such as a probe's GET) would not fit beside the bytes already arrived is answered 503
  (Retry-After) before it is read. Nothing is reserved: bytes count as they arrive, never as declared, so
  a client that declares a large body and sends nothing holds none of the buffer, and requests admitted
  together can overcommit it; the one whose chunk would take the total past it is then cut with the same
  503, even if it is not the slowest. Small packets are joined into chunks
  of 64 KiB, so a body costs about its size however it is sent. Once a body is in, it leaves this count:
  Ray's proxy holds it until a replica reads it (bounded by the Ingress's max_ongoing_requests per
  replica plus its max_queued_requests per proxy), as before. With API keys on, a request with a body
  must present a valid key (serve.auth.AccessPolicy on the app's keys file, any scope: the app checks the
  route's) or is answered the app's 401 before any of its body is read: the buffer is for key holders.
  Only routes that take no body may be public (serve.auth.check_routes refuses any other).
- ByRoutePrefix: the application a request's path belongs to, by Ray's rule (the longest route prefix that
  the path, less http_options.root_path, equals or continues with '/'); each application has its own
  BodyBuffer (limit, body timeout, buffer limit and keys; the bytes arriving are counted for the proxy as a
  whole). A request with a body whose path no application serves is answered 404 before any of it is read
  (Ray would answer it 404 too, after the proxy had read the body). The table is the one the proxy started
  with: an application added or moved to another route prefix by a later `serve deploy` needs the service
  restarted (its requests would meet another application's settings, or a 404). With API keys on (any
  application's), Ray's own `GET /-/routes`, which needs no key and lists every route prefix and application
  name, is answered the 404 of a path no application serves (Ray's `/-/healthz` stays: probes need it).
- HeaderGuard, outermost: a request whose headers are ambiguous is answered 400 `malformed-request` before
  anything else runs: more than one Host or Content-Type header line (the first decided the app's host check
  and its body parser, where another server in the path may have read the other), or HTTP/1.1 without a Host
  (RFC 9112 3.2: a server must answer 400; HTTP/1.0 may leave it out), or HTTP/1.0 with a Transfer-Encoding
  (RFC 9112 6.1), or a Transfer-Encoding other than chunked alone (`gzip, chunked`); a body with a
  Content-Encoding (gzip) is answered 415 `unsupported-media-type`: nothing here decodes another coding, and it
  reached the app as the coded bytes. A client's X-Request-Id is echoed by
  Serve and written to every log line of the request; one that is not 1-128 characters of [A-Za-z0-9._-] is
  dropped, so Serve makes its own. Ray's per-request hints for a trusted front proxy (X-Request-Timeout-Seconds:
  0 lifts http_options' request_timeout_s, X-Request-Disconnect-Disabled: ?1 keeps the work running after the
  client has gone, X-Session-Id and serve_multiplexed_model_id steer routing) are dropped: no client of this API
  may set them.
  A WebSocket handshake is refused (close 1008 before accepting: uvicorn answers it 403): Ray's proxy
  reads the same hints from it, and the app has no WebSocket route.
- RayAnswers: what Ray's proxy answers on its own, in plain text (a full Ingress queue: 503 "Request
  dropped due to backpressure"; no running Ingress replica: 503; a path outside every route prefix: 404;
  Ray's 429; its http_options.request_timeout_s: 408 proxy-timeout, a kind of its own since the app's
  `timeout` is 504), becomes the app's problem+json of the same status, so a client reads one error format.
  The app itself never answers in text/plain. A request Ray gives up without answering (its Ingress replica
  failed: Ray sends nothing, and uvicorn would answer a plain 500) gets 503 replica-failed with Retry-After,
  the answer that tells the client to retry; one cancelled meanwhile is left to whoever cancelled it (Drain).
  A client that hung up gets the same answer too, which uvicorn drops (nobody is there to read it).
- Drain: `python -m serve run` stops by creating the drain flag file: from then on new HTTP requests
  are answered 503 `stopping` at once, requests in flight may finish for DRAIN_GRACE_S, and those still without
  a response then are answered 503 too, so the service can stop without cutting a connection. Such a
  request's task is cancelled; Ray's proxy catches that and returns without answering, so the 503 comes
  once the inner app has returned or raised the cancellation. gRPC calls are refused, counted and given up on
  alike at Ray's gRPC proxy (serve.grpc_gate; InFlight for both).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import uuid

from serve.problems import ANSWER_HEADERS, MEDIA_TYPE, Problem

# JSON: {route prefix: {limit, timeout_s, max_held, keys_file, keys_reload_s}} (BodyBuffer's settings; the keys
# only while the application's auth is on), one entry per application
ROUTES_ENV = "ROREM_PROXY_ROUTES"
RETRY_AFTER_ENV = "ROREM_PROXY_RETRY_AFTER_S"  # the longest overload.retry_after_s of the applications (HTTP or gRPC)
DRAIN_FLAG_ENV = "ROREM_DRAIN_FLAG"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # ray/serve/_private/constants.py
CALLBACK_PATH = "serve.proxy_middleware:middlewares"
DRAIN_PATH = "/-/rorem-drain"  # while draining: {"in_flight": n}, for the stopping CLI
RAY_ROUTES_PATH = "/-/routes"  # Ray's proxy answers it, keyless (ray/serve/_private/proxy_request_response.py)
DRAIN_GRACE_S = 4.0
DEFAULT_RETRY_AFTER_S = 2  # overload.retry_after_s's default (tests/test_proxy_limits.py)


@functools.cache
def retry_after_s() -> int:
    """The Retry-After of the proxies' own refusals (stopping, replica-failed, Ray's 503 without one), HTTP and gRPC
    alike: the longest of the applications' overload.retry_after_s (RETRY_AFTER_ENV), as their Ingresses say it;
    one value, as a proxy serves them all. The default where it is not set, or not a whole number of seconds."""
    said = os.environ.get(RETRY_AFTER_ENV, "")
    return int(said) if said.isascii() and said.isdigit() and int(said) > 0 else DEFAULT_RETRY_AFTER_S


REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(REQUEST_ID_PATTERN.encode())
logger = logging.getLogger("ray.serve")  # the proxy's log (its file under the Ray session's logs/serve/)


def middlewares() -> list:
    """The callback Ray's proxy calls: Starlette Middleware objects, outermost last. Ray calls it before it builds
    its uvicorn server and its gRPC server, so the request heads are bounded from here too
    (serve.proxy_connections), compressed gRPC messages refused and cancelled calls' tracebacks left out of the log
    (serve.grpc_gate)."""
    from starlette.middleware import Middleware

    from serve import grpc_gate, proxy_connections

    proxy_connections.install()
    grpc_gate.refuse_compressed_messages()
    grpc_gate.quiet_cancelled_calls()

    stack = [Middleware(RayAnswers)]
    routes = os.environ.get(ROUTES_ENV)
    if routes:
        stack.append(Middleware(ByRoutePrefix, routes=json.loads(routes)))
    flag = os.environ.get(DRAIN_FLAG_ENV)
    if flag:
        stack.append(Middleware(Drain, flag=flag))
    stack.append(Middleware(HeaderGuard))  # outermost: an ambiguous head is refused before any other runs
    return stack


@functools.cache
def proxy_keys(path: str, reload_s: float | None):
    """An application's keys file, as its Ingress reads it; a proxy that cannot read it (a node without the
    mounted Secret) refuses every body until it can, rather than not starting. Its failures count as the
    Ingress's do: with REST traffic only, the proxy may be the one that reads a broken file. One reader per file
    in the process: the HTTP route's check and the gRPC gate's (serve.grpc_gate) share it, as its failures."""
    from serve.auth import AccessPolicy, ApiKeys

    reload = {"reload_interval_s": reload_s} if reload_s is not None else {}
    return AccessPolicy(ApiKeys(path, must_exist=False, on_error=_keys_file_error, **reload))


def _keys_file_error() -> None:
    from serve.metrics import proxy_metrics  # Ray's metrics: not for the CLI, which imports this module

    proxy_metrics().keys_file_errors.inc()


def route_path(scope) -> str:
    """The path Ray routes by (ray/serve/_private/proxy_request_response.py, ASGIProxyRequest.route_path): uvicorn
    puts http_options.root_path in front of every path, and Ray takes it off again."""
    return scope["path"][len(scope.get("root_path", "")) :]


def route_matches(prefix: str, path: str) -> bool:
    """Ray's rule (ray/serve/_private/proxy_router.py, match_route): the path is the prefix, or continues it
    with '/'; a prefix ending in '/' ("/") takes every path that starts with it."""
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


class ByRoutePrefix:
    def __init__(self, app, routes: dict[str, dict]):
        self.app = app
        self.keyed = any("keys_file" in limits for limits in routes.values())
        self.buffers = []  # (prefix, BodyBuffer), longest prefix first, as Ray matches them
        arriving = ArrivingBytes()  # one count for the proxy: each application's max_held bounds it
        for prefix in sorted(routes, key=len, reverse=True):
            limits = dict(routes[prefix])
            keys_file, reload_s = limits.pop("keys_file", None), limits.pop("keys_reload_s", None)
            keys = proxy_keys(keys_file, reload_s) if keys_file else None
            self.buffers.append((prefix, BodyBuffer(app, keys=keys, arriving=arriving, **limits)))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if self.keyed and path == RAY_ROUTES_PATH:
            return await _problem(send, _not_served(path), scope)
        buffer = next((buffer for prefix, buffer in self.buffers if route_matches(prefix, path)), None)
        if buffer is not None:
            return await buffer(scope, receive, send)
        if _declared_size(_first_headers(scope)) != 0:
            return await _problem(send, _not_served(path), scope)
        await self.app(scope, receive, send)  # Ray's own 404 (RayAnswers words it)


def _not_served(path: str) -> Problem:
    return Problem("not-found", f"no application serves {path[:200]!r} (at the proxy)")


def _first_headers(scope) -> dict[bytes, bytes]:
    """The first of repeated headers, as the app (Starlette) reads them."""
    headers = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


def _declared_size(headers: dict[bytes, bytes]) -> int | None:
    """The body's size by its headers; None for a chunked one (Transfer-Encoding overrides any Content-Length, RFC
    9112 6.3). HTTP/1.1: a request with neither has no body (a probe's GET)."""
    if b"transfer-encoding" in headers:
        return None
    declared = headers.get(b"content-length", b"")
    return int(declared) if declared.isdigit() else 0


async def _problem(send, problem: Problem, scope) -> None:
    """A refusal of these middlewares' own, naming the request as the app does."""
    request_id = refusal_request_id(scope["headers"])
    note_refusal(problem, "http", f"{scope['method']} {scope['path']}", request_id)
    await _answer(send, problem, request_id)


MAX_LOGGED_TARGET_CHARS = 200


def note_refusal(problem: Problem, protocol: str, target: str, request_id: str, for_ray: bool = False) -> None:
    """Count and log a request the proxy refused itself (here, serve.proxy_connections, serve.grpc_gate): neither
    Ray's access log nor its request counts see it; `for_ray`: an answer RayAnswers gave in place of Ray's own or of
    a dead Ingress's, which Ray counts by its status only (a 500 for the dead Ingress). `target`: the method and
    path, or the gRPC method; the client's text goes in repr'd or with its whitespace collapsed, and clipped: no
    line breaks of its own in the log. A fault (a 5xx no refusal) is a warning."""
    from serve.metrics import proxy_metrics  # Ray's metrics: not for the CLI, which imports this module

    if for_ray:
        proxy_metrics().answered_for_ray(problem.problem)
    else:
        proxy_metrics().refused(problem.problem, protocol)
    logger.log(
        logging.WARNING if problem.status >= 500 and not problem.kind.refusal else logging.INFO,
        "%s proxy %s %r: %d %s (%s) request_id=%s",
        "gRPC" if protocol == "grpc" else "HTTP",
        "answered" if for_ray else "refused",
        target[:MAX_LOGGED_TARGET_CHARS],
        problem.status,
        problem.problem,
        " ".join(problem.detail.split())[:MAX_LOGGED_TARGET_CHARS],
        request_id,
    )


def refusal_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The id a refusal of the proxy's own names its request by: the client's valid X-Request-Id, else a fresh one
    (serve.proxy_connections too)."""
    return _request_id(_given_id(headers))


def _given_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The first X-Request-Id line, as Starlette reads a header (dict() kept the last)."""
    return next((value for name, value in headers if name.lower() == _REQUEST_ID_HEADER), None)


def _request_id(*given: bytes | None) -> str:
    """The first valid X-Request-Id of `given`, else a fresh id. Checked here too: HeaderGuard drops an invalid
    client id, but an id may come from Ray's answer, or from the client where HeaderGuard is not in front."""
    for value in given:
        if value and _VALID_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


async def _answer(send, problem: Problem, request_id: str | None = None) -> None:
    """The problem+json answer the app would give, closing the connection."""
    body = json.dumps(problem.body(request_id)).encode()
    headers = [
        (b"content-type", MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if request_id:
        headers.append((_REQUEST_ID_HEADER, request_id.encode()))
    answer_headers = {**ANSWER_HEADERS, **problem.headers}
    headers += [(name.lower().encode(), value.encode()) for name, value in answer_headers.items()]
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
        self.valid = _VALID_REQUEST_ID
        self.dropped = ray_control_headers()

    def _keep(self, name: bytes, value: bytes) -> bool:
        name = name.lower()
        if name == _REQUEST_ID_HEADER:
            return self.valid.fullmatch(value) is not None
        return name.replace(b"_", b"-") not in self.dropped

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] == "http":
            headers = scope["headers"]
            ambiguous = _ambiguous_head(scope)
            if ambiguous:
                return await _problem(send, Problem("malformed-request", f"{ambiguous} (at the proxy)"), scope)
            coded = _coded_body(scope)
            if coded:
                return await _problem(send, coded, scope)
            kept = [(k, v) for k, v in headers if self._keep(k, v)]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def _ambiguous_head(scope) -> str:
    """Why the request's headers say two things, or leave out the host an HTTP/1.1 request must name (RFC 9112
    3.2: a server must answer 400), or frame an HTTP/1.0 body with a Transfer-Encoding (RFC 9112 6.1); "" if they do
    not. Otherwise the first line decides, in the app's host check and body parser alike, where another server in
    the path may have read the other."""
    names = [name.lower() for name, _ in scope["headers"]]
    for repeated in (b"host", b"content-type"):
        if names.count(repeated) > 1:
            return f"more than one {repeated.decode().title()} header line"
    if b"host" not in names and scope["http_version"] != "1.0":
        return f"an HTTP/{scope['http_version']} request must have a Host header"
    if b"transfer-encoding" in names and scope["http_version"] == "1.0":
        return "an HTTP/1.0 request cannot have a Transfer-Encoding (RFC 9112 6.1: its framing is faulty)"
    return ""


def _coded_body(scope) -> Problem | None:
    """The refusal of a body sent in a coding nobody here decodes, else None. httptools frames a body
    as chunked when chunked comes last and hands on what it decoded, so `gzip, chunked` reached the app as gzip bytes
    read as plain, as did a body with a Content-Encoding. RFC 9112 6.1 suggests 501 for the first; it is 400 here,
    as every other request the service cannot read: what a client sends never gets a 5xx (clients retry those, and
    they count against the service's error budget). RFC 9110 15.5.16: 415 for a content coding."""
    headers = scope["headers"]
    transfer = _codings(headers, b"transfer-encoding")
    if transfer not in ([], ["chunked"]):
        detail = f"Transfer-Encoding {', '.join(transfer)!r}: only chunked, alone, is decoded here (at the proxy)"
        return Problem("malformed-request", detail)
    content = [coding for coding in _codings(headers, b"content-encoding") if coding != "identity"]
    if content and _declared_size(_first_headers(scope)) != 0:
        detail = f"Content-Encoding {', '.join(content)!r}: send the body uncoded (at the proxy)"
        return Problem("unsupported-media-type", detail, {"Accept-Encoding": "identity"})
    return None


def _codings(headers, header: bytes) -> list[str]:
    """The codings every `header` line names, in order."""
    return [
        coding.strip().lower()
        for name, value in headers
        if name.lower() == header
        for coding in value.decode("latin-1").split(",")
        if coding.strip()
    ]


class RayAnswers:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list[dict] = []
        started = gone = False

        async def watching_receive():
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def rewriting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if _from_ray(message):
                    held.append(message)
                    return
            if not held:
                return await send(message)
            held.append(message)
            if not message.get("more_body", False):  # Ray counted its own answer, and named it
                named = _request_id(_header(held[0], _REQUEST_ID_HEADER), _given_id(scope["headers"]))
                problem = _ray_problem(held)
                _note_answer_for_ray(problem, scope, named)
                await _answer(send, problem, named)

        await self.app(scope, watching_receive, rewriting_send)
        if not started and not asyncio.current_task().cancelling():  # Ray counted the failure, as a 500
            failed = Problem("replica-failed", _NO_ANSWER, {"Retry-After": str(retry_after_s())})
            named = refusal_request_id(scope["headers"])
            if not gone:  # a client that hung up: Ray gives up its request the same way (a 499), no fault
                _note_answer_for_ray(failed, scope, named)
            await _answer(send, failed, named)


PROBE_PATHS = ("/healthz", "/readyz")  # serve/app.py's probe routes, under any route prefix


def _note_answer_for_ray(problem: Problem, scope, request_id: str) -> None:
    """Count and log it, except for a probe: a starting service's routes and Ingress are not there yet (the CLI's
    and Kubernetes' probes got a dozen 404s and 503s at every start), which the probe's own answer says."""
    if not route_path(scope).endswith(PROBE_PATHS):
        note_refusal(problem, "http", f"{scope['method']} {scope['path']}", request_id, for_ray=True)


def _header(start: dict, name: bytes) -> bytes | None:
    return next((value for key, value in start.get("headers", []) if key.lower() == name), None)


def _from_ray(start: dict) -> bool:
    return start["status"] in _RAY_KINDS and (_header(start, b"content-type") or b"").startswith(b"text/plain")


def _ray_problem(messages: list[dict]) -> Problem:
    start = messages[0]
    text = b"".join(m.get("body", b"") for m in messages[1:]).decode("utf-8", "replace").strip()
    # Ray's 404 points at GET /-/routes, which is itself a 404 with keys on (ByRoutePrefix)
    text = _RAY_ROUTES_HINT.sub("", text)
    kind = _RAY_KINDS[start["status"]]
    if start["status"] == 503 and "backpressure" in text:
        kind = "overloaded"
    elif start["status"] == 503 and "failed to deploy" in text:  # DeploymentUnavailableError: a fault, no pause
        kind = "replica-failed"
    retry_after = (_header(start, b"retry-after") or str(retry_after_s()).encode()).decode()
    headers = {"Retry-After": retry_after} if start["status"] in (429, 503) else {}
    return Problem(kind, f"{text[:300]} (at the proxy)", headers)


_RAY_ROUTES_HINT = re.compile(r"\s*Ping \S+ for available routes\.")
# Ray's own plain-text answers (ray/serve/_private/http_util.py) and the app's kind of the same status
_RAY_KINDS = {404: "not-found", 408: "proxy-timeout", 429: "too-many-requests", 503: "not-ready"}
_NO_ANSWER = "Ray's proxy got no answer from the Ingress replica; retry (at the proxy)"
ROUTE_ANSWERS = (
    *(kind for kind in _RAY_KINDS.values() if kind != "not-found"),
    "overloaded", "stopping", "replica-failed", "payload-too-large", "body-timeout", "malformed-request",
    "unsupported-media-type",
)  # fmt: skip
"""The problems these middlewares answer on a path an application serves, which serve/openapi.py lists for the
routes taking a body (not-found is for a path none serves; a refused key is the route's own 401). Every kind
named in this module is here or there (tests/test_openapi_client.py)."""


class ArrivingBytes:
    """Bytes of request bodies still arriving in one proxy, for every application together."""

    def __init__(self):
        self.count = 0


class BodyBuffer:
    def __init__(
        self, app, limit: int, timeout_s: float | None = None, max_held: int | None = None, keys=None,
        arriving: ArrivingBytes | None = None,
    ):  # fmt: skip
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s
        self.max_held = max_held
        self.keys = keys  # serve.auth.AccessPolicy while auth is on
        self.arriving = arriving if arriving is not None else ArrivingBytes()

    @property
    def held(self) -> int:
        return self.arriving.count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _first_headers(scope)
        declared = _declared_size(headers)
        needs = self.limit if declared is None else declared
        if needs > self.limit:
            return await _problem(send, _too_large(f"request body is {needs} bytes; the limit is {self.limit}"), scope)
        if needs and self.keys is not None:
            credentials = {name.decode("latin-1"): headers.get(name, b"").decode("latin-1") for name in _KEY_HEADERS}
            try:
                await self.keys.check_async(credentials, None)
            except Problem as refusal:
                return await _problem(send, refusal, scope)
        if self.max_held is not None and self.held + needs > self.max_held:
            # before reading; nothing is reserved, so the check below stays
            return await _problem(send, _retry_later("overloaded", _BUSY), scope)
        chunks, received, refusal = [], 0, None
        pending = bytearray()
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # gone before its body was in: no replica hears of it
                    body = message.get("body", b"")
                    received += len(body)
                    self.arriving.count += len(body)
                    if received > self.limit:
                        refusal = _too_large(f"request body exceeds the limit of {self.limit} bytes")
                        break
                    if self.max_held is not None and self.held > self.max_held:
                        refusal = _retry_later("overloaded", _BUSY)
                        break
                    pending += body
                    if len(pending) >= _CHUNK or not message.get("more_body", False):
                        # small network packets kept as one message each would cost far more than their bytes
                        chunks.append(bytes(pending))
                        pending.clear()
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = f"{received} bytes of the body arrived in {self.timeout_s:g} s (overload.body_timeout_s)"
            refusal = Problem("body-timeout", f"{detail} (at the proxy)")
        finally:
            self.arriving.count -= received
        if refusal is not None:  # answered outside the timeout: a timer firing mid-send cannot answer twice
            return await _problem(send, refusal, scope)
        messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
        messages[-1]["more_body"] = False
        messages.reverse()

        async def replay():
            """The body in chunks of _CHUNK bytes, the last smaller (never joined whole on the proxy's loop), then
            the client."""
            return messages.pop() if messages else await receive()

        await self.app(scope, replay, send)


_CHUNK = 64 * 1024
_KEY_HEADERS = (b"authorization", b"x-api-key")  # where serve.auth.presented_key looks


def _too_large(detail: str) -> Problem:
    return Problem("payload-too-large", f"{detail} (at the proxy)")


def _retry_later(kind: str, detail: str) -> Problem:
    return Problem(kind, detail, {"Retry-After": str(retry_after_s())})


def stopping(what_happened: str) -> Problem:
    """503 `stopping`: what became of the request, for HTTP (Drain) and gRPC (serve.grpc_api)."""
    return _retry_later("stopping", f"{what_happened}; sent again, it reaches another instance")


def draining() -> bool:
    """Whether `python -m serve run` has begun to stop: the drain flag it names to the Ray processes exists."""
    flag = os.environ.get(DRAIN_FLAG_ENV)
    return bool(flag) and os.path.exists(flag)


_BUSY = "this proxy holds as many arriving request bodies as it may (overload.proxy_buffer_bytes); retry"


class InFlight:
    """Requests (HTTP, Drain) or calls (gRPC, serve.grpc_gate) in flight at this proxy process: what the local stop
    waits for and, after its grace, gives up on: each one without an answer started is cancelled, and its caller
    answers `stopping`. Ray's proxy catches that cancellation (HTTP: it returns without answering; gRPC: its status
    becomes CANCELLED), so the answer must not depend on the cancellation coming back. Both proxies run on one
    event loop, so Drain's timer gives up on the gRPC calls too."""

    def __init__(self):
        self.running: dict[asyncio.Task, list[bool]] = {}  # task -> [its answer started]
        self.given_up: set[asyncio.Task] = set()
        self.grace_s = DRAIN_GRACE_S  # the grace they were given, for the answer's words

    def __len__(self) -> int:
        return len(self.running)

    async def run(self, call, started: list[bool] | None = None):
        """(given up, `call`'s result: None where given up); `started[0]` is set by the caller once its answer
        starts (a unary gRPC call has none before its handler returns)."""
        task = asyncio.current_task()
        self.running[task] = started or [False]
        try:
            try:
                result = await call
            except asyncio.CancelledError:
                if task not in self.given_up:
                    raise
                result = None
            if task in self.given_up:
                task.uncancel()
                return True, result
            return False, result
        finally:
            self.running.pop(task, None)
            self.given_up.discard(task)

    def give_up(self, grace_s: float) -> int:
        self.grace_s = grace_s
        for task, started in list(self.running.items()):
            if not started[0]:
                self.given_up.add(task)
                task.cancel()
        return len(self.given_up)


GRPC_CALLS = InFlight()


NOT_RUN = "it arrived after the stop began and was not run"


def still_without_an_answer(grace_s: float) -> str:
    return f"it was still without an answer {grace_s:g} s into the stop"


class Drain:
    def __init__(self, app, flag: str, grace_s: float = DRAIN_GRACE_S, grpc_calls: InFlight = GRPC_CALLS):
        self.app = app
        self.flag = flag
        self.grace_s = grace_s
        self.requests = InFlight()
        self.grpc_calls = grpc_calls
        self.draining = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining or os.path.exists(self.flag):
            self._begin()
            if route_path(scope) == DRAIN_PATH:
                body = json.dumps({"in_flight": len(self.requests) + len(self.grpc_calls)}).encode()
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
                )
                return await send({"type": "http.response.body", "body": body})
            return await self._unavailable(scope, send, NOT_RUN)
        started = [False]

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        given_up, _ = await self.requests.run(self.app(scope, receive, tracking_send), started)
        if given_up and not started[0]:
            await self._unavailable(scope, send, still_without_an_answer(self.grace_s))

    def _begin(self) -> None:
        if not self.draining:
            self.draining = True
            logger.info(
                "draining: new requests and gRPC calls get stopping; "
                "%d requests and %d calls in flight may finish within %g s",
                len(self.requests),
                len(self.grpc_calls),
                self.grace_s,
            )
            asyncio.get_running_loop().call_later(self.grace_s, self._give_up)

    def _give_up(self) -> None:
        """Past the grace period: answer `stopping` to every request and call that has no answer yet."""
        requests, calls = self.requests.give_up(self.grace_s), self.grpc_calls.give_up(self.grace_s)
        logger.log(
            logging.WARNING if requests or calls else logging.INFO,
            "draining: answered stopping to the %d requests and %d gRPC calls still without an answer "
            "%g s into the stop",
            requests,
            calls,
            self.grace_s,
        )

    async def _unavailable(self, scope, send, what_happened: str) -> None:
        await _problem(send, stopping(what_happened), scope)
