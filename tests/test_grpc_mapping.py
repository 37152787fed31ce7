"""The gRPC request messages carry the option models' fields, read by name: the proto and the models agree."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from serve import openapi
from serve import rorem_pb2 as pb
from serve.grpc_api import removal_request, remove_reply, score_reply, score_request
from serve.problems import Problem
from serve.protocol import (
    JSONRemoveBody,
    JSONScoreBody,
    RemovalRequest,
    RemoveOptions,
    ScoreOptions,
    ScoreRequest,
)
from serve.rest_api import json_reply_body, remove_reply_json, score_reply_json
from serve.service import RemovalResult, ScoreResult

LIMIT = 1 << 20
PAIRS = [
    (pb.RemoveRequest, RemoveOptions, RemovalRequest, JSONRemoveBody),
    (pb.ScoreRequest, ScoreOptions, ScoreRequest, JSONScoreBody),
]
FILES = {"source": b"s", "mask": b"m", "edited": b"e"}


def _files(request) -> set[str]:
    return {field.name for field in dataclasses.fields(request)} - {"options"}


@pytest.mark.parametrize(("message", "model", "request_type", "json_body"), PAIRS, ids=lambda x: x.__name__)
def test_the_proto_fields_are_the_model_fields_plus_the_files(message, model, request_type, json_body):
    fields = message.DESCRIPTOR.fields_by_name
    assert set(fields) == set(model.model_fields) | _files(request_type)
    assert set(fields) == set(json_body.model_fields)  # the REST JSON body: the same names
    assert all(fields[name].type == FieldDescriptor.TYPE_BYTES for name in _files(request_type))


@pytest.mark.parametrize(("message", "model", "request_type", "json_body"), PAIRS, ids=lambda x: x.__name__)
def test_only_strings_go_without_presence(message, model, request_type, json_body):
    """An option without `optional` reads its empty value as unset: fine for a string, but a 0 or false would
    silently mean the configured default."""
    fields = message.DESCRIPTOR.fields_by_name
    for name in model.model_fields:
        assert fields[name].has_presence or fields[name].type == FieldDescriptor.TYPE_STRING, name


def test_every_remove_option_arrives():
    given = {
        "seed": 7,
        "output_format": "webp",
        "quality": 80,
        "dilate": 3,
        "gate": "retry",
        "gate_threshold": 0.5,
        "max_attempts": 2,
        "retain": False,
        "timeout_s": 2.5,
    }
    assert set(given) == set(RemoveOptions.model_fields)
    request = removal_request(pb.RemoveRequest(image=b"i", mask=b"m", **given), LIMIT)
    assert (request.image, request.mask) == (b"i", b"m")
    assert request.options.model_dump() == given


def test_float_options_arrive_as_the_decimal_sent_not_its_float32():
    """gate_threshold and timeout_s are proto `float` (float32): 9.3 is applied and reported as REST's 9.3."""
    remove = removal_request(pb.RemoveRequest(image=b"i", gate_threshold=9.3, timeout_s=0.3), LIMIT).options
    score = score_request(pb.ScoreRequest(**FILES, gate_threshold=0.3), LIMIT).options
    assert (remove.gate_threshold, remove.timeout_s, score.gate_threshold) == (9.3, 0.3, 0.3)


def test_unset_remove_options_are_none():
    request = removal_request(pb.RemoveRequest(image=b"i"), LIMIT)
    assert request.mask is None
    assert request.options.model_dump() == dict.fromkeys(RemoveOptions.model_fields)


def test_every_score_option_arrives():
    given = {"dilate": 0, "gate_threshold": 1.25, "timeout_s": 2.5}
    assert set(given) == set(ScoreOptions.model_fields)
    request = score_request(pb.ScoreRequest(**FILES, **given), LIMIT)
    assert (request.source, request.mask, request.edited) == tuple(FILES.values())
    assert request.options.model_dump() == given
    assert score_request(pb.ScoreRequest(**FILES), LIMIT).options.model_dump() == dict.fromkeys(given)


def test_options_are_validated_by_the_model():
    with pytest.raises(Problem) as caught:
        removal_request(pb.RemoveRequest(image=b"i", gate="sometimes", quality=0), LIMIT)
    assert caught.value.problem == "invalid-request"
    assert {error["field"] for error in caught.value.extra["errors"]} == {"gate", "quality"}


