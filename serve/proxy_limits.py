"""How large a request Ray's proxies may take in, and how long its body may take to arrive, derived from each
application's `imaging` and `overload` settings.

Ray's gRPC proxy reads a whole request before any replica sees it, up to RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
(2 GiB by default). Its HTTP proxy reads the body without a bound, and hands the request to a replica
before the body is in; the proxy middleware (serve.proxy_middleware.BodyBuffer) bounds the body and
holds the request until its body is in. All of this is set per Ray process, from the environment, so
`python -m serve run` (serve.cli) and the Kubernetes manifests (k8s/render.py) put `proxy_env(config)`
into the environment of the Ray processes they start. The HTTP settings are per application (by route
prefix: one proxy serves them all); gRPC's message limit is one number for the process, the largest any application
needs, and the gate (serve.grpc_gate) holds each application's call to its own. The app's own checks
(serve.protocol: 413 `payload-too-large`, 408 `body-timeout`) stay the exact ones; these bounds keep a larger or
slower request out of the proxies' memory and off the replicas.
"""

from __future__ import annotations

import json

from serve.config import AppSettings, ImagingSettings, app_name, route_prefix
from serve.grpc_gate import APPS_ENV as GRPC_APPS_ENV
from serve.grpc_servicer import MAX_REQUEST_ENV
from serve.proxy_middleware import CALLBACK_ENV, CALLBACK_PATH, RETRY_AFTER_ENV, ROUTES_ENV

GRPC_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # ray/serve/_private/constants.py, read at import
# How long a proxy being drained (its node scaled down) keeps taking requests at least. Ray counts a request as
# ongoing only once BodyBuffer hands it on, so the proxy must not go while a body may still be arriving.
PROXY_DRAINING_ENV = "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"  # same file
RAY_PROXY_DRAINING_S = 30.0  # Ray's default
# How long a node that gets SIGTERM (a deleted or evicted pod: `ray start --block` is its PID 1) drains before Ray
# kills its processes; the drain ends as soon as the node is idle. Ray's 30 s default cut requests still in
# flight on the pod: it must outlast the longest one (its body's time, then the proxy's request timeout).
# `python -m serve run` stops Ray its own way (serve.launcher), so locally Ray never reads it.
NODE_DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # ray/_private/ray_constants.py
GRPC_MESSAGE_CEILING = 2**31 - 1  # Ray's default and gRPC's own maximum (a signed 32-bit length)

# Protobuf framing of the request's fields (a tag and a varint length each) and its options: a few
# hundred bytes; a generous margin costs nothing.
GRPC_REQUEST_SLACK = 64 * 1024
# The largest encoded reply per pixel: 8-bit RGBA PNG (4 bytes) plus its per-row filter byte, zlib
# and chunk framing; a 1-pixel-wide strip maximises those (measured 4.53 bytes/pixel; JPEG and WebP
# replies are smaller at the sizes their side limits allow). tests/test_lifecycle.py checks it.
REPLY_BYTES_PER_PIXEL = 5
REPLY_SLACK = 1024 * 1024  # encoder headers, JPEG's 16-pixel blocks on small images, the reply's other fields


def grpc_max_message_bytes(imaging: ImagingSettings) -> int:
    """The gRPC proxy's message limit. Ray applies one number to both directions, so it is the larger of:

    - a request: the files of one request together are at most `max_upload_bytes` (the app checks the
      sum, serve.protocol.check_upload_size), so one upload plus framing, not two;
    - a reply: the encoded result, which can be larger than the upload (a JPEG in, a PNG out), bounded
      by `max_megapixels`.
    A request over this limit is refused by the proxy with RESOURCE_EXHAUSTED before it is buffered
    whole; one between `max_upload_bytes` and this limit reaches the app (over grpc_max_request_bytes, as a
    stand-in without its bytes), which answers RESOURCE_EXHAUSTED `payload-too-large`.
    """
    request = grpc_max_request_bytes(imaging)
    reply = int(imaging.max_megapixels * 1e6) * REPLY_BYTES_PER_PIXEL + REPLY_SLACK
    return min(max(request, reply), GRPC_MESSAGE_CEILING)


def grpc_max_request_bytes(imaging: ImagingSettings) -> int:
    """The largest request message: the files of one request together (serve.protocol.check_upload_size) and the
    framing. One over it is not pickled to a replica (serve.grpc_servicer.OversizedMessage)."""
    return imaging.max_upload_bytes + GRPC_REQUEST_SLACK


