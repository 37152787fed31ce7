"""The request's one schema (serve.protocol), as each protocol's parsing reaches it: multipart, JSON and gRPC."""

from __future__ import annotations

import base64
import json
import time

import pytest

from serve import rorem_pb2 as pb
from serve import uploads
from serve.grpc_api import removal_request
from serve.problems import MAX_LISTED, Problem
from serve.protocol import JSONRemoveBody, RemoveOptions, validate

FILES = ("image", "mask")


def _multipart(fields: dict[str, str]) -> RemoveOptions:
    parts = ['name="image"; filename="i.png"\r\n\r\npng', *(f'name="{k}"\r\n\r\n{v}' for k, v in fields.items())]
    body = "".join(f"--b0undary\r\nContent-Disposition: form-data; {part}\r\n" for part in parts) + "--b0undary--\r\n"
    content_type = "multipart/form-data; boundary=b0undary"
    return uploads._from_multipart(content_type, body.encode(), FILES, ("image",), RemoveOptions)[1]


def _json(fields: dict) -> RemoveOptions:
    body = json.dumps({"image": base64.b64encode(b"png").decode(), **fields}).encode()
    return uploads._from_json(body, FILES, RemoveOptions, JSONRemoveBody)[1]


def _grpc(fields: dict) -> RemoveOptions:
    return removal_request(pb.RemoveRequest(image=b"png", **fields), 1 << 20).options


PROTOCOLS = {"multipart": _multipart, "json": _json, "grpc": _grpc}


@pytest.mark.parametrize("read", PROTOCOLS.values(), ids=PROTOCOLS)
@pytest.mark.parametrize(("given", "meant"), [("JPG", "jpeg"), ("jpg", "jpeg"), ("Png", "png"), ("WEBP", "webp")])
def test_an_output_format_is_read_in_any_case_and_jpg_is_jpeg(read, given, meant):
    """`jpg` and `PNG` were 422, where the gRPC client names a .jpg output JPEG."""
    assert read({"output_format": given}).output_format == meant


@pytest.mark.parametrize("read", PROTOCOLS.values(), ids=PROTOCOLS)
def test_an_output_format_the_service_does_not_write_is_still_refused(read):
    with pytest.raises(Problem) as refused:
        read({"output_format": "gif"})
    assert refused.value.problem == "invalid-request"
    assert [error["field"] for error in refused.value.extra["errors"]] == ["output_format"]


def test_the_openapi_enum_keeps_the_formats_own_names():
    field = RemoveOptions.model_json_schema()["properties"]["output_format"]
    assert field["anyOf"][0]["enum"] == ["png", "jpeg", "webp"] and "jpg" in field["description"]


@pytest.mark.parametrize("read", [_multipart, _json], ids=["multipart", "json"])
def test_an_unknown_field_does_not_hide_the_invalid_ones(read):
    """`quality=0, timeout_s=5000, prompt=remove` answered only "unknown fields: 'prompt'"."""
    with pytest.raises(Problem) as refused:
        read({"quality": "0", "timeout_s": "5000", "prompt": "remove"})
    errors = {error["field"]: error["message"] for error in refused.value.extra["errors"]}
    assert set(errors) == {"quality", "timeout_s", "prompt"} and errors["prompt"] == "unknown field"
    detail = refused.value.detail
    assert "quality: " in detail and "timeout_s: " in detail and "unknown fields: 'prompt'" in detail, detail


@pytest.mark.timing
def test_many_unknown_keys_leave_room_for_the_invalid_fields_and_stay_cheap():
    """The known fields' errors come first, in `errors` and in the clipped detail; 200000 unknown keys are counted,
    never handed to pydantic."""
    data = {"image": "AAAA", "quality": 0, **{f"key{i}": i for i in range(200_000)}}
    started = time.perf_counter()
    with pytest.raises(Problem) as refused:
        validate(JSONRemoveBody, data)
    assert time.perf_counter() - started < 1
    body = refused.value.body()
    assert body["errors"][0]["field"] == "quality" and len(body["errors"]) == MAX_LISTED
    assert body["detail"].startswith("quality: ") and f"200000 unknown fields, the first {MAX_LISTED}" in body["detail"]


def test_a_valid_known_subset_answers_the_unknown_fields_alone():
    with pytest.raises(Problem) as refused:
        validate(JSONRemoveBody, {"image": "AAAA", "quality": 90, "prompt": "remove"})
    assert refused.value.detail == "unknown fields: 'prompt'"
    assert refused.value.extra["errors"] == [{"field": "prompt", "message": "unknown field"}]