def test_the_reply_has_a_seed_only_when_something_was_removed():
    """An empty mask's reply said seed 0, a valid seed, where REST answers no X-Seed and a null `seed`."""
    nothing = remove_reply(RemovalResult(b"i", "png", None, [], None, None, 0, "nothing-to-remove"), "r1")
    assert not nothing.HasField("seed") and nothing.bucket == 0 and nothing.batch_size == 0
    zero = remove_reply(RemovalResult(b"i", "png", 0, [512], 1, None, 1, "off"), "r2")
    assert zero.HasField("seed") and zero.seed == 0


# --- replies: gRPC's messages and the JSON replies (serve.openapi's models, which the OpenAPI document describes) ---

REPLIES = [(pb.RemoveReply, openapi.RemoveReply), (pb.ScoreReply, openapi.ScoreReply)]
GRPC_ONLY = {"request_id"}  # REST sends it as the X-Request-Id header, on every answer
NULL_AS_EMPTY = {"bucket": 0, "batch_size": 0, "result_id": ""}  # JSON null; proto3 fields without presence: their empty value
JSON_TYPES = {
    FieldDescriptor.TYPE_BYTES: "string",  # the image: bytes in gRPC, base64 text in JSON
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_FLOAT: "number",
    FieldDescriptor.TYPE_INT32: "integer",
    FieldDescriptor.TYPE_UINT64: "integer",
}


def _json_schema_of(field) -> dict:
    kind = {"type": JSON_TYPES[field.type]}
    return {"type": "array", "items": kind} if field.is_repeated else kind


@pytest.mark.parametrize(("message", "model"), REPLIES, ids=lambda x: x.__name__)
def test_the_proto_replies_carry_the_json_replies_fields(message, model):
    """Field for field, of the same kind. The differences are by design: request_id is gRPC's alone (REST's is the
    X-Request-Id header), the image travels as bytes in gRPC and as base64 text in JSON, and JSON's null is an
    unset `optional` field or, for a field without presence, its empty value (NULL_AS_EMPTY)."""
    fields = message.DESCRIPTOR.fields_by_name
    assert set(fields) == set(model.model_fields) | GRPC_ONLY
    for name, schema in model.model_json_schema()["properties"].items():
        kinds = schema.get("anyOf", [schema])
        nullable = {"type": "null"} in kinds
        given = [{key: kind[key] for key in ("type", "items") if key in kind} for kind in kinds]
        assert [kind for kind in given if kind != {"type": "null"}] == [_json_schema_of(fields[name])], name
        assert fields[name].has_presence == (nullable and name not in NULL_AS_EMPTY), name


REMOVALS = {
    "two regions, scored, kept": RemovalResult(b"\x89PNG", "png", 7, [512, 256], 2, 0.75, 2, "passed", result_id="r1"),
    "seed 0, not scored": RemovalResult(b"RIFF", "webp", 0, [512], 1, None, 1, "off"),
    "nothing to remove": RemovalResult(b"\xff\xd8", "jpeg", None, [], None, None, 0, "nothing-to-remove"),
}


def _say_the_same(message, content: dict) -> None:
    """Every JSON field has its gRPC twin's value (a proto `float` is 32-bit)."""
    for name, value in content.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if value is None and field.has_presence:
            assert not message.HasField(name), name
        elif value is None:
            assert getattr(message, name) == NULL_AS_EMPTY[name], name
        elif field.type == FieldDescriptor.TYPE_FLOAT:
            assert getattr(message, name) == float(np.float32(value)), name
        else:
            assert getattr(message, name) == value, name


@pytest.mark.parametrize("result", REMOVALS.values(), ids=REMOVALS.keys())
def test_the_grpc_and_json_removal_replies_say_the_same(result):
    content = remove_reply_json(result)
    assert list(content) == list(openapi.RemoveReply.model_fields)
    assert content["image"] is result.body  # bytes, not copied: json_reply_body writes the base64
    _say_the_same(remove_reply(result, "r1"), content)
    sent = json.loads(json_reply_body(content))
    assert list(sent) == list(openapi.RemoveReply.model_fields)
    assert base64.b64decode(sent["image"]) == result.body
    assert openapi.RemoveReply.model_validate(sent).model_dump() == {**content, "image": sent["image"]}


@pytest.mark.parametrize("result", [ScoreResult(0.25, 0.5, False, 1024), ScoreResult(1.75, 0.5, True, 256)])
def test_the_grpc_and_json_score_replies_say_the_same(result):
    content = score_reply_json(result)
    assert list(content) == list(openapi.ScoreReply.model_fields)
    assert content == dataclasses.asdict(result)
    _say_the_same(score_reply(result, "r1"), content)
