"""The child process of `python -m serve run`: Ray on loopback with a known metrics port, then Ray's
own `serve run` on the effective config.

`serve run` starts Ray itself when none is running, but then the Prometheus export port is random;
starting Ray here first fixes it (`--metrics-port`), and `serve run` reuses this Ray. It is always a Ray of its
own, whatever $RAY_ADDRESS or a running `ray start` cluster says.

Until the applications run, it watches Serve's status: a deploy that failed for good (DEPLOY_FAILED: a
missing bundle, a deployment the config names and the app lacks) ends it at once with Ray's message and
DEPLOY_FAILED_EXIT, so `python -m serve run` does not wait out its --ready-timeout. Ray's `serve run`
itself only prints the controller's logs and waits.

SIGINT / SIGTERM stop Ray at once (ray.shutdown): `python -m serve run` has drained the proxies by then
(serve.proxy_middleware.Drain), and Serve's own shutdown (replica by replica, seconds each, then the
proxies) would not fit in Docker's 10 s grace. The CLI's death sends SIGTERM too (stop_with_parent).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable

SERVE_NAMESPACE = "serve"
DEPLOY_FAILED = "DEPLOY_FAILED"
DEPLOY_FAILED_EXIT = 3
MESSAGE_CHARS = 300


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve.launcher")
    parser.add_argument("config")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--node-ip", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray may schedule (default: the cores)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs Ray may schedule (default: detected)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the CLI) is gone")
    options = parser.parse_args(argv)
    if options.parent_pid:
        stop_with_parent(options.parent_pid)

    import ray
    from ray.serve.scripts import run

    context = ray.init(
        address="local",
        namespace=SERVE_NAMESPACE,
        _node_ip_address=options.node_ip,
        _metrics_export_port=options.metrics_port,
        include_dashboard=False,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
    )

    # where a driver joins this Ray (live settings, docs/configuration.md): address="auto" takes the newest Ray on
    # the machine, which need not be this one
    print(f"[rorem] Ray: {context.address_info['gcs_address']} (this service's, for a driver's ray.init)", flush=True)

    def stop(_signum, _frame):
        ray.shutdown()
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    run.main([options.config, "--non-blocking"], prog_name="serve run", standalone_mode=False)
    failure = wait_for_start(serve_status)
    if failure:
        print(f"[rorem] cannot start: the deploy failed: {failure}", file=sys.stderr, flush=True)
        ray.shutdown()
        os._exit(DEPLOY_FAILED_EXIT)
    while True:  # as Ray's blocking `serve run`: the replicas' logs reach this terminal
        time.sleep(10)


PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when `python -m serve run` (`parent_pid`) dies without stopping this process
    (SIGKILL, the OOM killer): in a session of its own, Ray's processes would outlive it and keep the ports and
    the GPU. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def serve_status():
    from ray import serve

    return serve.status()


def wait_for_start(status: Callable[[], object], poll_s: float = 1.0) -> str | None:
    """None once every application runs; Ray's message (trimmed) once one failed to deploy. `status`:
    ray.serve.status (a ServeStatus)."""
    while True:
        applications = status().applications
        for name, app in applications.items():
            if app.status == DEPLOY_FAILED:
                return deploy_failure(name, app)
        if applications and all(app.status == "RUNNING" for app in applications.values()):
            return None
        time.sleep(poll_s)


def deploy_failure(name: str, app) -> str:
    """An application's failure in a line: its message and each failed deployment's, each the last line of
    Ray's text (a traceback's last line is the error; Ray's preface before it is the same each time)."""
    parts = [f"application {name!r}: {_last_line(app.message)}"]
    for deployment, state in app.deployments.items():
        if state.status == DEPLOY_FAILED:
            parts.append(f"deployment {deployment!r}: {_last_line(state.message)}")
    return "; ".join(parts)


def _last_line(message: str) -> str:
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    line = lines[-1] if lines else "no message"
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


if __name__ == "__main__":
    main()
