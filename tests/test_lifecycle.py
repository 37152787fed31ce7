"""Start and stop as people expect: busy ports fail the start at once, naming the port and its holder;
READY only once this instance answers; SIGTERM stops everything within 10 s, in-flight requests answered.
Also the gRPC proxy's message limit (serve.proxy_limits), on the same running service."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import yaml

from serve import launcher
from serve import rorem_pb2 as pb
from serve.cli import ForeignInstance, StopRequest, listen_addresses, run, session_members, wait_until_ready
from serve.config import AppSettings
from serve.ports import RAY_WORKER_PORTS, busy_ports, ephemeral_ports, free_port, listeners, port_in_use
from serve.proxy_limits import grpc_max_message_bytes
from serve.rorem_pb2_grpc import ObjectRemovalStub
from tests.helpers import REPO, CannedAnswers, loopback_server, photo, png_bytes, serve_test_config

STOP_LIMIT_S = 10.0  # Docker's default grace before SIGKILL


def _listen(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("name", ["HTTP", "gRPC", "metrics"])
def test_a_busy_port_is_named_with_its_holder(name):
    holder = _listen()
    port = holder.getsockname()[1]
    from serve.grpc_servicer import SERVICER_FUNCTION

    grpc = {"port": free_port(), "grpc_servicer_functions": [SERVICER_FUNCTION]}  # without: no gRPC proxy, no port
    config = {"http_options": {"host": "127.0.0.1", "port": free_port()}, "grpc_options": grpc}
    if name == "HTTP":
        config["http_options"]["port"] = port
    elif name == "gRPC":
        config["grpc_options"]["port"] = port
    addresses = listen_addresses(config, port if name == "metrics" else free_port())
    with holder:
        busy = busy_ports(addresses)
        assert busy == [
            f"the {name} port {port} ({addresses[name][0]}) is already in use, held by {listeners(port)[0]}"
        ]
        assert listeners(port)[0].startswith(f"pid {os.getpid()} (")
    assert not port_in_use("127.0.0.1", port)


@pytest.mark.parametrize("refusal", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_the_grpc_port_is_checked_on_ipv4_on_a_machine_without_ipv6(monkeypatch, refusal):
    """A kernel booted with ipv6.disable=1 refuses an IPv6 socket (socket.has_ipv6 stays True): the check of the
    gRPC port on "::" refused every start with "cannot listen on the gRPC port", while gRPC listens on IPv4."""
    real = socket.socket

    class NoIPv6(real):
        def __init__(self, family=socket.AF_INET, *args, **kwargs):
            if family == socket.AF_INET6:
                raise OSError(refusal, os.strerror(refusal))
            super().__init__(family, *args, **kwargs)

    port = free_port()
    monkeypatch.setattr(socket, "socket", NoIPv6)
    assert busy_ports({"gRPC": ("::", port)}) == []
    with _listen("0.0.0.0") as holder:
        held = holder.getsockname()[1]
        (said,) = busy_ports({"gRPC": ("::", held)})
    assert said.startswith(f"the gRPC port {held} (::) is already in use, held by pid {os.getpid()}")
    assert busy_ports({"HTTP": ("::1", port)}) == [
        f"cannot listen on the HTTP port {port} (::1): {os.strerror(refusal)}"
    ], "an IPv6 address itself has no IPv4 stand-in"


def test_test_and_benchmark_ports_stay_clear_of_the_ranges_ray_binds_on_its_own():
    ports = {free_port() for _ in range(50)}
    assert not ports & set(ephemeral_ports()) and not ports & set(RAY_WORKER_PORTS)
    assert all(not port_in_use("127.0.0.1", port) for port in ports)


def test_ports_asked_for_together_are_never_the_same_even_when_the_random_picks_are(monkeypatch):
    """What CI once met: "the HTTP and metrics ports are both 20581" from two calls before either was bound."""
    from serve import ports

    monkeypatch.setattr(ports, "_HANDED_OUT", set())
    monkeypatch.setattr(ports.random, "sample", lambda candidates, k: [20581, 20582, 20583])
    assert [free_port() for _ in range(3)] == [20581, 20582, 20583]


def test_a_port_answered_in_http2_is_reported_as_someone_else_not_retried_until_the_timeout():
    """What CI once met: one of Ray's own gRPC servers held the HTTP port and answered /readyz in HTTP/2."""
    with _listen() as holder:
        port = holder.getsockname()[1]

        def answer_in_http2():
            connection, _ = holder.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x7f\xff\xff\xff")

        threading.Thread(target=answer_in_http2, daemon=True).start()
        launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            started = time.monotonic()
            with pytest.raises(ForeignInstance, match="not in HTTP/1.1"):
                wait_until_ready(f"http://127.0.0.1:{port}", "me", launcher, 20, StopRequest())
            assert time.monotonic() - started < 5
        finally:
            launcher.kill()
            launcher.wait()


def test_ready_is_printed_once_the_scorer_is_up_too_not_while_degraded():
    """/readyz is 200 "degraded" while only the Scorer is missing (the pods stay in the Services); the CLI's READY
    means the whole service, so it waits on."""
    import json

    answers = iter([{"status": "degraded", "missing": ["Scorer"]}] * 2 + [{"status": "ready", "missing": []}] * 9)
    asked = []

    class Probe(CannedAnswers):
        def do_GET(self):
            body = next(answers) if self.path == "/readyz" else {"status": "alive", "instance": "me"}
            asked.append((self.path, body.get("status")))
            self.reply(200, json.dumps(body).encode())

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with loopback_server(Probe) as url:
            ready = wait_until_ready(url, "me", launcher, 20, StopRequest())
    finally:
        launcher.kill()
        launcher.wait()
    assert ready["status"] == "ready"
    assert [status for path, status in asked if path == "/readyz"] == ["degraded", "degraded", "ready"]


def test_an_application_is_ready_once_its_own_ingress_answers_at_its_address():
    """Until an application's route is up, Ray sends its address to the application at "/": that one's ready
    answer printed READY for an application not running yet."""
    answering = iter(["rorem", "rorem", "keyed"])
    asked = []

    class Probe(CannedAnswers):
        def do_GET(self):
            body = {"status": "ready"}
            if self.path == "/api/v1/healthz":
                body = {"status": "alive", "instance": "me", "application": next(answering)}
                asked.append(body["application"])
            self.reply(200, json.dumps(body).encode())

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with loopback_server(Probe) as url:
            ready = wait_until_ready(url + "/api/v1", "me", launcher, 20, StopRequest(), "keyed")
    finally:
        launcher.kill()
        launcher.wait()
    assert ready == {"status": "ready"} and asked == ["rorem", "rorem", "keyed"]


