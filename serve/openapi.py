"""The OpenAPI description a client can be generated from: every route's problem+json errors, response headers
and media types, added to what FastAPI derives from the routes (`install(api)`).

Facts come from where they live: status codes and titles from serve.problems, access rules from the routes'
auth dependencies, request bodies from serve.protocol; the one table kept here is which problems each route
can answer (ROUTE_PROBLEMS), and the response headers (HEADERS), which app.py still spells as literals.

Checked with openapi-python-client 0.29 (tests/test_openapi_client.py generates a client and calls the
service). Where it mishandles a valid description, the description is the one it handles:
- A response media type it does not know (only application/json, */*+json, application/octet-stream and
  text/* are known) is skipped; of several, it parses the first known one, whatever the response's
  Content-Type. So /remove's 200 lists the image types and `application/json` without a schema: the client
  answers with the image bytes (Response.content) and headers, whichever was asked for; a schema there would
  make it call response.json() on PNG bytes. The JSON reply's shape is the component RemoveReply (the
  generator makes a model of every component), named in the description.
- A required request body with several media types (multipart and JSON) is typed `... | Unset = UNSET`
  without importing Unset (openapi-python-client issue #1451, PR #1478): the module fails to import unless
  something else imports Unset. An optional parameter does, so every operation documents the optional
  `X-Request-Id` header, which the service honours anyway; the body stays `required: true`.
- Response headers are not read into the generated models (Response.headers holds them); documenting them
  costs nothing.
- Enum members are named from their values (a type URI becomes HTTPSGITHUB_COMROREM_...); `x-enum-varnames`
  names them by slug. Function and model names come from operationId, so each operation's is its handler's
  name (`api.default.remove`, `RemoveFilesBody`) rather than FastAPI's `remove_remove_post`.
- A route answering a media type it does not know and no other (e.g. only `image/*`) loses its 200 from the
  client, with a warning: /results/{id}/{kind} also lists application/octet-stream (kept sources of an
  unrecognised format are stored as such), which the client returns as bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any, Literal

import fastapi.routing
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from engines import imaging
from engines.gate import REPLY_VERDICTS
from serve import auth, negotiation, quotas
from serve.page_headers import PRIVATE_HEADERS
from serve.problems import EXTENSIONS, MEDIA_TYPE, STATUS_BY_PROBLEM, TITLES, TYPE_BASE
from serve.protocol import Seed
from serve.proxy_middleware import REQUEST_ID_PATTERN, ROUTE_ANSWERS

REQUEST_ID = "X-Request-Id"
RETRY_AFTER = "Retry-After"
WWW_AUTHENTICATE = "WWW-Authenticate"

_INT = {"type": "integer"}
_STR = {"type": "string"}
HEADERS: dict[str, tuple[dict, str]] = {
    REQUEST_ID: (_STR, "the request's id: yours if you sent one, else a new one"),
    "X-Seed": (
        TypeAdapter(Seed).json_schema(),
        "seed of the kept attempt (the fields gate=off and seed=<X-Seed> reproduce the image); absent when nothing "
        "was removed",
    ),
    "X-Bucket": (
        _STR,
        "model input side in pixels of each crop (one per far-apart mask region, e.g. `512, 512`), or `none` when "
        "the mask was empty and the image came back as sent",
    ),
    "X-Batch-Size": (_INT, "how many crops ran in the same model batch; absent when nothing was removed"),
    "X-Removal-Score": (
        {"type": "number"},
        "the discriminator's score of the result (>= gate_threshold passes), unrounded (the JSON `score`'s digits); "
        "absent when not scored",
    ),
    "X-Attempts": (_INT, "removal attempts that finished (retry / reject run several)"),
    "X-Gate": (_STR, f"the gate's verdict: {', '.join(REPLY_VERDICTS[:-1])} or {REPLY_VERDICTS[-1]}"),
    "X-Result-Id": (_STR, "id of the retained result (GET /results/{id}, POST /feedback); only when it was kept"),
    "Server-Timing": (_STR, "stage durations in ms: read, cpu_wait, decode, queue_wait, ..., encode, total"),
    RETRY_AFTER: (_INT, "seconds to wait before retrying"),
    WWW_AUTHENTICATE: (_STR, "the authentication scheme (Bearer)"),
    quotas.RATELIMIT_POLICY: (
        _STR,
        'the key\'s quotas, e.g. `"minute";q=60;w=60, "concurrency";q=2;qu="concurrent-requests"`; only for a key '
        "with a quota",
    ),
    quotas.RATELIMIT: (
        _STR,
        'what the key has left of each quota, e.g. `"minute";r=59;t=60, "concurrency";r=1` (t: seconds until the '
        "window's quota is back); only for a key with a quota",
    ),
    **{name: (_STR, f"`{value}`: the answer holds your photo") for name, value in PRIVATE_HEADERS.items()},
}
REMOVE_HEADERS = (
    "X-Seed",
    "X-Bucket",
    "X-Batch-Size",
    "X-Removal-Score",
    "X-Attempts",
    "X-Gate",
    "X-Result-Id",
    "Server-Timing",
    *PRIVATE_HEADERS,
)
"""The headers of a successful removal, besides X-Request-Id (which every answer carries)."""
_HEADERS_BY_STATUS = {401: (WWW_AUTHENTICATE,), 429: (RETRY_AFTER,), 503: (RETRY_AFTER,)}
QUOTA_HEADERS = (quotas.RATELIMIT_POLICY, quotas.RATELIMIT)
"""On every answer of a metered route (serve/quotas.py) but those its access rule gives before the quota counts."""
_BEFORE_THE_QUOTA = ("401", "403")

_UPLOAD = ("invalid-request", "malformed-body", "unsupported-media-type", "payload-too-large", "body-timeout")
_DECODE = ("invalid-image", "image-too-large", "invalid-mask", "mask-size-mismatch")
_MODEL = ("too-many-requests", "overloaded", "replica-failed", "timeout")
_STORE = ("not-found", "retention-unavailable")
_PROXY = ROUTE_ANSWERS  # what Ray's proxy and our middlewares there answer before the route runs
ROUTE_PROBLEMS: dict[str, tuple[str, ...]] = {
    "GET /healthz": (),
    "GET /readyz": ("not-ready",),
    "POST /remove": (
        *_UPLOAD, *_DECODE, *_MODEL, *_PROXY, "removal-failed", "gate-unavailable",
        "scorer-unavailable", "retention-disabled",
    ),
    "POST /score": (
        *_UPLOAD, *_DECODE, *_MODEL, *_PROXY, "image-size-mismatch", "gate-unavailable", "scorer-unavailable",
    ),
    "POST /feedback": (*_UPLOAD, *_PROXY, *_STORE),
    "GET /results/{id}": _STORE,
    "GET /results/{id}/{kind}": _STORE,
    "DELETE /results/{id}": _STORE,
    "GET /annotate": ("not-found",),
    "GET /annotation/queue": ("invalid-request", *_STORE),
}  # fmt: skip
"""Which problems each route answers besides EVERY_ROUTE's and unauthorized / forbidden (derived from the route's
access rule). Keys: "METHOD path" as FastAPI lists the route."""
EVERY_ROUTE = ("internal-error", "stopping")  # stopping: the drain's answer (serve.proxy_middleware.Drain), probes too

ProblemType = Annotated[
    Literal[tuple(TYPE_BASE + slug for slug in STATUS_BY_PROBLEM)],  # type: ignore[valid-type]
    Field(json_schema_extra={"x-enum-varnames": [slug.replace("-", "_").upper() for slug in STATUS_BY_PROBLEM]}),
]  # the names generators give the enum's members (openapi-python-client: ProblemType.INVALID_IMAGE)


class FieldError(BaseModel):
    """One invalid field of an invalid-request problem."""

    field: str = Field(description="the field's path, dot-separated (body fields: its name)")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json), as serve.problems.Problem.body writes them."""

    model_config = ConfigDict(extra="allow", title="Problem")
    type: ProblemType | str = Field(
        description="stable URI of the kind of problem; its last segment is the slug. The kinds this version answers"
        " are listed; the set is open (RFC 9457): a client takes one it does not know by its status"
    )  # a closed enum made a client generated from it fail on the first kind added after it (a contract trial)
    title: str = Field(description="short summary of the kind of problem (the same for every problem of a type)")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request")
    instance: str | None = Field(None, description="urn:request:<X-Request-Id>")
    errors: list[FieldError] | None = Field(None, description=EXTENSIONS["errors"])
    score: float | None = Field(None, description=EXTENSIONS["score"])
    threshold: float | None = Field(None, description=EXTENSIONS["threshold"])
    attempts: int | None = Field(None, description=EXTENSIONS["attempts"])
    seed: Seed | None = Field(None, description=EXTENSIONS["seed"])
    quota: str | None = Field(None, description=EXTENSIONS["quota"])


