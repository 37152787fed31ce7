"""RFC 9457 problem+json: every error the API returns, with a stable `type` per kind."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from engines.errors import InputError

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://github.com/rorem-serve/problems/"
# A problem document echoes what the client sent (field names, values): bounded, so a body of a million unknown
# keys gets a few KB back, not megabytes. The detail keeps its start; lists keep their first items.
MAX_DETAIL_CHARS = 2000
MAX_TEXT_CHARS = 200
MAX_LISTED = 20

STATUS_BY_PROBLEM = {
    "invalid-image": 422,
    "image-too-large": 413,
    "invalid-mask": 422,
    "mask-size-mismatch": 422,
    "unsupported-output-format": 422,
    "image-size-mismatch": 422,
    "removal-failed": 422,
    "gate-unavailable": 422,
    "retention-disabled": 422,
    "invalid-input": 422,
    "invalid-request": 422,
    "malformed-body": 400,
    "payload-too-large": 413,
    "body-timeout": 408,
    "unsupported-media-type": 415,
    "not-found": 404,
    "method-not-allowed": 405,
    "unauthorized": 401,
    "forbidden": 403,
    "too-many-requests": 429,
    "overloaded": 503,
    "replica-failed": 503,
    "not-ready": 503,
    "scorer-unavailable": 503,
    "retention-unavailable": 503,
    "timeout": 504,
    "internal-error": 500,
}

TITLES = {
    "invalid-image": "The image cannot be decoded",
    "image-too-large": "The image is too large",
    "invalid-mask": "The mask is not usable",
    "mask-size-mismatch": "The mask and the image differ in size",
    "unsupported-output-format": "Unsupported output format",
    "image-size-mismatch": "The source and edited images differ in size",
    "removal-failed": "No removal attempt passed the quality gate",
    "gate-unavailable": "This deployment has no quality scorer",
    "retention-disabled": "This deployment does not retain results",
    "invalid-input": "Invalid input",
    "invalid-request": "The request is invalid",
    "malformed-body": "The request body cannot be parsed",
    "payload-too-large": "The request body is too large",
    "body-timeout": "The request body did not arrive in time",
    "unsupported-media-type": "Unsupported content type",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "unauthorized": "A valid API key is required",
    "forbidden": "The API key does not allow this",
    "too-many-requests": "Too many requests in progress; retry later",
    "overloaded": "The service is overloaded; retry later",
    "replica-failed": "A model replica failed while answering; retry later",
    "not-ready": "The model is not loaded yet",
    "scorer-unavailable": "The quality scorer is unavailable; retry later",
    "retention-unavailable": "The result store is unavailable; retry later",
    "timeout": "The request took too long",
    "internal-error": "Internal error",
}


class Problem(Exception):
    def __init__(self, problem: str, detail: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    @classmethod
    def from_input_error(cls, error: InputError) -> "Problem":
        return cls(error.problem, error.detail)

    @property
    def status(self) -> int:
        return STATUS_BY_PROBLEM[self.problem]

    def body(self, request_id: str | None = None) -> dict:
        """The problem+json document; the same fields travel in gRPC error details."""
        body = {
            "type": TYPE_BASE + self.problem,
            "title": TITLES[self.problem],
            "status": self.status,
            "detail": _clip(self.detail, MAX_DETAIL_CHARS),
            **{key: _bounded(value) for key, value in self.extra.items()},
        }
        if request_id:
            body["instance"] = f"urn:request:{request_id}"
        return body

    def response(self, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(self.body(request_id), status_code=self.status, media_type=MEDIA_TYPE, headers=self.headers)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _bounded(value):
    """An extra field of a problem document with every text clipped and every list cut to MAX_LISTED items
    (a last item counts the rest)."""
    if isinstance(value, str):
        return _clip(value, MAX_TEXT_CHARS)
    if isinstance(value, dict):
        return {_clip(str(key), MAX_TEXT_CHARS): _bounded(item) for key, item in list(value.items())[:MAX_LISTED]}
    if isinstance(value, (list, tuple)):
        kept = [_bounded(item) for item in value[:MAX_LISTED]]
        return kept + ([f"... and {len(value) - MAX_LISTED} more"] if len(value) > MAX_LISTED else [])
    return value
