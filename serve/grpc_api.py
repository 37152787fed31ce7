"""The gRPC adapter: protobuf messages <-> the service's requests and replies, problems <-> status codes.

An error sets the status code mapped from the problem and puts the problem+json document in the
status details (a JSON string), so a gRPC client gets the same `type`, `detail` and extra fields
(score, attempts, ...) as a REST client. The stubs come from serve/rorem.proto (`make proto`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import grpc

from serve import rorem_pb2 as pb
from serve.problems import Problem
from serve.requests import RemovalRequest, RemoveOptions, ScoreOptions, ScoreRequest, check_upload_size, validate
from serve.service import RemovalReply, ScoreReply

SERVICE = "rorem.v1.ObjectRemoval"

_CODE_BY_PROBLEM = {
    "payload-too-large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "image-too-large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "removal-failed": grpc.StatusCode.FAILED_PRECONDITION,
    "gate-unavailable": grpc.StatusCode.FAILED_PRECONDITION,
    "retention-disabled": grpc.StatusCode.FAILED_PRECONDITION,
    "not-found": grpc.StatusCode.NOT_FOUND,
    "method-not-allowed": grpc.StatusCode.UNIMPLEMENTED,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "too-many-requests": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "overloaded": grpc.StatusCode.UNAVAILABLE,
    "replica-failed": grpc.StatusCode.UNAVAILABLE,
    "not-ready": grpc.StatusCode.UNAVAILABLE,
    "scorer-unavailable": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal-error": grpc.StatusCode.INTERNAL,
}


def status_code(problem: Problem) -> grpc.StatusCode:
    """Every other problem is the caller's input: INVALID_ARGUMENT."""
    return _CODE_BY_PROBLEM.get(problem.problem, grpc.StatusCode.INVALID_ARGUMENT)


def status_for(problem: Problem, context, request_id: str | None, metadata: Iterable[tuple[str, str]] = ()) -> None:
    """Set code, details (the problem+json document) and trailing metadata on a Serve gRPC context;
    `metadata`: more trailing metadata (the quota fields, serve/quotas.py)."""
    context.set_code(status_code(problem))
    context.set_details(json.dumps(problem.body(request_id)))
    trailing = [("problem-type", problem.body()["type"])]
    if "Retry-After" in problem.headers:
        trailing.append(("retry-after", problem.headers["Retry-After"]))
    context.set_trailing_metadata(trailing + list(metadata))


def removal_request(message: pb.RemoveRequest, max_upload_bytes: int) -> RemovalRequest:
    check_upload_size(len(message.image) + len(message.mask), max_upload_bytes)
    if not message.image:
        raise Problem("invalid-request", "the request has no image")
    options = {
        "seed": message.seed if message.HasField("seed") else None,
        "output_format": message.output_format or None,
        "quality": message.quality if message.HasField("quality") else None,
        "dilate": message.dilate if message.HasField("dilate") else None,
        "gate": message.gate or None,
        "gate_threshold": message.gate_threshold if message.HasField("gate_threshold") else None,
        "max_attempts": message.max_attempts if message.HasField("max_attempts") else None,
        "retain": message.retain if message.HasField("retain") else None,
        "timeout_s": message.timeout_s if message.HasField("timeout_s") else None,
    }
    return RemovalRequest(image=message.image, mask=message.mask or None, options=validate(RemoveOptions, options))


def score_request(message: pb.ScoreRequest, max_upload_bytes: int) -> ScoreRequest:
    check_upload_size(len(message.source) + len(message.mask) + len(message.edited), max_upload_bytes)
    for name in ("source", "mask", "edited"):
        if not getattr(message, name):
            raise Problem("invalid-request", f"the request has no {name}")
    options = {
        "dilate": message.dilate if message.HasField("dilate") else None,
        "gate_threshold": message.gate_threshold if message.HasField("gate_threshold") else None,
    }
    return ScoreRequest(message.source, message.mask, message.edited, validate(ScoreOptions, options))


def remove_reply(reply: RemovalReply, request_id: str) -> pb.RemoveReply:
    message = pb.RemoveReply(
        image=reply.body,
        media_type=reply.media_type,
        seed=reply.seed or 0,
        bucket=reply.bucket or 0,
        batch_size=reply.batch_size,
        attempts=reply.attempts,
        gate=reply.gate,
        request_id=request_id,
        result_id=reply.result_id or "",
    )
    if reply.score is not None:
        message.score = reply.score
    return message


def score_reply(reply: ScoreReply, request_id: str) -> pb.ScoreReply:
    return pb.ScoreReply(
        score=reply.score, threshold=reply.threshold, passed=reply.passed, bucket=reply.bucket, request_id=request_id
    )
