"""This service vs what a user would otherwise write, under the same locust load.

    python loadtests/bench_vs_naive.py [--users 4] [--seconds 60] [--mix 512:1]

Both serve the same weights: a tiny authors' layout (seed 0) written once; the service imports it
(`bundle.authors`, float32, Remover only: gate off, no Scorer, so both do the same work) and the
baseline (loadtests/naive_app.py: FastAPI + diffusers' SDXL inpainting pipeline, one request at a
time, the whole image resized to the model side) loads it with diffusers. Each runs alone on the
machine, in turn, under `locust --headless` with REST users only (loadtests/locustfile.py, every
answer checked for a valid image of the input's size). Prints and saves (out/bench_vs_naive.json)
the removals that succeeded per second, p50/p95/p99 and failures of the removals, and the refusals (a busy
service's 429 / 503 with Retry-After, too-many-requests or overloaded, which locust counts as successes) apart.
Exits 1, saying which server, when a run had failures or no removal that succeeded: not a comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from benchlib import REPO, free_port, locust_stop_timeout_s, remover_only, start_service, stop_service


def run_locust(url: str, users: int, seconds: int, mix: str, prefix: Path) -> dict:
    """The removals' figures from locust's --json-file, written at exit: its _stats.csv is rewritten every second
    in the background and not at shutdown, so the last second of the stop-timeout drain was missing from it."""
    env = {**os.environ, "ROREM_MIX": mix, "ROREM_USERS": "rest:1,grpc:0"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", "loadtests/locustfile.py", "--headless", "--host", url,
         "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", str(locust_stop_timeout_s()),
         "--json-file", str(prefix), "--only-summary"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 600,
    )  # fmt: skip
    stats = Path(f"{prefix}.json")  # locust adds the suffix
    if result.returncode not in (0, 1) or not stats.exists():  # 1: the run had failures, which the figures show
        raise SystemExit(f"locust against {url} exited {result.returncode} without its stats:\n{result.stderr[-2000:]}")
    return removal_figures(json.loads(stats.read_text()))


def removal_figures(entries: list[dict]) -> dict:
    """The removals' figures, without the locustfile's "... refused 429" and "... over quota 429" entries (successes
    to locust); the refusals, a key's quota's 429s and the failures are columns of their own. requests_per_s
    counts the removals that succeeded, over the span from the run's first answer to its last; the percentiles are
    over every removal answered (locust does not time failures apart: a run with failures is refused by
    `run_problems`), from the entries' response-time histograms merged."""
    removals = [entry for entry in entries if not _kinds(entry)]
    requests = sum(entry["num_requests"] for entry in removals)
    failures = sum(entry["num_failures"] for entry in removals)
    stamps = [entry["last_request_timestamp"] for entry in entries if entry["last_request_timestamp"]]
    span = max(stamps, default=0.0) - min((entry["start_time"] for entry in entries), default=0.0)
    times = Counter()
    for entry in removals:
        times.update({float(ms): count for ms, count in entry["response_times"].items()})
    return {
        "requests": requests,
        "failures": failures,
        "refused": sum(entry["num_requests"] for entry in entries if " refused " in _kinds(entry)),
        "over_quota": sum(entry["num_requests"] for entry in entries if " over quota " in _kinds(entry)),
        "requests_per_s": round((requests - failures) / span, 3) if span > 0 else 0.0,
        **{f"p{q}_ms": _percentile(times, q) if requests > failures else None for q in (50, 95, 99)},
    }


def _kinds(entry: dict) -> list[str]:
    """Which of the locustfile's answers apart an entry's name says it holds (" refused ", " over quota ")."""
    return [kind for kind in (" refused ", " over quota ") if kind in entry["name"]]


def _percentile(times: Counter, q: int) -> float | None:
    """The smallest of locust's (rounded) response times that at least q% of the timed requests did not exceed;
    not locust.stats' own: importing locust monkey-patches this process for gevent."""
    total, within = sum(times.values()), 0
    for value in sorted(times):
        within += times[value]
        if within * 100 >= q * total:
            return value
    return None


MIN_SUCCEEDED = 10  # removals a run's rate needs: it counts from the first answer, so N answers span N - 1 gaps


