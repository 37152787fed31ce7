"""Bounded soak / chaos run: steady load for a while, optionally killing model replicas, then a count
of what happened to every request.

    python loadtests/soak.py --url http://127.0.0.1:8000 --seconds 300 --clients 4
    python loadtests/soak.py --url http://127.0.0.1:8000 --seconds 300 --clients 4 --chaos-every 60 \\
        --chaos-deployments Remover,Scorer --out out/soak.json

Counts: sent (requests started), answered (an HTTP answer came back: a valid image, or a problem+json
error), ok and ok_in_window (the 200s with a valid image, and those of them that came back before --seconds
had passed: each client's last request ends after it), errored (answered with an error, by status), lost (no
answer: connection dropped or the client deadline passed). lost must be 0: a request may fail, but it must be
told so. A 200 without a decodable image of the input's size counts as `bad_result` (not ok), an error without
problem+json as `bad_error`. The exit code is 1 when lost, bad_result or bad_error is non-zero, when no request
succeeded (a run whose every request got 401, no --api-key, removed nothing), or on any error but a load refusal
(`refused`: a problem of serve.problems.LOAD_REFUSALS, too-many-requests or overloaded, with Retry-After; the
locustfile's rule, benchlib.rest_refusal): a 503 replica-failed or not-ready, a 504 or a 408 is a failure.
A key's own quota's 429 (its problem names the `quota`) is counted apart as `over_quota`, not as a refusal of a
busy service, and does not fail the run either.
A client waits out an error's Retry-After (at most
benchlib.MAX_RETRY_AFTER_S, and not past the window), or ERROR_PAUSE_S without one.

Chaos kills replica processes of a local Serve (`ray::ServeReplica:<app>:<deployment>`) with SIGKILL,
round-robin over --chaos-deployments, only those of the service --url answers for (the instance id its
/healthz gives, which `python -m serve run` puts in the environment of every Ray process it starts, and the
Serve application it names there: one start may serve several).
On Kubernetes, delete a worker pod instead (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from benchlib import (
    answer_problem, api_key_headers, center_mask, exit_if_unreachable, photo, png, positive_int, rest_over_quota,
    rest_refusal, retry_after_s, summarize, valid_image,
)  # fmt: skip

from serve.config import INSTANCE_ENV
from serve.grpc_client import API_KEY_ENV
from serve.ports import DEFAULT_HTTP_PORT

# after a lost request or an error without Retry-After (a refused connection or a 401 answers at once: no tight loop)
ERROR_PAUSE_S = 0.1


@dataclass
class SoakReport:
    seconds: float
    clients: int
    sent: int = 0
    answered: int = 0
    ok: int = 0
    ok_in_window: int = 0  # the 200s that came back before `seconds` had passed (a rate's numerator)
    errored: dict[str, int] = field(default_factory=dict)
    # the same errors by problem: a 503 is a replica-failed (a failure) or an overloaded (a refusal)
    errored_problems: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # of the errored, the load refusals (benchlib.rest_refusal): what a busy service answers
    over_quota: int = 0  # of the errored, the key's own quota's 429s (benchlib.rest_over_quota): not the service's
    lost: int = 0
    lost_reasons: dict[str, int] = field(default_factory=dict)
    bad_result: int = 0
    bad_error: int = 0
    kills: list[dict] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the service answered every request well: each error a load refusal (benchlib.rest_refusal, the
        locustfile's rule: a 503 replica-failed, a 504 or a 401 is a failure), and one ok removal at least (a
        run without one measured nothing)."""
        well_formed = self.lost == 0 and self.bad_result == 0 and self.bad_error == 0
        return well_formed and self.refused + self.over_quota == sum(self.errored.values()) and self.ok > 0


def replica_pids(deployment: str, instance: str, app: str, proc: Path = Path("/proc")) -> list[int]:
    """The replica processes (`ray::ServeReplica:<app>:<deployment>`) of one local service: those whose
    environment carries its instance id (serve.config.INSTANCE_ENV, which `python -m serve run` gives every Ray
    process it starts, and its /healthz answers)."""
    marker, title = f"{INSTANCE_ENV}={instance}".encode(), f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for pid_dir in proc.iterdir():
        try:
            if pid_dir.name.isdigit() and title in (pid_dir / "cmdline").read_bytes():
                if marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                    pids.append(int(pid_dir.name))
        except OSError:
            continue  # gone, or another user's
    return sorted(pids)


def service_identity(url: str, headers: dict | None = None) -> tuple[str, str]:
    """The instance id and the Serve application the service at `url` answers on /healthz: chaos kills that
    service's replicas only (with several local Serves, or several applications on one, the first matching
    replica on the machine was another one's)."""
    answer = httpx.get(url.rstrip("/") + "/healthz", headers=headers, timeout=10).json()
    if not answer.get("instance"):
        raise SystemExit(f"{url}/healthz names no instance: chaos kills replicas of a `python -m serve run` only")
    return answer["instance"], answer["application"]


