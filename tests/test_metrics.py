"""Prometheus metrics: after REST and gRPC traffic, Ray's export on the metrics port holds ours."""

import json
import re
import socket
import time

import grpc
import pytest

from serve import metrics
from serve import rorem_pb2 as pb
from serve.grpc_client import stub
from tests.helpers import METRICS_EXPORT_S, REPO, RecordedMetric
from tests.helpers import box_mask as _mask
from tests.helpers import metric_samples as _samples
from tests.helpers import metric_total as _total
from tests.helpers import photo, png_bytes
from tests.helpers import post_remove as _remove
from tests.helpers import scrape_metrics as _scrape


NO_APP_ERRORS = {"serve_num_grpc_error_requests"}


def _dashboard_ray_counters() -> set[str]:
    """The counters of Ray's own that docs/grafana's dashboard queries (without "ray_" and "_total")."""
    dashboard = json.loads((REPO / "docs" / "grafana" / "rorem-dashboard.json").read_text())
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    names = set(re.findall(r"\bray_(serve_[a-z_]+)_total\{", exprs))
    assert {"serve_num_http_requests", "serve_num_grpc_error_requests"} <= names, names
    return names


def _bucket(families, name, le: float, **labels) -> float:
    """Observations <= le (a cumulative histogram bucket)."""
    return sum(s.value for s in _samples(families, name, "_bucket", **labels) if float(s.labels["le"]) == float(le))


def test_metrics_after_traffic(service):
    image, mask = png_bytes(photo()), png_bytes(_mask())
    for seed in range(3):
        assert _remove(service, image, mask, seed=seed, gate="annotate").status_code == 200
    assert _remove(service, image, mask, seed=9, gate="retry", gate_threshold=10, max_attempts=2).status_code == 200
    assert _remove(service, b"junk", mask).status_code == 422
    with service.channel() as channel:
        stub(channel).Remove(pb.RemoveRequest(image=image, mask=mask, seed=1), timeout=120)
        with pytest.raises(grpc.RpcError):
            stub(channel).Remove(pb.RemoveRequest(image=b"junk", mask=mask), timeout=120)
    with socket.create_connection(("127.0.0.1", service.ports["http"]), timeout=30) as client:  # 413 at the proxy
        client.sendall(b"POST /remove HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999999\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 413")
    refusals = metrics.PROXY_REFUSALS[: -len("_total")]

    proxy_counters = _dashboard_ray_counters()
    deadline, families = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        families = _scrape(service.metrics_url, service.app_name)  # the other applications' traffic left out
        if (
            _total(families, metrics.REQUESTS[: -len("_total")], "_total", route="/remove", protocol="grpc") >= 1
            and _total(families, metrics.GATE_OUTCOMES[: -len("_total")], "_total", mode="retry") >= 1
            and _total(families, refusals, "_total", problem="payload-too-large") >= 1
            and all(
                _total(families, name, "_total", application=service.app_name) >= 1
                for name in proxy_counters - NO_APP_ERRORS
            )
        ):
            break
        time.sleep(METRICS_EXPORT_S)
    for name in proxy_counters - NO_APP_ERRORS:  # the error share at Ray's proxy: names and labels as Ray exports them
        assert _total(families, name, "_total", application=service.app_name) >= 1, name
    # Ray's gRPC proxy counts the app's own error codes as OK (the junk call above): its error counter holds only
    # Ray's own refusals, which this traffic has none of. Ray names both protocols' counters with one pattern.
    assert _total(families, "serve_num_grpc_requests", "_total", application=service.app_name, status_code="OK") >= 2
    assert {name.replace("grpc", "http") for name in NO_APP_ERRORS} <= proxy_counters
    requests = metrics.REQUESTS[: -len("_total")]
    assert _total(families, requests, "_total", route="/remove", protocol="http", status="200", problem="none") >= 4
    assert _total(families, requests, "_total", route="/remove", protocol="http", status="422") >= 1
    assert _total(families, requests, "_total", route="/remove", protocol="grpc", status="OK") >= 1
    assert _total(families, requests, "_total", protocol="grpc", problem="invalid-image") >= 1, "the junk call's kind"
    assert _total(families, refusals, "_total", problem="payload-too-large") >= 1, "the proxy's own refusals"

    # Ray 2.60 exports a histogram's _sum approximated from bucket midpoints: check counts and buckets.
    count = _total(families, metrics.REQUEST_LATENCY, "_count", route="/remove")
    assert count >= 6
    assert _bucket(families, metrics.REQUEST_LATENCY, 120.0, route="/remove") == count, "every request under 120 s"
    assert _bucket(families, metrics.REQUEST_LATENCY, 0.005, route="/remove") < count, "a removal takes > 5 ms"
    # refusals and bad uploads apart from removals: under overload instant 429s hid the removals' latency
    assert _total(families, metrics.REQUEST_LATENCY, "_count", route="/remove", outcome="ok") >= 5
    assert _total(families, metrics.REQUEST_LATENCY, "_count", route="/remove", outcome="client_error") >= 1

    for stage in ("read", "cpu_wait", "decode", "queue_wait", "vae_encode", "unet", "vae_decode", "score", "paste", "encode"):
        assert _total(families, metrics.STAGE_LATENCY, "_count", stage=stage) >= 1, stage
    assert _total(families, metrics.LOOP_LAG, "_count") >= 1, "the Ingress's loop lag, every second from its start"
    unet = _total(families, metrics.STAGE_LATENCY, "_count", stage="unet")
    assert _bucket(families, metrics.STAGE_LATENCY, 0.005, stage="unet") < unet, "4 UNet steps take > 5 ms"

    max_batch = service.config["batching"]["max_batch_size"]
    for model in ("remover", "scorer"):
        batches = _total(families, metrics.BATCH_SIZE, "_count", model=model)
        assert batches >= 1 and _bucket(families, metrics.BATCH_SIZE, 8.5, model=model) == batches, model
    assert _bucket(families, metrics.BATCH_SIZE, max_batch + 0.5, model="remover") == _total(
        families, metrics.BATCH_SIZE, "_count", model="remover"
    ), "no Remover batch exceeds max_batch_size"

    retried = _total(families, metrics.GATE_OUTCOMES[: -len("_total")], "_total", mode="retry", verdict="failed")
    assert retried >= 1
    retry_count = _total(families, metrics.GATE_ATTEMPTS, "_count", mode="retry")
    assert retry_count - _bucket(families, metrics.GATE_ATTEMPTS, 1.5, mode="retry") >= retried, "failed retries ran > 1 attempt"
    assert _total(families, metrics.SCORES, "_count") >= 4