def test_readiness_is_polled_directly_whatever_the_environment_s_http_proxy_says(monkeypatch):
    """urlopen sends even loopback URLs to $http_proxy unless no_proxy names that exact host: READY never came,
    and the start was stopped after its whole --ready-timeout with no reason given."""

    class Probe(CannedAnswers):
        def do_GET(self):
            body = {"status": "ready"} if self.path == "/readyz" else {"status": "alive", "instance": "me"}
            self.reply(200, json.dumps(body).encode())

    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers there
    monkeypatch.setenv("no_proxy", "localhost")
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with loopback_server(Probe) as url:
            assert wait_until_ready(url, "me", launcher, 3, StopRequest()) == {"status": "ready"}
    finally:
        launcher.kill()
        launcher.wait()


def _start_with_ports(tmp_path, *flags) -> int:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_test_config(tmp_path)))
    return run(["run", "--config", str(path), *flags])


def test_a_port_given_twice_or_an_address_not_here_fails_the_start_saying_so(tmp_path, capsys, no_launch):
    """Each port was checked alone: the same number for HTTP and metrics launched Ray, whose exporter then
    answered the READY poll; an address not on this machine ended in a traceback."""
    port = free_port()
    assert _start_with_ports(tmp_path, "--port", str(port), "--metrics-port", str(port)) == 2
    err = capsys.readouterr().err
    assert f"the HTTP and metrics ports are both {port}: give each its own" in err and "choose others" in err
    started = time.monotonic()
    assert _start_with_ports(tmp_path, "--host", "192.0.2.1", "--port", str(free_port())) == 2  # TEST-NET-1
    err = capsys.readouterr().err
    assert "cannot listen on the HTTP port" in err and "(192.0.2.1)" in err and "Traceback" not in err
    assert "an address of this machine" in err and "holds a port" not in err, err  # no process to stop
    assert time.monotonic() - started < 5


# `python -m serve run` with its launcher a sleeper (in the launcher's own session, as the CLI starts it; no Ray),
# which writes the sleeper's pid to argv[1]; the drain, which would poll an address nothing answers, is skipped
_CLI_DRIVER = """
import fcntl, os, signal, subprocess, sys, termios
from pathlib import Path
if os.isatty(0):
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the session's controlling terminal: its hangup comes here
if os.environ.get("IGNORING_HANGUPS"):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it
from types import SimpleNamespace
import serve.cli as cli
real = subprocess.Popen
def launch(command, **kwargs):
    child = real([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
    Path(sys.argv[1]).write_text(str(child.pid))
    return child
cli.subprocess = SimpleNamespace(Popen=launch)
cli._wait_drained = lambda *args: None
sys.exit(cli.run(["run", "--config", *sys.argv[2:], "--ready-timeout", "60"]))
"""


def _cli_on_a_terminal(tmp_path, output=None, ignoring_hangups=False):
    """The CLI in a session of its own whose controlling terminal is a pty (its output there too, unless `output`);
    the pty's master end, the CLI and its launcher's pid."""
    import pty

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_test_config(tmp_path)))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    master, terminal = pty.openpty()

    pid_file = tmp_path / "launcher.pid"
    cli = subprocess.Popen(
        [sys.executable, "-c", _CLI_DRIVER, str(pid_file), str(path), *ports], cwd=REPO, stdin=terminal,
        stdout=output or terminal, stderr=output or terminal, start_new_session=True,
        env={**os.environ, **({"IGNORING_HANGUPS": "1"} if ignoring_hangups else {})},
    )  # fmt: skip
    os.close(terminal)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and cli.poll() is None and time.monotonic() < deadline:
        _read_some(master)
    assert pid_file.exists(), f"the CLI did not launch (exit {cli.poll()})"
    time.sleep(0.2)  # its pid is written before Popen returns to the CLI
    return master, cli, int(pid_file.read_text())


def _read_some(master: int) -> None:
    import select

    if select.select([master], [], [], 0.05)[0]:
        try:
            os.read(master, 65536)
        except OSError:
            pass


def test_a_hung_up_terminal_stops_what_the_start_launched(tmp_path):
    """A closed terminal or a dropped SSH session (SIGHUP) ended the CLI at once, and, once handled, the stop's
    first message to the gone terminal failed (EIO) before anything was stopped; the launcher, in a session of its
    own, and Ray with it kept the ports and the GPU."""
    master, cli, launcher = _cli_on_a_terminal(tmp_path)
    try:
        os.close(master)  # the hangup: SIGHUP to the terminal's session
        cli.wait(timeout=30)
        time.sleep(0.2)
        assert not _alive(launcher), f"the launcher outlived the CLI (exit {cli.returncode})"
    finally:
        cli.kill()
        if _alive(launcher):
            os.kill(launcher, signal.SIGKILL)


