"""Locust load test for the service: REST users (multipart) and gRPC users, photo-like inputs.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000                        # web UI
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 2m \\
        --stop-timeout 150 --csv out/locust --html out/locust.html                        # headless

--stop-timeout, longer than ROREM_TIMEOUT_S (120 s) and a margin (benchlib.locust_stop_timeout_s), lets the
requests still running when -t ends finish and count: without it locust kills them at once and the slowest
requests vanish from the figures (the percentiles biased low).

Knobs (environment variables):
  ROREM_MIX      sizes and weights of the inputs, e.g. "512:6,1024:3,12mp:1" (default)
  ROREM_GRPC     host:port of the gRPC API (default: the --host's host, port 9000; needed with gRPC users when
                 --host names another port than 8000: the gRPC port does not follow it)
  ROREM_GRPC_APPLICATION  the Serve application gRPC calls name, where one cluster serves several (default: none,
                 which a cluster of one application takes)
  ROREM_GATE     gate mode sent with every request (default: the service's)
  ROREM_USERS    "rest:3,grpc:1" user-class weights (default); "rest:1,grpc:0" for REST only
  ROREM_TIMEOUT_S  seconds a REST or gRPC request may take before it counts as failed (default 120)
  ROREM_API_KEY  the API key of a service with keys on, sent as `x-api-key` (REST header, gRPC metadata)

Every answer is checked: a 200 must carry an image of the input's size (its header: decoding a 12 MP
answer would block every user of this gevent process and add to the next ones' times), else the request
is counted as failed (so a smoke run fails on any error, any stall past ROREM_TIMEOUT_S or any response
without a valid image). The inputs of ROREM_MIX are built when locust starts, before any user runs (the
12 MP photo takes seconds, which the first request of each size otherwise paid and every user waited).
A refusal because the service is busy (a problem of serve.problems.LOAD_REFUSALS, too-many-requests or
overloaded, with Retry-After; over gRPC its `problem-type` and `retry-after` metadata, or Ray's proxy's
RESOURCE_EXHAUSTED for backpressure) is what the service does under overload, not an error: it is reported
under its own name ("/remove 512 refused 429") so the removals' latencies are the removals', and the user
waits the Retry-After before its next request, as a well-behaved client does. Every other error is a
failure, Retry-After or not: a 503 replica-failed, not-ready or stopping says something broke.
A key's own quota's 429 (its problem names the `quota`, serve/quotas.py; over gRPC in the error's details) is
neither: the client asked past its limit, the service is not shedding load (its metrics call it
outcome="over_quota"). It is reported under a name of its own ("/remove 512 over quota 429", "Remove 512 over
quota RESOURCE_EXHAUSTED"), not as a failure nor as a refusal, and its Retry-After is waited out too.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from functools import cache

import gevent
import numpy as np
from benchlib import (  # locust puts loadtests/ on sys.path
    api_key_headers, over_quota, parsed_problem, problem_slug, request_timeout_s, rest_over_quota, rest_refusal,
    retry_after_s, valid_image,
)  # fmt: skip
from locust import HttpUser, User, between, events, task
from locust.runners import MasterRunner
from PIL import Image

from serve.grpc_client import API_KEY_ENV
from serve.ports import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, url_host
from serve.problems import LOAD_REFUSALS

SIZES = {"512": (512, 512), "1024": (1024, 1024), "12mp": (4000, 3000)}
MASK_FRACTIONS = (0.05, 0.15, 0.3)


def _weights(text: str) -> dict[str, int]:
    pairs = (item.split(":") for item in text.split(",") if item.strip())
    return {name.strip(): int(weight) for name, weight in pairs}


MIX = _weights(os.environ.get("ROREM_MIX", "512:6,1024:3,12mp:1"))
USER_WEIGHTS = _weights(os.environ.get("ROREM_USERS", "rest:3,grpc:1"))
GATE = os.environ.get("ROREM_GATE", "")
REQUEST_TIMEOUT_S = request_timeout_s()  # HttpSession has none: a hang fails
CREDENTIALS = api_key_headers(os.environ.get(API_KEY_ENV))


@cache
def photo_png(size: str) -> bytes:
    """A photo-like image: smooth gradients plus texture and edges (compresses like a photo, not like noise)."""
    width, height = SIZES[size]
    rng = np.random.default_rng(len(size))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 1 - x / width], axis=-1) * 180 + 40
    texture = rng.normal(0, 12, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    image = np.clip(base + texture, 0, 255).astype(np.uint8)
    image[height // 3 : height // 2, width // 4 : width // 2] = (200, 60, 40)
    return _png(image)


@cache
def mask_png(size: str, fraction: float) -> bytes:
    width, height = SIZES[size]
    mask = np.zeros((height, width), np.uint8)
    h, w = int(height * fraction), int(width * fraction)
    top, left = height // 3, width // 4
    mask[top : top + h, left : left + w] = 255
    return _png(mask)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def pick_input() -> tuple[str, bytes, bytes]:
    size = random.choices(list(MIX), weights=list(MIX.values()))[0]
    return size, photo_png(size), mask_png(size, random.choice(MASK_FRACTIONS))


@events.init.add_listener
def check_grpc_target(environment, **_kwargs) -> None:
    """With gRPC users, a --host off the default HTTP port needs ROREM_GRPC: refused here, at the start, where each
    gRPC user failed to start instead and the run sent nothing until its -t ran out. Before build_inputs (listeners
    run in the order they are added): a refusal came after seconds of building the 12 MP inputs."""
    if not USER_WEIGHTS.get("grpc", 1):
        return
    try:
        grpc_target(environment.host, os.environ.get("ROREM_GRPC"))
    except ValueError as exc:
        sys.exit(f"locustfile: {exc} (or ROREM_USERS=rest:1,grpc:0 for REST users only)")


@events.init.add_listener
def build_inputs(environment, **_kwargs) -> None:
    """Every input of MIX, before any user runs: built inside a task, the 12 MP photo (seconds) blocked every
    gevent user and counted in the response times of the requests waiting behind it."""
    if isinstance(environment.runner, MasterRunner):
        return  # the workers send
    for size in MIX:
        photo_png(size)
        for fraction in MASK_FRACTIONS:
            mask_png(size, fraction)
    # gevent's timers count from the loop's clock, which stood still while the inputs were built (seconds for the
    # 12 MP photo): locust's -t timer, set next, fired that much early (a 3 s run lasted 5 ms and sent nothing)
    gevent.get_hub().loop.update_now()


def image_problem(content: bytes, size: str) -> str | None:
    """None if `content` is an image of the input's size (benchlib.valid_image: the header only), else what."""
    return None if valid_image(content, SIZES[size]) else f"not a valid image of {SIZES[size]}"