def test_the_api_doc_lists_the_stages_in_their_order():
    """The doc said `score, paste` where the header and the request say paste, then score."""
    doc = " ".join((REPO / "docs" / "api.md").read_text().split())
    header = doc.split("`Server-Timing` (", 1)[1].split("; ms)", 1)[0]
    assert header.split(", ") == [*metrics.STAGES, "total"]
    histogram = doc.split("`ray_rorem_stage_latency_seconds` | histogram | `stage`: ", 1)[1].split(". Counted", 1)[0]
    assert [stage.split(" (")[0] for stage in histogram.split(", ")] == list(metrics.STAGES)
    ingress = doc.split("Counted per request for the Ingress's stages (", 1)[1].split(")", 1)[0].split(", ")
    assert ingress == [stage for stage in metrics.STAGES if stage in metrics.INGRESS_STAGES]


def test_a_rest_request_the_client_hung_up_on_is_counted_499_not_as_a_server_error(monkeypatch):
    """A hang-up cancels the request's task: the counter said 500, so clients leaving looked like server faults."""
    import asyncio
    from types import SimpleNamespace

    from serve import rest_api

    answered = []
    recorder = SimpleNamespace(
        answered=lambda route, protocol, status, seconds, http_status, problem=None, over_quota=False: answered.append(
            (route, protocol, status)
        )
    )
    monkeypatch.setattr(rest_api, "ingress_metrics", lambda: recorder)

    async def hung_up(request):
        raise asyncio.CancelledError

    async def failed(request):
        raise RuntimeError("a bug")

    request = type("Request", (), {"scope": {}})()
    for call_next, error in ((hung_up, asyncio.CancelledError), (failed, RuntimeError)):
        with pytest.raises(error):
            asyncio.run(rest_api._count_requests(request, call_next))
    assert answered == [("other", "http", "499"), ("other", "http", "500")]


