"""The proxies' request limits: derived from `imaging`, wide enough for every valid request and reply,
enforced in Ray's HTTP proxy by serve.proxy_middleware, and the same in the Kubernetes manifests.

The gRPC proxy refusing a message over its limit is checked against a running service in
tests/test_lifecycle.py (it shares that module's service)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re

import numpy as np
import pytest
import yaml

from engines.imaging import MAX_OUTPUT_SIDE, encode_image
from serve import rorem_pb2 as pb
from serve.auth import AccessPolicy, ApiKeys, new_key_entry
from serve.config import ImagingSettings
from serve.proxy_limits import (
    GRPC_MESSAGE_ENV,
    NODE_DRAIN_ENV,
    PROXY_DRAINING_ENV,
    RAY_PROXY_DRAINING_S,
    REPLY_BYTES_PER_PIXEL,
    REPLY_SLACK,
    grpc_max_message_bytes,
    http_max_body_bytes,
    proxy_env,
)
from serve.proxy_middleware import (
    DEFAULT_RETRY_AFTER_S,
    DRAIN_PATH,
    RAY_ROUTES_PATH,
    REQUEST_ID_PATTERN,
    ROUTES_ENV,
    BodyBuffer,
    ByRoutePrefix,
    Drain,
    middlewares,
    route_matches,
)
from tests.helpers import logged_by_ray_serve, record_proxy_metrics

IMAGING = ImagingSettings(max_upload_bytes=6 * 1024 * 1024, max_megapixels=0.5)


def _config(*apps: dict) -> dict:
    """A Serve config of these applications' args: "rorem" at /, then "app1" at /app1, ..."""
    return {
        "applications": [
            {"name": "rorem" if i == 0 else f"app{i}", "route_prefix": "/" if i == 0 else f"/app{i}", "args": args}
            for i, args in enumerate(apps)
        ]
    }


def test_a_largest_valid_grpc_request_fits_and_the_limit_is_far_below_ray_default():
    upload = IMAGING.max_upload_bytes
    remove = pb.RemoveRequest(
        image=b"\xff" * (upload - 1), mask=b"\xff", seed=2**64 - 1, output_format="webp", quality=100, dilate=256,
        gate="annotate", gate_threshold=0.5, max_attempts=8, retain=True, timeout_s=120.0,
    )  # fmt: skip
    score = pb.ScoreRequest(source=b"\xff" * (upload - 2), mask=b"\xff", edited=b"\xff", dilate=256, gate_threshold=0.5)
    limit = grpc_max_message_bytes(IMAGING)
    assert remove.ByteSize() <= limit and score.ByteSize() <= limit
    assert grpc_max_message_bytes(ImagingSettings()) < 2**31 // 8  # defaults: ~200 MB, not Ray's 2 GiB


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("shape", [(700, 700), (100_000, 1), (65_500, 1), (50_000, 2), (7_000, 7), (16_383, 30)])
def test_the_largest_reply_fits_the_grpc_limit(fmt, shape):
    """Noise (incompressible) at quality 100 with alpha, in the shapes that maximise per-row and per-block
    overhead: the encoded result stays within REPLY_BYTES_PER_PIXEL (the limit covers replies too)."""
    height, width = shape
    if height > MAX_OUTPUT_SIDE.get(fmt, height):
        pytest.skip(f"{fmt} output is limited to {MAX_OUTPUT_SIDE[fmt]} pixels per side")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
    reply = pb.RemoveReply(image=encode_image(rgb, alpha, fmt, 100), media_type=f"image/{fmt}", request_id="r" * 128)
    assert reply.ByteSize() <= height * width * REPLY_BYTES_PER_PIXEL + REPLY_SLACK
    imaging = ImagingSettings(max_upload_bytes=1024, max_megapixels=height * width / 1e6)
    assert reply.ByteSize() <= grpc_max_message_bytes(imaging)


def test_the_http_limit_admits_the_largest_json_body_the_app_accepts():
    upload = IMAGING.max_upload_bytes
    body = json.dumps(
        {"image": base64.b64encode(b"\xff" * (upload - 1)).decode(), "mask": base64.b64encode(b"\xff").decode(),
         "seed": 2**63, "output_format": "webp", "quality": 100, "dilate": 256, "gate": "annotate",
         "gate_threshold": 0.5, "max_attempts": 8, "retain": True, "timeout_s": 120.0}
    ).encode()  # fmt: skip
    assert len(body) <= http_max_body_bytes(IMAGING) < 2 * len(body)


# --- the middlewares, as Ray's proxy (uvicorn) runs them: one task per request ------------------------