def test_a_start_under_nohup_keeps_running_through_a_hangup(tmp_path):
    log = (tmp_path / "nohup.out").open("w")
    master, cli, launcher = _cli_on_a_terminal(tmp_path, output=log, ignoring_hangups=True)
    try:
        os.close(master)
        time.sleep(1.0)
        assert cli.poll() is None and _alive(launcher), "a hangup nohup ignores stopped the service"
        cli.terminate()
        cli.wait(timeout=30)
        time.sleep(0.2)
        assert not _alive(launcher)
    finally:
        cli.kill()
        log.close()
        if _alive(launcher):
            os.kill(launcher, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_launcher_stops_when_the_cli_is_killed():
    """SIGKILL or the OOM killer give the CLI no chance to stop anything: the launcher asks the kernel for a
    SIGTERM when its parent dies (and a SIGTERM stops Ray)."""
    middle = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
         "'import os, sys, time; from serve.launcher import stop_with_parent; stop_with_parent(int(sys.argv[1])); "
         "print(os.getpid(), flush=True); time.sleep(60)', str(os.getpid())]); child.wait()"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    launcher = int(middle.stdout.readline())
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 10
    while _alive(launcher) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(launcher)


def test_the_launcher_hides_the_gpus_from_replicas_given_none(tmp_path, monkeypatch):
    """Ray 2.60 no longer sets CUDA_VISIBLE_DEVICES for a replica at num_gpus 0: with device "auto" it loaded on the
    GPU anyway, outside Ray's accounting, and `--gpus 0` said the model ran on the CPU."""
    from serve import cli

    launched = []
    monkeypatch.setattr(cli, "subprocess", SimpleNamespace(Popen=lambda command, env, **kw: launched.append(env) or
                                                           SimpleNamespace(poll=lambda: 1, returncode=1)))
    monkeypatch.setattr(cli, "wait_until_ready", lambda *args: None)
    monkeypatch.setattr(cli, "stop_service", lambda *args: 1)
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    _start_with_ports(tmp_path, *ports, "--gpus", "0")
    (env,) = launched
    assert env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"


def test_a_start_starts_a_ray_of_its_own_whatever_ray_address_names(tmp_path, monkeypatch):
    """With $RAY_ADDRESS set (or a `ray start` cluster running) the launcher's ray.init() joined that cluster and
    `serve run` replaced its Serve applications."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    _, env = _launched(tmp_path, monkeypatch, _local_yaml())
    assert "RAY_ADDRESS" not in env and env["PATH"] == os.environ["PATH"]

    class Stop(Exception):
        pass

    def serve_run(*args, **kwargs):
        raise Stop

    initialized = []
    context = types.SimpleNamespace(address_info={"gcs_address": "127.0.0.1:6379"})
    monkeypatch.setattr(ray, "init", lambda **kwargs: initialized.append(kwargs) or context)
    monkeypatch.setattr(launcher.signal, "signal", lambda *args: None)
    monkeypatch.setattr("ray.serve.scripts.run.main", serve_run)
    with pytest.raises(Stop):
        launcher.main([str(tmp_path / "serve.yaml"), "--metrics-port", "9464", "--num-cpus", "3"])
    (kwargs,) = initialized
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 3


def test_a_start_on_a_busy_port_fails_at_once_naming_it(tmp_path, capsys):
    config = serve_test_config(tmp_path)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with _listen("0.0.0.0") as holder:
        port = holder.getsockname()[1]
        started = time.monotonic()
        code = run(["run", "--config", str(path), "--port", str(free_port()), "--grpc-port", str(port)])
    assert code == 2 and time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert f"the gRPC port {port} (::) is already in use, held by pid {os.getpid()}" in err


def _local_yaml(edit=None) -> str:
    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    if edit:
        edit(config)
    return yaml.safe_dump(config)


def _deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@pytest.fixture
def no_launch(monkeypatch):
    """These starts must fail before Ray: a launch is a failure of the test, not a service."""

    def launch(*args, **kwargs):
        raise AssertionError("the CLI launched Ray")

    monkeypatch.setattr("serve.cli.subprocess", SimpleNamespace(Popen=launch))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (None, "No such file or directory"),
        ("", "not a Serve config (a mapping: applications, http_options, ...) but NoneType"),
        ("applications: [\n", "line 2, column 1: expected the node content"),
        (_local_yaml(lambda c: c["applications"][0]["args"].update(batching={"max_batch_sz": 8})),
         "batching.max_batch_sz: Extra inputs are not permitted"),
        (_local_yaml(lambda c: c["http_options"].update(port="eighty")), "http_options.port: Input should be a valid integer"),
        (_local_yaml(lambda c: c["applications"][0]["args"].update(overload={"proxy_buffer_bytes": 1_000_000})),
         "overload.proxy_buffer_bytes (1000000) is below the largest body the app accepts"),
        (_local_yaml(lambda c: _deployment(c, "Remover").update(user_config={"batch_wait_timeout_s": {512: 0.02}})),
         "Remover: set its live settings in the application args, not in user_config"),
        (_local_yaml(lambda c: _deployment(c, "Ingress").update(backpressure_config={"status_code": 503})),
         "Ingress: set overload.retry_after_s in the application args, not in backpressure_config"),
        (_local_yaml(lambda c: c["http_options"].update(port=70000)), "http_options.port 70000 is not a TCP port"),
        (_local_yaml(lambda c: c["grpc_options"].update(port=70000)), "grpc_options.port 70000 is not a TCP port"),
        (_local_yaml(lambda c: c["http_options"].update(port=-1)), "http_options.port -1 is not a TCP port"),
        (_local_yaml(lambda c: c["applications"][0]["args"].update(imaging={"max_megapixels": float("inf")})),
         "imaging.max_megapixels: Input should be a finite number"),
        (_local_yaml(lambda c: c["applications"][0]["args"].update(engine={"steps": 1, "strength": 0.99})),
         "engine.strength 0.99 leaves no step of engine.steps 1"),
        (_local_yaml(lambda c: c["applications"][0]["args"].update(gate={"max_attempts": 8})),
         ": gate: max_attempts 8 needs max_model_calls >= 16 (an attempt"),
    ],
    ids=[
        "missing", "empty", "broken-yaml", "unknown-arg", "port-not-a-number", "proxy-buffer-below-a-body",
        "user-config", "backpressure-config", "http-port-70000", "grpc-port-70000", "http-port-negative",
        "infinite-megapixels", "no-step-to-run", "attempts-past-the-calls",
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_bad_config_fails_the_start_naming_the_file_and_the_problem(
    tmp_path, capsys, no_launch, text, said, command
):
    """A review got Python tracebacks (FileNotFoundError, AttributeError, a YAML error, a ValidationError; a
    deployment's user_config or backpressure_config, which the rendering of the live settings refuses; a port past
    65535, an infinite size); a strength that leaves no step started Ray, and every Remover replica failed.
    `check` says the same, without starting anything."""
    path = tmp_path / "serve.yaml"
    if text is not None:
        path.write_text(text)
    assert run([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[rorem] cannot start: {path}: ") and said in err and "Traceback" not in err


def test_check_says_a_config_would_start_here_without_starting_it_even_beside_a_running_service(
    tmp_path, capsys, no_launch
):
    """An operator could check a config (an edit, a CI step) only by starting Ray with it (a configuration trial):
    `check` runs every check of `run` but whether the ports are free, and can write the Serve config `run` would
    hand Ray."""
    from serve.config import validate_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_test_config(tmp_path)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = ["--port", port, "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
        assert run(["run", "--config", str(path), *ports]) == 2
        assert f"cannot start: the HTTP port {port} (127.0.0.1) is already in use" in capsys.readouterr().err
        effective = tmp_path / "effective.yaml"
        assert run(["check", "--config", str(path), *ports, "--effective", str(effective)]) == 0
    out = capsys.readouterr().out
    assert f"would start 1 application(s); HTTP 127.0.0.1:{port}" in out and "[rorem] model: TINY bundle" in out
    handed = yaml.safe_load(effective.read_text())
    validate_serve_config(handed)
    assert handed["http_options"]["port"] == int(port)
    twice = ["--port", port, "--metrics-port", port]  # what run refuses before Ray but a port in use (a review)
    assert run(["check", "--config", str(path), *twice]) == 2
    assert f"the HTTP and metrics ports are both {port}: give each its own" in capsys.readouterr().err
    nowhere = tmp_path / "missing" / "effective.yaml"
    assert run(["check", "--config", str(path), *ports, "--effective", str(nowhere)]) == 2
    assert f"cannot start: --effective {nowhere}: No such file or directory" in capsys.readouterr().err


def test_a_config_without_an_http_proxy_fails_the_start_saying_why(tmp_path, capsys, no_launch):
    """`proxy_location: Disabled` was taken, then the start waited out --ready-timeout (600 s) for an HTTP answer."""
    path = tmp_path / "serve.yaml"
    path.write_text(_local_yaml(lambda c: c.update(proxy_location="Disabled")))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), *ports]) == 2
    assert "cannot start: proxy_location is Disabled (no HTTP proxy): python -m serve run checks readiness and " \
        "drains over HTTP; set EveryNode or HeadOnly" in capsys.readouterr().err


def test_a_bundle_flag_over_the_authors_layout_fails_the_start(tmp_path, capsys, no_launch):
    authors = {"unet": "hf:LetsThink/RORem", "lcm_lora": "/l"}
    path = tmp_path / "serve.yaml"
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(bundle={"authors": authors})))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), "--bundle", "/models/b", *ports]) == 2
    assert "with the command line: bundle: set either bundle.path or bundle.authors, not both" in capsys.readouterr().err


def test_a_bundle_or_runner_path_that_is_not_there_fails_the_start_before_ray(tmp_path, capsys, no_launch):
    """A new user's --bundle /nonexistent started Ray and waited ~20 s for the replicas to fail on it."""
    from engines.bundle import MANIFEST
    from serve.cli import BUNDLE_MANIFEST
    from serve.config import BUNDLE_ENV

    assert BUNDLE_MANIFEST == MANIFEST
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    (tmp_path / "empty").mkdir()
    for bundle, said in ((tmp_path / "none", "(no such folder)"), (tmp_path / "empty", "(no manifest.json in it)")):
        assert run(["run", "--bundle", str(bundle), *ports]) == 2
        err = capsys.readouterr().err
        assert f"cannot start: bundle.path {bundle} (from --bundle) is not a bundle {said}" in err, err
        assert "Model bundles" in err
    with pytest.MonkeyPatch.context() as env:
        env.setenv(BUNDLE_ENV, str(tmp_path / "none"))
        assert run(["run", *ports]) == 2
    assert f"bundle.path {tmp_path / 'none'} (from {BUNDLE_ENV}) is not a bundle" in capsys.readouterr().err
    path = tmp_path / "serve.yaml"
    engine = {"runner": "onnx", "runner_path": "unet.onnx"}
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(engine=engine)))
    assert run(["run", "--config", str(path), *ports]) == 2
    assert f"engine.runner_path {Path.cwd() / 'unet.onnx'}: no such file" in capsys.readouterr().err
    (tmp_path / "unet.onnx").write_bytes(b"onnx")
    torch_runner = {"runner_path": str(tmp_path / "unet.onnx")}
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(engine=torch_runner)))
    assert run(["run", "--config", str(path), *ports]) == 2
    assert "the runner is torch: set the runner to the file's (onnx or tensorrt)" in capsys.readouterr().err


