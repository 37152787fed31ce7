"""The REST adapter: the FastAPI app, its problem+json error handlers and request metrics, and the helpers
its routes use. The routes themselves are methods of serve.app.Ingress: Serve binds a FastAPI app's routes to
the class they are defined in (a class defined elsewhere and inherited is not shipped with its bound routes).
"""

import asyncio
import html
import logging
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serve import auth, quotas
from serve.metrics import CLIENT_CLOSED, ingress_metrics
from serve.openapi import RemoveReply, ScoreReply
from serve.openapi import install as install_openapi
from serve.page_headers import sha256_source
from serve.problems import Problem, invalid_request
from serve.request_ids import serve_request_id, valid_request_id
from serve.uploads import b64encode_pieces

if TYPE_CHECKING:
    from serve.service import RemovalResult, ScoreResult

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="RORem object removal",
    description="POST an image and a mask (white = remove); get the image back with the object removed.",
    version="0.1.0",
    docs_url=None,  # our own /docs below: FastAPI's loads Swagger UI from a CDN by a floating major version
    redoc_url=None,  # the same, and not documented
    # Starlette answers /playground/ with a redirect to the client's own Host header, before any route (and the
    # Host check with it) runs: a cache that does not key on Host could be poisoned to send users elsewhere
    redirect_slashes=False,
)
install_openapi(api)  # serve/openapi.py: problem responses, headers, media types


def get_route(path: str, access=auth.PUBLIC, **route):
    """A GET route that answers HEAD too, as its GET without the body (the server drops it; RFC 9110 9.1: a server
    supports both): uptime checks and `curl -I` send HEAD, which a scoped route answered 405. `access`: the route's
    rule (auth.PUBLIC, auth.requires(scope)). The HEAD route stays out of the OpenAPI: one operation a path."""

    def declare(endpoint):
        declared = {**route, "dependencies": [access]}
        api.head(path, **{**declared, "include_in_schema": False})(endpoint)
        return api.get(path, **declared)(endpoint)

    return declare


public_get = get_route  # a page or a probe


def _route_label(scope: dict) -> str:
    """The metrics label of a request: the template of the route that answered it (never a raw id, whatever
    the route_prefix), or "other" where no route matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


def request_id_of(request: Request) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id if it is a valid one (the proxy drops any
    other, serve.proxy_middleware.HeaderGuard), else one Serve made; Serve echoes it back."""
    return serve_request_id() or valid_request_id(request.headers.get("x-request-id", ""))


def _answer(request: Request, problem: Problem) -> JSONResponse:
    """The problem's answer, its kind noted for _count_requests: a 503's kind tells shedding from a fault."""
    request.state.problem = problem.problem
    request.state.over_quota = problem.over_quota
    return problem.response(getattr(request.state, "request_id", None) or request_id_of(request))


@api.exception_handler(Problem)
async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return _answer(request, exc)


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _answer(request, invalid_request(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    problem = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "invalid-request")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request, headers.get("Allow", "")))
    return _answer(request, Problem(problem, str(exc.detail), headers=headers))


def allowed_methods(request: Request, said: str) -> list[str]:
    """Every method a route of this path answers. Starlette's 405 (`said`) names the first route whose path
    matched only: `Allow: HEAD` for a public page (its HEAD route comes first), `Allow: GET` for /results/{id},
    which DELETE has too."""
    methods = {method.strip() for method in said.split(",") if method.strip()}
    for route in auth.api_routes(request.app.router):
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


@api.exception_handler(ClientDisconnect)
async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up while its body was being read: nobody hears this answer, and it is no server error."""
    return Response(status_code=CLIENT_CLOSED)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """Logged once per exception: a metered request's is answered by QuotaFields with this handler, and then
    Starlette's ServerErrorMiddleware calls it again on its way out (that answer unused)."""
    if getattr(request.state, "internal_error", None) is not exc:
        request.state.internal_error = exc
        logger.exception("unhandled error in %s %r", request.method, request.url.path)  # %r: no control characters
    return _answer(request, Problem("internal-error", f"{type(exc).__name__}; see the server log"))


class BarePrefix:
    """Ray's proxy hands the app its route_prefix's own address (/api/v1) as path and root_path alike: with
    redirect_slashes off nothing matched it, and the READY line's address answered 404. It is the app's root.
    The scope is rewritten in place: the router records the matched route in it, and _count_requests, outside
    this middleware, labels the request from that same scope."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        root = scope.get("root_path", "")
        if scope["type"] == "http" and root and scope["path"] == root:
            scope["path"], scope["raw_path"] = root + "/", (root + "/").encode()
        await self.app(scope, receive, send)


api.add_middleware(BarePrefix)
# after _internal, which answers a metered request's 500 in it (with the RateLimit fields); before _count_requests:
# inside it, so that count sees the 500
api.add_middleware(quotas.QuotaFields, internal_error=_internal)


WORK_CANCELLED = "rorem_work_cancelled"  # CancellationMark's key in the scope's state


class CancellationMark:
    """Marks the request whose work was cancelled inside the app (Serve cancels a request whose client hung up),
    for _count_requests, outside it, where Starlette's http middleware turns that cancellation into a RuntimeError.
    The mark, not the client's disconnect: Ray delivers the disconnect and the cancellation apart, in no set order."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            scope.setdefault("state", {})[WORK_CANCELLED] = True
            raise


