"""Registers rorem.v1.ObjectRemoval on Ray Serve's gRPC proxy: the one entry of `grpc_servicer_functions`.

Ray's proxy keeps each method's request deserializer and pickles the parsed message to the Ingress replica.
The generated add_ObjectRemovalServicer_to_server parses with FromString, which raises on bytes that are not a
valid message (corrupt wire format, a string field that is not UTF-8) inside grpcio: status UNKNOWN, no problem
document, no request id, not counted. Here such bytes become a MalformedMessage, which the Ingress answers as
the problem `malformed-body` (serve/grpc_api.py). Unknown fields are dropped and a message larger than the
largest request an application takes becomes an OversizedMessage (`payload-too-large`): otherwise bytes that no
field holds would pass the app's size check (it adds up the files) and be pickled to the replica and held there.
With API keys on, a call is checked at the proxy before it is routed (serve/grpc_gate.py). The proxy loads
this: it imports grpc, the stubs and serve.problems only (the gate what it needs, where keys are on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from serve import rorem_pb2 as pb
from serve.problems import Problem

SERVICE = pb.DESCRIPTOR.services_by_name["ObjectRemoval"]
SERVICER_FUNCTION = "serve.grpc_servicer.add_servicer"  # what every Serve config's grpc_servicer_functions names
MAX_REQUEST_ENV = "ROREM_GRPC_MAX_REQUEST_BYTES"  # set for the proxies by serve.proxy_limits.proxy_env


@dataclass(frozen=True)
class MalformedMessage:
    """Stands for a request message that did not parse; plain fields, so it pickles to the replica."""

    message_type: str
    error: str


@dataclass(frozen=True)
class OversizedMessage:
    """Stands for a request message larger than any application takes, in place of its bytes."""

    size: int
    limit: int


Parsed = Message | MalformedMessage | OversizedMessage


def lenient_parser(message_class: type[Message], max_bytes: int | None = None) -> Callable[[bytes], Parsed]:
    def parse(data: bytes) -> Parsed:
        if max_bytes is not None and len(data) > max_bytes:
            return OversizedMessage(len(data), max_bytes)
        try:
            message = message_class.FromString(data)
        except DecodeError as error:
            return MalformedMessage(message_class.DESCRIPTOR.full_name, str(error))
        message.DiscardUnknownFields()
        return message

    return parse


def max_request_bytes() -> int | None:
    value = os.environ.get(MAX_REQUEST_ENV)
    return int(value) if value else None


def method_handlers(servicer, max_bytes: int | None = None, streamed: bool = False) -> dict[str, grpc.RpcMethodHandler]:
    """The generated stubs' handlers for every RPC of the service, parsing with lenient_parser; `streamed`: as
    client-streaming handlers (the same calls on the wire), which Ray's proxy serves behind serve.grpc_gate."""
    make = grpc.stream_unary_rpc_method_handler if streamed else grpc.unary_unary_rpc_method_handler
    handlers = {}
    for method in SERVICE.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary RPCs are registered here")
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient_parser(getattr(pb, method.input_type.name), max_bytes),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return handlers


def status_code(problem: Problem) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, problem.kind.grpc_code)


def status_for(problem: Problem, context, request_id: str | None, metadata: Iterable[tuple[str, str]] = ()) -> None:
    """Set code, details (the problem+json document) and trailing metadata on a gRPC context (the Ingress's or the
    proxy's); `metadata`: more trailing metadata (the quota fields, serve/quotas.py)."""
    context.set_code(status_code(problem))
    context.set_details(json.dumps(problem.body(request_id)))
    trailing = [("problem-type", problem.body()["type"])]
    if "Retry-After" in problem.headers:
        trailing.append(("retry-after", problem.headers["Retry-After"]))
    context.set_trailing_metadata(trailing + list(metadata))


def add_servicer(servicer, server) -> None:
    """What add_ObjectRemovalServicer_to_server does, with method_handlers; on Ray's proxy, behind the key gate."""
    from serve import grpc_gate

    gated = grpc_gate.install(server, f"/{SERVICE.full_name}/")
    handlers = method_handlers(servicer, max_request_bytes(), streamed=gated)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