def test_an_exported_runner_without_its_export_or_a_gpu_fails_the_start_before_ray(tmp_path, capsys, no_launch):
    """`engine.runner: tensorrt` without CUDA and `engine.runner: onnx` with a bundle that records no export started
    Ray, and every Remover replica failed on it (while `engine.device: cuda` without a GPU was refused); the tiny
    bundle was not checked, and the command said checked 256 and 512 px, not the config's buckets, and broke on a
    path with a space (an export trial)."""
    import shlex

    from engines.runners import export_key
    from serve.cli import missing_model_files

    assert export_key("onnx", "float32").startswith("onnx.") and export_key("tensorrt", "float16", "9.0").startswith(
        "tensorrt."
    ), "serve.cli._no_export_recorded reads the records by these keys"
    bundle = tmp_path / "my bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"name": "b", "provenance": {"exports": {}}}))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    path = tmp_path / "serve.yaml"
    for runner in ("onnx", "tensorrt"):
        args = {"bundle": {"path": str(bundle)}, "engine": {"runner": runner}}
        path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(args)))
        for command in ("run", "check"):
            assert run([command, "--config", str(path), "--gpus", "1", *ports]) == 2
            err = capsys.readouterr().err
            assert f"cannot start: engine.runner {runner}: bundle.path {bundle} records no {runner} export: run " \
                f"`python -m export all --config {path} --bundle {shlex.quote(str(bundle))}`" in err, err
        (tmp_path / "unet.bin").write_bytes(b"x")
        unchecked = {"runner": runner, "runner_path": str(tmp_path / "unet.bin")}
        assert missing_model_files({**args, "engine": unchecked}, path) is None, "a runner_path is served unchecked"
    exported_at_start = {"runner": "onnx", "export_missing": True}
    assert missing_model_files({"bundle": {"path": str(bundle)}, "engine": exported_at_start}, path) is None
    (bundle / "manifest.json").write_text(json.dumps({"provenance": {"exports": {"onnx.float32": {}}}}))
    assert missing_model_files({"bundle": {"path": str(bundle)}, "engine": {"runner": "onnx"}}, path) is None

    tiny = {"bundle": {"cache_dir": str(tmp_path / "cache")}, "engine": {"runner": "onnx"}}
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(tiny)))
    assert run(["check", "--config", str(path), *ports]) == 2
    assert f"cannot start: engine.runner onnx: the tiny bundle {tmp_path / 'cache' / 'tiny-0'} records no onnx " \
        f"export: run `python -m export all --config {path}`" in capsys.readouterr().err
    (tmp_path / "cache" / "tiny-0").mkdir(parents=True)
    (tmp_path / "cache" / "tiny-0" / "manifest.json").write_text(
        json.dumps({"provenance": {"exports": {"onnx.float32": {}}}})
    )
    assert missing_model_files(tiny, path) is None

    def second_app(config: dict) -> None:  # export reads a config's first application unless told (a review)
        second = copy.deepcopy(config["applications"][0])
        second.update(name="second", route_prefix="/second")
        second["args"].update(bundle={"cache_dir": str(tmp_path / "cache"), "tiny_seed": 1}, engine={"runner": "onnx"})
        config["applications"].append(second)

    path.write_text(_local_yaml(second_app))
    assert run(["check", "--config", str(path), *ports]) == 2
    assert f"application second: engine.runner onnx: the tiny bundle {tmp_path / 'cache' / 'tiny-1'} records no " \
        f"onnx export: run `python -m export all --config {path} --app second`" in capsys.readouterr().err
    import argparse

    from export.cli import _serve_buckets

    (tmp_path / "two.yaml").write_text(_local_yaml(lambda c: (second_app(c), c["applications"][1]["args"].update(
        imaging={"buckets": [512, 768]}, batching={}))))
    two = argparse.Namespace(config=str(tmp_path / "two.yaml"), app="second", buckets=None)
    assert _serve_buckets(two) == [512, 768]
    from export.tensorrt_build import load_serve_settings

    (tmp_path / "unnamed.yaml").write_text(_local_yaml(lambda c: (c["applications"][0].pop("name"), second_app(c))))
    assert load_serve_settings(tmp_path / "unnamed.yaml", "default").bundle.is_tiny(), "Ray's name for an unnamed one"
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(engine={"runner": "tensorrt"})))
    assert run(["run", "--config", str(path), "--gpus", "0", *ports]) == 2
    assert "cannot start: the Remover is set to engine.runner: tensorrt, which runs on a CUDA GPU only, and gets no " \
        "GPU (this machine has no CUDA GPU)" in capsys.readouterr().err
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(engine={"runner": "tensorrt",
                                                                                       "device": "cpu"})))
    assert run(["run", "--config", str(path), *ports]) == 2
    err = capsys.readouterr().err
    assert "engine.runner tensorrt runs on a CUDA GPU only: set engine.device to cuda or auto" in err