api.add_middleware(CancellationMark)  # added before _count_requests: inside it


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    """Requests by route and status, and end-to-end latency, for every REST answer (errors included)."""
    started = time.perf_counter()
    status = "500"
    try:
        response = await call_next(request)
        status = str(response.status_code)
        return response
    except asyncio.CancelledError:
        status = str(CLIENT_CLOSED)  # the client hung up: not a server error
        raise
    except RuntimeError as exc:
        # Serve cancels the work of a request whose client hung up; Starlette's http middleware turns a cancellation
        # inside the app into this, which the catch-all handler would log and answer as a 500
        if str(exc) != "No response returned." or not (request.scope.get("state") or {}).get(WORK_CANCELLED):
            raise
        status = str(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    finally:
        route = _route_label(request.scope)
        state = request.scope.get("state") or {}
        seconds = time.perf_counter() - started
        ingress_metrics().answered(
            route, "http", status, seconds, int(status), state.get("problem"), state.get("over_quota", False)
        )


# Swagger UI for /docs, pinned, with Subresource Integrity: the pages of this origin keep a user's API key in
# the browser's storage, which any script on the origin can read, so the CDN may serve these bytes or none.
# sha384 of the files of the npm package swagger-ui-dist 5.35.0 (its tarball checked against the registry's
# sha512 integrity; jsDelivr serves the package's files as they are).
SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
SWAGGER_UI_FILES = {
    "swagger-ui-bundle.js": "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
    "swagger-ui.css": "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
}
SWAGGER_JS, SWAGGER_CSS = (f"{SWAGGER_UI}/{name}" for name in SWAGGER_UI_FILES)


# Fixed text, so its hash in the policy below is the same under every route_prefix: the page's own URL for the
# OpenAPI document is in the box's data-openapi attribute.
_DOCS_SCRIPT = (
    "SwaggerUIBundle({url: document.getElementById('swagger-ui').dataset.openapi, dom_id: '#swagger-ui', "
    "deepLinking: true});"
)


def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI over this app's OpenAPI (under its route_prefix). Until it loads (or without the CDN), its
    box says where else the API is described."""
    openapi_path = html.escape(root_path(request) + api.openapi_url)
    js_hash, css_hash = SWAGGER_UI_FILES.values()
    return HTMLResponse(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        f"{html.escape(api.title)} - API</title>\n"
        f'<link rel="stylesheet" href="{SWAGGER_CSS}" integrity="{css_hash}" crossorigin="anonymous">\n'
        f'</head><body><div id="swagger-ui" data-openapi="{openapi_path}">\n'
        f"<p>The interactive API reference (Swagger UI) loads from {SWAGGER_UI.split('/')[2]}; if it does not show, "
        f'the API is described in <a href="{openapi_path}">the OpenAPI document</a> and in '
        "docs/api.md in the service's repository.</p></div>\n"
        f'<script src="{SWAGGER_JS}" integrity="{js_hash}" crossorigin="anonymous"></script>\n'
        f"<script>{_DOCS_SCRIPT}</script>\n"
        "</body></html>\n",
        headers=DOCS_PAGE_HEADERS,
    )


# The pages of this origin keep a user's API key in the browser's storage: on /docs only the pinned Swagger UI
# and the page's own line run (their exact URL and hash), its stylesheet is the pinned one, images are Swagger's
# own data: icons and blob: previews of image answers, and requests go to this origin. Not framed (clickjacking),
# no plugins, <base> or forms. Checked in Chromium with swagger-ui-dist 5.35.0's files: the page renders,
# Authorize, Try it out and Execute work, no violation reported.
DOCS_PAGE_HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            f"script-src {sha256_source(_DOCS_SCRIPT)} {SWAGGER_JS}",
            f"style-src {SWAGGER_CSS}",
            "img-src data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ]
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def root_path(request: Request) -> str:
    """The app's mount point (Serve's route_prefix), for links in answers."""
    return request.scope.get("root_path", "").rstrip("/")


def remove_reply_json(result: "RemovalResult") -> dict:
    """/remove's JSON reply, for json_reply_body: made by the model the OpenAPI document describes (RemoveReply),
    which checks every field but the image; that stays bytes, put in after (json_reply_body writes its base64)."""
    content = RemoveReply(
        image="", media_type=result.media_type, seed=result.seed, bucket=result.bucket, buckets=result.buckets,
        batch_size=result.batch_size, score=result.score, attempts=result.attempts, gate=result.gate,
        result_id=result.result_id,
    ).model_dump()  # fmt: skip
    content["image"] = result.body
    return content


def score_reply_json(result: "ScoreResult") -> dict:
    """/score's JSON reply, made by the model the OpenAPI document describes (ScoreReply)."""
    return ScoreReply(
        score=result.score, threshold=result.threshold, passed=result.passed, bucket=result.bucket
    ).model_dump()


_JSON_IMAGE_HEAD = b'{"image":"'


def json_reply_body(content: dict) -> bytes:
    """The body JSONResponse(content) would send, where content["image"] (its first key) holds bytes to send
    as base64. Built in steps (no C call over the whole image): the other keys go through JSONResponse's own
    rendering with an empty image, and the base64 text, which needs no JSON escaping, goes between its quotes."""
    rendered = JSONResponse({**content, "image": ""}).body
    if not rendered.startswith(_JSON_IMAGE_HEAD + b'"'):
        raise ValueError("the JSON reply must start with its image")
    return b"".join([_JSON_IMAGE_HEAD, *b64encode_pieces(content["image"]), rendered[len(_JSON_IMAGE_HEAD) :]])
