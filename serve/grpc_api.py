"""The gRPC adapter: protobuf messages <-> the service's requests and replies, problems <-> status codes.

An error sets the status code mapped from the problem and puts the problem+json document in the
status details (a JSON string), so a gRPC client gets the same `type`, `detail` and extra fields
(score, attempts, ...) as a REST client. The stubs come from serve/rorem.proto (`make proto`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel
from ray.serve.grpc_util import RayServegRPCContext

from serve import auth
from serve import rorem_pb2 as pb
from serve.grpc_servicer import MalformedMessage, OversizedMessage, Parsed, status_code, status_for
from serve.metrics import CLIENT_CLOSED, INGRESS_STAGES
from serve.problems import Problem
from serve.protocol import RemovalRequest, RemoveOptions, ScoreOptions, ScoreRequest, check_upload_size, validate
from serve.request_ids import serve_request_id, valid_request_id
from serve.service import RemovalResult, ScoreResult, request_deadline_s

SERVICE = "rorem.v1.ObjectRemoval"
logger = logging.getLogger("ray.serve")

Options = TypeVar("Options", bound=BaseModel)
Answer = tuple[Message, list[tuple[str, str]]]  # a handler's reply and its trailing metadata
SERVER_TIMING = "server-timing"  # trailing metadata: a removal's stage timings, as REST's Server-Timing header
SHARED_ROUTE_SCOPES = {"/remove": "remove", "/score": "score"}
"""The scope of each REST route that a gRPC method also serves: serve.app declares the routes with it, and the
method needs its route's scope, so a key allowed one way is allowed the other."""


def removal_request(message: pb.RemoveRequest, max_upload_bytes: int) -> RemovalRequest:
    """proto3 has no absent bytes field, only an empty one: no image is REST's empty image (invalid-image, from
    the decoder), and no mask means the image's alpha, where REST's empty mask part is invalid-mask."""
    image, mask = message.image, message.mask  # each read copies the bytes
    check_upload_size(len(image) + len(mask), max_upload_bytes)
    return RemovalRequest(image=image, mask=mask or None, options=_options(message, RemoveOptions))


def score_request(message: pb.ScoreRequest, max_upload_bytes: int) -> ScoreRequest:
    """As for Remove, a field not sent is an empty one: the decoders answer what REST answers to an empty part
    (invalid-image "the source image is empty" or "the edited image is empty", invalid-mask "the mask is empty")."""
    source, mask, edited = message.source, message.mask, message.edited  # each read copies the bytes
    check_upload_size(len(source) + len(mask) + len(edited), max_upload_bytes)
    return ScoreRequest(source, mask, edited, _options(message, ScoreOptions))


def _options(message, model: type[Options]) -> Options:
    """The model's fields, read from the message's fields of the same names and validated. Unset means the
    configured default (None): an `optional` field not set, or a proto3 string left empty (it has no unset state)."""
    options = {}
    for name in model.model_fields:
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.has_presence:
            options[name] = getattr(message, name) if message.HasField(name) else None
        else:
            options[name] = getattr(message, name) or None
        if field.type == FieldDescriptor.TYPE_FLOAT and options[name] is not None:
            options[name] = _float32_decimal(options[name])
    return validate(model, options)


def _float32_decimal(value: float) -> float:
    """A proto `float` (float32) as the shortest decimal with the same float32: 9.3 arrives as 9.300000190734863,
    and REST's 9.3 and gRPC's are then applied, reported and stored as the same number."""
    return float(str(np.float32(value)))


def remove_reply(result: RemovalResult, request_id: str) -> pb.RemoveReply:
    message = pb.RemoveReply(
        image=result.body,
        media_type=result.media_type,
        bucket=result.bucket or 0,
        batch_size=result.batch_size or 0,
        attempts=result.attempts,
        gate=result.gate,
        request_id=request_id,
        result_id=result.result_id or "",
        buckets=result.buckets,
    )
    if result.seed is not None:
        message.seed = result.seed
    if result.score is not None:
        message.score = result.score
    return message


def score_reply(result: ScoreResult, request_id: str) -> pb.ScoreReply:
    return pb.ScoreReply(
        score=result.score,
        threshold=result.threshold,
        passed=result.passed,
        bucket=result.bucket,
        request_id=request_id,
    )


