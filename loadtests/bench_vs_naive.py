"""This service vs what a user would otherwise write, under the same locust load.

    python loadtests/bench_vs_naive.py [--users 4] [--seconds 60] [--mix 512:1]

Both serve the same weights: a tiny authors' layout (seed 0) written once; the service imports it
(`bundle.authors`, float32, Remover only: gate off, no Scorer, so both do the same work) and the
baseline (loadtests/naive_app.py: FastAPI + diffusers' SDXL inpainting pipeline, one request at a
time, the whole image resized to the model side) loads it with diffusers. Each runs alone on the
machine, in turn, under `locust --headless` with REST users only (loadtests/locustfile.py, every
answer checked for a valid image of the input's size). Prints and saves (out/bench_vs_naive.json)
requests/s, p50/p95/p99 and failures of the removals, and the refusals (a busy service's 429 / 503 with
Retry-After, too-many-requests or overloaded, which locust counts as successes) apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchlib import REPO, free_port, remover_only, start_service, stop_service


def run_locust(url: str, users: int, seconds: int, mix: str, prefix: Path) -> dict:
    env = {**os.environ, "ROREM_MIX": mix, "ROREM_USERS": "rest:1,grpc:0"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", "loadtests/locustfile.py", "--headless", "--host", url,
         "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "120", "--csv", str(prefix),
         "--only-summary"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 600,
    )  # fmt: skip
    stats = Path(f"{prefix}_stats.csv")
    if result.returncode not in (0, 1) or not stats.exists():  # 1: the run had failures, which the table shows
        raise SystemExit(f"locust against {url} exited {result.returncode} without its stats:\n{result.stderr[-2000:]}")
    return removal_figures(list(csv.DictReader(open(stats))))


def removal_figures(rows: list[dict]) -> dict:
    """The removals' figures, without the locustfile's "... refused 429" rows (successes to locust, so its
    Aggregated row counted refusals as throughput); the refusals are a column of their own. With several
    removal rows (a mix of sizes) each percentile is read off the rows' percentile tables merged by count."""
    removals = [row for row in rows if row["Name"] != "Aggregated" and " refused " not in row["Name"]]
    requests = sum(int(row["Request Count"]) for row in removals)
    return {
        "requests": requests,
        "failures": sum(int(row["Failure Count"]) for row in removals),
        "refused": sum(int(row["Request Count"]) for row in rows if " refused " in row["Name"]),
        "requests_per_s": round(sum(_number(row["Requests/s"]) or 0.0 for row in removals), 3),
        **{f"p{q}_ms": _merged_percentile(removals, q, requests) for q in (50, 95, 99)},
    }


def _merged_percentile(rows: list[dict], q: int, requests: int) -> float | None:
    """The smallest of the rows' percentile values that at least q% of all their requests did not exceed."""
    tables = [
        (int(row["Request Count"]), [(float(k[:-1]), _number(v)) for k, v in row.items() if k.endswith("%")])
        for row in rows if int(row["Request Count"])
    ]  # fmt: skip
    values = sorted({v for _, table in tables for _, v in table if v is not None})

    def share_within(value: float) -> float:
        return sum(n * max((p for p, v in table if v is not None and v <= value), default=0.0) for n, table in tables)

    return next((value for value in values if share_within(value) >= q * requests), None)


def _number(text: str) -> float | None:
    """Locust writes N/A where it has no sample (a run in which no request completed): a missing figure."""
    return None if text.strip() in ("", "N/A") else float(text)


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


def main() -> None:
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
    result["throughput_ratio"] = round(ours_run["requests_per_s"] / max(naive_run["requests_per_s"], 1e-9), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{'server':>18} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'requests':>9} {'failures':>9}"
        f" {'refused':>8}"
    )
    for name, run in result["runs"].items():
        print(
            f"{name:>18} {run['requests_per_s']:>7} {_ms(run['p50_ms']):>8} {_ms(run['p95_ms']):>8}"
            f" {_ms(run['p99_ms']):>8}"
            f" {run['requests']:>9} {run['failures']:>9} {run['refused']:>8}"
        )
    print(f"throughput rorem-serve / fastapi+diffusers: {result['throughput_ratio']}x; saved {args.out}")


if __name__ == "__main__":
    main()
