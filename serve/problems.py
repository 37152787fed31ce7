"""RFC 9457 problem+json: every error the API returns, with a stable `type` per kind."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from engines.errors import InputError

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://github.com/rorem-serve/problems/"

STATUS_BY_PROBLEM = {
    "invalid-image": 422,
    "image-too-large": 413,
    "invalid-mask": 422,
    "mask-size-mismatch": 422,
    "unsupported-output-format": 422,
    "invalid-input": 422,
    "invalid-request": 422,
    "malformed-body": 400,
    "payload-too-large": 413,
    "unsupported-media-type": 415,
    "not-found": 404,
    "method-not-allowed": 405,
    "overloaded": 503,
    "not-ready": 503,
    "timeout": 504,
    "internal-error": 500,
}

TITLES = {
    "invalid-image": "The image cannot be decoded",
    "image-too-large": "The image is too large",
    "invalid-mask": "The mask is not usable",
    "mask-size-mismatch": "The mask and the image differ in size",
    "unsupported-output-format": "Unsupported output format",
    "invalid-input": "Invalid input",
    "invalid-request": "The request is invalid",
    "malformed-body": "The request body cannot be parsed",
    "payload-too-large": "The request body is too large",
    "unsupported-media-type": "Unsupported content type",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "overloaded": "The service is overloaded; retry later",
    "not-ready": "The model is not loaded yet",
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

    def response(self, request_id: str | None = None) -> JSONResponse:
        status = STATUS_BY_PROBLEM[self.problem]
        body = {
            "type": TYPE_BASE + self.problem,
            "title": TITLES[self.problem],
            "status": status,
            "detail": self.detail,
            **self.extra,
        }
        if request_id:
            body["instance"] = f"urn:request:{request_id}"
        return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=self.headers)