def test_latency_outcomes_follow_the_answers_status_and_problem():
    """Each outcome is what an operator filters on: ok removals apart from refusals (429, and the 503s that shed
    load), client errors, timeouts, server faults and hang-ups; and every outcome the service can give is one of
    them. A 503 from a failed replica or an unavailable scorer or store is a fault, not load shedding."""
    from serve.problems import KINDS

    assert [metrics.outcome_of(s) for s in (200, 201, 204, 400, 404, 413, 422, 429, 504, 500, 499)] == [
        "ok", "ok", "ok", "client_error", "client_error", "client_error", "client_error", "refused", "timeout",
        "server_error", "client_gone",
    ]  # fmt: skip
    shed = ("overloaded", "stopping", "not-ready")
    failed = ("replica-failed", "scorer-unavailable", "retention-unavailable")
    assert [metrics.outcome_of(503, problem) for problem in shed + failed] == ["refused"] * 3 + ["server_error"] * 3
    assert metrics.outcome_of(429, "too-many-requests") == "refused"
    assert metrics.outcome_of(429, "too-many-requests", over_quota=True) == "over_quota", "a key's own limit: no load"
    assert {metrics.outcome_of(kind.status, kind.slug) for kind in KINDS} <= set(metrics.OUTCOMES)
    assert metrics.LATENCY_BUCKETS_S[-1] >= 180, "up to Serve's request_timeout_s"
    assert metrics.STAGE_BUCKETS_S[0] <= 0.0005, "a stage of under a millisecond is told from one of 5 ms"


@pytest.mark.parametrize(
    ("problem", "extra", "outcome"),
    [
        ("overloaded", {}, "refused"),
        ("replica-failed", {}, "server_error"),
        ("not-found", {}, "client_error"),
        ("too-many-requests", {}, "refused"),
        ("too-many-requests", {"quota": "concurrency"}, "over_quota"),
    ],
)
def test_a_rest_answers_outcome_and_problem_label_come_from_its_problem_kind(monkeypatch, problem, extra, outcome):
    """A dying GPU replica's 503 replica-failed was counted `refused`, like load shedding: the dashboards read a
    failing model as a busy one. The request counter names the problem, so an operator sees which 503 it was. A
    key past its quota is counted apart from a busy replica's 429: the same problem, no load."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve import rest_api
    from serve.problems import STATUS_BY_PROBLEM, Problem

    recorded = metrics.IngressMetrics()
    recorded.requests, recorded.latency = RecordedMetric(), RecordedMetric()
    monkeypatch.setattr(rest_api, "ingress_metrics", lambda: recorded)
    app = FastAPI()
    for error, handler in rest_api.api.exception_handlers.items():
        app.add_exception_handler(error, handler)
    app.middleware("http")(rest_api._count_requests)

    @app.post("/remove")
    async def remove():
        raise Problem(problem, "for the test", **extra)

    path = "/nowhere" if problem == "not-found" else "/remove"
    assert TestClient(app).post(path).status_code == STATUS_BY_PROBLEM[problem]
    assert [tags["outcome"] for tags in recorded.latency.tags] == [outcome]
    assert [tags["problem"] for tags in recorded.requests.tags] == [problem]


def test_a_client_that_hangs_up_during_its_upload_is_counted_499_and_logged_as_no_error(monkeypatch, caplog):
    """Without the proxy's body buffer (a plain `serve run` of local.yaml), a hang-up while the body was read
    raised ClientDisconnect into the catch-all handler: an ERROR with a traceback, counted as a 500."""
    import asyncio
    from types import SimpleNamespace
    from serve import rest_api

    answered = []
    recorder = SimpleNamespace(
        answered=lambda route, protocol, status, seconds, http_status, problem=None, over_quota=False: answered.append(
            (status, http_status)
        )
    )
    monkeypatch.setattr(rest_api, "ingress_metrics", lambda: recorder)
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    from fastapi import FastAPI, Request

    app = FastAPI()  # the service's handlers and counting middleware, on a route that reads its body
    for error, handler in rest_api.api.exception_handlers.items():
        app.add_exception_handler(error, handler)
    app.middleware("http")(rest_api._count_requests)

    @app.post("/upload")
    async def upload(request: Request):
        return {"bytes": len(await request.body())}

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/upload", "raw_path": b"/upload", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"10")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert answered == [("499", 499)], answered
    assert "unhandled error" not in caplog.text


@pytest.mark.parametrize("ends", ["work cancelled", "no answer"])
def test_work_cancelled_when_its_client_hangs_up_is_counted_499_and_logged_as_no_error(monkeypatch, caplog, ends):
    """Serve cancels the work of a request whose client hung up (a load test's clients stopping at its time limit);
    Starlette's http middleware turned that cancellation into RuntimeError("No response returned."): an ERROR with
    a traceback, counted as a 500, a server error to every 5xx alert. The client's disconnect may reach the replica
    after the cancellation (Ray sends them apart): it is not waited for here. An app that answers nothing without
    being cancelled is a bug, and stays a 500."""
    import asyncio
    from types import SimpleNamespace

    from fastapi import FastAPI

    from serve import rest_api

    answered = []
    recorder = SimpleNamespace(
        answered=lambda route, protocol, status, seconds, http_status, problem=None, over_quota=False: answered.append(
            (status, http_status)
        )
    )
    monkeypatch.setattr(rest_api, "ingress_metrics", lambda: recorder)
    app = FastAPI()
    for error, handler in rest_api.api.exception_handlers.items():
        app.add_exception_handler(error, handler)
    app.add_middleware(rest_api.CancellationMark)
    app.middleware("http")(rest_api._count_requests)

    @app.get("/remove")
    async def remove():
        raise asyncio.CancelledError  # its Serve call cancelled under it

    async def silent(scope, receive, send):
        return None

    app.mount("/silent", silent)

    async def receive():
        await asyncio.sleep(60)  # the disconnect not there yet

    async def send(message):
        pass

    path = "/remove" if ends == "work cancelled" else "/silent/"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def main():
        try:
            await app(scope, receive, send)
        except RuntimeError:
            pass

    asyncio.run(main())
    if ends == "work cancelled":
        assert answered == [("499", 499)] and "unhandled error" not in caplog.text, answered
    else:
        assert answered == [("500", 500)], answered


def test_a_request_to_the_bare_route_prefix_is_counted_under_the_route_that_answered_it(monkeypatch):
    """GET /api/v1 (the address the READY line prints) is answered by the "/" route, and was counted as
    route="other": the dashboards lost it among unmatched paths."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient
    from ray import serve as ray_serve

    import serve.app  # noqa: F401 (its Ingress class registers the routes on the api)
    from serve import rest_api

    answered = []
    recorder = SimpleNamespace(
        answered=lambda route, protocol, status, seconds, http_status, problem=None, over_quota=False: answered.append(
            (route, status)
        )
    )
    monkeypatch.setattr(rest_api, "ingress_metrics", lambda: recorder)
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: SimpleNamespace(servable_object=object()))
    monkeypatch.setattr(rest_api.api, "middleware_stack", rest_api.api.middleware_stack)  # built by the client
    client = TestClient(rest_api.api, base_url="http://127.0.0.1:8000", root_path="/api/v1")
    for path in ("/api/v1/", "/api/v1"):
        assert client.get(path, follow_redirects=False).headers["location"] == "/api/v1/playground"
    assert answered == [("/", "307"), ("/", "307")]


