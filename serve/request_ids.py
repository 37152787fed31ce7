"""Request ids: the client's X-Request-Id when it is a valid one, else Serve's (or a fresh one)."""

import re
import uuid

from serve.proxy_middleware import REQUEST_ID_PATTERN

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def valid_request_id(given: str | None) -> str:
    """`given` where valid; for an invalid one, always the same stand-in (a gRPC client's request_id metadata
    reaches Serve's context unchecked, and the reply and the stored result must name one id); none: a fresh one."""
    if not given:
        return uuid.uuid4().hex
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid5(uuid.NAMESPACE_OID, given).hex


def serve_request_id() -> str | None:
    """Serve's id for the request in progress, when it is one we may echo and log; None outside a request."""
    try:
        from ray.serve.context import _get_serve_request_context

        given = _get_serve_request_context().request_id
    except Exception:
        return None
    return valid_request_id(given) if given else None
