"""The locust smoke profile against the local Serve: REST and gRPC users, bounded in time; any error fails."""

import csv
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from serve.problems import TYPE_BASE
from tests.helpers import REPO, CannedAnswers, loopback_server, png_bytes

pytestmark = pytest.mark.slow  # each test runs locust or imports its locustfile (gevent) in a subprocess


def test_locust_smoke_profile_has_no_errors(service, tmp_path):
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        pytest.skip("locust is not installed (dev extra)")
    env = {**os.environ, "ROREM_MIX": "512:3,1024:1", "ROREM_USERS": "rest:2,grpc:1", "ROREM_GRPC": service.grpc_target,
           "ROREM_GRPC_APPLICATION": service.app_name}
    result = subprocess.run(
        [str(locust), "-f", "loadtests/locustfile.py", "--headless", "--host", service.url, "-u", "3", "-r", "3",
         "-t", "6s", "--stop-timeout", "60", "--csv", str(tmp_path / "smoke"), "--html", str(tmp_path / "smoke.html"),
         "--only-summary"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "smoke_stats.csv"))}
    assert result.returncode == 0, f"locust failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    total = rows["Aggregated"]
    # each kind of user ran (a busy runner once completed 2 requests of 3 users in the 6 s: a count bound measured
    # the machine), and nothing failed
    assert int(total["Failure Count"]) == 0
    assert any(name.startswith("/remove") for name in rows), "REST users ran"
    assert any(name.startswith("Remove ") for name in rows), "gRPC users ran"
    assert (tmp_path / "smoke.html").stat().st_size > 0


