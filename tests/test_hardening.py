"""Access control, load shedding, deadlines and faults, against a local Serve with API keys on, mounted
at a non-root route_prefix (so the access rules are shown not to depend on the path's spelling).

The fault tests kill real replica processes (SIGKILL) and check what a client sees: every request
answered (a result, or a problem+json 503 with Retry-After), nothing past the deadline, /readyz
dropping and recovering, and the quality gate degrading as configured.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from serve import rorem_pb2 as pb
from serve.rorem_pb2_grpc import ObjectRemovalStub
from tests.helpers import Keyed, load_script, photo, png_bytes

soak = load_script("loadtests/soak.py")

REQUEST_TIMEOUT_S, MAX_IN_FLIGHT, BODY_TIMEOUT_S = Keyed.REQUEST_TIMEOUT_S, Keyed.MAX_IN_FLIGHT, Keyed.BODY_TIMEOUT_S


@pytest.fixture
def hardened(keyed_service):
    return keyed_service


@pytest.fixture(scope="module")
def upload():
    image = photo(256, 256)
    mask = np.zeros((256, 256), np.uint8)
    mask[100:140, 110:150] = 255
    return {"image": png_bytes(image), "mask": png_bytes(mask)}


def _remove(service, upload, key=None, **fields):
    headers = {"x-api-key": key} if key else {}
    return httpx.post(
        service.url + "/remove", files=upload, data={k: str(v) for k, v in fields.items()}, headers=headers, timeout=120
    )


def _assert_problem(response, status, problem):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/" + problem)


def _replica_pids(service, deployment: str) -> list[int]:
    instance, application = soak.service_identity(service.url)
    assert application == service.app_name
    return soak.replica_pids(deployment, instance, application)


def _wait_ready(service, timeout_s: float = 180.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(service.url + "/readyz", timeout=10).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"/readyz did not recover within {timeout_s} s")


def test_health_probes_are_public_and_work_needs_a_key(hardened, upload):
    assert httpx.get(hardened.url + "/healthz").status_code == 200
    assert httpx.get(hardened.url + "/readyz").status_code == 200
    missing = _remove(hardened, upload)
    _assert_problem(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    _assert_problem(_remove(hardened, upload, key="rk_not-a-key"), 401, "unauthorized")
    assert _remove(hardened, upload, key=hardened.app_key, gate="off").status_code == 200
    bearer = httpx.post(
        hardened.url + "/remove", files=upload, data={"gate": "off"}, timeout=120,
        headers={"authorization": f"Bearer {hardened.app_key}"},
    )  # fmt: skip
    assert bearer.status_code == 200


def test_a_key_without_the_scope_is_forbidden_under_a_route_prefix(hardened):
    assert hardened.url.endswith(Keyed.ROUTE_PREFIX)
    forbidden = httpx.delete(hardened.url + "/results/0123", headers={"x-api-key": hardened.app_key})
    _assert_problem(forbidden, 403, "forbidden")
    assert "app-team" in forbidden.json()["detail"]
    for path in ("/results/0123", "/results/0123/source", "/annotation/queue"):
        _assert_problem(httpx.get(hardened.url + path, headers={"x-api-key": hardened.app_key}), 403, "forbidden")
        _assert_problem(httpx.get(hardened.url + path), 401, "unauthorized")
    ops = httpx.delete(hardened.url + "/results/" + "0" * 32, headers={"x-api-key": hardened.ops_key})
    _assert_problem(ops, 404, "not-found")


def test_the_route_prefix_answers_at_its_own_address_without_a_trailing_slash(hardened):
    """Without Starlette's slash redirect (which sent /playground/ to the client's own Host), GET /keyed matched no
    route: the address the READY line prints for an app under a route_prefix answered 404."""
    assert not hardened.url.endswith("/")
    bare = httpx.get(hardened.url, follow_redirects=False)
    assert bare.status_code == 307 and bare.headers["location"] == f"{Keyed.ROUTE_PREFIX}/playground", bare.headers
    assert httpx.get(hardened.url + "/playground").status_code == 200


def test_grpc_needs_a_key_in_metadata(hardened, upload):
    stub = ObjectRemovalStub(hardened.channel())
    request = pb.RemoveRequest(image=upload["image"], mask=upload["mask"], gate="off")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Remove(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unauthorized" in caught.value.details()
    reply = stub.Remove(request, timeout=120, metadata=[("x-api-key", hardened.app_key)])
    assert reply.image and reply.bucket > 0


def test_the_bundled_grpc_client_sends_a_key_from_its_option_or_the_environment(hardened, upload, tmp_path, monkeypatch):
    """The README's gRPC client had no way to send a key: with keys on it could only get UNAUTHENTICATED."""
    from serve import grpc_client

    (tmp_path / "photo.png").write_bytes(upload["image"])
    (tmp_path / "mask.png").write_bytes(upload["mask"])
    args = ["remove", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), "-o", str(tmp_path / "out.png")]
    args += ["--gate", "off"]
    monkeypatch.delenv(grpc_client.API_KEY_ENV, raising=False)
    assert grpc_client.main(["--target", hardened.grpc_target, "--application", hardened.app_name, *args]) == 1
    assert grpc_client.main(["--target", hardened.grpc_target, "--application", hardened.app_name, "--api-key", hardened.app_key, *args]) == 0
    monkeypatch.setenv(grpc_client.API_KEY_ENV, hardened.app_key)
    (tmp_path / "out.png").unlink()
    assert grpc_client.main(["--target", hardened.grpc_target, "--application", hardened.app_name, *args]) == 0 and (tmp_path / "out.png").stat().st_size