class Exchange:
    """One ASGI request: the body in chunks; what the client receives."""

    def __init__(self, chunks: list[bytes], headers: dict[str, str] | None = None, path: str = "/remove"):
        self.scope = {
            "type": "http", "method": "POST", "path": path,
            "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        }  # fmt: skip
        self.chunks = list(chunks)
        self.sent: list[dict] = []

    async def receive(self):
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        await asyncio.sleep(3600)

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self):
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def body(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


async def reading_app(scope, receive, send):
    """The proxy behind the middleware: reads the whole body, answers 200 with its size."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})


def test_a_body_over_the_limit_is_refused_at_the_proxy_by_length_or_while_streaming():
    limit = BodyBuffer(reading_app, limit=1000)
    declared = Exchange([b"x" * 10], {"content-length": "1001"})
    chunked = Exchange([b"x" * 600, b"x" * 600, b"x" * 600])
    fits = Exchange([b"x" * 500, b"x" * 500])

    async def main():
        for exchange in (declared, chunked, fits):
            await limit(exchange.scope, exchange.receive, exchange.send)

    asyncio.run(main())
    assert declared.status == 413 and declared.body["type"].endswith("/payload-too-large")
    assert chunked.status == 413 and "1000" in chunked.body["detail"]
    assert len(chunked.chunks) == 1, "the proxy stopped reading at the limit"
    assert [m for m in chunked.sent if m["type"] == "http.response.start"] == chunked.sent[:1], "one answer only"
    assert fits.status == 200 and fits.body == {"size": 1000}


class Trickle(Exchange):
    """A client that sends its body a chunk every `every_s`, or hangs up after its chunks."""

    def __init__(self, chunks: list[bytes], every_s: float, hang_up: bool = False):
        super().__init__(chunks + ([] if hang_up else [b""]))
        self.every_s = every_s
        self.hang_up = hang_up

    async def receive(self):
        if self.chunks:
            await asyncio.sleep(self.every_s)
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.hang_up}
        if self.hang_up:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)


@pytest.mark.timing
def test_no_request_reaches_the_app_before_its_whole_body_is_in_at_the_proxy():
    """Ray's proxy gives a request to a replica as soon as its headers are in: a client trickling its body
    would hold one of the replica's max_ongoing_requests all the while. Behind BodyBuffer the app (Ray's
    proxy) sees a request only once its body is in; a slow one gets 408, one that hangs up nothing."""
    reached: list[float] = []
    loop_time = None

    async def app(scope, receive, send):
        reached.append(loop_time())
        await reading_app(scope, receive, send)

    async def main():
        nonlocal loop_time
        loop_time = asyncio.get_running_loop().time
        buffer = BodyBuffer(app, limit=1000, timeout_s=0.5)
        slow_but_in_time = Trickle([b"a" * 100, b"b" * 100, b"c" * 100], every_s=0.05)
        too_slow = Trickle([b"x" * 10] * 20, every_s=0.1)
        gone = Trickle([b"x" * 10, b"y" * 10], every_s=0.05, hang_up=True)
        started = loop_time()
        await asyncio.gather(*(buffer(e.scope, e.receive, e.send) for e in (slow_but_in_time, too_slow, gone)))
        assert buffer.held == 0, "every byte is given back: handed on, timed out or hung up"
        return started, slow_but_in_time, too_slow, gone

    started, in_time, too_slow, gone = asyncio.run(main())
    assert len(reached) == 1 and reached[0] - started >= 0.15, "only the complete body reached the app, once in"
    assert in_time.status == 200 and in_time.body == {"size": 300}, "the app read the body as sent"
    assert too_slow.status == 408 and too_slow.body["type"].endswith("/body-timeout")
    assert "0.5 s" in too_slow.body["detail"] and "at the proxy" in too_slow.body["detail"]
    assert gone.sent == [], "a client that hung up mid-body: no answer, and no replica heard of it"


def test_the_body_that_would_overfill_the_proxy_buffer_gets_503_and_the_others_keep_arriving():
    """Bytes count as they arrive: a client that declares a body and sends nothing holds none."""

    async def main():
        buffer = BodyBuffer(reading_app, limit=1000, timeout_s=5, max_held=1500)
        declared_only = Exchange([], {"content-length": "1000"})
        first = Trickle([b"x" * 800, b"x" * 100], every_s=0.2)
        second = Trickle([b"y" * 100, b"y" * 700, b"y" * 100], every_s=0.15)
        tasks = [asyncio.create_task(buffer(e.scope, e.receive, e.send)) for e in (declared_only, first, second)]
        await asyncio.sleep(0.25)
        held = buffer.held  # 800 + 100 arrived; the declared 1000 count nothing
        no_room = Exchange([b"n" * 700], {"content-length": "700"})
        await buffer(no_room.scope, no_room.receive, no_room.send)
        await asyncio.wait(tasks[1:])
        tasks[0].cancel()
        after = Exchange([b"z" * 10])
        await buffer(after.scope, after.receive, after.send)
        return held, first, second, after, buffer.held, no_room

    held, first, second, after, held_at_end, no_room = asyncio.run(main())
    assert held == 900
    assert no_room.status == 503 and no_room.chunks == [b"n" * 700], "900 + 700 > 1500: refused before it is read"
    assert second.status == 503 and second.body["type"].endswith("/overloaded"), "its 700 would make 1600 > 1500"
    assert "proxy_buffer_bytes" in second.body["detail"] and (b"retry-after", b"2") in second.sent[0]["headers"]
    assert first.status == 200 and first.body == {"size": 900}, "the body within the buffer kept arriving"
    assert after.status == 200 and held_at_end == 0, "every byte is given back once its request is handed on or ends"


def test_the_applications_of_a_proxy_share_its_buffer():
    """Each application's max_held bounds the bytes arriving in the proxy for all of them: counted apart, four
    applications could hold four buffers' worth."""

    async def main():
        proxy = ByRoutePrefix(reading_app, {"/": {"limit": 1000, "max_held": 1500}, "/b": {"limit": 1000, "max_held": 1500}})
        stalled = Trickle([b"x" * 900, b"x" * 50], every_s=0.2)
        task = asyncio.create_task(proxy(stalled.scope, stalled.receive, stalled.send))
        await asyncio.sleep(0.3)  # 900 arrived for "/", its last 50 still to come
        other = Exchange([b"y" * 700], {"content-length": "700"}, path="/b/remove")
        await proxy(other.scope, other.receive, other.send)
        await task
        return stalled, other

    stalled, other = asyncio.run(main())
    assert other.status == 503 and other.chunks == [b"y" * 700], "900 + 700 > 1500: refused before it is read"
    assert stalled.status == 200


def test_a_full_buffer_still_passes_requests_without_a_body_such_as_the_probes():
    """A GET has neither Content-Length nor Transfer-Encoding: it needs none of the buffer. A chunked upload
    may need up to the limit, so it waits for room like any upload."""

    async def main():
        buffer = BodyBuffer(reading_app, limit=1000, timeout_s=5, max_held=1500)
        stalled = Trickle([b"x" * 900, b"x" * 50], every_s=0.1)
        task = asyncio.create_task(buffer(stalled.scope, stalled.receive, stalled.send))
        await asyncio.sleep(0.15)  # 900 held: no room for a body of up to 1000
        probe = Exchange([b""], path="/readyz")
        probe.scope["method"] = "GET"
        chunked = Exchange([b"c" * 10], {"transfer-encoding": "chunked"})
        for exchange in (probe, chunked):
            await buffer(exchange.scope, exchange.receive, exchange.send)
        await task
        return probe, chunked, stalled

    probe, chunked, stalled = asyncio.run(main())
    assert probe.status == 200 and probe.body == {"size": 0}
    assert chunked.status == 503 and chunked.chunks == [b"c" * 10], "refused unread"
    assert stalled.status == 200


def test_a_proxy_buffer_smaller_than_the_largest_body_is_refused_at_start():
    with pytest.raises(ValueError, match="proxy_buffer_bytes"):
        proxy_env(_config({"overload": {"proxy_buffer_bytes": http_max_body_bytes(ImagingSettings()) - 1}}))