def test_a_local_piece_of_the_authors_layout_that_is_not_there_fails_the_start_before_ray(tmp_path, capsys, no_launch):
    """A Drive folder not copied yet (lcm_lora, discriminator) was found missing only by the replicas, after Ray's start."""
    (tmp_path / "RORem-LCM").mkdir()
    authors = {
        "base": "hf:LetsThink/RORem@" + "a" * 40,
        "lcm_lora": str(tmp_path / "RORem-LCM"),
        "discriminator": str(tmp_path / "RORem-Discriminator"),
        "discriminator_unet": str(tmp_path / "sdxl-inpainting" / "unet"),
    }
    path = tmp_path / "serve.yaml"
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(bundle={"authors": authors})))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), *ports]) == 2
    err = capsys.readouterr().err
    named = f"bundle.authors.discriminator {authors['discriminator']}, bundle.authors.discriminator_unet "
    assert f"cannot start: {named}{authors['discriminator_unet']}: no such file or folder" in err
    assert "lcm_lora" not in err and "base" not in err and "Model bundles" in err


@pytest.mark.parametrize(("keys", "said"), [(None, "No such file or directory"), ("keys: [{name: a}]\n", "keys.0")])
def test_an_api_keys_file_that_cannot_be_read_fails_the_start_before_ray(tmp_path, capsys, no_launch, keys, said):
    """With auth on, a missing or invalid keys file started Ray, and the Ingress then failed its start inside it."""
    keys_file = tmp_path / "keys.yaml"
    if keys is not None:
        keys_file.write_text(keys)
    path = tmp_path / "serve.yaml"
    auth = {"enabled": True, "keys_file": str(keys_file)}
    path.write_text(_local_yaml(lambda c: c["applications"][0]["args"].update(auth=auth)))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), *ports]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[rorem] cannot start: auth.keys_file: cannot read API keys from {keys_file}: ")
    assert said in err and "new-key" in err and len(err.splitlines()) == 1


# a /readyz answer for the tests that start the CLI with a faked launcher
_READY = {
    "status": "ready", "gate": {"mode": "annotate"},
    "model": {"bundle": {"name": "tiny"}, "tiny": True, "device": "cpu", "dtype": "float32", "steps": 4, "buckets": [512]},
}  # fmt: skip


def _two_applications(config: dict) -> None:
    """local.yaml's application twice: `rorem` at / and `keyed` at /api/v1 with keys on and a bundle folder given
    relative to where the CLI starts."""
    second = copy.deepcopy(config["applications"][0])
    second.update(name="keyed", route_prefix="/api/v1")
    second["args"]["auth"] = {"enabled": True, "keys_file": "keys.yaml"}
    config["applications"].append(second)


def test_a_config_of_several_applications_is_started_as_one_and_ready_once_each_is(tmp_path, monkeypatch, capsys):
    """One Ray and one proxy for every application of the config: each waited for at its own address and printed
    READY with the metadata its gRPC calls name, the proxy's body settings for each route prefix, and the stop's
    drain asked at the HTTP root (under a route prefix it asked the app's address, which the proxy's drain
    endpoint is not, and every stop waited out the whole grace)."""
    from serve import cli
    from serve.proxy_middleware import ROUTES_ENV

    path = tmp_path / "serve.yaml"
    path.write_text(_local_yaml(_two_applications))
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROREM_RETENTION_DATABASE_URL", "sqlite:///store/results.db")
    launched, waited, stopped = [], [], []
    ready = _READY

    def popen(command, env, **kwargs):
        launched.append(env)
        return SimpleNamespace(poll=lambda: 0, returncode=0)  # the launcher exits once READY is printed

    monkeypatch.setattr(cli, "subprocess", SimpleNamespace(Popen=popen))  # cli's name only: Ray subclasses Popen
    monkeypatch.setattr(cli, "wait_until_ready", lambda url, *args: waited.append(url) or ready)
    monkeypatch.setattr(cli, "stop_service", lambda child, url, *args: stopped.append(url) or 0)
    port = free_port()
    ports = ["--port", str(port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), *ports]) == 0
    root = f"http://127.0.0.1:{port}"
    assert waited == [root, root + "/api/v1"] and stopped == [root]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[rorem] READY")]
    assert len(lines) == 2
    assert lines[0].startswith(f"[rorem] READY on {root} : POST {root}/remove | gRPC")
    assert "(metadata application=rorem)" in lines[0] and "| API keys off |" in lines[0]
    assert lines[1].startswith(f"[rorem] READY on {root}/api/v1 : POST {root}/api/v1/remove")
    assert "(metadata application=keyed)" in lines[1] and f"| API keys on ({tmp_path / 'keys.yaml'}) |" in lines[1]
    routes = json.loads(launched[0][ROUTES_ENV])
    assert set(routes) == {"/", "/api/v1"} and routes["/api/v1"]["keys_file"] == str(tmp_path / "keys.yaml")
    grpc_apps = json.loads(launched[0]["ROREM_GRPC_APPS"])
    assert grpc_apps["rorem"]["keys"] is None and grpc_apps["keyed"]["keys"]["keys_file"] == str(tmp_path / "keys.yaml")
    # Ray's processes run in the repository: a relative SQLite file from the environment named another file there
    assert launched[0]["ROREM_RETENTION_DATABASE_URL"] == f"sqlite:///{tmp_path / 'store' / 'results.db'}"