def _histogram_quantile(q: float, bounds: list[float], counts: list[int]) -> float:
    """Prometheus's histogram_quantile over one histogram: linear within the bucket holding the rank, the first
    bucket from 0."""
    rank, seen, lower = q * sum(counts), 0, 0.0
    for upper, count in zip(bounds, counts):
        if seen + count >= rank and count:
            return lower + (upper - lower) * (rank - seen) / count
        seen, lower = seen + count, upper
    return bounds[-1]


@pytest.mark.parametrize("bounds", [metrics.BATCH_BUCKETS, metrics.ATTEMPT_BUCKETS], ids=["batch", "attempts"])
def test_whole_number_histograms_read_back_their_whole_numbers(bounds):
    """With bounds at 1, 2, 3...: every batch of 1 gave the dashboard's p50 0.5 and p95 0.95, and Ray exported each
    at its bucket's midpoint (0.5). Bounds half-way between whole numbers read 1 as 1."""
    for value in (1, 2, 3, 4):
        counts = [int(lower < value <= upper) * 20 for lower, upper in zip([0.0, *bounds], bounds)]
        assert _histogram_quantile(0.5, bounds, counts) == value
        (lower, upper), = [(lower, upper) for lower, upper in zip([0.0, *bounds], bounds) if lower < value <= upper]
        assert (lower + upper) / 2 == value, "Ray's export of the observation"