def _trickle(url: str, key: str, answers: list, stop: threading.Event) -> None:
    """A client that declares a 100 KB multipart body and sends a few bytes a second; records (status, seconds)."""
    parsed = urllib.parse.urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as conn:
        conn.sendall(
            f"POST {parsed.path}/remove HTTP/1.1\r\nHost: {parsed.hostname}\r\nX-API-Key: {key}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n".encode()
        )
        conn.settimeout(0.5)
        reply, sending = b"", True
        while not stop.is_set() and time.monotonic() - started < 30:
            if sending and not reply:  # once the answer starts, more bytes would only make the server reset
                try:
                    conn.sendall(b"--x")
                except OSError:  # the server answered and closed its side: what it sent is still to be read
                    sending = False
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:  # reset: nothing more will come
                break
            if not chunk:
                break
            reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            if length and len(body) >= int(length.group(1)):
                break
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1") else None
    answers.append((status, time.monotonic() - started, reply))


def test_slow_uploads_hold_no_slot_and_are_cut_off(hardened, upload):
    answers, stop = [], threading.Event()
    tricklers = [
        threading.Thread(target=_trickle, args=(hardened.url, hardened.app_key, answers, stop))
        for _ in range(MAX_IN_FLIGHT + 2)
    ]
    for thread in tricklers:
        thread.start()
    time.sleep(1.0)
    try:
        assert _remove(hardened, upload, key=hardened.app_key, gate="off").status_code == 200, "no slot is held"
    finally:
        for thread in tricklers:
            thread.join(timeout=40)
        stop.set()
    assert len(answers) == len(tricklers)
    for status, seconds, reply in answers:
        assert status == 408 and b"body-timeout" in reply, reply[:300]
        assert seconds < BODY_TIMEOUT_S + 5, seconds


def test_without_a_valid_key_an_upload_is_refused_before_its_body_is_read(hardened):
    """The proxy holds arriving bodies for key holders only: a keyless or unknown-key upload is answered 401 at
    once, not after the body timeout, so an anonymous client cannot fill the proxy's buffer."""
    answers, stop = [], threading.Event()
    for key in ("", "rk_not-a-key"):
        _trickle(hardened.url, key, answers, stop)
    for status, seconds, reply in answers:
        assert status == 401 and b"unauthorized" in reply and b"www-authenticate" in reply.lower(), reply[:300]
        assert seconds < BODY_TIMEOUT_S / 2, seconds


def test_a_retained_result_is_seen_and_labelled_only_by_its_owner_or_a_reviewer(hardened, upload):
    def as_(name_or_key):
        return {"x-api-key": hardened.people.get(name_or_key, name_or_key)}

    kept = httpx.post(
        hardened.url + "/remove", files=upload, data={"gate": "off", "retain": "true"}, headers=as_("alice"), timeout=120
    )
    assert kept.status_code == 200, kept.text
    result_id = kept.headers["x-result-id"]
    verdict = {"result_id": result_id, "verdict": "yes"}
    for stranger in ("bob", "dave"):  # another key's (or team's) result is "not found"
        for path in (f"/results/{result_id}", *(f"/results/{result_id}/{kind}" for kind in ("source", "mask", "result"))):
            _assert_problem(httpx.get(hardened.url + path, headers=as_(stranger)), 404, "not-found")
        _assert_problem(httpx.post(hardened.url + "/feedback", json=verdict, headers=as_(stranger)), 404, "not-found")
        queue = httpx.get(hardened.url + "/annotation/queue", params={"limit": 200}, headers=as_(stranger)).json()
        assert result_id not in [item["id"] for item in queue["items"]]
    assert httpx.get(hardened.url + f"/results/{result_id}/source", headers=as_("alice")).content == upload["image"]
    reviewer_queue = httpx.get(
        hardened.url + "/annotation/queue", params={"limit": 200}, headers=as_(hardened.reviewer_key)
    ).json()
    assert result_id in [item["id"] for item in reviewer_queue["items"]]
    labelled = httpx.post(hardened.url + "/feedback", json=verdict, headers=as_(hardened.reviewer_key))
    assert labelled.status_code == 201 and labelled.json()["label"] == "yes"
    assert httpx.post(hardened.url + "/feedback", json=verdict, headers=as_("alice")).status_code == 201
    shared = httpx.post(
        hardened.url + "/remove", files=upload, data={"gate": "off", "retain": "true"}, headers=as_("dave"), timeout=120
    ).headers["x-result-id"]
    assert httpx.get(hardened.url + f"/results/{shared}", headers=as_("erin")).status_code == 200, "a team shares"
    _assert_problem(httpx.get(hardened.url + f"/results/{shared}", headers=as_("alice")), 404, "not-found")