def test_each_application_gets_its_own_body_settings_and_grpc_the_largest_limit(tmp_path):
    """One proxy serves every application of a cluster: its HTTP settings are each application's, by route prefix;
    gRPC's message limit and the draining period, one number for the process, are the largest any needs."""
    from serve.grpc_gate import APPS_ENV as GRPC_APPS_ENV
    from serve.grpc_servicer import MAX_REQUEST_ENV
    from serve.proxy_limits import GRPC_REQUEST_SLACK

    small = {"imaging": {"max_upload_bytes": 1024, "max_megapixels": 0.1}, "overload": {"body_timeout_s": 5}}
    keyed = {"auth": {"enabled": True, "keys_file": str(tmp_path / "keys.yaml")}, "overload": {"body_timeout_s": 90}}
    env = proxy_env(_config({}, small, keyed))
    routes = json.loads(env[ROUTES_ENV])
    assert set(routes) == {"/", "/app1", "/app2"}
    assert routes["/app1"]["limit"] == http_max_body_bytes(ImagingSettings(max_upload_bytes=1024)) < routes["/"]["limit"]
    assert (routes["/"]["timeout_s"], routes["/app1"]["timeout_s"], routes["/app2"]["timeout_s"]) == (60, 5, 90)
    assert [("keys_file" in routes[p]) for p in ("/", "/app1", "/app2")] == [False, False, True]
    assert int(env[GRPC_MESSAGE_ENV]) == grpc_max_message_bytes(ImagingSettings()), "the default app's, the largest"
    request_limit = int(env[MAX_REQUEST_ENV])
    assert request_limit == ImagingSettings().max_upload_bytes + GRPC_REQUEST_SLACK < int(env[GRPC_MESSAGE_ENV])
    assert float(env[PROXY_DRAINING_ENV]) == 90 > RAY_PROXY_DRAINING_S
    assert float(env[NODE_DRAIN_ENV]) == 90 + 120, "the longest body, then the applications' deadline"
    keys_file = {"keys_file": str(tmp_path / "keys.yaml"), "keys_reload_s": 10.0}
    grpc = json.loads(env[GRPC_APPS_ENV])  # the gRPC gate's, by name: each application's own limits (a gRPC trial)
    assert {name: app["keys"] for name, app in grpc.items()} == {"rorem": None, "app1": None, "app2": keys_file}
    assert grpc["app1"]["max_request_bytes"] == 1024 + GRPC_REQUEST_SLACK < grpc["rorem"]["max_request_bytes"]
    assert [grpc[name]["body_timeout_s"] for name in ("rorem", "app1", "app2")] == [60, 5, 90]
    alone = {ROUTES_ENV: json.dumps({"/": routes["/"]}), PROXY_DRAINING_ENV: "60.0", NODE_DRAIN_ENV: "180.0"}
    assert proxy_env(_config({})) == {**env, **alone, GRPC_APPS_ENV: json.dumps({"rorem": grpc["rorem"]})}
    behind_proxy_timeouts = _config({}, small, keyed) | {"http_options": {"request_timeout_s": 180}}
    assert float(proxy_env(behind_proxy_timeouts)[NODE_DRAIN_ENV]) == 90 + 180, "the proxy's timeout, past the app's"
    grpc_only = _config({}, small)
    grpc_only["applications"][1]["route_prefix"] = None  # no HTTP route reaches it
    assert set(json.loads(proxy_env(grpc_only)[ROUTES_ENV])) == {"/"}


def test_the_proxys_own_retry_after_is_the_longest_its_applications_configure():
    """The proxy's stopping, replica-failed and Ray's 503 said Retry-After 2 (a constant) where the application's
    own not-ready, replica-failed and overloaded said its overload.retry_after_s: an operator's 10 s reached only
    some answers. The proxies, shared by every application (one served over gRPC only too), now say the longest of
    theirs; 2 without any, or with a value that is no whole number of seconds."""
    import subprocess
    import sys

    from serve.config import OverloadSettings
    from serve.proxy_middleware import RETRY_AFTER_ENV
    from tests.helpers import REPO

    assert DEFAULT_RETRY_AFTER_S == OverloadSettings().retry_after_s
    config = _config({}, {"overload": {"retry_after_s": 7}}, {"overload": {"retry_after_s": 30}})
    config["applications"][2]["route_prefix"] = None  # gRPC only: no HTTP route, no entry in ROREM_PROXY_ROUTES
    env = proxy_env(config)
    assert env[RETRY_AFTER_ENV] == "30" and "retry_after_s" not in env[ROUTES_ENV]
    said = "from serve import proxy_middleware as p; print(p.retry_after_s(), p.stopping('now').headers['Retry-After'])"
    for given, expected in ((env[RETRY_AFTER_ENV], "30 30"), ("", "2 2"), ("x", "2 2"), ("0", "2 2"), ("²", "2 2")):
        run = subprocess.run(
            [sys.executable, "-c", said], cwd=REPO, env={**os.environ, RETRY_AFTER_ENV: given}, capture_output=True,
            text=True, check=True,
        )  # fmt: skip
        assert run.stdout.split() == expected.split(), given


def test_a_request_meets_the_body_limit_of_the_application_its_path_belongs_to():
    routes = {"/": {"limit": 1000}, "/api/v1": {"limit": 100}, "/api/v1/big": {"limit": 5000}}
    proxy = ByRoutePrefix(reading_app, routes)

    def send(path: str, size: int, headers: dict | None = None) -> int:
        exchange = Exchange([b"x" * size], {"content-length": str(size), **(headers or {})}, path=path)
        asyncio.run(proxy(exchange.scope, exchange.receive, exchange.send))
        return exchange.status

    assert (send("/remove", 500), send("/api/v1/remove", 500), send("/api/v1", 500)) == (200, 413, 413)
    assert send("/api/v1x/remove", 500) == 200, "a prefix takes whole path segments (Ray's rule): this is /'s"
    assert (send("/api/v1/big/remove", 4000), send("/api/v1/bigger", 4000)) == (200, 413)

    def behind_root_path(path: str, size: int) -> int:
        """uvicorn puts http_options.root_path in front of every path; Ray routes by what follows it."""
        exchange = Exchange([b"x" * size], {"content-length": str(size)}, path="/rorem" + path)
        exchange.scope["root_path"] = "/rorem"
        asyncio.run(proxy(exchange.scope, exchange.receive, exchange.send))
        return exchange.status

    assert (behind_root_path("/remove", 500), behind_root_path("/api/v1/remove", 500)) == (200, 413)

    only_prefixed = ByRoutePrefix(reading_app, {"/api/v1": {"limit": 100}})
    unread = Exchange([b"x" * 10], {"content-length": "10"}, path="/elsewhere")
    asyncio.run(only_prefixed(unread.scope, unread.receive, unread.send))
    assert unread.status == 404 and unread.body["type"].endswith("/not-found") and unread.chunks, "refused unread"
    probe = Exchange([], {}, path="/elsewhere")  # no body: Ray answers its own 404 (RayAnswers words it)
    probe.scope["method"] = "GET"
    reached = []

    async def ray_proxy(scope, receive, send):
        reached.append(scope["path"])

    asyncio.run(ByRoutePrefix(ray_proxy, {"/api/v1": {"limit": 100}})(probe.scope, probe.receive, probe.send))
    assert reached == ["/elsewhere"]
    assert [route_matches("/", p) for p in ("/", "/x", "")] == [True, True, False]
    assert [route_matches("/a", p) for p in ("/a", "/a/", "/a/b", "/ab", "/")] == [True, True, True, False, False]


