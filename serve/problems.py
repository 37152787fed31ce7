"""RFC 9457 problem+json: every error the API returns, with a stable `type` per kind."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from fastapi.responses import JSONResponse

from engines.errors import InputError

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://github.com/rorem-serve/problems/"
# A problem document echoes what the client sent (field names, values): bounded, so a body of a million unknown
# keys gets a few KB back, not megabytes. The detail keeps its start; lists keep their first items.
MAX_DETAIL_CHARS = 2000
MAX_TEXT_CHARS = 200
MAX_LISTED = 20
# On every problem answer, the app's and the proxies' own: a problem quotes the input it refuses (a field's value, a
# result id), never to be sniffed as a page; and it answers one request at one moment, never to be cached (a cache
# that kept a result's 404, or a 503, would answer it after the result exists or the service is back).
ANSWER_HEADERS = MappingProxyType({"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@dataclass(frozen=True)
class Kind:
    """One kind of problem: its `type` slug, HTTP status, title and gRPC status code (a grpc.StatusCode name,
    resolved by serve/grpc_api.py, so this module needs no grpc)."""

    slug: str
    status: int
    title: str
    grpc_code: str = "INVALID_ARGUMENT"  # the caller's input
    # The service declined to take the request on now rather than failing it: "load" (busy: a replica's or a proxy's
    # queue, a key's quota; a retry after Retry-After may pass), "pause" (this instance is stopping, or its model is
    # still loading). Either is the latency outcome `refused` (serve.metrics), read as shedding, not as a fault (a
    # key's quota is `over_quota` there: Problem.over_quota); a load test counts only "load" apart from failures
    # (loadtests/).
    refusal: str = ""


KINDS = (
    Kind("invalid-image", 422, "The image cannot be decoded"),
    Kind("image-too-large", 413, "The image is too large", "RESOURCE_EXHAUSTED"),
    Kind("invalid-mask", 422, "The mask is not usable"),
    Kind("mask-size-mismatch", 422, "The mask and the image differ in size"),
    Kind("image-size-mismatch", 422, "The source and edited images differ in size"),
    Kind("removal-failed", 422, "No removal attempt passed the quality gate", "FAILED_PRECONDITION"),
    Kind("gate-unavailable", 422, "This deployment has no quality scorer", "FAILED_PRECONDITION"),
    Kind("retention-disabled", 422, "This deployment does not retain results", "FAILED_PRECONDITION"),
    Kind("invalid-input", 422, "Invalid input"),
    Kind("invalid-request", 422, "The request is invalid"),
    Kind("malformed-body", 400, "The request body cannot be parsed"),
    # HTTP's own framing: what the proxy's parser refuses, a repeated Host or Content-Type, no Host in HTTP/1.1, a
    # transfer coding other than chunked alone
    Kind("malformed-request", 400, "The request cannot be parsed"),
    Kind("payload-too-large", 413, "The request body is too large", "RESOURCE_EXHAUSTED"),
    Kind("body-timeout", 408, "The request body did not arrive in time"),
    Kind("headers-too-large", 431, "The request's headers are too large", "RESOURCE_EXHAUSTED"),
    Kind("unsupported-media-type", 415, "Unsupported content type"),
    Kind("not-found", 404, "Not found", "NOT_FOUND"),
    Kind("method-not-allowed", 405, "Method not allowed", "UNIMPLEMENTED"),
    Kind("unauthorized", 401, "A valid API key is required", "UNAUTHENTICATED"),
    Kind("forbidden", 403, "The API key does not allow this", "PERMISSION_DENIED"),
    Kind("host-not-allowed", 403, "This host name is not served here", "PERMISSION_DENIED"),
    Kind("cross-site-request", 403, "Requests from other sites are refused", "PERMISSION_DENIED"),
    # a busy replica's refusal, or a key's quota (its problem names the quota)
    Kind("too-many-requests", 429, "Too many requests; retry later", "RESOURCE_EXHAUSTED", refusal="load"),
    Kind("overloaded", 503, "The service is overloaded; retry later", "UNAVAILABLE", refusal="load"),
    # a draining instance (serve.proxy_middleware.Drain): another instance can answer at once
    Kind("stopping", 503, "This instance is stopping; retry", "UNAVAILABLE", refusal="pause"),
    Kind("replica-failed", 503, "A model replica failed while answering; retry later", "UNAVAILABLE"),
    Kind("not-ready", 503, "The model is not loaded yet", "UNAVAILABLE", refusal="pause"),
    Kind("scorer-unavailable", 503, "The quality scorer is unavailable; retry later", "UNAVAILABLE"),
    Kind("retention-unavailable", 503, "The result store is unavailable; retry later", "UNAVAILABLE"),
    Kind("timeout", 504, "The request took too long", "DEADLINE_EXCEEDED"),
    # Ray Serve's own http_options.request_timeout_s, past the app's deadline; Ray chose the status
    Kind("proxy-timeout", 408, "No answer within the proxy's request timeout", "DEADLINE_EXCEEDED"),
    Kind("internal-error", 500, "Internal error", "INTERNAL"),
)
# The members a problem document carries besides RFC 9457's (the `extra` of Problem below), and what each means:
# the OpenAPI Problem component (serve/openapi.py) describes each of them from here.
EXTENSIONS = MappingProxyType(
    {
        "errors": "invalid-request: the invalid and unknown fields (the first 20; the detail counts them all)",
        "score": "removal-failed: the best attempt's score",
        "threshold": "removal-failed: the passing score",
        "attempts": "removal-failed: attempts that finished",
        "seed": "removal-failed: the best attempt's seed",
        "quota": "too-many-requests from a key's quota: the one it is past, named as in RateLimit-Policy (`minute`, "
        "or `<window>s` at another window than 60 s; `concurrency`)",
    }
)
KIND_BY_SLUG = MappingProxyType({kind.slug: kind for kind in KINDS})
LOAD_REFUSALS = frozenset(kind.slug for kind in KINDS if kind.refusal == "load")
STATUS_BY_PROBLEM = MappingProxyType({kind.slug: kind.status for kind in KINDS})
TITLES = MappingProxyType({kind.slug: kind.title for kind in KINDS})


class Problem(Exception):
    def __init__(self, problem: str, detail: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    @classmethod
    def from_input_error(cls, error: InputError) -> Problem:
        return cls(error.problem, error.detail)

    @property
    def kind(self) -> Kind:
        return KIND_BY_SLUG[self.problem]

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def over_quota(self) -> bool:
        """A key's quota's refusal (serve.quotas names the quota), not a busy service's."""
        return "quota" in self.extra

    def body(self, request_id: str | None = None) -> dict:
        """The problem+json document; the same fields travel in gRPC error details."""
        body = {
            "type": TYPE_BASE + self.problem,
            "title": self.kind.title,
            "status": self.status,
            "detail": _clip(self.detail, MAX_DETAIL_CHARS),
            **{key: _bounded(value) for key, value in self.extra.items()},
        }
        if request_id:
            body["instance"] = f"urn:request:{request_id}"
        return body

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {**ANSWER_HEADERS, **self.headers}
        return JSONResponse(self.body(request_id), status_code=self.status, media_type=MEDIA_TYPE, headers=headers)