def test_a_request_id_is_echoed_only_when_it_is_a_valid_one(hardened):
    from serve.proxy_middleware import REQUEST_ID_PATTERN

    assert httpx.get(hardened.url + "/healthz", headers={"x-request-id": "abc-1.2_3"}).headers["x-request-id"] == "abc-1.2_3"
    for bad in ("x" * 5000, "a b", "<script>"):
        echoed = httpx.get(hardened.url + "/healthz", headers={"x-request-id": bad}).headers["x-request-id"]
        assert echoed != bad and re.fullmatch(REQUEST_ID_PATTERN, echoed)
    problem = httpx.get(hardened.url + "/results/x", headers={"x-request-id": "y" * 300})
    assert "y" * 300 not in problem.text


def test_ray_s_proxy_bounds_a_request_s_headers_keys_on_or_off(hardened):
    """Before any key is read: one endless header grew the proxy's memory (serve.proxy_connections)."""
    from serve.proxy_connections import MAX_HEAD_BYTES

    too_large = httpx.get(hardened.url + "/healthz", headers={"x-padding": "p" * MAX_HEAD_BYTES})
    _assert_problem(too_large, 431, "headers-too-large")
    assert httpx.get(hardened.url + "/healthz", headers={"x-padding": "p" * 8192}).status_code == 200


def test_keys_never_reach_the_logs(hardened, upload):
    _remove(hardened, upload, key=hardened.app_key, gate="off")
    _remove(hardened, upload, key=hardened.app_key + "x", gate="off")
    log = hardened.log_path.read_text(errors="replace")
    assert hardened.app_key not in log and hardened.ops_key not in log