class RemoveReply(BaseModel):
    """POST /remove's answer with `Accept: application/json` (the headers' facts, and the image in base64). The
    route builds its answer with this model (serve.rest_api.remove_reply_json); gRPC's RemoveReply carries the
    same fields (tests/test_grpc_mapping.py)."""

    image: str = Field(description="the edited image, base64")
    media_type: str = Field(description="its media type: " + ", ".join(imaging.MEDIA_TYPES.values()))
    seed: Seed | None = Field(description="as X-Seed")
    bucket: int | None = Field(description="the largest crop's bucket (null: nothing was removed)")
    buckets: list[int] = Field(description="as X-Bucket: every crop's bucket, one crop per far-apart mask region")
    batch_size: int | None = Field(description="as X-Batch-Size (null: nothing was removed)")
    score: float | None = Field(description="as X-Removal-Score")
    attempts: int = Field(description="as X-Attempts")
    gate: str = Field(description="as X-Gate")
    result_id: str | None = Field(description="as X-Result-Id")


class ScoreReply(BaseModel):
    """POST /score's answer, built with this model (serve.rest_api.score_reply_json); gRPC's ScoreReply carries
    the same fields."""

    score: float = Field(description="the discriminator's score: the lowest crop's (a crop per far-apart mask region)")
    threshold: float = Field(description="the passing score applied")
    passed: bool = Field(description="score >= threshold")
    bucket: int = Field(description="the largest crop's bucket (model input side in pixels), as /remove's `bucket`")


