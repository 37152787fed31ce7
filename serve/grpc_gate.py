"""Ray's gRPC proxy, gated: API keys checked before a call is routed to an Ingress replica, and the calls in flight
counted for the local stop.

The HTTP proxy refuses a body without a valid key before reading it (serve.proxy_middleware.BodyBuffer). Ray's
gRPC proxy has no middleware hook, so a keyless call (up to max_upload_bytes) was parsed, pickled and queued to an
Ingress replica, which only then refused it. Ray's server (gRPCGenericServer) makes each method's handler with its
`service_handler_factory`, for the generic and the registered-method paths alike: wrapping that factory before the
service registers puts this gate in front of both. The gate's methods are registered as client-streaming
(`add_servicer` does it where the gate is installed): grpcio reads a unary method's whole message before its handler
runs, so a keyless call of up to the proxy's message limit (~200 MB) was received and parsed before its refusal
(four at once held ~1 GB); a streaming one's message is read only when the handler asks for it, after the key check.
Clients see no difference on the wire (a unary call is a stream of one message). Any valid key of the called
application passes here; the
Ingress still checks the key's scope and quotas. Applications are told apart by the `application` metadata Ray
routes by (a cluster of one application takes calls without it); a call naming none of them, or two, is refused
here with a problem (Ray's own NOT_FOUND had none), as is one naming an application deployed after the proxy
started (the service must be restarted, as for the HTTP route table).

While `python -m serve run` stops (serve.proxy_middleware.Drain), a new call is answered `stopping` here, and the
calls in flight are counted with the HTTP requests the stop waits for (serve.proxy_middleware.InFlight): the
stop ended at once on a service with only gRPC traffic, and Ray's shutdown cut those calls with a bare UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from serve.auth import GRPC_LOOPBACK_ONLY_ENV, AccessPolicy
from serve.problems import Problem
from serve.proxy_middleware import (
    DRAIN_FLAG_ENV,
    GRPC_CALLS,
    NOT_RUN,
    draining,
    note_refusal,
    proxy_keys,
    still_without_an_answer,
    stopping,
)

# {application: {"keys": {"keys_file", "keys_reload_s"} or null, "max_request_bytes", "body_timeout_s"}}, set by
# serve.proxy_limits
APPS_ENV = "ROREM_GRPC_APPS"
APPLICATION_METADATA = "application"  # the metadata Ray's gRPC proxy routes a call by


def install(server, service_prefix: str) -> bool:
    """Gate the unary methods under `service_prefix` ("/package.Service/") of a Ray gRPC server where the
    applications are known (APPS_ENV, which serve.proxy_limits always sets) or the local stop's drain flag is
    named: those methods must then be registered as client-streaming (returns True), and Ray's STREAM_UNARY
    handler for them is its UNARY_UNARY one behind the gate. A server that is not Ray's (tests, the generated
    stubs) is left as it is (False)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        return False
    gate = ProxyGate(json.loads(os.environ.get(APPS_ENV) or "{}"), os.environ.get(GRPC_LOOPBACK_ONLY_ENV) == "1")
    if not gate.names and not os.environ.get(DRAIN_FLAG_ENV):
        return False

    def gated_factory(service_method: str, streaming_type):
        if service_method.startswith(service_prefix) and getattr(streaming_type, "name", "") == "STREAM_UNARY":
            unary = type(streaming_type)["UNARY_UNARY"]
            return gate.wrap(factory(service_method=service_method, streaming_type=unary), service_method)
        return factory(service_method=service_method, streaming_type=streaming_type)

    server.service_handler_factory = gated_factory
    return True


