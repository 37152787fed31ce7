"""Shared by the benchmark and load scripts (run as `python loadtests/<script>.py`, or by locust, which puts
loadtests/ on sys.path: this imports as `benchlib`)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from serve.ports import free_port  # noqa: F401 (the benchmark scripts import it from here)

REPO = Path(__file__).resolve().parent.parent
MAX_RETRY_AFTER_S = 60.0  # a client that is told to come back later still comes back within a load test
TIMEOUT_ENV = "ROREM_TIMEOUT_S"  # seconds a locust user's request may take before it counts as failed
DEFAULT_TIMEOUT_S = 120
STOP_TIMEOUT_MARGIN_S = 30  # locust's --stop-timeout: the longest request's time and this


def request_timeout_s() -> float:
    """ROREM_TIMEOUT_S, the seconds a locust user's request may take (DEFAULT_TIMEOUT_S when unset). A value that is
    no number of seconds above 0 ("", "abc", "inf", "nan", "0", "-5") ends the run in one line naming it, not with
    float()'s ValueError at locust's import, nor as a timeout that never fires or fails every request."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SystemExit(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds above 0 (default {DEFAULT_TIMEOUT_S})")
    return seconds


def locust_stop_timeout_s() -> int:
    """locust's --stop-timeout for a run: longer than a request may take (ROREM_TIMEOUT_S), so the requests still
    running when -t ends are answered and counted; without it locust kills them and the slowest requests vanish
    from the figures (percentiles biased low)."""
    return math.ceil(request_timeout_s()) + STOP_TIMEOUT_MARGIN_S


def api_key_headers(key: str | None) -> dict[str, str]:
    """The credentials of a service with API keys on: serve/auth.py takes `x-api-key` as a REST header and as gRPC
    metadata alike."""
    return {"x-api-key": key} if key else {}


def retry_after_s(value: str | None, now: float | None = None) -> float:
    """A Retry-After in seconds, at most MAX_RETRY_AFTER_S: delay-seconds or an HTTP date (RFC 9110 10.2.3; the
    service sends seconds, a proxy in front may send a date); one that is neither (or absent, or NaN) waits 1 s
    rather than ending the client with a ValueError."""
    from email.utils import parsedate_to_datetime

    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            seconds = 1.0
    if math.isnan(seconds):
        seconds = 1.0
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def problem_slug(type_uri: object) -> str | None:
    """The kind a problem's `type` names (serve.problems.TYPE_BASE + slug), None if it names none."""
    return type_uri.rsplit("/", 1)[-1] if isinstance(type_uri, str) and type_uri else None


def answer_problem(response) -> str:
    """An error answer's problem slug, with the quota it names (`too-many-requests (quota minute)`: a key's own
    limit, not a busy service), or `(no problem)` for a body that is not problem+json."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    slug = (isinstance(problem, dict) and problem_slug(problem.get("type"))) or "(no problem)"
    return f"{slug} (quota {problem['quota']})" if isinstance(problem, dict) and problem.get("quota") else slug


def parsed_problem(body: bytes | str | None) -> dict | None:
    """A problem+json document (a REST answer's body, a gRPC error's details), None for anything else."""
    try:
        problem = json.loads(body or b"")
    except ValueError:
        return None
    return problem if isinstance(problem, dict) else None


def over_quota(problem: dict | None) -> bool:
    """Whether a problem is a key's own quota's refusal (serve/quotas.py names the quota): what the client asked
    past its limit, not a busy service (the service's metrics call it outcome="over_quota")."""
    return bool(problem) and problem_slug(problem.get("type")) == "too-many-requests" and bool(problem.get("quota"))


def rest_refusal(headers, body: bytes) -> bool:
    """Whether an answer is a load refusal (LOAD_REFUSALS, with Retry-After), which a busy service answers a good
    request with: a 503 replica-failed or not-ready also has a Retry-After, and a crashing Remover counted as
    refused showed no failure (the locustfile's rule and soak.py's). A key's quota's 429 is not one (rest_over_quota):
    counted as one, a run past its key's quota read as a service shedding load."""
    from serve.problems import LOAD_REFUSALS  # here: serve.problems needs fastapi, which the GPU machine lacks

    if not headers.get("retry-after"):
        return False
    problem = parsed_problem(body)
    return problem is not None and problem_slug(problem.get("type")) in LOAD_REFUSALS and not over_quota(problem)


def rest_over_quota(headers, body: bytes) -> bool:
    """Whether an answer is a key's quota's 429 (with Retry-After): neither a failure of the service nor load
    shedding; load tests report it under its own name."""
    return bool(headers.get("retry-after")) and over_quota(parsed_problem(body))


def photo(side: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut) resized to side x side."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB").resize((side, side)))