def grpc_refusal(code: str, details: str | None, trailing: dict) -> bool:
    """Whether a gRPC error is a load refusal: a problem-type of LOAD_REFUSALS with retry-after, or Ray's gRPC
    proxy's backpressure, a RESOURCE_EXHAUSTED with neither (docs/reliability.md)."""
    if "problem-type" not in trailing:
        return code == "RESOURCE_EXHAUSTED" and "backpressure" in (details or "")
    if grpc_over_quota(details, trailing):
        return False
    return problem_slug(trailing["problem-type"]) in LOAD_REFUSALS and bool(trailing.get("retry-after"))


def grpc_over_quota(details: str | None, trailing: dict) -> bool:
    """Whether a gRPC error is a key's quota's refusal: with retry-after, its details (the problem+json document)
    naming the quota, as a REST answer's body does (benchlib.rest_over_quota)."""
    return bool(trailing.get("retry-after")) and over_quota(parsed_problem(details))


class RestUser(HttpUser):
    """POST /remove with multipart uploads, PNG out."""

    weight = USER_WEIGHTS.get("rest", 3)
    wait_time = between(0.0, 0.5)

    def on_start(self):
        self.client.headers.update(CREDENTIALS)

    @task
    def remove(self):
        size, image, mask = pick_input()
        data = {"output_format": "png", "seed": str(random.getrandbits(31))}
        if GATE:
            data["gate"] = GATE
        files = {"image": ("image.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}
        name = f"/remove {size}"
        with self.client.post(
            "/remove", files=files, data=data, name=name, catch_response=True, timeout=REQUEST_TIMEOUT_S
        ) as response:
            refused = rest_refusal(response.headers, response.content or b"")
            quota = rest_over_quota(response.headers, response.content or b"")
            if refused or quota:
                reason = "refused" if refused else "over quota"
                response.request_meta["name"] = f"{name} {reason} {response.status_code}"
                response.success()
            elif response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or str(response.error))[:200]}")
            elif problem := image_problem(response.content, size):
                response.failure(problem)
        if refused or quota:
            gevent.sleep(retry_after_s(response.headers.get("retry-after")))


class GrpcUser(User):
    """ObjectRemoval/Remove over gRPC, reporting to locust like an HTTP request."""

    weight = USER_WEIGHTS.get("grpc", 1)
    wait_time = between(0.0, 0.5)

    def __init__(self, environment):
        super().__init__(environment)
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        from serve.grpc_client import open_channel, stub

        target = grpc_target(environment.host, os.environ.get("ROREM_GRPC"))
        self.channel = open_channel(target, os.environ.get("ROREM_GRPC_APPLICATION"))
        self.stub = stub(self.channel)

    def on_stop(self):
        self.channel.close()

    @task
    def remove(self):
        import grpc

        from serve import rorem_pb2 as pb

        size, image, mask = pick_input()
        request = pb.RemoveRequest(image=image, mask=mask, output_format="png", seed=random.getrandbits(31), gate=GATE)
        started = time.perf_counter()
        exception, length, name, refused, retry_after, reply = None, 0, f"Remove {size}", False, None, None
        try:
            reply = self.stub.Remove(request, timeout=REQUEST_TIMEOUT_S, metadata=tuple(CREDENTIALS.items()))
        except grpc.RpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            quota = grpc_over_quota(error.details(), trailing)
            if quota or grpc_refusal(error.code().name, error.details(), trailing):
                reason = "over quota" if quota else "refused"
                name, refused = f"Remove {size} {reason} {error.code().name}", True
                retry_after = trailing.get("retry-after")
            else:
                exception = RuntimeError(f"{error.code().name}: {(error.details() or '')[:200]}")
        response_time = (time.perf_counter() - started) * 1000  # the answer's arrival, as locust times REST users
        if reply is not None:
            length = len(reply.image)
            if problem := image_problem(reply.image, size):
                exception = RuntimeError(problem)
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={},
        )
        if refused:
            gevent.sleep(retry_after_s(retry_after))


def grpc_target(host: str | None, given: str | None) -> str:
    """ROREM_GRPC, else the --host's host at the default gRPC port, which only a --host at the default HTTP port
    implies: with --host :8700 the gRPC users loaded whatever listened on :9000 (another test run's Serve)."""
    from urllib.parse import urlparse

    if given:
        return given
    url = urlparse(host or f"http://127.0.0.1:{DEFAULT_HTTP_PORT}")
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)  # the scheme's port where the URL names none
    if port != DEFAULT_HTTP_PORT:
        raise ValueError(f"--host {host} is not on port {DEFAULT_HTTP_PORT}: set ROREM_GRPC=host:port for gRPC users")
    return f"{url_host(url.hostname or '127.0.0.1')}:{DEFAULT_GRPC_PORT}"
