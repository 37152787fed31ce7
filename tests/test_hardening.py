"""Access control, load shedding, deadlines and faults, against a local Serve with API keys on.

The fault tests kill real replica processes (SIGKILL) and check what a client sees: every request
answered (a result, or a problem+json 503 with Retry-After), nothing past the deadline, /readyz
dropping and recovering, and the quality gate degrading as configured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import yaml

from serve import rorem_pb2 as pb
from serve.auth import new_key_entry
from serve.grpc_client import open_channel
from serve.rorem_pb2_grpc import ObjectRemovalStub
from tests.conftest import REPO, photo, png_bytes, running_service, serve_test_config

sys.path.insert(0, str(REPO / "loadtests"))
from soak import replica_pids, run_soak

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 30.0
MAX_IN_FLIGHT = 4


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    work = tmp_path_factory.mktemp("hardened")
    app_key, app_entry = new_key_entry("app-team", ["remove", "score"])
    ops_key, ops_entry = new_key_entry("ops", ["remove", "score", "feedback", "admin"])
    (work / "keys.yaml").write_text(yaml.safe_dump({"keys": [app_entry, ops_entry]}))
    config = serve_test_config(work)
    args = config["applications"][0]["args"]
    args["auth"] = {"enabled": True, "keys_file": str(work / "keys.yaml")}
    args["overload"] = {"max_in_flight": MAX_IN_FLIGHT, "retry_after_s": 3, "max_queue_wait_s": None}
    args["gate"]["on_scorer_error"] = "fail_closed"
    args["scorer"]["timeout_s"] = 2.0
    args["request_timeout_s"] = REQUEST_TIMEOUT_S
    with running_service(work, config) as service:
        service.app_key, service.ops_key, service.work = app_key, ops_key, work
        yield service


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


def _serve_session(service) -> int:
    """The process session of this test's Serve: its CLI was started with setsid, Ray and the replicas inherit it."""
    config_path = str(service.work / "serve.yaml")
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    (pid,) = [int(line.split(None, 1)[0]) for line in table.splitlines() if "serve run" in line and config_path in line]
    return os.getsid(pid)


def _replica_pids(service, deployment: str) -> list[int]:
    return replica_pids(deployment, session=_serve_session(service))


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


def test_a_key_without_the_scope_is_forbidden(hardened):
    forbidden = httpx.delete(hardened.url + "/results/0123", headers={"x-api-key": hardened.app_key})
    _assert_problem(forbidden, 403, "forbidden")
    assert "app-team" in forbidden.json()["detail"]


def test_grpc_needs_a_key_in_metadata(hardened, upload):
    stub = ObjectRemovalStub(open_channel(hardened.grpc_target))
    request = pb.RemoveRequest(image=upload["image"], mask=upload["mask"], gate="off")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Remove(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unauthorized" in caught.value.details()
    reply = stub.Remove(request, timeout=120, metadata=[("x-api-key", hardened.app_key)])
    assert reply.image and reply.bucket > 0


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
    stub = ObjectRemovalStub(open_channel(hardened.grpc_target))
    request = pb.RemoveRequest(image=upload["image"], mask=upload["mask"], gate="off", timeout_s=0.01)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Remove(request, timeout=60, metadata=[("x-api-key", hardened.app_key)])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "/timeout" in caught.value.details()


def test_scorer_down_fails_closed_for_retry_and_annotates_unscored(hardened, upload):
    (scorer,) = _replica_pids(hardened, "Scorer")
    os.kill(scorer, signal.SIGKILL)
    closed = _remove(hardened, upload, key=hardened.app_key, gate="retry")
    _assert_problem(closed, 503, "scorer-unavailable")
    assert closed.headers["retry-after"] == "3"
    annotated = _remove(hardened, upload, key=hardened.app_key, gate="annotate")
    assert annotated.status_code == 200 and annotated.headers["x-gate"] == "unscored"
    _wait_ready(hardened)
    scored = _remove(hardened, upload, key=hardened.app_key, gate="annotate")
    assert scored.headers["x-gate"] in ("passed", "failed") and "x-removal-score" in scored.headers


def test_a_killed_remover_drops_readiness_until_it_is_replaced(hardened, upload):
    (remover,) = _replica_pids(hardened, "Remover")
    os.kill(remover, signal.SIGKILL)
    readiness = []
    for _ in range(6):
        readiness.append(httpx.get(hardened.url + "/readyz", timeout=10).status_code)
        time.sleep(0.5)
    assert 503 in readiness, readiness
    _wait_ready(hardened)
    new_pids = _replica_pids(hardened, "Remover")
    assert new_pids and remover not in new_pids
    assert _remove(hardened, upload, key=hardened.app_key, gate="off").status_code == 200


def test_chaos_soak_loses_no_request(hardened):
    """Replicas killed under steady load: every request gets an answer, a result or a clear 503."""
    report = run_soak(
        hardened.url, seconds=30, clients=3, side=256, headers={"x-api-key": hardened.app_key},
        fields={"gate": "annotate"}, client_timeout_s=REQUEST_TIMEOUT_S + 10, chaos_every_s=7,
        chaos_deployments=("Remover", "Scorer"), serve_session=_serve_session(hardened),
    )  # fmt: skip
    print(report)
    assert len(report.kills) >= 3
    assert report.lost == 0 and report.sent == report.answered
    assert report.bad_result == 0 and report.bad_error == 0
    assert set(report.errored) <= {"503", "504"}, report.errored  # a replacement slower than the deadline: 504
    assert report.ok > 0
    _wait_ready(hardened)
