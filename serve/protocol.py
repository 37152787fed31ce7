"""The request, defined once: per-request options and uploads as every protocol carries them.

REST multipart fields, REST JSON keys and gRPC message fields are validated through these models
(`validate`); serve/uploads.py reads REST bodies into them, serve/grpc_api.py maps gRPC messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from engines import imaging
from engines.gate import GateMode
from serve import negotiation
from serve.config import Attempts, Dilation, GateThreshold, NotABool, Quality
from serve.problems import Problem, invalid_request

# Bounds on the inner type, not on the `X | None` union: there pydantic publishes its own "ge" / "le" keys, which
# JSON Schema (and so OpenAPI) does not know, instead of minimum / maximum.
# int64: generators (Java, Go, C#) make an int32 of a bare integer. The OpenAPI description's seeds are all this one.
MAX_SEED = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, json_schema_extra={"format": "int64"}), NotABool]
TimeoutS = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False), NotABool]
RequestTimeoutS = Annotated[
    TimeoutS | None,
    Field(description="answer 504 after this many seconds (at most the configured request_timeout_s)"),
]


FORMAT_ALIASES = {"jpg": "jpeg"}


def _format_name(value):
    """A format as people name it: any case, and jpg for jpeg (the suffix a client names its output by)."""
    if not isinstance(value, str):
        return value
    return FORMAT_ALIASES.get(value.lower(), value.lower())


# The Literal (the OpenAPI enum) stays the formats' own names; the validator before it reads the other spellings.
OutputFormat = Annotated[
    Literal[imaging.OUTPUT_FORMATS] | None,  # type: ignore[valid-type]
    BeforeValidator(_format_name),
    Field(
        description=f"png, jpeg (drops alpha) or webp, in any case (jpg: jpeg); else from Accept, else "
        f"{negotiation.DEFAULT}"
    ),
]


class RemoveOptions(BaseModel):
    """Per-request options: multipart form fields or JSON keys of the same names."""

    model_config = ConfigDict(extra="forbid")
    seed: Seed | None = Field(None, description="noise seed; random when absent")
    output_format: OutputFormat = None
    quality: Quality | None = Field(None, description="JPEG / WebP quality")
    dilate: Dilation | None = Field(None, description="mask dilation in pixels; default from config")
    gate: GateMode | None = Field(None, description="off, annotate, retry or reject; default from config")
    gate_threshold: GateThreshold | None = Field(None, description="passing score; default from config")
    max_attempts: Attempts | None = Field(None, description="attempts for retry / reject")
    retain: bool | None = Field(
        None, description="keep this result for feedback (true) or never (false); default from config (retention)"
    )
    timeout_s: RequestTimeoutS = None


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dilate: Dilation | None = Field(None, description="mask dilation used for the removal; default from config")
    gate_threshold: GateThreshold | None = Field(None, description="passing score; default from config")
    timeout_s: RequestTimeoutS = None


class JSONRemoveBody(RemoveOptions):
    image: str = Field(description="base64 image bytes, or a data URL (data:image/png;base64,...)")
    mask: str | None = Field(None, description="base64 mask bytes or a data URL; absent: the image's alpha is the mask")


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
            **{name: _form_field(schema) for name, schema in options_model.model_json_schema()["properties"].items()},
        },
        "required": [name for name in files if name in json_schema.get("required", [])],
    }
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": json_schema}},
    }


def _form_field(schema: dict) -> dict:
    """An option as a form field: a form has no null, so the `X | None` union loses its null branch and its null
    default (absent is the default). Left as it was, generators send None as the text "None" (a 422)."""
    branches = [branch for branch in schema.get("anyOf", ()) if branch != {"type": "null"}]
    field = {key: value for key, value in schema.items() if key != "anyOf" and not (key == "default" and value is None)}
    if len(branches) == 1:
        return {**branches[0], **field}
    return {**({"anyOf": branches} if branches else {}), **field}


def form_options(model: type[BaseModel], fields: dict[str, str]):
    """A multipart body's option fields, validated: an empty option is absent, as an HTML form sends a field left
    blank (its schema above has no null); an unknown field is refused, blank or not (a misspelt one left blank)."""
    return validate(
        model, {name: value for name, value in fields.items() if value != "" or name not in model.model_fields}
    )


def check_upload_size(total_bytes: int, max_upload_bytes: int) -> None:
    """The same limit for every protocol: the files of one request together."""
    if total_bytes > max_upload_bytes:
        raise Problem("payload-too-large", f"the uploads are {total_bytes} bytes; the limit is {max_upload_bytes}")


def validate(model: type[BaseModel], data: dict):
    """Validate options against their model; a failure is one 422 invalid-request listing every invalid field and
    every unknown one.

    Unknown keys are counted here, not by pydantic: its error list for 200000 of them takes 5 s to build in
    one call that holds the GIL (the event loop stalls with it). The known keys are then validated alone, a
    model's few fields whatever the body holds."""
    forbidden = model.model_config.get("extra") == "forbid"
    unknown = [key for key in data if key not in model.model_fields] if forbidden else []
    known = {name: data[name] for name in model.model_fields if name in data} if unknown else data
    try:
        options = model.model_validate(known)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False, include_input=False), unknown) from exc
    if unknown:
        raise invalid_request([], unknown)
    return options