def test_past_the_in_flight_limit_requests_are_shed_with_429(hardened, upload):
    with ThreadPoolExecutor(3 * MAX_IN_FLIGHT) as pool:
        answers = list(pool.map(lambda _: _remove(hardened, upload, key=hardened.app_key, gate="off"), range(12)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for shed in (a for a in answers if a.status_code == 429):
        _assert_problem(shed, 429, "too-many-requests")
        assert shed.headers["retry-after"] == "3"


def test_a_client_deadline_answers_504(hardened, upload):
    started = time.monotonic()
    late = _remove(hardened, upload, key=hardened.app_key, gate="off", timeout_s=0.01)
    _assert_problem(late, 504, "timeout")
    assert time.monotonic() - started < 5
    _assert_problem(_remove(hardened, upload, key=hardened.app_key, timeout_s=-1), 422, "invalid-request")
    stub = ObjectRemovalStub(hardened.channel())
    request = pb.RemoveRequest(image=upload["image"], mask=upload["mask"], gate="off", timeout_s=0.01)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Remove(request, timeout=60, metadata=[("x-api-key", hardened.app_key)])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "/timeout" in caught.value.details()


SCORING_BACK_WITHIN_S = 30.0


@pytest.mark.chaos
def test_scorer_down_fails_closed_for_retry_and_annotates_unscored(hardened, upload):
    (scorer,) = _replica_pids(hardened, "Scorer")
    os.kill(scorer, signal.SIGKILL)
    closed = _remove(hardened, upload, key=hardened.app_key, gate="retry")
    _assert_problem(closed, 503, "scorer-unavailable")
    assert closed.headers["retry-after"] == "3"
    annotated = _remove(hardened, upload, key=hardened.app_key, gate="annotate")
    assert annotated.status_code == 200 and annotated.headers["x-gate"] == "unscored"
    # the default mode (annotate) answers without the Scorer: the pods stay ready, marked degraded
    degraded = _wait_status(hardened, "degraded")
    assert degraded["missing"] == ["Scorer"] and "no running replica" in degraded["why"]["Scorer"], degraded
    _wait_status(hardened, "ready", timeout_s=180.0)
    # Serve's published state can lead the Ingress's handle by a moment, and the new replica's first scoring on a
    # busy runner can outlast this app's 2 s scorer timeout (a CI run's first removal after "ready" was unscored):
    # scoring is back within seconds
    started = time.monotonic()
    scored = _remove(hardened, upload, key=hardened.app_key, gate="annotate")
    while scored.headers.get("x-gate") == "unscored" and time.monotonic() - started < SCORING_BACK_WITHIN_S:
        time.sleep(0.5)
        scored = _remove(hardened, upload, key=hardened.app_key, gate="annotate")
    assert scored.headers.get("x-gate") in ("passed", "failed") and "x-removal-score" in scored.headers, (
        scored.status_code,
        scored.headers.get("x-gate"),
        scored.text[:300],
    )


def _wait_status(service, status: str, timeout_s: float = 10.0) -> dict:
    """/readyz's body once its status is `status` (200 answers: "ready", or "degraded" without the Scorer)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        answer = httpx.get(service.url + "/readyz", timeout=10)
        if answer.status_code == 200 and answer.json()["status"] == status:
            return answer.json()
        time.sleep(0.25)
    pytest.fail(f"/readyz did not say {status!r} within {timeout_s} s: {answer.status_code} {answer.text}")


def _wait_unready(service, timeout_s: float = 10.0) -> list[int]:
    """/readyz until it answers 503: Serve notices a killed replica at its next health check
    (health_check_period_s: 2) and /readyz follows Serve's published state within a second."""
    readiness = []
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        readiness.append(httpx.get(service.url + "/readyz", timeout=10).status_code)
        if readiness[-1] == 503:
            break
        time.sleep(0.25)
    return readiness


@pytest.mark.chaos
def test_a_killed_remover_drops_readiness_until_it_is_replaced(hardened, upload):
    (remover,) = _replica_pids(hardened, "Remover")
    os.kill(remover, signal.SIGKILL)
    readiness = _wait_unready(hardened)
    assert 503 in readiness, readiness
    _wait_ready(hardened)
    new_pids = _replica_pids(hardened, "Remover")
    assert new_pids and remover not in new_pids
    assert _remove(hardened, upload, key=hardened.app_key, gate="off").status_code == 200


@pytest.mark.chaos
def test_chaos_soak_loses_no_request(hardened):
    """Replicas killed under steady load: every request gets an answer, a result or a clear 503."""
    report = soak.run_soak(
        hardened.url, seconds=24, clients=3, side=256, headers={"x-api-key": hardened.app_key},
        fields={"gate": "annotate"}, client_timeout_s=REQUEST_TIMEOUT_S + 10, chaos_every_s=6,
        chaos_deployments=("Remover", "Scorer"),
    )  # fmt: skip
    print(report)
    assert len(report.kills) >= 3
    assert report.lost == 0 and report.sent == report.answered
    assert report.bad_result == 0 and report.bad_error == 0
    assert set(report.errored) <= {"503", "504"}, report.errored  # a replacement slower than the deadline: 504
    assert report.ok > 0
    _wait_ready(hardened)


def test_chaos_kills_only_the_replicas_of_the_service_it_loads(tmp_path):
    """operations.md's soak command killed the first matching replica on the machine: with another local Serve
    running (another session's tests, say), it SIGKILLed that one and counted the kill. Then it needed the
    service's process session, which nothing printed. Now the instance id and application the loaded URL's
    /healthz gives (one instance may serve several applications, each with its own Remover)."""
    processes = {
        101: ("ray::ServeReplica:rorem:Remover", "mine"),
        102: ("ray::ServeReplica:rorem:Scorer", "mine"),
        103: ("ray::ServeReplica:keyed:Remover", "mine"),
        201: ("ray::ServeReplica:rorem:Remover", "another"),
        301: ("python -m serve run", "mine"),
        401: ("ray::ServeReplica:rorem:Remover", None),  # not started by the CLI
    }
    for pid, (title, instance) in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(title.encode() + b"\0")
        environ = [b"PATH=/usr/bin"] + ([f"ROREM_INSTANCE_ID={instance}".encode()] if instance else [])
        (tmp_path / str(pid) / "environ").write_bytes(b"\0".join(environ) + b"\0")
    assert soak.replica_pids("Remover", "mine", "rorem", proc=tmp_path) == [101]
    assert soak.replica_pids("Scorer", "mine", "rorem", proc=tmp_path) == [102]
    assert soak.replica_pids("Remover", "mine", "keyed", proc=tmp_path) == [103]
    assert soak.replica_pids("Remover", "another", "rorem", proc=tmp_path) == [201]
    assert soak.replica_pids("Remover", "mi", "rorem", proc=tmp_path) == [], "the whole id, not a prefix"