class GrpcMethods:
    """The gRPC methods of the Ingress (serve.app): `Remove` / `Score` are the RPC names in serve/rorem.proto."""

    async def Remove(
        self, message: pb.RemoveRequest | Parsed, grpc_context: RayServegRPCContext
    ) -> pb.RemoveReply:
        return await self._grpc("/remove", grpc_context, pb.RemoveReply, self._grpc_remove, message)

    async def Score(
        self, message: pb.ScoreRequest | Parsed, grpc_context: RayServegRPCContext
    ) -> pb.ScoreReply:
        return await self._grpc("/score", grpc_context, pb.ScoreReply, self._grpc_score, message)

    async def _grpc_remove(self, message: pb.RemoveRequest, request_id: str, principal, place) -> Answer:
        upload = removal_request(message, self.settings.imaging.max_upload_bytes)
        place.check_deadline(request_deadline_s(upload.options, self.settings))
        reply = await self.service.remove(upload, owner=auth.result_owner(principal), admitted=place)
        place.counted = reply.bucket is not None
        self.metrics.stages.observe({k: v for k, v in reply.timings.stages.items() if k in INGRESS_STAGES})
        return remove_reply(reply, request_id), [(SERVER_TIMING, reply.timings.server_timing())]

    async def _grpc_score(self, message: pb.ScoreRequest, request_id: str, principal, place) -> Answer:
        upload = score_request(message, self.settings.imaging.max_upload_bytes)
        place.check_deadline(request_deadline_s(upload.options, self.settings))
        reply = await self.service.score(upload, place)
        return score_reply(reply, request_id), []

    async def _grpc(self, route, context, empty_reply, handler, message):
        """Run a gRPC call needing its REST route's scope (SHARED_ROUTE_SCOPES); a Problem
        becomes a status code + problem+json details, counted like REST under the REST route's name. A message
        that did not parse (serve/grpc_servicer.py) is the problem malformed-body, after the key and quota checks.
        `handler` answers (reply, trailing metadata): an answer's metadata is set once, with the quota's. The local
        stop's `stopping` is answered at the proxy (serve/grpc_gate.py), as HTTP's is."""
        started = time.perf_counter()
        request_id = serve_request_id() or valid_request_id(context.request_id())
        quota = None  # the key's quota decision (serve/quotas.py): counted once the key is known
        try:
            metadata = context.invocation_metadata()
            principal = await self.access.check_grpc(SHARED_ROUTE_SCOPES[route], metadata, context.peer())
            quota = await self.quotas.acquire(principal)
            if quota is not None:
                quota.check()
            if isinstance(message, MalformedMessage):
                raise Problem("malformed-body", f"cannot parse the request message: {message.error}")
            if isinstance(message, OversizedMessage):
                raise Problem("payload-too-large", f"the message is {message.size} bytes; the limit is {message.limit}")
            with self.admissions[route].slot() as place:
                reply, trailing = await handler(message, request_id, principal, place)
            status = "OK"
        except Problem as problem:
            status_problem = problem
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            self.metrics.answered(route, "grpc", "CANCELLED", time.perf_counter() - started, CLIENT_CLOSED)
            raise
        except Exception as exc:  # never let an unexpected error escape without a status and a log line
            logger.exception("unhandled error in gRPC %s", route)
            status_problem = Problem("internal-error", f"{type(exc).__name__}; see the server log")
        else:
            if quota is not None:
                trailing = [*quota.metadata(), *trailing]
            if trailing:  # one call: Ray's context keeps the last one's metadata only
                context.set_trailing_metadata(trailing)
            self.metrics.answered(route, "grpc", status, time.perf_counter() - started, 200)
            return reply
        finally:
            self.quotas.release(quota)
        status_for(status_problem, context, request_id, quota.metadata() if quota is not None else ())
        seconds = time.perf_counter() - started
        code = status_code(status_problem).name
        self.metrics.answered(
            route, "grpc", code, seconds, status_problem.status, status_problem.problem, status_problem.over_quota
        )
        # Ray's access lines say OK for every call its handler returns from, the refused ones too
        logger.info("gRPC %s answered %s %s (%.1f ms)", route, code, status_problem.problem, seconds * 1000)
        return empty_reply()