def test_with_keys_on_rays_route_list_is_not_found_at_the_proxy(tmp_path):
    """Ray's proxy answers GET /-/routes itself, with no key: every route prefix and application name. With keys
    on (any application's) it is the 404 of a path no application serves; behind root_path too. Without keys,
    and for /-/healthz (the probes'), Ray answers."""
    keyed = {"/": {"limit": 1000}, "/app1": {"limit": 1000, "keys_file": str(tmp_path / "keys.yaml")}}

    def get(routes: dict, path: str, root_path: str = "") -> tuple[int | None, list[str]]:
        reached = []

        async def ray_proxy(scope, receive, send):
            reached.append(scope["path"])

        exchange = Exchange([b""], {}, path=root_path + path)  # a GET: an empty body at once
        exchange.scope.update(method="GET", root_path=root_path)
        asyncio.run(ByRoutePrefix(ray_proxy, routes)(exchange.scope, exchange.receive, exchange.send))
        return exchange, reached

    refused, reached = get(keyed, RAY_ROUTES_PATH)
    assert refused.status == 404 and refused.body["type"].endswith("/not-found") and reached == []
    assert refused.body["detail"] == "no application serves '/-/routes' (at the proxy)"
    assert get(keyed, RAY_ROUTES_PATH, root_path="/rorem")[0].status == 404
    assert get(keyed, "/-/healthz")[1] == ["/-/healthz"]
    assert get({"/": {"limit": 1000}}, RAY_ROUTES_PATH)[1] == [RAY_ROUTES_PATH], "no keys: Ray's list, as before"
    assert get(keyed, "/-/routes/x")[1] == ["/-/routes/x"], "Ray answers the exact path only"


def test_the_app_gets_the_body_in_few_chunks_and_then_the_client_s_own_receive():
    """A body sent in tiny packets is kept and replayed in 64 KiB chunks (a message per packet would cost far
    more than its bytes), never joined whole on the proxy's loop; after it the app's receive is the client's,
    so Ray's proxy still sees a disconnect and cancels the request."""
    got: list[dict] = []

    async def app(scope, receive, send):
        while not got or got[-1]["type"] != "http.disconnect":
            got.append(await receive())

    class HangsUpAfter(Exchange):
        async def receive(self):
            if self.chunks:
                return await super().receive()
            return {"type": "http.disconnect"}

    sent = [bytes([n % 251]) * 100 for n in range(3000)]  # 300,000 bytes in 100-byte packets
    exchange = HangsUpAfter(sent)
    asyncio.run(BodyBuffer(app, limit=400_000)(exchange.scope, exchange.receive, exchange.send))
    body, disconnect = got[:-1], got[-1]
    assert disconnect == {"type": "http.disconnect"}
    assert len(body) == 5 and [m["more_body"] for m in body] == [True] * 4 + [False]
    assert b"".join(m["body"] for m in body) == b"".join(sent)


def test_a_refused_body_leaves_nothing_held_and_gets_one_answer():
    async def main():
        buffer = BodyBuffer(reading_app, limit=1000, timeout_s=0.2, max_held=1500)
        too_large = Exchange([b"x" * 600, b"x" * 600])
        too_slow = Trickle([b"x" * 10] * 10, every_s=0.1)
        for exchange in (too_large, too_slow):
            await buffer(exchange.scope, exchange.receive, exchange.send)
        return buffer.held, too_large, too_slow

    held, too_large, too_slow = asyncio.run(main())
    assert held == 0 and (too_large.status, too_slow.status) == (413, 408)
    for exchange in (too_large, too_slow):
        assert [m["type"] for m in exchange.sent] == ["http.response.start", "http.response.body"]


def test_with_keys_on_only_key_holders_get_their_body_read(tmp_path):
    """An anonymous client could otherwise fill the proxy's buffer: a body needs a valid key (any scope: the
    route's is the app's to check) before any of it is read. A request without a body passes (probes)."""
    key, entry = new_key_entry("app", ["remove"])
    reader_key, reader_entry = new_key_entry("reader", ["feedback"])
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [entry, reader_entry]}))
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await reading_app(scope, receive, send)

    body = [b"x" * 100]
    refused = {
        "no key": Exchange(body, {"content-length": "100"}),
        "chunked, no key": Exchange(body, {"transfer-encoding": "chunked"}),
        "unknown key": Exchange(body, {"content-length": "100", "x-api-key": "rk_not-a-key"}),
        "not bearer": Exchange(body, {"content-length": "100", "authorization": f"Basic {key}"}),
        "not bearer, bogus header": Exchange(
            body, {"content-length": "100", "authorization": "Basic dXNlcg==", "x-api-key": "rk_bogus"}
        ),
        "chunked under a zero length": Exchange(body, {"content-length": "0", "transfer-encoding": "chunked"}),
    }
    passed = {
        "bearer": Exchange(body, {"content-length": "100", "authorization": f"Bearer {key}"}, path="/bearer"),
        "header": Exchange(body, {"content-length": "100", "x-api-key": key}, path="/header"),
        "other scope": Exchange(body, {"content-length": "100", "x-api-key": reader_key}, path="/other-scope"),
        "behind basic auth": Exchange(
            body, {"content-length": "100", "authorization": "Basic dXNlcg==", "x-api-key": key}, path="/basic"
        ),
        "probe": Exchange([b""], path="/readyz"),
    }

    async def main():
        buffer = BodyBuffer(app, limit=1000, timeout_s=5, max_held=1500, keys=AccessPolicy(ApiKeys(str(path))))
        for exchange in (*refused.values(), *passed.values()):
            await buffer(exchange.scope, exchange.receive, exchange.send)
        return buffer.held

    assert asyncio.run(main()) == 0
    for name, exchange in refused.items():
        assert exchange.status == 401 and exchange.body["type"].endswith("/unauthorized"), name
        assert (b"www-authenticate", b'Bearer realm="rorem"') in exchange.sent[0]["headers"], name
        assert exchange.chunks == body, f"{name}: refused before any of its body was read"
        assert key not in json.dumps(exchange.body), "a key is never echoed"
    assert all(exchange.status == 200 for exchange in passed.values())
    assert reached == ["/bearer", "/header", "/other-scope", "/basic", "/readyz"]


