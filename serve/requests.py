"""Turn a request into validated uploads: bounded body read, multipart or JSON, strict options.

The option models are the one schema of per-request options; the gRPC adapter validates its
fields through the same models (`validate`)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from serve.config import GateMode
from serve.problems import Problem

_JSON_OVERHEAD = 64 * 1024


class RemoveOptions(BaseModel):
    """Per-request options: multipart form fields or JSON keys of the same names."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="noise seed; random when absent")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="png, jpeg or webp; else from Accept, else the input's format"
    )
    quality: int | None = Field(None, ge=1, le=100, description="JPEG / WebP quality")
    dilate: int | None = Field(None, ge=0, le=256, description="mask dilation in pixels; default from config")
    gate: GateMode | None = Field(None, description="off, annotate, retry or reject; default from config")
    gate_threshold: float | None = Field(
        None, ge=0.0, le=10.0, allow_inf_nan=False, description="passing score; default from config"
    )
    max_attempts: int | None = Field(None, ge=1, le=8, description="attempts for retry / reject")
    retain: bool | None = Field(
        None, description="keep this result for feedback (true) or never (false); default from config (retention)"
    )
    timeout_s: float | None = Field(
        None, gt=0, le=3600, description="answer 504 after this many seconds (at most the configured request_timeout_s)"
    )


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dilate: int | None = Field(None, ge=0, le=256, description="mask dilation used for the removal; default from config")
    gate_threshold: float | None = Field(
        None, ge=0.0, le=10.0, allow_inf_nan=False, description="passing score; default from config"
    )


class JSONRemoveBody(RemoveOptions):
    image: str = Field(description="base64 image bytes")
    mask: str | None = Field(None, description="base64 mask bytes; absent: the image's alpha is the mask")


class JSONScoreBody(ScoreOptions):
    source: str = Field(description="base64 bytes of the image before removal")
    mask: str = Field(description="base64 mask bytes (white = removed)")
    edited: str = Field(description="base64 bytes of the image after removal")


@dataclass
class RemovalRequest:
    image: bytes
    mask: bytes | None
    options: RemoveOptions


@dataclass
class ScoreRequest:
    source: bytes
    mask: bytes
    edited: bytes
    options: ScoreOptions


def openapi_request_body(options_model: type[BaseModel], json_model: type[BaseModel], files: dict[str, str]) -> dict:
    """The OpenAPI `requestBody` of an upload route: multipart (files + option fields) or JSON (base64).

    The routes read their bodies themselves (bounded, two formats), so FastAPI cannot infer this."""
    json_schema = json_model.model_json_schema()
    multipart = {
        "type": "object",
        "properties": {
            **{name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()},
            **options_model.model_json_schema()["properties"],
        },
        "required": [name for name in files if name in json_schema.get("required", [])],
    }
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": json_schema}},
    }


async def read_removal_request(request: Request, max_upload_bytes: int) -> RemovalRequest:
    files, options = await _read_upload(
        request, max_upload_bytes, ("image", "mask"), ("image",), RemoveOptions, JSONRemoveBody
    )
    return RemovalRequest(image=files["image"], mask=files.get("mask"), options=options)


async def read_score_request(request: Request, max_upload_bytes: int) -> ScoreRequest:
    names = ("source", "mask", "edited")
    files, options = await _read_upload(request, max_upload_bytes, names, names, ScoreOptions, JSONScoreBody)
    return ScoreRequest(source=files["source"], mask=files["mask"], edited=files["edited"], options=options)


async def read_json(request: Request, model: type[BaseModel], limit: int = _JSON_OVERHEAD):
    """A small JSON document (POST /feedback): bounded read, then the same problems as /remove's JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Problem("unsupported-media-type", f"send application/json, not {content_type or 'no content type'}")
    return validate(model, _json_object(await _read_body(request, limit)))


def check_upload_size(total_bytes: int, max_upload_bytes: int) -> None:
    """The same limit for every protocol: the files of one request together."""
    if total_bytes > max_upload_bytes:
        raise Problem("payload-too-large", f"the uploads are {total_bytes} bytes; the limit is {max_upload_bytes}")


async def _read_upload(request, max_upload_bytes, names, required, options_model, json_model):
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        body = await _read_body(request, max_upload_bytes + _JSON_OVERHEAD)
        files, options = await _from_multipart(request, body, names, required, options_model)
    elif content_type == "application/json":
        body = await _read_body(request, max_upload_bytes * 4 // 3 + _JSON_OVERHEAD)
        files, options = _from_json(body, names, options_model, json_model)
    else:
        raise Problem(
            "unsupported-media-type",
            f"send multipart/form-data (file fields {', '.join(names)}) or application/json, "
            f"not {content_type or 'no content type'}",
        )
    check_upload_size(sum(len(f) for f in files.values()), max_upload_bytes)
    return files, options


async def _read_body(request: Request, limit: int) -> bytes:
    """Refuse by Content-Length before reading, and stop reading once past the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem("payload-too-large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem("payload-too-large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise Problem("invalid-request", "the request body is empty")
    return b"".join(chunks)


async def _from_multipart(request: Request, body: bytes, names, required, options_model):
    request._body = body  # starlette's form parser reads a cached body instead of the consumed stream
    try:
        form = await request.form(max_files=len(names), max_fields=16)
    except (MultiPartException, HTTPException) as exc:  # starlette turns the parser's exception into a 400
        reason = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise Problem("malformed-body", f"cannot parse the multipart body: {reason}") from exc
    files: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in files or key in fields:
            raise Problem("invalid-request", f"field {key!r} is given more than once")
        if isinstance(value, UploadFile):
            files[key] = await value.read()
        else:
            fields[key] = value
    for name in names:
        if name in fields:
            raise Problem("invalid-request", f"{name!r} must be sent as a file part, not a text field")
    unknown = set(files) - set(names)
    if unknown:
        raise Problem("invalid-request", f"unknown file fields: {sorted(unknown)}")
    for name in required:
        if name not in files:
            raise Problem("invalid-request", f"the multipart body has no {name!r} file")
    return files, validate(options_model, fields)


def _from_json(body: bytes, names, options_model, json_model):
    parsed = validate(json_model, _json_object(body))
    options = options_model.model_validate(parsed.model_dump(exclude=set(names)))
    files = {name: _b64decode(getattr(parsed, name), name) for name in names if getattr(parsed, name) is not None}
    return files, options


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise Problem("malformed-body", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Problem("invalid-request", "the JSON body must be an object")
    return data


def _b64decode(text: str, field: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Problem("invalid-request", f"{field!r} is not valid base64: {exc}") from exc


def validate(model: type[BaseModel], data: dict):
    """Validate options against their model; a failure is a 422 invalid-request listing every field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem("invalid-request", detail, errors=errors) from exc