def test_an_unnamed_application_is_ray_s_default_and_an_ipv6_host_is_bracketed(tmp_path, monkeypatch, capsys):
    from ray.serve._private.constants import SERVE_DEFAULT_APP_NAME

    from serve import cli
    from serve.config import RAY_DEFAULT_APP_NAME, app_name

    assert RAY_DEFAULT_APP_NAME == SERVE_DEFAULT_APP_NAME and app_name({}) == "default"
    config = yaml.safe_load(_local_yaml(_two_applications))
    del config["applications"][0]["name"]
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    waited = []
    ready = _READY
    launcher = SimpleNamespace(poll=lambda: 0, returncode=0)
    monkeypatch.setattr(cli, "subprocess", SimpleNamespace(Popen=lambda *args, **kwargs: launcher))
    monkeypatch.setattr(cli, "wait_until_ready", lambda url, *args: waited.append((url, args[-1])) or ready)
    monkeypatch.setattr(cli, "stop_service", lambda *args: 0)
    monkeypatch.setattr(cli, "busy_ports", lambda addresses, in_use_too=True: [])  # ::1 may not be here: none listens
    port, grpc_port = free_port(), free_port()
    assert run(["run", "--config", str(path), "--host", "::1", "--port", str(port), "--grpc-port", str(grpc_port)]) == 0
    assert waited == [(f"http://[::1]:{port}", "default"), (f"http://[::1]:{port}/api/v1", "keyed")]
    out = capsys.readouterr().out
    assert f"READY on http://[::1]:{port} : POST http://[::1]:{port}/remove | gRPC [::1]:{grpc_port} (metadata application=default)" in out
    empty = tmp_path / "empty.yaml"
    empty.write_text("applications: []\n")
    assert run(["run", "--config", str(empty)]) == 2
    assert "the config has no applications" in capsys.readouterr().err


def test_deployments_the_config_does_not_list_are_given_cpus_too(tmp_path, monkeypatch):
    """Ray gives a replica 1 CPU unless told otherwise: a config without `deployments` (the docs' example of two
    applications) was counted 0 CPUs, Ray started with the machine's 2, and the replicas waited forever."""
    config = yaml.safe_load(_local_yaml())
    del config["applications"][0]["deployments"]
    # within Ray's default of 5 requests at once, which the unlisted deployments run with (check_deployments)
    config["applications"][0]["args"].update(
        overload={"max_in_flight": 4}, batching={"max_batch_size": 2}, scorer={"max_batch_size": 4}
    )
    command, _ = _launched(tmp_path, monkeypatch, yaml.safe_dump(config), cores=2, quota=None)
    assert command[command.index("--num-cpus") + 1] == "3", command  # Ingress, Remover, Scorer at 1 each


def test_a_container_s_cpu_quota_is_counted_as_ray_counts_it(tmp_path, monkeypatch, capsys):
    """`docker run --cpus 2` on a 16-core host: the CLI compared the replicas' 3 CPUs with the host's 16 cores and
    passed no --num-cpus, Ray started with the quota's 2, and a replica waited for a CPU until --ready-timeout."""
    command, _ = _launched(tmp_path, monkeypatch, _local_yaml(), cores=16, quota=2.0)
    assert command[command.index("--num-cpus") + 1] == "3", command
    assert "the deployments ask for 3 CPUs, Ray sees 2 here: they share cores" in capsys.readouterr().out
    command, _ = _launched(tmp_path, monkeypatch, _local_yaml(), cores=16, quota=4.0)
    assert "--num-cpus" not in command


def _launched(tmp_path, monkeypatch, config_text: str, cores: int = 16, quota: float | None = None):
    """(the launcher's command, its environment) of a start of this config on a machine of `cores` cores in a
    container of `quota` CPUs (None: no quota), Ray not started."""
    import ray._private.utils

    from serve import cli

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(ray._private.utils, "_get_docker_cpus", lambda *args, **kwargs: quota)
    monkeypatch.delenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text(config_text)
    launched = []
    child = SimpleNamespace(poll=lambda: 1, returncode=1)
    popen = lambda command, env, **kwargs: launched.append((command, env)) or child
    monkeypatch.setattr(cli, "subprocess", SimpleNamespace(Popen=popen))
    monkeypatch.setattr(cli, "wait_until_ready", lambda *args: None)
    monkeypatch.setattr(cli, "stop_service", lambda *args: 1)
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    run(["run", "--config", str(path), *ports])
    (started,) = launched
    return started


def test_several_applications_share_the_gpus_and_a_single_bundle_flag_is_refused(tmp_path, capsys, no_launch):
    from serve.cli import PlacementError, fit_to_machine, host_names_note

    config = yaml.safe_load(_local_yaml(_two_applications))
    for app in config["applications"]:
        app["args"]["bundle"] = {"path": f"bundles/{app['name']}"}
    notes = fit_to_machine(config, None, None, None, gpus=1)
    assert notes == [
        "1 GPU(s) here, 4 GPU replicas (rorem/Remover x1, rorem/Scorer x1, keyed/Remover x1, keyed/Scorer x1) "
        "asked for 4: they share, num_gpus 0.25 each (set ray_actor_options.num_gpus in the config to size them "
        "yourself)"
    ]
    assert {d["ray_actor_options"].get("num_gpus", 0) for app in config["applications"] for d in app["deployments"]} == {
        0.25, 0
    }  # the Ingresses ask for none
    assert [app["args"]["bundle"]["path"] for app in config["applications"]] == [
        str(Path.cwd() / "bundles" / "rorem"), str(Path.cwd() / "bundles" / "keyed")
    ]
    with pytest.raises(PlacementError, match="ROREM_BUNDLE names one bundle, and this config has 2 applications"):
        fit_to_machine(copy.deepcopy(config), "/models/b", None, None, gpus=0)
    config["http_options"]["host"] = "0.0.0.0"
    (note,) = host_names_note(config)
    assert note.startswith("listening on 0.0.0.0 without API keys (application rorem): ")

    config["applications"][1]["route_prefix"] = None  # Ray's gRPC-only application
    for app in config["applications"]:
        del app["args"]["bundle"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert run(["run", "--config", str(path), *ports]) == 2
    assert "cannot start: application keyed has no route_prefix" in capsys.readouterr().err


def test_the_ready_line_says_whether_api_keys_are_on():
    from serve.cli import keys_state

    assert keys_state({}) == "API keys off"
    keyed = {"auth": {"enabled": True, "keys_file": "/etc/rorem/keys.yaml"}}
    assert keys_state(keyed) == "API keys on (/etc/rorem/keys.yaml)"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--port", "99999"], "99999 is not a port (1-65535)"),
        (["--gpus", "-1"], "-1: a GPU count is 0 or more"),
        *((["--ready-timeout", t], f"{t!r} is no deadline: a number of seconds above 0") for t in ("0", "-5", "nan")),
    ],
)
def test_a_bad_flag_is_refused_by_the_command_line(capsys, no_launch, flags, said):
    with pytest.raises(SystemExit) as exit:
        run(["run", *flags])
    assert exit.value.code == 2 and said in capsys.readouterr().err


def _status(app: str, deployments: dict[str, tuple[str, str]], message: str = "") -> SimpleNamespace:
    """A ray.serve.status() answer: one application and its deployments' (status, message)."""
    states = {name: SimpleNamespace(status=status, message=text) for name, (status, text) in deployments.items()}
    return SimpleNamespace(
        applications={"rorem": SimpleNamespace(status=app, message=message, deployments=states)}
    )