def test_the_proxy_reads_repeated_key_headers_as_the_app_does(tmp_path):
    """The first of repeated headers counts, as Starlette's request.headers reads it: a valid key after a
    bogus one is refused at the proxy (the app would refuse it too), a bogus one after a valid key passes."""
    key, entry = new_key_entry("app", ["remove"])
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [entry]}))

    def exchange(first: str, second: str) -> Exchange:
        sent = Exchange([b"x" * 10], {"content-length": "10"})
        sent.scope["headers"] += [(b"x-api-key", first.encode()), (b"x-api-key", second.encode())]
        return sent

    bogus_first, valid_first = exchange("rk_bogus", key), exchange(key, "rk_bogus")

    async def main():
        buffer = BodyBuffer(reading_app, limit=1000, keys=AccessPolicy(ApiKeys(str(path))))
        for sent in (bogus_first, valid_first):
            await buffer(sent.scope, sent.receive, sent.send)

    asyncio.run(main())
    assert (bogus_first.status, valid_first.status) == (401, 200)


def test_a_proxy_without_the_keys_file_refuses_bodies_until_the_file_is_there(tmp_path, monkeypatch):
    """A proxy on a node without the keys file (the Kubernetes head) fails closed rather than not starting;
    the proxies get the file and its reload interval from proxy_env, only while auth is on."""
    path = tmp_path / "keys.yaml"
    env = proxy_env(_config({"auth": {"enabled": True, "keys_file": str(path), "reload_interval_s": 0}}))
    route = json.loads(env[ROUTES_ENV])["/"]
    assert route["keys_file"] == str(path) and route["keys_reload_s"] == 0
    for off in ({}, {"auth": {"keys_file": str(path)}}):
        assert "keys_file" not in json.loads(proxy_env(_config(off))[ROUTES_ENV])["/"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (by_route,) = [m for m in middlewares() if m.cls is ByRoutePrefix]
    ((prefix, buffer),) = ByRoutePrefix(reading_app, **by_route.kwargs).buffers
    keys = buffer.keys
    assert prefix == "/" and isinstance(keys, AccessPolicy) and keys.keys.path == path
    key, entry = new_key_entry("app", ["remove"])

    def remove():
        exchange = Exchange([b"x" * 10], {"content-length": "10", "x-api-key": key})
        asyncio.run(BodyBuffer(reading_app, limit=1000, keys=keys)(exchange.scope, exchange.receive, exchange.send))
        return exchange.status

    assert remove() == 401
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    assert remove() == 200


@pytest.mark.parametrize("cancellation", ["raised", "caught as Ray's proxy does"])
def test_draining_answers_new_requests_503_and_in_flight_ones_finish_or_get_503(tmp_path, cancellation):
    """Past the grace period Drain cancels a request still without a response; Ray's proxy catches that
    cancellation and returns without answering (then uvicorn would send a plain 500), so the 503 must not
    depend on the cancellation coming back. RayAnswers, inside, leaves the cancelled request to Drain."""
    from serve.proxy_middleware import RayAnswers

    flag = tmp_path / "draining"
    gate = asyncio.Event

    async def main():
        finish_quick = gate()

        async def app(scope, receive, send):
            if scope["path"] == "/slow":
                if cancellation == "raised":
                    await asyncio.sleep(3600)
                return await ray_s_proxy()(scope, receive, send)
            await finish_quick.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        drain = Drain(RayAnswers(app), flag=str(flag), grace_s=0.3)
        quick, slow, new, probe = (
            Exchange([b""]),
            Exchange([b""], path="/slow"),
            Exchange([b""]),
            Exchange([], path=DRAIN_PATH),
        )
        tasks = [asyncio.create_task(drain(e.scope, e.receive, e.send)) for e in (quick, slow)]
        await asyncio.sleep(0.05)
        flag.touch()
        await drain(new.scope, new.receive, new.send)
        await drain(probe.scope, probe.receive, probe.send)
        assert probe.body == {"in_flight": 2}
        finish_quick.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        return quick, slow, new

    quick, slow, new = asyncio.run(main())
    assert quick.status == 200
    assert slow.status == 503 and slow.body["type"].endswith("/stopping") and len(slow.sent) == 2
    assert "0.3 s into the stop" in slow.body["detail"] and "not run" in new.body["detail"]
    assert all(r.body["title"].lower() not in r.body["detail"].lower() for r in (slow, new)), "the detail adds to it"
    assert new.status == 503 and (b"retry-after", b"2") in new.sent[0]["headers"]
    assert new.body["type"].endswith("/stopping"), "not a busy service: another instance can answer now"


def test_the_proxy_drops_a_request_id_it_must_not_echo_or_log():
    import asyncio

    from serve.proxy_middleware import HeaderGuard

    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))

    guard = HeaderGuard(app)
    for given, kept in [
        (b"abc-123.X_y", b"abc-123.X_y"),
        (b"a" * 128, b"a" * 128),
        (b"a" * 129, None),
        (b"id\n", None),
        (b"<script>", None),
        (b"", None),
    ]:
        asyncio.run(guard({"type": "http", "headers": [(b"x-request-id", given), (b"host", b"h")]}, None, None))
        assert seen[-1] == kept, given


@pytest.mark.parametrize(
    ("header", "value"),
    [(b"x-request-timeout-seconds", b"0"), (b"X-Request-Disconnect-Disabled", b"?1"), (b"x-session-id", b"s"),
     (b"x_session_id", b"s"), (b"serve_multiplexed_model_id", b"m1"), (b"Serve-Multiplexed-Model-Id", b"m2")],
)  # fmt: skip
def test_a_client_cannot_lift_the_proxys_timeout_or_keep_work_running_after_it_hangs_up(header, value):
    """Ray's proxy reads these per-request hints (meant for a trusted front proxy): unguarded,
    `x-request-timeout-seconds: 0` lifts http_options.request_timeout_s and `x-request-disconnect-disabled: ?1`
    keeps a request's model work going after its client has gone (Ray's own parsers say so below). The guard
    drops them, and the routing keys (session, multiplexed model id: the router remembers every new id), before
    Ray reads the headers."""
    from ray.serve._private.http_util import parse_disconnect_disabled_header, parse_request_timeout_header

    from serve.proxy_middleware import HeaderGuard

    sent = {header.lower(): value}
    if b"timeout" in header:
        assert parse_request_timeout_header(sent, 180.0) is None, "Ray would run this request without a timeout"
    if b"disconnect" in header.lower():
        assert parse_disconnect_disabled_header(sent), "Ray would not cancel this request when its client goes"

    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]))

    headers = [(header, value), (b"host", b"h"), (b"x-request-id", b"abc")]
    asyncio.run(HeaderGuard(app)({"type": "http", "headers": headers}, None, None))
    assert seen == [{b"host": b"h", b"x-request-id": b"abc"}]
    assert parse_request_timeout_header(seen[0], 180.0) == 180.0 and not parse_disconnect_disabled_header(seen[0])