def http_max_body_bytes(imaging: ImagingSettings) -> int:
    """The HTTP proxy's body limit: the largest body the app reads (JSON, base64 is 4/3 of the files)."""
    from serve.uploads import largest_json_body

    return largest_json_body(imaging.max_upload_bytes)


PROXY_ENV_NAMES = (
    GRPC_MESSAGE_ENV, MAX_REQUEST_ENV, GRPC_APPS_ENV, ROUTES_ENV, RETRY_AFTER_ENV, PROXY_DRAINING_ENV, NODE_DRAIN_ENV,
    CALLBACK_ENV,
)  # fmt: skip
"""Every name proxy_env may set (k8s/render.py replaces these in a manifest and keeps any other)."""


def proxy_routes(config: dict) -> dict[str, dict]:
    """BodyBuffer's settings for each application's route prefix (serve.proxy_middleware.ByRoutePrefix)."""
    routes = {}
    for app in config["applications"]:
        if route_prefix(app) is None:
            continue  # gRPC only: no HTTP request reaches it
        settings = AppSettings.model_validate(app.get("args") or {})
        body_limit = http_max_body_bytes(settings.imaging)
        if settings.overload.proxy_buffer_bytes < body_limit:
            raise ValueError(
                f"application {app_name(app)!r}: overload.proxy_buffer_bytes ({settings.overload.proxy_buffer_bytes}) "
                f"is below the largest body the app accepts ({body_limit} bytes, from imaging.max_upload_bytes): "
                "such a body could never arrive"
            )
        route = {
            "limit": body_limit,
            "timeout_s": settings.overload.body_timeout_s,
            "max_held": settings.overload.proxy_buffer_bytes,
        }
        route |= keys_at_the_proxy(settings) or {}  # a body without a valid key is refused before it is read
        routes[route_prefix(app)] = route
    return routes


def keys_at_the_proxy(settings: AppSettings) -> dict | None:
    """Where the proxies read an application's API keys (serve.proxy_middleware.proxy_keys); None where keys are off."""
    auth = settings.auth
    return {"keys_file": auth.keys_file, "keys_reload_s": auth.reload_interval_s} if auth.enabled else None


def grpc_apps(config: dict) -> dict[str, dict]:
    """What the gRPC proxy's gate (serve.grpc_gate) checks of each application's calls, by name: its keys
    (keys_at_the_proxy), its largest request message and how long that may take to come. Every application is
    named: a call without the `application` metadata goes to the only one."""
    apps = {}
    for app in config["applications"]:
        settings = AppSettings.model_validate(app.get("args") or {})
        apps[app_name(app)] = {
            "keys": keys_at_the_proxy(settings),
            "max_request_bytes": grpc_max_request_bytes(settings.imaging),
            "body_timeout_s": settings.overload.body_timeout_s,
        }
    return apps


def proxy_env(config: dict) -> dict[str, str]:
    """The environment the Ray processes need for these limits (the proxies read it when they start), for a
    whole Serve config (every application)."""
    routes = proxy_routes(config)
    apps = [AppSettings.model_validate(app.get("args") or {}) for app in config["applications"]]
    body_timeout_s = max(settings.overload.body_timeout_s for settings in apps)
    return {
        GRPC_MESSAGE_ENV: str(max(grpc_max_message_bytes(settings.imaging) for settings in apps)),
        MAX_REQUEST_ENV: str(max(grpc_max_request_bytes(settings.imaging) for settings in apps)),
        GRPC_APPS_ENV: json.dumps(grpc_apps(config), sort_keys=True),
        ROUTES_ENV: json.dumps(routes, sort_keys=True),
        RETRY_AFTER_ENV: str(max(settings.overload.retry_after_s for settings in apps)),
        PROXY_DRAINING_ENV: str(max(RAY_PROXY_DRAINING_S, body_timeout_s)),
        NODE_DRAIN_ENV: str(body_timeout_s + longest_request_s(config, apps)),
        CALLBACK_ENV: CALLBACK_PATH,
    }


def longest_request_s(config: dict, apps: list[AppSettings]) -> float:
    """The longest a request may run once its body is in: the proxies' `request_timeout_s` (HTTP or gRPC), where
    set, which come after the applications' own deadline (serve.config.check_proxy_timeout), else that deadline."""
    proxies = [(config.get(section) or {}).get("request_timeout_s") for section in ("http_options", "grpc_options")]
    return max([float(s) for s in proxies if s and s > 0] + [app.request_timeout_s for app in apps])
