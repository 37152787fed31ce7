"""What several test modules share: test images, request helpers, the local Serve the README's way.

Test modules import from here, never from each other; tests/conftest.py holds only fixtures and hooks.
"""

from __future__ import annotations

import http.server
import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

# the test being set up or run (tests/conftest.py keeps it current): running_cluster refuses to start a
# Serve for a test that is not marked e2e, so `make test-fast` (-m "not e2e") never starts Ray
current_test: pytest.Item | None = None


# --- images and requests ------------------------------------------------------------------------


def load_script(relative: str):
    """A script of the repository (k8s/render.py, loadtests/soak.py) imported as a module; its folder is on
    sys.path only while it loads (for its own imports, such as loadtests/benchlib.py)."""
    path = REPO / relative
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module(path.stem)
    finally:
        sys.path.remove(folder)
    assert Path(module.__file__).resolve() == path, f"{path.stem} imported from {module.__file__}, not {path}"
    return module


def database_driver(monkeypatch, module: str, installed: bool) -> None:
    """Whatever this machine has: `import module` (a database driver, e.g. psycopg) finds an empty module, or fails
    as a driver that is not installed does."""
    import types

    monkeypatch.setitem(sys.modules, module, types.ModuleType(module) if installed else None)


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to `threads` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def photo(height: int = 256, width: int = 320) -> np.ndarray:
    """A real photograph (scikit-image's bundled astronaut), cropped to the requested size."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))[:height, 100 : 100 + width].copy()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_declaring_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims another size (valid CRC): a decompression bomb in a few bytes."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    ihdr_start = 8 + 4  # signature, chunk length
    data[ihdr_start + 4 : ihdr_start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13]))
    data[ihdr_start + 17 : ihdr_start + 21] = struct.pack(">I", crc)
    return bytes(data)


def box_mask(height=256, width=320, box=(90, 120, 170, 220)):
    mask = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return mask


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def post_remove(service, image: bytes, mask: bytes | None, **fields):
    files = {"image": ("image.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return service.client.post("/remove", files=files, data={k: str(v) for k, v in fields.items()})


def assert_problem(response, status: int, problem: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"].endswith("/" + problem) and body["detail"]


# --- Prometheus ---------------------------------------------------------------------------------

# How often the test Serve's processes export their metrics (Ray's default is 10 s): a test that waits for a
# count to settle waits a few of these, not a few of Ray's default.
METRICS_EXPORT_S = 1.0


def scrape_metrics(url: str, application: str | None = None) -> dict:
    """The metrics port's families by name; `application`: only that Serve application's samples (the session's
    Serve has several; samples without the label, Ray's own, are kept)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if application is not None:
            family.samples = [s for s in family.samples if s.labels.get("application", application) == application]
        families[family.name] = family
    return families


def metric_samples(families, name, suffix="", **labels):
    family = families.get("ray_" + name)
    if family is None:
        return []
    return [
        s for s in family.samples
        if s.name == "ray_" + name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip


def metric_total(families, name, suffix="", **labels) -> float:
    return sum(s.value for s in metric_samples(families, name, suffix, **labels))


# --- a stand-in HTTP server -------------------------------------------------------------------------


class CannedAnswers(http.server.BaseHTTPRequestHandler):
    """A handler for `loopback_server`: a subclass answers with `reply`; nothing is logged."""

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def loopback_server(handler: type[CannedAnswers]):
    """An HTTP server on a free loopback port, in a thread, for as long as the block runs: yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


# --- a headless browser -------------------------------------------------------------------------


def chromium_missing() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return shutil.which(CHROMIUM) is None


# A made-up origin for a page tested without a Serve: the test answers every request to it (page.route), so a
# page test needs no Ray and no model
PAGE_ORIGIN = "http://rorem.test"


def launch_chromium(playwright):
    """Debian's Chromium, headless (the `browser` fixture of tests/conftest.py holds one per test process)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def answer_offline(page, pages: dict[str, tuple[str, dict[str, str]]], api) -> None:
    """Serve `pages` (path -> html, headers: the page's own policy applies) at PAGE_ORIGIN; every other request
    to it goes to `api(route, path)`."""

    def answer(route):
        path = urlsplit(route.request.url).path
        if path in pages:
            html, headers = pages[path]
            route.fulfill(status=200, headers={**headers, "Content-Type": "text/html; charset=utf-8"}, body=html)
        else:
            api(route, path)

    page.route(PAGE_ORIGIN + "/**", answer)


def fulfill_problem(route, problem) -> None:
    """Answer with a serve.problems.Problem as the service writes it."""
    headers = {**problem.headers, "Content-Type": PROBLEM}
    route.fulfill(status=problem.status, headers=headers, body=json.dumps(problem.body()))


# --- the local Serve ----------------------------------------------------------------------------


class Service:
    """One application of the session's local Serve (tests/conftest.py `serve_started`): its address (the HTTP port and
    its route prefix), its settings (defaults filled in), gRPC (calls name the application: the cluster serves
    several), the metrics port and log the applications share, and the CLI that runs them all."""

    def __init__(
        self, app_name: str, url: str, config: dict, grpc_target: str, metrics_url: str, log_path: Path,
        child: subprocess.Popen, ports: dict[str, int], started_at: float, ready_within_s: float,
    ):  # fmt: skip
        self.app_name = app_name
        self.url = url
        self.config = config
        self.grpc_target = grpc_target
        self.metrics_url = metrics_url
        self.log_path = log_path
        self.child = child  # the CLI, `python -m serve run`
        self.ports = ports  # http, grpc, metrics
        self.work = log_path.parent
        self.client = httpx.Client(base_url=url, timeout=120)
        self.started_at = started_at  # time.monotonic() when the CLI started
        self.ready_within_s = ready_within_s  # past this a start that is not ready fails
        self.ready = False

    def wait_ready(self) -> Service:
        """This application ready (its /readyz; its /healthz names it: until its route is up, Ray routes its
        address to the application at "/"), whether the others are or not: the CLI prints its READY lines once
        all are, and tests of the first application to be ready need not wait for the slowest start."""
        while not self.ready:
            try:
                self.ready = (
                    httpx.get(self.url + "/healthz", timeout=2).json().get("application") == self.app_name
                    and httpx.get(self.url + "/readyz", timeout=2).json().get("status") == "ready"
                )
            except (httpx.HTTPError, ValueError):
                pass
            if not self.ready:
                self.still_starting(f"application {self.app_name}")
            else:  # for the suite's budget (`pytest -s` shows it)
                print(f"\n[tests] {self.app_name} ready {self.started_s():.0f} s after the start", file=sys.stderr)
        return self

    def started_s(self) -> float:
        return time.monotonic() - self.started_at

    def still_starting(self, what: str) -> None:
        """Fails the test if the CLI exited or `what` took too long to be ready; else waits a little."""
        if self.child.poll() is not None:
            pytest.fail(f"serve exited early; see {self.log_path}:\n{self.log_path.read_text()[-3000:]}")
        if self.started_s() > self.ready_within_s:
            pytest.fail(f"{what} not ready after {self.ready_within_s} s; see {self.log_path}")
        time.sleep(0.2)

    def channel(self):
        """A gRPC channel whose calls reach this application."""
        from serve.grpc_client import open_channel

        return open_channel(self.grpc_target, self.app_name)


def serve_test_config(work: Path) -> dict:
    """The shipped local.yaml with small buckets, a short batch window and a private bundle cache."""
    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    args.setdefault("bundle", {})["cache_dir"] = str(work / "cache")
    args["batching"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.25}
    args.setdefault("imaging", {}).update(
        {"buckets": [256, 512], "crop_margin": 32, "max_upload_bytes": 6 * 1024 * 1024}
    )
    # results are kept only for requests that ask (retain=true): tests that don't ask see no difference
    args["retention"] = {"enabled": True, "default_retain": False, "object_store": {"path": str(work / "results")}}
    # admission by expected wait is tested with a fake clock (tests/test_admission.py); on a busy 2-core
    # runner the tiny model's rate swings, so the service tests admit by count only
    args["overload"] = {**args.get("overload", {}), "max_queue_wait_s": None}
    return config


def named_app(work: Path, name: str, route_prefix: str) -> dict:
    """serve_test_config's application, named and mounted for a cluster of several."""
    app = serve_test_config(work)["applications"][0]
    return {**app, "name": name, "route_prefix": route_prefix}


def without_scorer(app: dict) -> dict:
    """An application that needs no Scorer: one model replica fewer to start (gate off, as a deployment without
    a Scorer must be configured)."""
    app["args"]["scorer"] = {"enabled": False}
    app["args"]["gate"] = {"mode": "off"}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Scorer"]
    return app


def without_retention(app: dict) -> dict:
    """An application that keeps no results: no ResultStore replica to start."""
    app["args"]["retention"] = {"enabled": False}
    return app


class Keyed:
    """The keyed application (tests/conftest.py `keyed_service`), shared by the hardening and the lifecycle tests:
    API keys on, under a route prefix (the access rules do not depend on the path's spelling), a small in-flight
    limit and body timeout, the Scorer failing closed, and 1 MP images."""

    NAME = "keyed"
    REQUEST_TIMEOUT_S = 30.0
    MAX_IN_FLIGHT = 4
    ROUTE_PREFIX = "/api/v1"
    BODY_TIMEOUT_S = 3.0
    MAX_MEGAPIXELS = 1.0
    OWNERS = {"alice": None, "bob": None, "dave": "studio", "erin": "studio"}  # name -> team

    @classmethod
    def app(cls, work: Path) -> tuple[dict, dict]:
        """The application, and the keys its tests present (app, ops, reviewer, people: name -> key)."""
        from serve.auth import new_key_entry

        app_key, app_entry = new_key_entry("app-team", ["remove", "score"])
        ops_key, ops_entry = new_key_entry("ops", ["remove", "score", "feedback", "admin"])
        people = {name: new_key_entry(name, ["remove", "feedback"], team=team) for name, team in cls.OWNERS.items()}
        reviewer_key, reviewer_entry = new_key_entry("reviewer", ["feedback", "review"])
        entries = [app_entry, ops_entry, reviewer_entry, *(entry for _, entry in people.values())]
        (work / "keys.yaml").write_text(yaml.safe_dump({"keys": entries}))
        app = named_app(work, cls.NAME, cls.ROUTE_PREFIX)
        args = app["args"]
        args["auth"] = {"enabled": True, "keys_file": str(work / "keys.yaml")}
        args["overload"] = {
            "max_in_flight": cls.MAX_IN_FLIGHT, "retry_after_s": 3, "max_queue_wait_s": None,
            "body_timeout_s": cls.BODY_TIMEOUT_S,
        }  # fmt: skip
        args.setdefault("gate", {})["on_scorer_error"] = "fail_closed"
        args.setdefault("scorer", {})["timeout_s"] = 2.0
        args["request_timeout_s"] = cls.REQUEST_TIMEOUT_S
        args["imaging"]["max_megapixels"] = cls.MAX_MEGAPIXELS
        keys = {
            "app_key": app_key, "ops_key": ops_key, "reviewer_key": reviewer_key,
            "people": {name: key for name, (key, _) in people.items()},
        }  # fmt: skip
        return app, keys


class Metered:
    """The metered application (tests/test_quotas.py): keys with quotas over a short window, two Ingress replicas
    sharing one ledger, no Scorer and no retention (metering needs neither)."""

    NAME = "metered"
    ROUTE_PREFIX = "/metered"
    WINDOW_S = 5.0
    BODY_TIMEOUT_S = 6.0  # well past the served request of test_rest_a_key_s_trickling_upload_holds_no_lease
    SPREAD = 12  # requests, all in flight at once, that reach both replicas (tests/test_quotas.py)

    @classmethod
    def app(cls, work: Path) -> tuple[dict, dict]:
        """The application, and its keys by name."""
        from serve.auth import new_key_entry

        keys = {
            "rest": new_key_entry("rest", ["remove", "score"], requests_per_minute=5),
            "grpc": new_key_entry("grpc", ["remove", "score"], requests_per_minute=5),
            "single": new_key_entry("single", ["remove"], max_concurrent=1),
            "free": new_key_entry("free", ["remove"]),
            "spread": new_key_entry("spread", ["remove"], requests_per_minute=cls.SPREAD),
        }
        (work / "keys.yaml").write_text(yaml.safe_dump({"keys": [entry for _, entry in keys.values()]}))
        app = without_retention(without_scorer(named_app(work, cls.NAME, cls.ROUTE_PREFIX)))
        args = app["args"]
        args["auth"] = {"enabled": True, "keys_file": str(work / "keys.yaml"), "quota_window_s": cls.WINDOW_S}
        args["overload"] = {**args["overload"], "body_timeout_s": cls.BODY_TIMEOUT_S}
        ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
        ingress["num_replicas"] = 2  # the quota holds across replicas: the ledger is one Ray actor
        return app, {"keys": {name: key for name, (key, _) in keys.items()}}


class Trained:
    """The trained application (tests/test_trained_bundle_service.py): a bundle trained a few steps on synthetic
    data, its Scorer, no retention; engine.runner onnx, its UNet exported into the bundle at start."""

    NAME = "trained"
    ROUTE_PREFIX = "/trained"

    @classmethod
    def app(cls, work: Path, bundle: Path) -> tuple[dict, dict]:
        app = without_retention(named_app(work, cls.NAME, cls.ROUTE_PREFIX))
        app["args"]["bundle"]["path"] = str(bundle)
        app["args"].setdefault("engine", {}).update({"runner": "onnx", "export_missing": True})
        return app, {"bundle": bundle}


# The stages run one after another in one Python process, as a script calling `python -m training`'s main
# would: the model libraries are imported once (about 4 s a process here), not five times.
_STAGES_IN_ONE_PROCESS = """
import json, sys
from training.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"training {argv[0]} exited with {code}")
"""


def train_tiny_bundle(work: Path) -> Path:
    """Every training stage a few steps on synthetic data, then a bundle of their outputs: the chain a release
    goes through."""
    cache, data = str(work / "cache"), work / "data"
    common = ["--base", "tiny", "--cache-dir", cache]
    stages = [
        ["synthetic", "--out", str(data), "--n", "4", "--size", "64", "--kinds", "blur,no-change"],
        ["finetune", *common, "--data", str(data / "metadata.json"), "--out", str(work / "ft"),
         "--resolution", "64", "--steps", "2", "--batch-size", "2"],
        ["distill", *common, "--unet", str(work / "ft"), "--data", str(data / "metadata.json"),
         "--out", str(work / "distill"), "--resolution", "64", "--steps", "2", "--batch-size", "2", "--lora-rank", "4"],
        ["discriminator", *common, "--data", str(data / "discriminator" / "metadata.json"),
         "--out", str(work / "disc"), "--resolution", "512", "--steps", "2", "--batch-size", "2"],
        ["bundle", *common, "--unet", str(work / "ft"), "--lcm-lora", str(work / "distill"),
         "--discriminator", str(work / "disc"), "--out", str(work / "bundle"), "--dtype", "float32"],
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _STAGES_IN_ONE_PROCESS, json.dumps(stages)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return work / "bundle"


def check_e2e(what: str) -> None:
    """Starting Ray is for e2e tests only: a fixture that starts it must request `starts_serve`."""
    if current_test is not None and current_test.get_closest_marker("e2e") is None:
        pytest.fail(
            f"{current_test.nodeid} {what} but is not marked e2e: make the fixture that does it request "
            "the `starts_serve` fixture (tests/conftest.py), which marks its tests e2e"
        )


# The CLI stops everything when an application is not ready by its --ready-timeout; the tests' own wait (Service
# .ready_within_s) fails first and names the application, while the others' tests go on.
CLI_READY_TIMEOUT_S = 3600


@contextmanager
def running_cluster(work: Path, applications: list[dict]):
    """`python -m serve run` (the README's way) on loopback ports serving `applications` (each named, with its own
    route prefix), stopped with everything it started: their Services by application name, as soon as the CLI
    is started (Service.wait_ready waits for one application; every_application_ready for all)."""
    check_e2e("starts a local Ray Serve")
    config = serve_test_config(work)
    config["applications"] = applications
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log_path = work / "serve.log"
    log = open(log_path, "w")
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_metrics_report_interval_ms": str(int(METRICS_EXPORT_S * 1000)),
        "RAY_DEDUP_LOGS": "0",  # every replica's access log line reaches the service log (tests/test_quotas.py)
    }
    from serve.config import BUNDLE_ENV, DATABASE_URL_ENV

    for variable in (BUNDLE_ENV, DATABASE_URL_ENV):  # each application names its own
        env.pop(variable, None)
    started = time.monotonic()
    child = subprocess.Popen(
        [
            sys.executable, "-m", "serve", "run", "--config", str(config_path), "--port", str(port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--ready-timeout", str(CLI_READY_TIMEOUT_S),
        ],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        from serve.config import AppSettings

        ready_within_s = 150 + 75 * len(applications)  # ~120 s for four on a quiet 2-core machine
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        ports = {"http": port, "grpc": grpc_port, "metrics": metrics_port}
        services = {}
        for app in applications:
            settings = AppSettings.model_validate(app["args"]).model_dump()  # defaults filled in
            url = f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}"
            services[app["name"]] = Service(
                app["name"], url, settings, f"127.0.0.1:{grpc_port}", metrics_url, log_path, child, ports, started,
                ready_within_s,
            )  # fmt: skip
        yield services
    finally:
        stop_cli(child)
        log.close()


def every_application_ready(services: dict[str, Service]) -> dict[str, Service]:
    """Every application ready, as the CLI says: one READY line each, printed once all are."""
    some = next(iter(services.values()))
    while some.log_path.read_text().count("[rorem] READY") < len(services):
        some.still_starting("every application")
    for service in services.values():
        service.ready = True
    print(f"\n[tests] every application ready {some.started_s():.0f} s after the start", file=sys.stderr)
    return services


def autogroup_nice() -> int | None:
    """This process's scheduler group's nice (the kernel groups a session's processes, where it has autogroups)."""
    try:
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def set_autogroup_nice(nice: int) -> bool:
    """Whether this process's scheduler group now has `nice` (a lower one than it had needs root)."""
    try:
        Path("/proc/self/autogroup").write_text(str(nice))
    except OSError:
        return False
    return autogroup_nice() == nice


def stop_cli(child: subprocess.Popen) -> None:
    """Stop the CLI and everything it started (Ray included): they share its process group."""
    try:
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RecordedMetric:
    """A Ray metric's stand-in for tests without Ray: the tags of each observation."""

    def __init__(self):
        self.tags = []

    def inc(self, value=1.0, tags=None):
        self.tags.append(tags or {})

    observe = inc


@contextmanager
def logged_by_ray_serve(level: int = logging.INFO):
    """The records the "ray.serve" logger takes at `level` and above, in a list: Ray turns its propagation off
    (pytest's caplog sees nothing) once some of its modules are imported."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger("ray.serve")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(saved or level, level))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def promql_selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each series a PromQL expression reads: its metric name and label matchers ({label: (operator, value)}), by
    promql-parser (a port of Prometheus's own parser): an expression Prometheus would refuse fails here."""
    import promql_parser

    found = []

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers}
            found.append((node.name, matchers))
            return
        for child in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            value = getattr(node, child, None)
            for item in value if isinstance(value, list) else [value]:
                if item is not None:
                    walk(item)

    walk(promql_parser.parse(expr))
    return found


# Ray's own metrics the dashboard and the alert rules read (tests/test_config.py checks Ray defines each)
RAYS_OWN_METRICS = frozenset({
    "ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
    "ray_serve_num_grpc_requests_total", "ray_serve_num_grpc_error_requests_total",
    "ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries", "ray_serve_deployment_status",
})  # fmt: skip


def check_rorem_selectors(expr: str, others: frozenset[str] = frozenset()) -> None:
    """The metrics `expr` reads are the service's (serve/metrics.py, as Ray exports them: `ray_` in front, a
    histogram's `_bucket`, `_count`, `_sum`) or in `others`, and the values it matches `outcome` and `route` against
    are ones the service gives: a misspelt metric or value makes a panel or an alert that never shows anything."""
    from serve import metrics
    from serve.app import api
    from serve.auth import api_routes
    from serve.problems import KIND_BY_SLUG

    suffixes = ("", "_bucket", "_count", "_sum")
    names = {value for name, value in vars(metrics).items() if name.isupper() and isinstance(value, str)}
    exported = {f"ray_{name}{suffix}": name for name in names for suffix in suffixes}
    routes = {route.path for route in api_routes(api)} | {"other"}
    problems = set(KIND_BY_SLUG) | {metrics.NO_PROBLEM}
    values = {
        (metrics.REQUEST_LATENCY, "outcome"): set(metrics.OUTCOMES),
        (metrics.REQUEST_LATENCY, "route"): routes,
        (metrics.REQUESTS, "route"): routes,
        (metrics.REQUESTS, "problem"): problems,
        (metrics.PROXY_REFUSALS, "problem"): problems,
        (metrics.PROXY_ANSWERS_FOR_RAY, "problem"): problems,
        (metrics.PROXY_REFUSALS, "protocol"): {"http", "grpc"},
        (metrics.REQUESTS, "protocol"): {"http", "grpc"},
    }
    for name, matchers in promql_selectors(expr):
        assert name in exported.keys() | others, f"{name} is not a metric the service exports: {expr}"
        for label, (_, value) in matchers.items():
            given = values.get((exported.get(name), label))
            if given is not None and value not in ("", ".*"):
                assert set(value.split("|")) <= given, f"{label}={value!r} matches nothing of {name}: {expr}"


def record_proxy_metrics(monkeypatch) -> SimpleNamespace:
    """serve.metrics.proxy_metrics() recording in lists: `refusals` (problem slugs), their `protocols`,
    `answers_for_ray` (problem slugs) and `keys_file_errors`."""
    from serve import metrics

    recorded = SimpleNamespace(refusals=[], protocols=[], answers_for_ray=[], keys_file_errors=RecordedMetric())

    def refused(problem: str, protocol: str = "http") -> None:
        recorded.refusals.append(problem)
        recorded.protocols.append(protocol)

    recorded.refused = refused
    recorded.answered_for_ray = recorded.answers_for_ray.append
    monkeypatch.setattr(metrics, "_proxy_metrics", recorded)
    return recorded


class FakeGrpcContext:
    """The parts of Ray's RayServegRPCContext that GrpcMethods uses."""

    def __init__(self):
        self.trailing = []

    def request_id(self):
        return "rid-1"

    def invocation_metadata(self):
        return []

    def peer(self):
        return "ipv4:127.0.0.1:5000"

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailing):
        self.trailing = list(trailing)  # as Ray's: the last call's metadata is sent, not all of them


# Units the docs write figures in (tests/test_docs_agree.py, tests/test_k8s.py)
DOC_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "MB": 10**6, "s": 1, "": 1}
_NAMED_FIGURE = (
    r"(?:default |up to |at most )?(?P<number>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)"
    r" ?(?P<unit>KiB|MiB|GiB|MB|s|px|x|characters|items)?\b(?! ?[-+*/])"
)
_NAME = r"(?P<name>`[A-Za-z_][A-Za-z0-9_.]*`)"
_NAMED_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        rf"{_NAME} \({_NAMED_FIGURE}",
        rf"(?<![\w.,]){_NAMED_FIGURE}(?: in all| more)? \({_NAME}",
        rf"(?<!\w)\({_NAMED_FIGURE}, {_NAME}",
        rf"(?<!\w)\({_NAME}, {_NAMED_FIGURE}",
    )
)


def named_values(text: str):
    """(name as written, value as written, the passage) for each value the text writes beside a name: `NAME`
    (value, value (`NAME` (or value in all / more (`NAME`), (value, `NAME` or (`NAME`, value."""
    text = " ".join(text.split())
    for pattern in _NAMED_PATTERNS:
        for match in pattern.finditer(text):
            value = float(match["number"].replace(",", "")) * DOC_UNITS.get(match["unit"] or "", 1)
            yield match["name"].strip("`"), value, match[0]