def invalid_request(errors: list[dict], unknown: list[str] = ()) -> Problem:
    """422 invalid-request from pydantic's validation errors (`loc`, `msg`), a body's or a query's, and the keys no
    field has (`unknown`, counted by serve.protocol.validate, not pydantic): each field in `errors` and in the
    detail. The invalid fields come first: they are the model's few, where the unknown keys are the client's many
    and the detail is clipped."""
    fields = [{"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]} for error in errors]
    details = []
    if fields:
        details.append(_listed([f"{field['field']}: {field['message']}" for field in fields], "invalid fields", "; "))
    if unknown:
        details.append(_listed([repr(key) for key in unknown], "unknown fields", ", ", "unknown fields: "))
        fields += [{"field": key, "message": "unknown field"} for key in unknown[:MAX_LISTED]]
    return Problem("invalid-request", "; ".join(details), errors=fields[:MAX_LISTED])


def invalid_field(field: str, detail: str) -> Problem:
    """422 invalid-request about one field, named in `errors` as pydantic's are (a field given twice, a file sent as
    text, bad base64 named none: a client mapping `errors` to its form showed nothing)."""
    return Problem("invalid-request", detail, errors=[{"field": field, "message": detail}])


def _listed(items: list[str], what: str, separator: str, prefix: str = "") -> str:
    """The first MAX_LISTED `items`, the count first where there are more: a detail is clipped, and the items quoted
    are the client's."""
    joined = separator.join(items[:MAX_LISTED])
    return f"{len(items)} {what}, the first {MAX_LISTED}: {joined}" if len(items) > MAX_LISTED else prefix + joined


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters, and encodable: a client's lone surrogate (a JSON key "\\udc80", a multipart
    field name in a charset that decodes to one) made the answer's UTF-8 encoding fail, a 500 in place of the 422."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


def _bounded(value):
    """An extra field of a problem document with every text clipped and every list cut to MAX_LISTED items. A list
    of texts ends with one that counts the rest; a list of objects only is cut, so that each item keeps the shape
    the OpenAPI document gives it (invalid_request counts the rest in its detail)."""
    if isinstance(value, str):
        return _clip(value, MAX_TEXT_CHARS)
    if isinstance(value, dict):
        return {_clip(str(key), MAX_TEXT_CHARS): _bounded(item) for key, item in list(value.items())[:MAX_LISTED]}
    if isinstance(value, (list, tuple)):
        kept = [_bounded(item) for item in value[:MAX_LISTED]]
        if len(value) <= MAX_LISTED or not all(isinstance(item, str) for item in kept):
            return kept
        return [*kept, f"... and {len(value) - MAX_LISTED} more"]
    return value