def test_a_deploy_that_failed_for_good_ends_the_start_at_once_with_rays_message():
    """A review's missing bundle and Scorer without a Scorer waited out --ready-timeout (600 s) in silence."""
    traceback = "Traceback (most recent call last):\n  File ...\nFileNotFoundError: no bundle at /models/x"
    answers = iter([
        SimpleNamespace(applications={}),
        _status("DEPLOYING", {"Remover": ("UPDATING", "")}),
        _status("DEPLOY_FAILED", {"Ingress": ("HEALTHY", ""), "Remover": ("DEPLOY_FAILED", f"failed 3 times. Error:\n{traceback}")},
                "Deploying app 'rorem' failed"),
    ])  # fmt: skip
    failure = launcher.wait_for_start(lambda: next(answers), poll_s=0)
    assert failure == (
        "application 'rorem': Deploying app 'rorem' failed; deployment 'Remover': FileNotFoundError: no bundle at /models/x"
    )
    long = _status("DEPLOY_FAILED", {}, "x" * 5000).applications["rorem"]
    assert len(launcher.deploy_failure("rorem", long)) == len("application 'rorem': ") + launcher.MESSAGE_CHARS
    running = iter([_status("DEPLOYING", {}), _status("RUNNING", {"Remover": ("HEALTHY", "")})])
    assert launcher.wait_for_start(lambda: next(running), poll_s=0) is None


# --- one real service: a second start, the gRPC limit, then SIGTERM ----------------------------------


@pytest.fixture
def running(keyed_service):
    """The keyed application (API keys on, 1 MP images) of the session's Serve, after the hardening tests; the last
    test here stops the Serve."""
    return keyed_service


def test_ray_goes_on_loopback_with_a_loopback_host_and_its_replica_grpc_servers_with_it(monkeypatch):
    import ray
    from ray.serve._private import replica

    from serve.cli import ray_network_env
    from serve.local_ray import RAY_LOOPBACK_ENV, RAY_TOKEN_AUTH_ENV, keep_replica_grpc_on_loopback

    assert ray_network_env({"http_options": {"host": "127.0.0.1"}, "applications": [{}]}) == {
        **RAY_LOOPBACK_ENV, **RAY_TOKEN_AUTH_ENV
    }
    assert ray_network_env({"http_options": {"host": "0.0.0.0"}, "applications": [{}]}) == RAY_TOKEN_AUTH_ENV
    bound = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.2")
    assert not keep_replica_grpc_on_loopback()
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert keep_replica_grpc_on_loopback() and keep_replica_grpc_on_loopback(), "twice: wrapped once"
    replica.add_port_to_grpc_server(None, "[::]:0")
    replica.add_port_to_grpc_server(None, "10.0.0.1:5000")
    assert bound == ["127.0.0.1:0", "10.0.0.1:5000"]

    bound.clear()  # a machine whose loopback is IPv6 only: the node's address is ::1
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "::1")
    assert keep_replica_grpc_on_loopback()
    replica.add_port_to_grpc_server(None, "[::]:0")
    assert bound == ["[::1]:0"]
    monkeypatch.delattr(replica, "add_port_to_grpc_server")  # a Ray without the hook: said, not silent
    logger, said = logging.getLogger("ray.serve"), []
    monkeypatch.setattr(logger, "error", lambda message, *args: said.append(message))
    assert not keep_replica_grpc_on_loopback()
    assert said and "listens on every interface" in said[0]