COMPONENTS = (Problem, RemoveReply, ScoreReply)
_REF = "#/components/schemas/{model}"
# The two ways a key is presented (serve.auth.presented_key): needed by every route but the public ones.
SECURITY_SCHEMES = {
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _header(name: str) -> dict:
    schema, description = HEADERS[name]
    return {"description": description, "schema": copy.deepcopy(schema)}


def _example(slug: str) -> dict:
    body = {"type": TYPE_BASE + slug, "title": TITLES[slug], "status": STATUS_BY_PROBLEM[slug], "detail": TITLES[slug]}
    return {"summary": slug, "value": body}


def _api_routes(app: FastAPI) -> list[tuple[str, APIRoute]]:
    """(path, route) of the app's documented routes, also those Serve's ingress includes through a router."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI >= 0.16x: routers stay included
    pairs = (
        [(c.path_format, c.original_route) for c in contexts(app.routes)]
        if contexts
        else [(r.path_format, r) for r in app.routes if isinstance(r, APIRoute)]
    )
    return [(path, route) for path, route in pairs if isinstance(route, APIRoute) and route.include_in_schema]


def problems_of(route: APIRoute, method: str, path: str) -> list[str]:
    """The problem slugs a route can answer, in STATUS_BY_PROBLEM's order."""
    slugs = {*EVERY_ROUTE, *ROUTE_PROBLEMS.get(f"{method} {path}", ())}  # a missing row: tests/test_openapi_client.py
    rule = auth.declared_rule(route)
    if rule is None or not rule.public:
        slugs.update({"unauthorized", "host-not-allowed"})
        if rule is None or rule.scope is not None:
            slugs.add("forbidden")
        if method not in auth.BODILESS_METHODS:
            slugs.add("cross-site-request")
    return [slug for slug in STATUS_BY_PROBLEM if slug in slugs]


def _problem_responses(slugs: list[str]) -> dict[str, dict]:
    by_status: dict[int, list[str]] = {}
    for slug in slugs:
        by_status.setdefault(STATUS_BY_PROBLEM[slug], []).append(slug)
    responses = {}
    for status, group in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "; ".join(f"`{slug}`: {TITLES[slug]}" for slug in group),
            "headers": {name: _header(name) for name in (REQUEST_ID, *_HEADERS_BY_STATUS.get(status, ()))},
            "content": {
                MEDIA_TYPE: {
                    "schema": {"$ref": _REF.format(model="Problem")},
                    "examples": {slug: _example(slug) for slug in group},
                }
            },
        }
    return responses