class CancelledCallNoise(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for a RequestCancelledError: Ray's gRPC proxy leaves
    the response task of every call its client cancels (or whose deadline passes) unretrieved, one traceback in the
    proxy's log per call, while the replicas log the call as CANCELLED."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).startswith("Task exception was never retrieved")
        return not (unretrieved and type(error).__name__ == "RequestCancelledError")


def quiet_cancelled_calls() -> None:
    """Install CancelledCallNoise on asyncio's logger, once, in the proxy's process."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(existing, CancelledCallNoise) for existing in asyncio_logger.filters):
        asyncio_logger.addFilter(CancelledCallNoise())


COMPRESSION_OPTION = "grpc.compression_enabled_algorithms_bitset"
IDENTITY_ONLY = 1  # bit 0: grpc's GRPC_COMPRESS_NONE


def refuse_compressed_messages() -> None:
    """Enable no message compression on the gRPC server Ray's proxy is about to build: grpcio inflated a gzip
    message before any handler ran, up to the proxy's message limit (~190 KB sent became a 190 MB message; 24 such
    calls at once took the proxy to 1.9 GB, and /healthz on the same loop to 32 s), keys or not. grpcio now refuses
    a compressed message itself, UNIMPLEMENTED, without inflating it; images do not compress, so clients lose
    nothing (they learn it from grpc-accept-encoding). Ray reads this list when it builds the server, which its
    proxy does after calling serve.proxy_middleware.middlewares, where this is called."""
    from ray.serve._private import grpc_util

    options = grpc_util.DEFAULT_GRPC_SERVER_OPTIONS
    options[:] = [option for option in options if option[0] != COMPRESSION_OPTION]
    options.append((COMPRESSION_OPTION, IDENTITY_ONLY))


class ProxyGate:
    """Each application's checks before its call's message is read (APPS_ENV): its keys, or where keys are off and
    the service listens on loopback, the caller's address (`loopback_only`: refused at the Ingress only, a remote
    caller's 30 MB message was read and sent there first); then how long the message may take to come (one never
    sent held the call for good) and how large it may be (the proxy's parser takes the largest of any
    application's: a smaller one's limit was checked only at its Ingress, after the message was pickled there)."""

    def __init__(self, applications: dict[str, dict], loopback_only: bool = False):
        self.names = list(applications)
        self.limits = applications
        self.policies = {
            name: proxy_keys(spec["keys"]["keys_file"], spec["keys"].get("keys_reload_s"))
            if spec.get("keys") else AccessPolicy(None, grpc_loopback_only=loopback_only)
            for name, spec in applications.items()
        }  # fmt: skip

    def application(self, metadata) -> str:
        """The application a call names, as Ray's gRPC proxy reads it (the last entry); a Problem where it names one
        the proxy did not start with (Ray routes any name to a lone application; refused here too), none of several,
        or two (the gate read the first entry and Ray routes by the last: a keyless call naming
        an application without keys, then a keyed one, passed the key check and reached the keyed Ingress with its
        whole message). The applications are those the proxy started with, as the HTTP route table's."""
        named = [value for key, value in metadata if key == APPLICATION_METADATA]
        if len(named) > 1:
            raise Problem("malformed-request", f"more than one {APPLICATION_METADATA!r} metadata entry (at the proxy)")
        if not self.names:  # no table (APPS_ENV unset): no keys either, Ray answers
            return named[0] if named else ""
        if not named and len(self.names) == 1:
            return self.names[0]
        if not named:
            raise Problem("not-found", f"this service has several applications: name one in the "
                          f"{APPLICATION_METADATA!r} metadata (at the proxy)")  # fmt: skip
        if named[0] not in self.names:
            raise Problem("not-found", f"no application named {named[0][:200]!r} (at the proxy)")
        return named[0]

    def wrap(self, handler, method: str):
        """A client-streaming handler around Ray's unary one for `method` ("/package.Service/Method"): the message
        is read once the call has passed."""

        async def stream_unary(requests, context):
            metadata = tuple(context.invocation_metadata() or ())

            def refuse(problem: Problem) -> bytes:
                return self._refuse(problem, context, metadata, method)

            if draining():
                return refuse(stopping(NOT_RUN))

            async def checked_call() -> bytes:
                try:
                    name = self.application(metadata)
                    policy = self.policies.get(name)
                    if policy is not None:
                        await policy.check_grpc(None, metadata, context.peer())
                    request = await self._message(requests, self.limits.get(name) or {})
                except Problem as refusal:
                    return refuse(refusal)
                return await handler(request, context)

            # counted from here: a key check that waits for a keys-file reload is in flight for the stop too
            given_up, reply = await GRPC_CALLS.run(checked_call())
            return refuse(stopping(still_without_an_answer(GRPC_CALLS.grace_s))) if given_up else reply

        return stream_unary

    @staticmethod
    async def _message(requests, limits: dict):
        """The call's one message, within the application's body_timeout_s and max_request_bytes (its fields as
        parsed: unknown ones are dropped); a Problem if not."""
        from google.protobuf.message import Message

        timeout_s = limits.get("body_timeout_s")
        try:
            request = await asyncio.wait_for(anext(requests, None), timeout_s)
        except asyncio.TimeoutError:
            raise Problem("body-timeout", f"the call sent no request message within {timeout_s:g} s (at the proxy)")
        if request is None:
            raise Problem("malformed-request", "the call sent no request message (at the proxy)")
        most = limits.get("max_request_bytes")
        if most is not None and isinstance(request, Message) and (size := request.ByteSize()) > most:
            raise Problem("payload-too-large", f"the message is {size} bytes; the limit is {most} (at the proxy)")
        return request

    @staticmethod
    def _refuse(refusal: Problem, context, metadata, method: str) -> bytes:
        from serve.grpc_servicer import status_for
        from serve.request_ids import valid_request_id

        request_id = valid_request_id(next((value for key, value in metadata if key == "request_id"), None))
        note_refusal(refusal, "grpc", method, request_id)
        # Ray's proxy sends request_id back with every call it routes; a client reads a refusal's by the same key
        status_for(refusal, context, request_id, [("request_id", request_id)])
        return b""