def test_a_websocket_handshake_reaches_neither_the_app_nor_ray_s_routing(tmp_path, monkeypatch):
    """Ray's proxy reads its control headers (no timeout, no cancel on hang-up, session and model-id routing) from
    a WebSocket handshake as from an HTTP request, and the app has no WebSocket route: every proxy middleware
    stack refuses the handshake (close 1008 before accepting, which uvicorn answers 403)."""
    from ray.serve._private.http_util import _apply_middlewares

    from serve.proxy_middleware import DRAIN_FLAG_ENV

    reached = []

    async def ray_proxy(scope, receive, send):
        reached.append(scope)

    headers = [(b"x-request-timeout-seconds", b"0"), (b"x-request-disconnect-disabled", b"?1"),
               (b"x-session-id", b"pin"), (b"serve-multiplexed-model-id", b"m1")]  # fmt: skip
    for env in ({}, {ROUTES_ENV: json.dumps({"/": {"limit": 1000}}), DRAIN_FLAG_ENV: str(tmp_path / "draining")}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        sent = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "websocket", "path": "/v1/remove", "headers": headers}
        asyncio.run(_apply_middlewares(ray_proxy, middlewares())(scope, receive, send))
        assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}], env


@pytest.mark.parametrize(
    ("headers", "http_version", "detail"),
    [
        ([(b"host", b"a"), (b"Host", b"b")], "1.1", "more than one Host header line"),
        ([], "1.1", "an HTTP/1.1 request must have a Host header"),
        ([(b"host", b"a"), (b"content-type", b"multipart/form-data; boundary=x"), (b"content-type", b"text/plain")],
         "1.1", "more than one Content-Type header line"),
        ([], "1.0", None),
        ([(b"host", b"a"), (b"content-type", b"text/plain")], "1.1", None),
    ],
)  # fmt: skip
def test_a_head_that_says_two_things_or_names_no_host_is_refused_before_anything_else_runs(
    monkeypatch, headers, http_version, detail
):
    """Two Host lines let the first decide the app's host check, two Content-Type lines its parser (multipart then
    text/plain: 200, the reverse 415), and HTTP/1.1 without a Host passed (RFC 9112 3.2: a server must answer 400).
    Refused 400 malformed-request, named and counted, before the body limit or anything else of the proxy's runs;
    HTTP/1.0 may leave the Host out."""
    from ray.serve._private.http_util import _apply_middlewares

    recorded = record_proxy_metrics(monkeypatch)
    monkeypatch.setenv(ROUTES_ENV, json.dumps({"/": {"limit": 100}}))
    over_the_limit = [(b"content-length", b"200"), (b"x-request-id", b"given-9")]
    exchange = Exchange([b"x" * 200])
    exchange.scope.update(headers=headers + over_the_limit, http_version=http_version, root_path="")
    asyncio.run(_apply_middlewares(reading_app, middlewares())(exchange.scope, exchange.receive, exchange.send))
    if detail is None:
        assert exchange.status == 413 and recorded.refusals == ["payload-too-large"]
        return
    assert exchange.status == 400 and exchange.body["type"].endswith("/malformed-request")
    assert exchange.body["detail"] == f"{detail} (at the proxy)" and exchange.body["instance"] == "urn:request:given-9"
    assert len(exchange.chunks) == 1, "no byte of the body was read"
    assert recorded.refusals == ["malformed-request"]


def test_a_refusal_of_the_proxys_own_is_logged_on_one_line_naming_the_request(monkeypatch):
    """Neither Ray's access log nor its request counts see what the proxy's middlewares answer: an operator asked
    about a 413 found only a count. One line: the request, the answer, why, and its id; the client's path cannot
    start a line of its own."""
    from ray.serve._private.http_util import _apply_middlewares

    recorded = record_proxy_metrics(monkeypatch)
    monkeypatch.setenv(ROUTES_ENV, json.dumps({"/": {"limit": 100}}))
    exchange = Exchange([b"x" * 200], {"host": "a", "content-length": "200", "x-request-id": "given-7"})
    exchange.scope.update(path="/remove\nINFO forged", http_version="1.1", root_path="")
    with logged_by_ray_serve() as records:
        asyncio.run(_apply_middlewares(reading_app, middlewares())(exchange.scope, exchange.receive, exchange.send))
    assert exchange.status == 413 and recorded.refusals == ["payload-too-large"]
    lines = [record.getMessage() for record in records if "proxy refused" in record.getMessage()]
    assert lines == [
        "HTTP proxy refused 'POST /remove\\nINFO forged': 413 payload-too-large (request body is 200 bytes; the "
        "limit is 100 (at the proxy)) request_id=given-7"
    ], lines


@pytest.mark.parametrize(
    ("status", "text", "headers", "kind", "retry_after"),
    [
        (503, "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).", [(b"retry-after", b"2")], "overloaded", "2"),
        (503, "Deployment 'Ingress' in application 'rorem' is unavailable.", [], "not-ready", "2"),
        (503, "Deployment(name='Ingress', app='rorem') is unavailable because it failed to deploy.", [],
         "replica-failed", "2"),
        (404, "Path '/nowhere' not found. Ping http://.../-/routes for available routes.", [], "not-found", None),
        (408, "Request req-1 timed out after 180.0s.", [], "proxy-timeout", None),
    ],
)
def test_what_ray_s_proxy_answers_in_plain_text_reaches_the_client_as_problem_json(status, text, headers, kind, retry_after):
    """A full Ingress queue was answered in text/plain by Ray itself, the one error a client could not parse as
    problem+json (found by the gRPC review); the app's own answers pass untouched."""
    from serve.proxy_middleware import RayAnswers

    def ray_answering(status, content_type, body, extra=()):
        async def app(scope, receive, send):
            start = {"type": "http.response.start", "status": status,
                     "headers": [(b"content-type", content_type), *extra]}  # fmt: skip
            await send(start)
            await send({"type": "http.response.body", "body": body[:10], "more_body": True})
            await send({"type": "http.response.body", "body": body[10:]})

        return app

    exchange = Exchange([b""], path="/remove")
    asyncio.run(RayAnswers(ray_answering(status, b"text/plain; charset=utf-8", text.encode(), headers))(
        exchange.scope, exchange.receive, exchange.send))  # fmt: skip
    start = next(m for m in exchange.sent if m["type"] == "http.response.start")
    sent_headers = dict(start["headers"])
    assert exchange.status == status and sent_headers[b"content-type"] == b"application/problem+json"
    assert exchange.body["type"].endswith("/" + kind) and exchange.body["status"] == status and text[:20] in exchange.body["detail"]
    assert "/-/routes" not in exchange.body["detail"], "a route that is a 404 itself with keys on"
    assert sent_headers.get(b"retry-after") == (retry_after.encode() if retry_after else None)

    problem = json.dumps({"type": "x/overloaded", "status": 503}).encode()
    for content_type, body in ((b"application/problem+json", problem), (b"image/png", b"\x89PNG" + b"0" * 20)):
        untouched = Exchange([b""])
        asyncio.run(RayAnswers(ray_answering(503 if b"problem" in content_type else 200, content_type, body))(
            untouched.scope, untouched.receive, untouched.send))  # fmt: skip
        assert b"".join(m.get("body", b"") for m in untouched.sent if m["type"] == "http.response.body") == body