def _locust(tmp_path, host: str, env: dict, seconds: str = "4s") -> tuple[subprocess.CompletedProcess, dict]:
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        pytest.skip("locust is not installed (dev extra)")
    result = subprocess.run(
        [str(locust), "-f", "loadtests/locustfile.py", "--headless", "--host", host, "-u", "2", "-r", "2",
         "-t", seconds, "--stop-timeout", "10", "--csv", str(tmp_path / "run"), "--only-summary"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    stats = tmp_path / "run_stats.csv"
    rows = {row["Name"]: row for row in csv.DictReader(open(stats))} if stats.exists() else {}
    return result, rows


def _python(code: str, env: dict) -> str:
    """The stdout of `code` run by this venv's Python at the repository root (a locustfile imports at once)."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _answers_problem(status: int, slug: str, **members) -> type[CannedAnswers]:
    """A service answering every POST with the problem `slug` (with `members`) and a Retry-After of 1 s."""

    class Answers(CannedAnswers):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"type": TYPE_BASE + slug, "status": status, **members}).encode()
            self.reply(status, body, {"Retry-After": "1", "Content-Type": "application/problem+json"})

    return Answers


def test_a_refusal_with_retry_after_is_reported_apart_and_waited_out_not_counted_as_a_failure(tmp_path):
    """The documented profile on a CPU box reported 94% failures, every one a 429 the users ignored (retrying at
    once): the median it printed was the time of a refusal."""
    with loopback_server(_answers_problem(429, "too-many-requests")) as host:
        result, rows = _locust(tmp_path, host, {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0"}, "2s")
    assert result.returncode == 0, result.stderr[-2000:]
    refused = rows["/remove 512 refused 429"]
    assert int(rows["Aggregated"]["Failure Count"]) == 0 and "/remove 512" not in rows
    assert 2 <= int(refused["Request Count"]) <= 2 * 3, "two users, each waiting the 1 s Retry-After: not a flood"


def test_a_keys_quota_429_is_reported_as_over_quota_not_as_the_service_refusing_nor_as_a_failure(tmp_path):
    """A key's own quota's 429 (its problem names the `quota`) was reported as "/remove 512 refused 429", which
    reads as a busy service shedding load, where the service's metrics call it outcome="over_quota" and its
    shedding alert leaves it out. It has a name of its own, is no failure, and its Retry-After is waited out."""
    with loopback_server(_answers_problem(429, "too-many-requests", quota="minute")) as host:
        result, rows = _locust(tmp_path, host, {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0"}, "2s")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any("refused" in name for name in rows) and "/remove 512" not in rows, rows
    quota = rows["/remove 512 over quota 429"]
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert 2 <= int(quota["Request Count"]) <= 2 * 3, "two users, each waiting the 1 s Retry-After: not a flood"


def test_a_503_with_retry_after_that_is_not_a_load_refusal_is_a_failure(tmp_path):
    """Every 503 carries Retry-After, replica-failed and not-ready too: users counted them all as refusals, so a
    crashing Remover showed 0 failures and exit 0. Only serve.problems.LOAD_REFUSALS are refusals."""
    with loopback_server(_answers_problem(503, "replica-failed")) as host:
        result, rows = _locust(tmp_path, host, {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0"}, "2s")
    assert result.returncode == 1, result.stderr[-2000:]
    failed = rows["/remove 512"]
    assert int(failed["Failure Count"]) == int(failed["Request Count"]) >= 1
    assert not any("refused" in name for name in rows), rows


def test_rest_users_send_the_api_key_of_rorem_api_key(tmp_path):
    """REST users posted without credentials: against a service with API keys on, every request was a 401."""
    seen = []

    class RecordsKeys(CannedAnswers):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(self.headers.get("x-api-key"))
            self.reply(200, png_bytes(np.zeros((512, 512, 3), np.uint8)), {"Content-Type": "image/png"})

    env = {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0", "ROREM_API_KEY": "rk_load"}
    with loopback_server(RecordsKeys) as host:
        result, _rows = _locust(tmp_path, host, env, "2s")
    assert result.returncode == 0, result.stderr[-2000:]
    assert seen and set(seen) == {"rk_load"}, seen


_GRPC_ERRORS = (
    "import sys, types, grpc; sys.path.insert(0, 'loadtests'); import locustfile as l\n"
    "fired, slept, sent = [], [], []\n"
    "l.events = types.SimpleNamespace(request=types.SimpleNamespace(fire=lambda **kw: fired.append(kw)))\n"
    "l.gevent = types.SimpleNamespace(sleep=slept.append)\n"
    "class Error(grpc.RpcError):\n"
    "    def __init__(self, code, details, trailing): self.args = (code, details, trailing)\n"
    "    def code(self): return getattr(grpc.StatusCode, self.args[0])\n"
    "    def details(self): return self.args[1]\n"
    "    def trailing_metadata(self): return self.args[2]\n"
    "from serve.problems import TYPE_BASE as base\n"
    "cases = [\n"
    "    ('UNAVAILABLE', '{}', (('problem-type', base + 'replica-failed'), ('retry-after', '2'))),\n"
    "    ('UNAVAILABLE', '{}', (('problem-type', base + 'not-ready'), ('retry-after', '2'))),\n"
    "    ('UNAVAILABLE', '{}', (('problem-type', base + 'overloaded'), ('retry-after', '2'))),\n"
    "    ('RESOURCE_EXHAUSTED', '{}', (('problem-type', base + 'too-many-requests'), ('retry-after', '3'))),\n"
    "    ('RESOURCE_EXHAUSTED', '{\"type\": \"' + base + 'too-many-requests\", \"quota\": \"minute\"}',\n"
    "     (('problem-type', base + 'too-many-requests'), ('retry-after', '5'), ('ratelimit', '\"minute\";r=0;t=5'))),\n"
    "    ('RESOURCE_EXHAUSTED', '{}', (('problem-type', base + 'payload-too-large'),)),\n"
    "    ('RESOURCE_EXHAUSTED', 'Request dropped due to backpressure (num_queued_requests=9)', ()),\n"
    "    ('RESOURCE_EXHAUSTED', 'Received message larger than max', ()),\n"
    "]\n"
    "for case in cases:\n"
    "    def remove(request, timeout, metadata=(), case=case):\n"
    "        sent.append(metadata)\n"
    "        raise Error(*case)\n"
    "    user = object.__new__(l.GrpcUser)\n"
    "    user.stub = types.SimpleNamespace(Remove=remove)\n"
    "    user.remove()\n"
    "    passed = fired[-1]['exception'] is None\n"
    "    print(fired[-1]['name'], passed, slept[-1] if passed else '-')\n"
    "print(sorted({tuple(m) for m in sent}))\n"
)


def test_grpc_users_count_only_load_refusals_as_refused_and_send_the_api_key():
    """gRPC users took any RESOURCE_EXHAUSTED / UNAVAILABLE with retry-after for a refusal (a failed replica's
    too), and sent no API key; Ray's proxy's backpressure (no problem-type, no retry-after) is a refusal. A key's
    quota's RESOURCE_EXHAUSTED (its details name the `quota`) is reported as over quota, not as the service's
    refusal, and waited out."""
    lines = _python(_GRPC_ERRORS, {"ROREM_MIX": "512:1", "ROREM_API_KEY": "rk_load"}).strip().splitlines()
    assert lines == [
        "Remove 512 False -",
        "Remove 512 False -",
        "Remove 512 refused UNAVAILABLE True 2.0",
        "Remove 512 refused RESOURCE_EXHAUSTED True 3.0",
        "Remove 512 over quota RESOURCE_EXHAUSTED True 5.0",
        "Remove 512 False -",
        "Remove 512 refused RESOURCE_EXHAUSTED True 1.0",
        "Remove 512 False -",
        "[(('x-api-key', 'rk_load'),)]",
    ], lines


def test_grpc_users_need_rorem_grpc_when_the_host_is_not_on_the_default_port():
    """With --host :8700 the gRPC users loaded whatever listened on :9000 (another test run's Serve, say); an https
    --host without a port was taken for port 8000; a Retry-After given as a date ended the user with a ValueError."""
    code = (
        "import sys; sys.path.insert(0, 'loadtests'); import locustfile as l\n"
        "print(l.grpc_target('http://127.0.0.1:8000', None), l.grpc_target('http://h:8700', 'h:9700'),"
        " l.grpc_target('http://[::1]:8000', None))\n"
        "for host in ('http://127.0.0.1:8700', 'https://api.example', 'http://api.example'):\n"
        "    try: l.grpc_target(host, None)\n"
        "    except ValueError as e: print(e)\n"
        "print(l.retry_after_s('3'), l.retry_after_s('Wed, 21 Oct 2015 07:28:05 GMT', now=1445412480.0),"
        " l.retry_after_s('soon'), l.retry_after_s('-4'), l.retry_after_s('nan'), l.retry_after_s('1e12'),"
        " l.retry_after_s(None))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    first, *refused, waits = result.stdout.strip().splitlines()
    assert first == "127.0.0.1:9000 h:9700 [::1]:9000"
    assert refused == [
        f"--host {host} is not on port 8000: set ROREM_GRPC=host:port for gRPC users"
        for host in ("http://127.0.0.1:8700", "https://api.example", "http://api.example")
    ], "a URL without a port is on its scheme's: 443 or 80, not 8000"
    assert waits == "3.0 5.0 1.0 0.0 1.0 60.0 1.0", "seconds; an HTTP date, from now; neither: 1 s; at most 60 s"


@pytest.mark.timing
def test_a_run_whose_grpc_users_have_no_target_is_refused_at_the_start(tmp_path):
    """Each gRPC user failed to start on a --host off port 8000 without ROREM_GRPC, the REST users with them: the run
    sent nothing until its -t ran out, and locust's exit code was all that said so. Refused before the inputs are
    built: after them it took 13 s (the default mix's 12 MP photo), before them 1.6 s."""
    started = time.monotonic()
    result, rows = _locust(tmp_path, "http://127.0.0.1:9", {}, seconds="60s")
    assert result.returncode != 0 and time.monotonic() - started < 8
    assert "set ROREM_GRPC=host:port for gRPC users" in result.stderr and not rows


def test_grpc_users_time_the_answer_not_the_check_of_its_image():
    """A gRPC user's response_time was taken after the check had decoded the returned image (a 12 MP PNG:
    ~200 ms on this machine), which REST users' times do not include (locust times them when the body has
    arrived). A fake clock: the call takes 5 ms, the check 1 s; the user must report 5 ms and still the check."""
    code = (
        "import sys, types; sys.path.insert(0, 'loadtests'); import locustfile as l\n"
        "clock, fired = [0.0], []\n"
        "l.time = types.SimpleNamespace(perf_counter=lambda: clock[0])\n"
        "l.events = types.SimpleNamespace(request=types.SimpleNamespace(fire=lambda **kw: fired.append(kw)))\n"
        "def remove(request, timeout, metadata=()):\n"
        "    clock[0] += 0.005\n"
        "    return types.SimpleNamespace(image=b'not an image')\n"
        "def check(content, size):\n"
        "    clock[0] += 1.0\n"
        "    return False\n"
        "l.valid_image = check\n"
        "user = object.__new__(l.GrpcUser)\n"
        "user.stub = types.SimpleNamespace(Remove=remove)\n"
        "user.remove()\n"
        "print(round(fired[0]['response_time'], 3), fired[0]['exception'], fired[0]['response_length'])\n"
    )
    assert _python(code, {"ROREM_MIX": "512:1"}).split() == ["5.0", *"not a valid image of (512, 512)".split(), "12"]


def test_a_locustfile_with_a_request_timeout_that_is_no_seconds_says_so_in_one_line():
    """ROREM_TIMEOUT_S="abc" failed locust at import with float()'s ValueError traceback (benchlib.request_timeout_s
    now reads it, as for --stop-timeout). Only imported: no locust run, no service."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'loadtests'); import locustfile"],
        cwd=REPO, env={**os.environ, "ROREM_MIX": "512:1", "ROREM_TIMEOUT_S": "abc"}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("ROREM_TIMEOUT_S='abc': expected a number of seconds above 0"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_rest_request_that_hangs_counts_as_failed(tmp_path):
    """REST users posted without a timeout (locust's HttpSession has none): a service that never answered showed
    0 failures and exit 0. They now give up after ROREM_TIMEOUT_S (120 s by default, as gRPC users), a failure."""
    answered = threading.Event()

    class Hangs(CannedAnswers):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            answered.wait(30)

    with loopback_server(Hangs) as host:
        try:
            env = {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0", "ROREM_TIMEOUT_S": "0.5"}
            result, rows = _locust(tmp_path, host, env, "3s")
        finally:
            answered.set()
    assert result.returncode == 1 and "/remove 512" in rows, result.stderr[-2000:]
    assert int(rows["/remove 512"]["Failure Count"]) >= 2 and int(rows["/remove 512"]["Request Count"]) == int(
        rows["/remove 512"]["Failure Count"]
    )


def test_an_answer_is_checked_by_its_header_and_size_not_decoded(tmp_path):
    """Every answer was fully decoded (a 12 MP PNG: ~200 ms, blocking every gevent user); the check is now
    benchlib.valid_image's, as the soak's: an answer whose header says the input's size passes, one of
    another size fails."""
    whole = png_bytes(np.zeros((512, 512, 3), np.uint8))

    class HeaderOnly(CannedAnswers):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.reply(200, whole[:100], {"Content-Type": "image/png"})  # the header of a 512 x 512 PNG, no pixels

    with loopback_server(HeaderOnly) as host:  # 4 s: in 2 s a busy 2-core machine has seen no answer at all
        result, rows = _locust(tmp_path, host, {"ROREM_MIX": "512:1", "ROREM_USERS": "rest:1,grpc:0"}, "4s")
    assert result.returncode == 0 and "/remove 512" in rows, result.stderr[-2000:]
    assert int(rows["/remove 512"]["Request Count"]) >= 2 and int(rows["Aggregated"]["Failure Count"]) == 0


def test_a_run_lasts_its_run_time_however_long_the_inputs_take_to_build(tmp_path):
    """Building the inputs blocked gevent's loop, whose clock then stood still: locust's -t timer, set right after,
    fired that much early (the documented profile's 12 MP photo: a `-t 10s` run ended 10 ms after it began, sent
    nothing and exited 0). The 1024 inputs take a few hundred ms here; the run now lasts its whole -t."""
    with loopback_server(_answers_problem(429, "too-many-requests")) as host:
        result, _ = _locust(tmp_path, host, {"ROREM_MIX": "1024:1", "ROREM_USERS": "rest:1,grpc:0"}, "2s")
    assert result.returncode == 0, result.stderr[-2000:]
    stamps = {}
    for line in result.stderr.splitlines():
        for event in ("Run time limit set", "--run-time limit reached"):
            if event in line:
                stamps[event] = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    lasted = (stamps["--run-time limit reached"] - stamps["Run time limit set"]).total_seconds()
    assert lasted >= 1.95, f"a 2 s run lasted {lasted:.3f} s"


def test_every_input_of_the_mix_is_built_when_locust_starts():
    """The inputs were built inside the first task of each size (the 12 MP photo: 4.5 s on a busy machine),
    blocking every gevent user and counting in the waiting requests' times; locust's init event builds them."""
    code = (
        "import sys, types; sys.path.insert(0, 'loadtests'); import locustfile as l\n"
        "from locust import events\n"
        "assert l.photo_png.cache_info().currsize == 0\n"
        "events.init.fire(environment=types.SimpleNamespace(runner=None), runner=None, web_ui=None)\n"
        "print(l.photo_png.cache_info().currsize, l.mask_png.cache_info().currsize)\n"
    )
    assert _python(code, {"ROREM_MIX": "512:2,1024:1"}).split() == ["2", "6"]
