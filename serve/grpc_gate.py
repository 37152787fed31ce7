"""API keys checked at Ray's gRPC proxy, before a call is routed to an Ingress replica.

The HTTP proxy refuses a body without a valid key before reading it (serve.proxy_middleware.BodyBuffer). Ray's
gRPC proxy has no middleware hook, so a keyless call (up to max_upload_bytes) was parsed, pickled and queued to an
Ingress replica, which only then refused it. Ray's server (gRPCGenericServer) makes each method's handler with its
`service_handler_factory`, for the generic and the registered-method paths alike: wrapping that factory before the
service registers puts this gate in front of both. Any valid key of the called application passes here; the
Ingress still checks the key's scope and quotas. Applications are told apart by the `application` metadata Ray
routes by (a cluster of one application takes calls without it).
"""

from __future__ import annotations

import json
import os

from serve.problems import Problem

KEYS_ENV = "ROREM_GRPC_KEYS"  # {application: {"keys_file", "keys_reload_s"} or null}, set by serve.proxy_limits
APPLICATION_METADATA = "application"  # the metadata Ray's gRPC proxy routes a call by


def install(server, service_prefix: str) -> None:
    """Gate the unary methods under `service_prefix` ("/package.Service/") of a Ray gRPC server, where an
    application has keys on; a server that is not Ray's (tests, the generated stubs) is left as it is."""
    spec = os.environ.get(KEYS_ENV)
    factory = getattr(server, "service_handler_factory", None)
    if not spec or factory is None:
        return
    gate = KeyGate(json.loads(spec))
    if not gate.policies:
        return

    def gated_factory(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method.startswith(service_prefix) and getattr(streaming_type, "name", "") == "UNARY_UNARY":
            return gate.wrap(handler)
        return handler

    server.service_handler_factory = gated_factory


class KeyGate:
    def __init__(self, applications: dict[str, dict | None]):
        from serve.proxy_middleware import proxy_keys

        self.names = list(applications)
        self.policies = {
            name: proxy_keys(spec["keys_file"], spec.get("keys_reload_s"))
            for name, spec in applications.items()
            if spec
        }

    def policy(self, metadata):
        """The called application's access policy; None where it has no keys or is not known here (Ray answers)."""
        named = next((value for key, value in metadata if key == APPLICATION_METADATA), None)
        if named is None and len(self.names) == 1:
            named = self.names[0]
        return self.policies.get(named)

    def wrap(self, handler):
        async def unary_unary(request, context):
            metadata = tuple(context.invocation_metadata() or ())
            policy = self.policy(metadata)
            if policy is not None:
                try:
                    await policy.check_grpc(None, metadata, context.peer())
                except Problem as refusal:
                    return self._refuse(refusal, context, metadata)
            return await handler(request, context)

        return unary_unary

    @staticmethod
    def _refuse(refusal: Problem, context, metadata) -> bytes:
        from serve.grpc_servicer import status_for
        from serve.metrics import proxy_metrics
        from serve.request_ids import valid_request_id

        proxy_metrics().refused(refusal.problem)
        given = next((value for key, value in metadata if key == "request_id"), None)
        status_for(refusal, context, valid_request_id(given))
        return b""