def ray_s_proxy(raised: BaseException | None = None):
    """Ray's HTTPProxy around a request (ray/serve/_private/proxy.py send_request_to_replica, by Ray's own
    functions): any error or cancellation is caught, answered only for 408, 429 and 503, and the call returns."""
    from ray.serve._private.http_util import get_http_response_status, send_http_response_on_exception

    async def app(scope, receive, send):
        try:
            if raised is not None:
                raise raised
            await asyncio.sleep(3600)
        except BaseException as caught:
            for message in send_http_response_on_exception(get_http_response_status(caught, 180.0, "req-1"), False):
                await send(message)

    return app


def test_a_request_ray_gives_up_without_an_answer_gets_a_problem_json_503_to_retry_not_a_plain_500(monkeypatch):
    """Ray's proxy sends nothing when the Ingress replica fails (its 500), and uvicorn then answers a text/plain
    500. RayAnswers answers 503 replica-failed with Retry-After instead, and its request timeout 408 as problem+json;
    a request cancelled meanwhile (Drain gives it up) is left to whoever cancelled it."""
    from serve.proxy_middleware import RayAnswers

    recorded = record_proxy_metrics(monkeypatch)
    failed, timed_out = Exchange([b""], {"x-request-id": "given-5"}), Exchange([b""])
    with logged_by_ray_serve() as records:
        asyncio.run(RayAnswers(ray_s_proxy(RuntimeError("actor died")))(failed.scope, failed.receive, failed.send))
        asyncio.run(RayAnswers(ray_s_proxy(TimeoutError()))(timed_out.scope, timed_out.receive, timed_out.send))
    warned = [record.getMessage() for record in records if record.levelno == logging.WARNING]
    assert warned == [
        "HTTP proxy answered 'POST /remove': 503 replica-failed (Ray's proxy got no answer from the Ingress replica; "
        "retry (at the proxy)) request_id=given-5"
    ], "a dead Ingress's requests: Ray's access log says 500, the client got this"
    assert failed.status == 503 and failed.body["type"].endswith("/replica-failed") and failed.body["status"] == 503
    assert (b"retry-after", b"2") in failed.sent[0]["headers"]
    assert timed_out.status == 408 and timed_out.body["type"].endswith("/proxy-timeout")
    assert recorded.answers_for_ray == ["replica-failed", "proxy-timeout"] and recorded.refusals == []
    assert dict(timed_out.sent[0]["headers"])[b"content-type"] == b"application/problem+json"

    async def cancelled_meanwhile():
        exchange = Exchange([b""])
        task = asyncio.create_task(RayAnswers(ray_s_proxy())(exchange.scope, exchange.receive, exchange.send))
        await asyncio.sleep(0.05)
        task.cancel()
        await task
        return exchange

    assert asyncio.run(cancelled_meanwhile()).sent == []