def run_soak(
    url: str,
    seconds: float,
    clients: int,
    side: int = 256,
    headers: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    client_timeout_s: float = 180.0,
    chaos_every_s: float | None = None,
    chaos_deployments: tuple[str, ...] = ("Remover",),
) -> SoakReport:
    image = photo(side)
    upload = {"image": png(image), "mask": png(center_mask(side).astype(np.uint8) * 255)}
    report = SoakReport(seconds=seconds, clients=clients)
    latencies: list[float] = []
    lock = threading.Lock()
    window_open = threading.Event()
    deadline = 0.0

    def open_window() -> None:
        """The window starts once every client is set up: on a loaded machine making the clients alone has taken
        over a second, and a short window then closed before any request was sent."""
        nonlocal deadline
        deadline = time.monotonic() + seconds
        window_open.set()

    everyone_ready = threading.Barrier(clients, action=open_window)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=client_timeout_s, headers=headers or {}) as http:
            everyone_ready.wait()
            while time.monotonic() < deadline:
                with lock:
                    report.sent += 1
                started = time.monotonic()
                try:
                    response = http.post("/remove", files=upload, data=fields or {})
                except httpx.HTTPError as exc:
                    with lock:
                        report.lost += 1
                        report.lost_reasons[type(exc).__name__] = report.lost_reasons.get(type(exc).__name__, 0) + 1
                    time.sleep(ERROR_PAUSE_S)
                    continue
                answered_at = time.monotonic()
                elapsed_ms = (answered_at - started) * 1000
                good = response.status_code == 200 and valid_image(response.content, (side, side))
                with lock:
                    report.answered += 1
                    if good:
                        report.ok += 1
                        report.ok_in_window += answered_at <= deadline
                        latencies.append(elapsed_ms)
                    elif response.status_code == 200:
                        report.bad_result += 1
                    else:
                        key, kind = str(response.status_code), f"{response.status_code} {answer_problem(response)}"
                        report.errored[key] = report.errored.get(key, 0) + 1
                        report.errored_problems[kind] = report.errored_problems.get(kind, 0) + 1
                        report.refused += rest_refusal(response.headers, response.content)
                        report.over_quota += rest_over_quota(response.headers, response.content)
                        report.bad_error += response.headers.get("content-type") != "application/problem+json"
                if not good:  # each client waits on its own, not holding the others' lock
                    retry_after = response.headers.get("retry-after")
                    pause = retry_after_s(retry_after) if retry_after else ERROR_PAUSE_S
                    time.sleep(max(0.0, min(pause, deadline - time.monotonic())))

    def chaos() -> None:
        turn = 0
        window_open.wait()
        while time.monotonic() + chaos_every_s < deadline:
            time.sleep(chaos_every_s)
            deployment = chaos_deployments[turn % len(chaos_deployments)]
            turn += 1
            for pid in replica_pids(deployment, instance, application)[:1]:
                os.kill(pid, signal.SIGKILL)
                at_s = round(seconds - (deadline - time.monotonic()), 1)
                report.kills.append({"at_s": at_s, "deployment": deployment, "pid": pid})

    if chaos_every_s:
        instance, application = service_identity(url, headers)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    if chaos_every_s:
        threads.append(threading.Thread(target=chaos, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads[:clients]:
        thread.join()
    if latencies:
        percentiles = summarize(latencies)
        report.latency_ms = {q: percentiles[f"{q}_ms"] for q in ("p50", "p95", "p99")}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_HTTP_PORT}")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=positive_int, default=4)
    parser.add_argument("--side", type=int, default=512, help="square photo side sent with every request")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV))
    parser.add_argument("--gate", default=None, help="gate mode sent with every request")
    parser.add_argument("--chaos-every", type=float, default=None, help="kill a replica every N seconds")
    parser.add_argument("--chaos-deployments", default="Remover")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    options = parser.parse_args()

    with exit_if_unreachable(options.url):
        httpx.get(options.url + "/healthz", timeout=10)  # a wrong --url: one line, not a run of lost requests
        report = run_soak(
            options.url, options.seconds, options.clients, side=options.side,
            headers=api_key_headers(options.api_key),
            fields={"gate": options.gate} if options.gate else None,
            chaos_every_s=options.chaos_every, chaos_deployments=tuple(options.chaos_deployments.split(",")),
        )  # fmt: skip
    summary = {**asdict(report), "passed": report.passed}
    print(f"{'sent':>8} {'answered':>9} {'ok':>6} {'errored':>18} {'lost':>5} {'kills':>6}  p50/p95/p99 ms")
    print(
        f"{report.sent:>8} {report.answered:>9} {report.ok:>6} {json.dumps(report.errored):>18} {report.lost:>5}"
        f" {len(report.kills):>6}  {'/'.join(str(report.latency_ms.get(q)) for q in ('p50', 'p95', 'p99'))}"
    )
    if report.errored_problems:
        print("errors by problem: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(report.errored_problems.items())))
    print("PASSED" if report.passed else f"FAILED: {json.dumps(summary)}")
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(summary, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