def _listening(pids: set[str]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on (/proc, as serve.ports reads it)."""
    inodes = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].rsplit(":", 1)
                inodes[f"socket:[{fields[9]}]"] = (address, int(port, 16))
    found = set()
    for pid in pids:
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        found |= {inodes[link] for link in links if link in inodes}
    return found


def _is_loopback(address: str) -> bool:
    """/proc/net's hex: 127.x.x.x (little-endian: the last byte is 7F), ::1, or ::ffff:127.x.x.x."""
    if len(address) == 8:
        return address.endswith("7F")
    return address == "00000000000000000000000001000000" or (
        address.startswith("0000000000000000FFFF0000") and address.endswith("7F")
    )


def test_a_local_instance_listens_on_loopback_only_but_for_the_grpc_api(running):
    """Ray turned the node address 127.0.0.1 into the machine's network address: GCS, the raylet, the metrics
    export and every replica's inter-deployment gRPC server (which unpickles what it is sent) listened on the
    network while the docs said loopback. Now only Ray's gRPC proxy does (the API's gRPC port, answered from
    loopback peers only while keys are off)."""
    instance = httpx.get(running.url + "/healthz").json()["instance"]
    marker = f"ROREM_INSTANCE_ID={instance}".encode()
    pids = set()
    for pid_dir in Path("/proc").iterdir():
        try:
            if pid_dir.name.isdigit() and marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                pids.add(pid_dir.name)
        except OSError:
            continue
    listening = _listening(pids)
    assert len(pids) >= 5 and len(listening) >= 8, (pids, listening)
    open_to_the_network = {(address, port) for address, port in listening if not _is_loopback(address)}
    assert {port for _, port in open_to_the_network} == {running.ports["grpc"]}, open_to_the_network


def test_ready_names_this_instance_and_whether_api_keys_are_on(running, cluster):
    """One READY line per application (the session's Serve has several), each naming the metadata its gRPC calls
    carry."""
    health = httpx.get(running.url + "/healthz").json()
    assert health["application"] == running.app_name
    lines = [line for line in running.log_path.read_text().splitlines() if "[rorem] READY" in line]
    assert len(lines) == len(cluster)
    (ready,) = [line for line in lines if f"READY on {running.url} :" in line]
    assert f"| instance {health['instance']}" in ready
    assert (f"(metadata application={running.app_name})" in ready) is (len(cluster) > 1), "a cluster of one takes any"
    assert "| API keys on (" in ready and "keys.yaml) |" in ready, ready
    assert all(f"| instance {health['instance']}" in line for line in lines), "one start serves them all"


def test_a_second_start_on_the_busy_http_port_fails_fast_naming_it(running):
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "serve", "run", "--config", str(running.work / "serve.yaml"),
         "--port", str(running.ports["http"]), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert second.returncode == 2, second.stderr
    assert f"the HTTP port {running.ports['http']} (127.0.0.1) is already in use, held by pid" in second.stderr
    assert "ray::ProxyActor" in second.stderr  # the holder, found in /proc
    assert f"a process of the service pid {running.child.pid} (python -m serve run)" in second.stderr, "the one to stop"
    assert "READY" not in second.stdout
    assert elapsed < 30, f"took {elapsed:.1f} s"  # before the model libraries load (a minute on a busy 2-core box)


def test_a_grpc_message_over_the_limit_is_refused_by_the_proxy(running, cluster):
    """The proxy's limit is one for the process: the largest any application of the cluster needs."""
    limit = max(grpc_max_message_bytes(AppSettings.model_validate(app.config).imaging) for app in cluster.values())
    channel = grpc.insecure_channel(
        f"127.0.0.1:{running.ports['grpc']}", options=[("grpc.max_send_message_length", 2 * limit)]
    )
    stub = ObjectRemovalStub(channel)
    metadata = [("x-api-key", running.app_key), ("application", running.app_name)]
    with pytest.raises(grpc.RpcError) as over:
        stub.Remove(_message_of(limit + 1), timeout=60, metadata=metadata)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in over.value.details()  # gRPC's own refusal, not the app's problem document
    with pytest.raises(grpc.RpcError) as under:  # at the limit: through the proxy, the app refuses it
        stub.Remove(_message_of(limit), timeout=60, metadata=metadata)
    assert under.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "payload-too-large" in under.value.details()
    channel.close()


def _message_of(size: int) -> pb.RemoveRequest:
    """A RemoveRequest of exactly `size` bytes: the mask field (3), the image's tag (1) and length (4)."""
    message = pb.RemoveRequest(image=b"\0" * (size - 8), mask=b"m")
    assert message.ByteSize() == size
    return message


def test_a_chunked_http_body_over_the_limit_is_refused_by_the_proxy(running):
    def body():
        for _ in range(20):
            yield b"x" * (1024 * 1024)  # 20 MiB, no Content-Length; the limit is 8 MiB

    headers = {"content-type": "application/json", "x-api-key": running.app_key}
    response = httpx.post(running.url + "/remove", content=body(), headers=headers)
    assert response.status_code == 413
    assert "(at the proxy)" in response.json()["detail"]


@pytest.mark.chaos
@pytest.mark.stops_cluster
def test_sigterm_stops_everything_within_10_s_answering_the_request_in_flight(running):
    launcher = int(Path(f"/proc/{running.child.pid}/task/{running.child.pid}/children").read_text().split()[0])
    members = session_members(launcher)
    session_dirs = {arg.split("=", 1)[1] for pid in members for arg in _argv(pid) if arg.startswith("--session_dir=")}
    assert len(members) > 5 and session_dirs, "gcs_server, raylet, workers run in the launcher's session"
    effective = Path(re.search(r"effective Serve config: (\S+)", running.log_path.read_text())[1])
    assert effective.is_file(), "the effective config is there to edit while the service runs"

    mask = np.zeros((256, 256), np.uint8)
    mask[100:140, 110:150] = 255
    upload = {"image": png_bytes(photo(256, 256)), "mask": png_bytes(mask)}
    answer: dict = {}

    def in_flight():
        try:
            headers = {"x-api-key": running.app_key}
            answer["status"] = httpx.post(running.url + "/remove", files=upload, headers=headers, timeout=30).status_code
        except httpx.HTTPError as exc:
            answer["error"] = repr(exc)

    big_mask = np.zeros((960, 960), np.uint8)
    big_mask[100:860, 100:860] = 255  # a 1024 crop: it outlasts the HTTP removal, so the drain must wait for it
    big_photo = np.resize(photo(512, 412), (960, 960, 3))  # the astronaut is 512 px: repeated to 960 x 960
    big = {"image": png_bytes(big_photo), "mask": png_bytes(big_mask)}

    def grpc_in_flight():  # the stop cut such a call with a bare UNAVAILABLE: the drain did not see gRPC
        metadata = [("x-api-key", running.app_key), ("application", running.app_name)]
        with grpc.insecure_channel(f"127.0.0.1:{running.ports['grpc']}") as channel:
            try:
                message = pb.RemoveRequest(image=big["image"], mask=big["mask"])
                ObjectRemovalStub(channel).Remove(message, timeout=30, metadata=metadata)
                answer["grpc"] = "OK"
            except grpc.RpcError as error:
                answer["grpc"] = (error.code(), error.details())

    clients = [threading.Thread(target=in_flight), threading.Thread(target=grpc_in_flight)]
    for client in clients:
        client.start()
    time.sleep(0.3)
    started = time.monotonic()
    running.child.send_signal(signal.SIGTERM)
    running.child.wait(timeout=30)
    stopped_s = time.monotonic() - started
    for client in clients:
        client.join(timeout=30)
    assert stopped_s < STOP_LIMIT_S, f"{stopped_s:.1f} s"
    assert answer.get("status") in (200, 503), answer
    assert answer.get("grpc") == "OK" or (
        answer["grpc"][0] == grpc.StatusCode.UNAVAILABLE and "s into the stop" in answer["grpc"][1]
    ), answer  # answered, or given up after the drain's grace: never cut, never "not run" (it came first)
    assert session_members(launcher) == [], "a process of the service outlived it"
    leftovers = [pid for pid in _pids() if any(d in " ".join(_argv(pid)) for d in session_dirs)]
    assert leftovers == [], f"Ray processes of {session_dirs} still run: {leftovers}"
    assert "[rorem] stopped in" in running.log_path.read_text()
    assert not effective.parent.exists(), "the CLI's work folder (effective config, drain flag) outlived it"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_a_config_without_grpc_neither_checks_nor_shows_a_grpc_port_and_refuses_one(tmp_path, capsys, no_launch):
    """Ray starts no gRPC proxy without servicer functions: its port was checked (a start refused for a port
    nothing would bind), printed in READY, and --grpc-port taken for it."""
    from serve.cli import ready_line
    from serve.grpc_servicer import SERVICER_FUNCTION

    config = yaml.safe_load(_local_yaml())
    del config["grpc_options"]
    assert set(listen_addresses(config, 9464)) == {"HTTP", "metrics"}
    ready = {"model": {"bundle": {"name": "tiny"}, "tiny": True, "device": "cpu", "dtype": "float32", "steps": 4,
             "buckets": [512]}, "gate": {"mode": "annotate"}}  # fmt: skip
    app = config["applications"][0]
    assert "gRPC" not in ready_line(app, "http://127.0.0.1:8000", ready, None, 9464, "x", 1)
    assert "| gRPC 127.0.0.1:9000 |" in ready_line(app, "http://127.0.0.1:8000", ready, "127.0.0.1:9000", 9464, "x", 1)
    ready["model"]["runner"] = "onnx"  # the UNet's runner, which only /readyz said
    assert "on cpu float32, onnx runner, 4 steps" in ready_line(app, "http://127.0.0.1:8000", ready, None, 9464, "x", 1)
    config["grpc_options"] = {"port": 9000, "grpc_servicer_functions": []}
    assert "gRPC" not in listen_addresses(config, 9464)
    config["grpc_options"] = {"port": 0, "grpc_servicer_functions": [SERVICER_FUNCTION]}  # Ray: no proxy on port 0
    assert "gRPC" not in listen_addresses(config, 9464)
    config["grpc_options"] = {"port": 9000, "grpc_servicer_functions": []}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(["run", "--config", str(path), "--grpc-port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "cannot start: --grpc-port: this config serves no gRPC (grpc_options.grpc_servicer_functions" in err