def test_what_the_proxy_refuses_itself_is_counted_by_problem_and_ray_s_own_answers_are_not(tmp_path, monkeypatch):
    """The proxy's own 401, 404, 408, 413 and 503s are answered outside Ray's request counts and never reach the
    Ingress's: an operator saw no trace of them. Ray's answers that RayAnswers rewords Ray counts itself."""
    from serve.proxy_middleware import RayAnswers

    recorded = record_proxy_metrics(monkeypatch)
    _, entry = new_key_entry("app", ["remove"])
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [entry]}))
    (tmp_path / "draining").touch()
    stack = ByRoutePrefix(reading_app, {"/app": {"limit": 100, "timeout_s": 0.2, "max_held": 50}})
    keyed = BodyBuffer(reading_app, limit=100, keys=AccessPolicy(ApiKeys(str(keys_file))))

    async def ray_503(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    slow = Trickle([b"x" * 10] * 10, every_s=0.1)
    slow.scope["path"] = "/app/remove"
    refused = [
        (stack, Exchange([b"x" * 200], {"content-length": "200"}, path="/app/remove")),
        (stack, Exchange([b"x" * 60], {"content-length": "60"}, path="/app/remove")),
        (stack, slow),
        (stack, Exchange([b"x" * 10], {"content-length": "10"}, path="/elsewhere")),
        (keyed, Exchange([b"x" * 10], {"content-length": "10"})),
        (Drain(reading_app, flag=str(tmp_path / "draining")), Exchange([b""])),
    ]
    ray_s = [(RayAnswers(ray_503), Exchange([b""])), (RayAnswers(ray_s_proxy(RuntimeError("died"))), Exchange([b""]))]

    async def main():
        for middleware, exchange in refused + ray_s:
            await middleware(exchange.scope, exchange.receive, exchange.send)

    asyncio.run(main())
    assert [exchange.status for _, exchange in refused + ray_s] == [413, 503, 408, 404, 401, 503, 503, 503]
    assert recorded.refusals == [
        "payload-too-large", "overloaded", "body-timeout", "not-found", "unauthorized", "stopping"
    ]  # fmt: skip
    # Ray counts these by status (the dead Ingress as a 500): counted apart, by their kind
    assert recorded.answers_for_ray == ["overloaded", "replica-failed"]


def test_a_request_whose_client_hung_up_is_not_counted_as_a_dead_ingress(monkeypatch):
    """Ray 2.60 gives up a request whose client disconnected by raising CancelledError into its own handler, and
    sends nothing, as for a dead Ingress: every hang-up was counted replica-failed (the fault alert's numerator)
    with a WARNING (the diff review)."""
    from serve.proxy_middleware import RayAnswers

    def hanging_up(scope, receive, send):
        async def app(scope_, receive_, send_):
            assert (await receive_())["type"] == "http.request"
            assert (await receive_())["type"] == "http.disconnect"
            await ray_s_proxy(asyncio.CancelledError())(scope_, receive_, send_)

        return app

    recorded = record_proxy_metrics(monkeypatch)
    gone = Exchange([b"x"])
    gone.chunks.append({"type": "http.disconnect"})

    async def receive():
        chunk = gone.chunks.pop(0)
        return chunk if isinstance(chunk, dict) else {"type": "http.request", "body": chunk, "more_body": False}

    with logged_by_ray_serve() as records:
        asyncio.run(RayAnswers(hanging_up(gone.scope, receive, gone.send))(gone.scope, receive, gone.send))
    assert recorded.answers_for_ray == [] and [r for r in records if r.levelno >= logging.WARNING] == []


def test_a_probe_ray_answers_while_the_service_starts_is_neither_counted_nor_logged(monkeypatch):
    """Every start logged a dozen 404s and three 503 replica-failed warnings for the CLI's /readyz polls, before
    the route and the Ingress were up, and counted them as faults; the probe's answer says so itself."""
    from serve.app import api
    from serve.auth import api_routes
    from serve.proxy_middleware import PROBE_PATHS, RayAnswers

    assert set(PROBE_PATHS) <= {route.path for route in api_routes(api)}
    recorded = record_proxy_metrics(monkeypatch)
    probes = [Exchange([b""], path=f"{prefix}{probe}") for prefix in ("", "/api/v1") for probe in PROBE_PATHS]
    with logged_by_ray_serve() as records:
        for probe in probes:
            asyncio.run(RayAnswers(ray_s_proxy(RuntimeError("starting")))(probe.scope, probe.receive, probe.send))
    assert [probe.status for probe in probes] == [503] * 4, "answered as before"
    assert recorded.answers_for_ray == [] and [r for r in records if "proxy answered" in r.getMessage()] == []


def test_the_proxy_s_own_refusals_name_the_request_as_the_app_s_answers_do(tmp_path):
    """A 413 at the proxy had no X-Request-Id and no `instance`, where the app's own 413 had both: a client quoting
    its id to support had nothing to quote."""
    (tmp_path / "draining").touch()
    stack = ByRoutePrefix(reading_app, {"/": {"limit": 100, "timeout_s": 5, "max_held": 1000}})
    drain = Drain(reading_app, flag=str(tmp_path / "draining"))
    from serve.proxy_middleware import RayAnswers

    async def ray_503(scope, receive, send):
        headers = [(b"content-type", b"text/plain"), (b"x-request-id", b"ray-named-3")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    given = Exchange([b"x" * 200], {"content-length": "200", "x-request-id": "client-id-1"})
    fresh = Exchange([b"x" * 200], {"content-length": "200"})
    stopped = Exchange([b""], {"x-request-id": "client-id-2"})
    invalid = Exchange([b"x" * 200], {"content-length": "200", "x-request-id": "not valid <x>"})
    by_ray = Exchange([b""])
    exchanges = [(stack, given), (stack, fresh), (drain, stopped), (stack, invalid), (RayAnswers(ray_503), by_ray)]

    async def main():
        for middleware, exchange in exchanges:
            await middleware(exchange.scope, exchange.receive, exchange.send)

    asyncio.run(main())
    assert "not valid" not in json.dumps(invalid.body), "without HeaderGuard in front: checked here too"
    named = ((given, "client-id-1"), (stopped, "client-id-2"), (by_ray, "ray-named-3"), (fresh, None), (invalid, None))
    for exchange, request_id in named:
        headers = dict(exchange.sent[0]["headers"])
        request_id = request_id or headers[b"x-request-id"].decode()
        assert re.fullmatch(REQUEST_ID_PATTERN, request_id)
        assert headers[b"x-request-id"] == request_id.encode()
        assert exchange.body["instance"] == f"urn:request:{request_id}"


def test_a_broken_keys_file_at_the_proxy_is_counted_where_rest_traffic_alone_reads_it(tmp_path, monkeypatch):
    """With REST traffic only the proxy may be the one reading a broken keys Secret: its failures count in
    ray_rorem_auth_keys_file_errors_total as the Ingress's do, a file missing at the proxy's start included."""
    recorded = record_proxy_metrics(monkeypatch)
    keys_file = tmp_path / "keys.yaml"
    routes = {"/": {"limit": 1000, "keys_file": str(keys_file), "keys_reload_s": 0}}
    ((_, buffer),) = ByRoutePrefix(reading_app, routes).buffers
    assert len(recorded.keys_file_errors.tags) == 1, "missing at the proxy's start"
    key, entry = new_key_entry("app", ["remove"])
    keys_file.write_text(yaml.safe_dump({"keys": [entry]}))

    def status() -> int:
        exchange = Exchange([b"x" * 10], {"content-length": "10", "x-api-key": key})
        asyncio.run(buffer(exchange.scope, exchange.receive, exchange.send))
        return exchange.status

    assert status() == 200
    keys_file.write_text("keys: [not a key]")
    assert status() == 401 and len(recorded.keys_file_errors.tags) == 2


def test_a_drain_logs_when_it_begins_and_how_many_in_flight_requests_it_cut_short(tmp_path, monkeypatch):
    """A stop's 503s were in no log: an operator could not tell a clean stop from one that cut requests off."""
    from types import SimpleNamespace

    from serve import proxy_middleware

    logged = []

    def record(*args):  # info(message, *values) or log(level, message, *values)
        message, *values = args[1:] if isinstance(args[0], int) else args
        logged.append(message % tuple(values))

    monkeypatch.setattr(proxy_middleware, "logger", SimpleNamespace(info=record, log=record))
    flag = tmp_path / "draining"

    async def stuck(scope, receive, send):
        await asyncio.sleep(3600)

    async def main():
        drain = Drain(stuck, flag=str(flag), grace_s=0.1)
        in_flight, new = Exchange([b""]), Exchange([b""])
        task = asyncio.create_task(drain(in_flight.scope, in_flight.receive, in_flight.send))
        await asyncio.sleep(0.05)
        flag.touch()
        await drain(new.scope, new.receive, new.send)
        await asyncio.wait_for(task, timeout=5)
        return in_flight.status, new.status

    assert asyncio.run(main()) == (503, 503)
    assert [line for line in logged if "proxy refused" not in line] == [
        "draining: new requests and gRPC calls get stopping; 1 requests and 0 calls in flight may finish within 0.1 s",
        "draining: answered stopping to the 1 requests and 0 gRPC calls still without an answer 0.1 s into the stop",
    ]
    assert sum(": 503 stopping (" in line for line in logged) == 2, "each answer the drain gave has its line"