@contextmanager
def exit_if_unreachable(url: str):
    """A request of the script's own that fails (a wrong --url: httpx.ConnectError) ends it with one line and
    exit code 1, not a traceback; the load's requests count their errors themselves."""
    try:
        yield
    except httpx.HTTPError as error:
        raise SystemExit(f"{url}: {type(error).__name__}: {error}") from None


def valid_image(body: bytes, size: tuple[int, int]) -> bool:
    """Whether `body` opens as an image of `size` (the header only: cheap enough inside a load generator)."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            return image.size == size
    except Exception:
        return False


def center_mask(side: int) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    mask[side // 3 : 2 * side // 3, side // 3 : 2 * side // 3] = True
    return mask


def positive_int(text: str) -> int:
    """An argparse type for --runs / --iters: with 0 runs there is nothing to summarize, and the script would
    do its setup (load a model, start a service) only to fail at the end."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


async def poisson_arrivals(rate: float, seconds: float, rng) -> AsyncIterator[float]:
    """Each arrival's scheduled time (time.perf_counter) for `seconds` of Poisson arrivals at `rate` per second,
    yielded when it is due. Users do not wait for each other: a latency counts from this time, not from when its
    task first ran (a generator that falls behind would drop its own lag from every latency)."""
    start = time.perf_counter()
    at = rng.expovariate(rate)
    while at < seconds:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield start + at
        at += rng.expovariate(rate)


def summarize(samples_ms: list[float]) -> dict:
    """Percentiles interpolated between the closest ranks (numpy's default), so p50 is the median and never
    exceeds p90."""
    ordered = sorted(samples_ms)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {
        "runs": len(ordered),
        **{f"p{q}_ms": round(cuts[q - 1], 1) for q in (50, 90, 95, 99)},
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


def saturation_point(levels: list[dict], load: str, rate: str) -> float | None:
    """The lowest `load` whose `rate` reaches 95% of the best; None when no level completed a removal (every level
    reaches 95% of 0: a run of 401s named its first level the saturation point)."""
    best = max((level[rate] for level in levels), default=0)
    if not best:
        return None
    return next(level[load] for level in levels if level[rate] >= 0.95 * best)


def timed_runs(run: Callable[[dict[str, float]], object], runs: int) -> tuple[list[float], dict[str, float]]:
    """The wall time (ms) of each of `runs` calls of `run(timings)`, and each stage's median over them (ms). Every
    call gets its own timings dict: the engines' StageClock adds to a stage already there, so one dict shared by
    the runs summed them (bench_scorer printed --runs times the stage times)."""
    samples, per_run = [], []
    for _ in range(runs):
        timings: dict[str, float] = {}
        started = time.perf_counter()
        run(timings)
        samples.append((time.perf_counter() - started) * 1000)
        per_run.append(timings)
    return samples, {stage: statistics.median(t.get(stage, 0.0) for t in per_run) * 1000 for stage in per_run[0]}


def encode(array: np.ndarray, fmt: str = "png") -> bytes:
    """PNG, or JPEG at quality 95 (how phones save photos)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    return encode(array, "png")


def start_service(work: Path, name: str, adjust: Callable[[dict], None]) -> tuple[subprocess.Popen, str]:
    """`python -m serve run` on free loopback ports with the shipped config changed by `adjust(config)`;
    returns the process (its own session, for stop_service) and the base URL once READY."""
    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    adjust(config)
    path = work / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work / f"serve-{name}.log"
    log = open(log_path, "w")
    child = subprocess.Popen(
        [sys.executable, "-m", "serve", "run", "--config", str(path), "--port", str(port),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while "[rorem] READY" not in log_path.read_text(errors="replace"):
        if child.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service did not start; see {log_path}")
        time.sleep(1)
    return child, f"http://127.0.0.1:{port}"


def stop_service(child: subprocess.Popen) -> None:
    os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)


def remover_only(config: dict) -> None:
    """The Remover alone: gate off, no Scorer deployment."""
    app = config["applications"][0]
    app["args"]["scorer"] = {"enabled": False}
    app["args"]["gate"] = {"mode": "off"}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Scorer"]