def run_problems(runs: dict[str, dict]) -> list[str]:
    """Why the comparison does not stand, one line per problem: a run with failures (their times are in its
    percentiles), without one removal that succeeded, or held back by its API key's quota (its rate is the quota's)."""
    problems = []
    for name, run in runs.items():
        succeeded = run["requests"] - run["failures"]
        over_quota = run.get("over_quota", 0)
        if over_quota:
            problems.append(
                f"{name}: {over_quota} requests were over the API key's quota, so the rate is the quota's, not the"
                " service's (use a key without one)"
            )
        if succeeded == 0:
            problems.append(
                f"{name}: no removal succeeded ({run['failures']} failed, {run['refused']} refused, {over_quota} over"
                " the key's quota)"
            )
        elif run["failures"]:
            problems.append(f"{name}: {run['failures']} of {run['requests']} removals failed")
        elif succeeded < MIN_SUCCEEDED:  # the span starts at the first answer: one answer makes no rate at all
            problems.append(f"{name}: {succeeded} removal(s) succeeded, too few for a rate (run longer)")
    return problems


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def start_naive(work: Path, layout, side: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ, "ROREM_NAIVE_BASE": layout.base, "ROREM_NAIVE_UNET": layout.unet,
        "ROREM_NAIVE_LCM_LORA": layout.lcm_lora, "ROREM_NAIVE_SIDE": str(side), "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "naive_app:app", "--app-dir", "loadtests", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=open(work / "naive.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        try:
            httpx.get(url + "/docs", timeout=2)
            return child, url
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit(f"the naive app did not start; see {work / 'naive.log'}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--mix", default="512:1", help="locustfile ROREM_MIX (sizes 512, 1024, 12mp)")
    parser.add_argument("--naive-side", type=int, default=512, help="the side the baseline resizes every image to")
    parser.add_argument("--out", type=Path, default=Path("out/bench_vs_naive.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from engines.tiny import write_tiny_authors_layout

    work = Path(tempfile.mkdtemp(prefix="rorem-bench-naive-"))
    layout = write_tiny_authors_layout(work / "layout", seed=0)

    def ours(config: dict) -> None:
        remover_only(config)
        config["applications"][0]["args"]["bundle"] = {
            "authors": {"base": layout.base, "unet": layout.unet, "lcm_lora": layout.lcm_lora},
            "import_dtype": "float32", "cache_dir": str(work / "cache"),
        }  # fmt: skip

    result = {"users": args.users, "seconds": args.seconds, "mix": args.mix, "runs": {}}
    child, url = start_service(work, "ours", ours)
    try:
        result["runs"]["rorem-serve"] = run_locust(url, args.users, args.seconds, args.mix, work / "ours")
    finally:
        stop_service(child)
    child, url = start_naive(work, layout, args.naive_side)
    try:
        result["runs"]["fastapi+diffusers"] = run_locust(url, args.users, args.seconds, args.mix, work / "naive")
    finally:
        stop_service(child)
    ours_run, naive_run = result["runs"]["rorem-serve"], result["runs"]["fastapi+diffusers"]
    result["problems"] = run_problems(result["runs"])
    result["throughput_ratio"] = (
        None if result["problems"] else round(ours_run["requests_per_s"] / max(naive_run["requests_per_s"], 1e-9), 2)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{'server':>18} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'requests':>9} {'failures':>9}"
        f" {'refused':>8} {'over quota':>10}"
    )
    for name, run in result["runs"].items():
        print(
            f"{name:>18} {run['requests_per_s']:>7} {_ms(run['p50_ms']):>8} {_ms(run['p95_ms']):>8}"
            f" {_ms(run['p99_ms']):>8}"
            f" {run['requests']:>9} {run['failures']:>9} {run['refused']:>8} {run['over_quota']:>10}"
        )
    if result["throughput_ratio"] is not None:
        print(f"throughput rorem-serve / fastapi+diffusers: {result['throughput_ratio']}x; saved {args.out}")
    for problem in result["problems"]:
        print(f"not a comparison: {problem}; saved {args.out}", file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