def _remove_ok(response: dict) -> None:
    """/remove's 200: the image types as binary, and JSON without a schema (see the module docstring)."""
    response["description"] = (
        f"the edited image (output_format, else Accept, else {negotiation.DEFAULT}); with `Accept: application/json`"
        " a RemoveReply object (components/schemas/RemoveReply) with the image in base64"
    )
    response["content"] = {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in imaging.MEDIA_TYPES.values()},
        "application/json": {},
    }
    response["headers"] = {name: _header(name) for name in (REQUEST_ID, *REMOVE_HEADERS)}


def _stored_image_ok(response: dict) -> None:
    """A retained image: PNG mask, the result as answered, the source as uploaded (unknown formats: octet-stream)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    response["content"] = {"image/*": copy.deepcopy(binary), "application/octet-stream": copy.deepcopy(binary)}


def _name_problem_types(schemas: dict[str, Any]) -> None:
    """The kinds of problem this version answers as a component of their own (generators name it: openapi-python-
    client's ProblemType.INVALID_IMAGE), one option of Problem.type beside any string."""
    options = schemas["Problem"]["properties"]["type"]["anyOf"]
    [known] = [option for option in options if "enum" in option]
    schemas["ProblemType"] = {"title": "ProblemType", **known}
    options[options.index(known)] = {"$ref": _REF.format(model="ProblemType")}


def describe(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    """Add problem responses, headers, component schemas and the X-Request-Id parameter to FastAPI's schema."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in COMPONENTS:
        model_schema = model.model_json_schema(ref_template=_REF)
        schemas.update(model_schema.pop("$defs", {}))
        schemas[model.__name__] = model_schema
    _name_problem_types(schemas)
    components.setdefault("parameters", {})["RequestId"] = {
        "name": REQUEST_ID,
        "in": "header",
        "required": False,
        "description": "your id for this request, echoed in the answer's X-Request-Id and in problems' instance",
        "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
    }
    components["securitySchemes"] = SECURITY_SCHEMES  # /docs then has an Authorize box for the key
    replies = {("POST", "/score"): ScoreReply}
    for path, route in _api_routes(app):
        for method in route.methods:
            operation = schema["paths"][path][method.lower()]
            operation["operationId"] = route.name  # the handler's name: generated functions remove(), score(), ...
            rule = auth.declared_rule(route)
            operation["security"] = [] if rule is not None and rule.public else [{name: []} for name in SECURITY_SCHEMES]
            operation.setdefault("parameters", []).append({"$ref": "#/components/parameters/RequestId"})
            if "requestBody" in (route.openapi_extra or {}):
                # as the route wrote it: FastAPI's OpenAPI model reads every bound as a float (2**63 - 1: 2**63)
                operation["requestBody"] = copy.deepcopy(route.openapi_extra["requestBody"])
            responses = operation["responses"]
            responses.pop("422", None)  # FastAPI's HTTPValidationError: this app answers a Problem instead
            for response in responses.values():
                response.setdefault("headers", {})[REQUEST_ID] = _header(REQUEST_ID)
            if (method, path) == ("POST", "/remove"):
                _remove_ok(responses["200"])
            if (method, path) == ("GET", "/results/{id}/{kind}"):
                _stored_image_ok(responses["200"])
            if (method, path) in replies:
                model = replies[(method, path)].__name__
                responses["200"]["content"] = {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}
            responses.update(_problem_responses(problems_of(route, method, path)))
            if quotas.is_metered(route):
                for status in set(responses) - set(_BEFORE_THE_QUOTA):
                    responses[status]["headers"].update({name: _header(name) for name in QUOTA_HEADERS})
    referenced = repr(schema["paths"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"/{unused}'" not in referenced:
            schemas.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    """Serve the `describe`d OpenAPI from the app, regenerated when FastAPI regenerates its own."""
    generate: Callable[[], dict] = app.openapi  # FastAPI's, cached until the routes change
    described: list[dict] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not described or described[0] is not schema:
            described[:] = [describe(app, schema)]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
