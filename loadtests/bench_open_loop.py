"""Latency and throughput against offered load with open-loop (Poisson) arrivals.

    python loadtests/bench_open_loop.py --rates 1 2 4 8 --seconds 30 --workload small
    python loadtests/bench_open_loop.py --rates 1 2 4 8 --seconds 30 --workload mixed

Closed-loop clients wait for their answer before sending again, so they slow down with the service
and hide queueing (and fall into step with the batcher: the "convoy" in docs/benchmarks.md). Here
requests arrive at exponential intervals at a fixed mean rate, whatever the service does, as users
do. Starts the local service once (tiny bundle, the Remover alone, gate off, buckets --side and
2 x --side); for each offered rate sends --seconds of arrivals, waits for every answer, and reports
the rate actually offered (realized_per_s: sent / --seconds; Poisson arrivals over a short window miss the
nominal rate: 14 in 20 s at 1/s), elapsed_s (the arrivals and the drain of the last answers), completed
removals per second (the 200s / elapsed_s, drain included), p50/p95/p99 of the admitted (200) answers (each from its scheduled
arrival), the shares of 429 / 503 / 504, other errors, bad_result (a 200 without an image of the photo's
size: every answer is checked, as loadtests/soak.py does) and lost (no answer). `small`: every photo is
--side; `mixed`: two in three are --side, one in three 2 x --side (a larger bucket). Saves JSON (--out)
and prints a table; the saturation point is the lowest rate reaching 95% of the best throughput. Exits 1 when no
rate completed a removal (no saturation point: nothing was measured).

The load generator shares the machine's cores with the service; Ray runs the service's processes at nice 15,
so at nice 0 the generator takes a core first (at 96 arrivals/s on 2 cores it used ~90% of one and starved the
proxy and the Ingress). --client-nice 15 sends at the service's priority.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from benchlib import (
    center_mask, exit_if_unreachable, photo, png, poisson_arrivals, remover_only, saturation_point, start_service,
    stop_service, summarize, valid_image,
)  # fmt: skip

from serve.worker_threads import lower_this_thread

REQUEST_TIMEOUT_S = 180.0
DRAIN_S = 240.0
DEFAULT_MAX_BATCH_SIZE = 8
SERVICE_OPTIONS = ("--max-batch-size", "--large-batch-size", "--overload")  # refused with --url


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8], help="offered requests per second")
    p.add_argument("--seconds", type=float, default=30, help="arrivals per rate")
    p.add_argument("--workload", choices=["small", "mixed"], default="small")
    p.add_argument("--side", type=int, default=128, help="the small photo side and (a started service) bucket; 2 x")
    p.add_argument("--max-batch-size", type=int, default=None, help=f"default {DEFAULT_MAX_BATCH_SIZE}")
    p.add_argument("--large-batch-size", type=int, default=None, help="batching.per_bucket for 2 x side (default: same)")
    p.add_argument("--overload", default=None, help="JSON for args.overload, e.g. '{\"max_queue_wait_s\": 5}'")
    p.add_argument("--url", default=None, help="a running service instead of starting one (its own config applies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before / after)")
    p.add_argument("--out", type=Path, default=Path("out/bench_open_loop.json"))
    p.add_argument("--client-nice", type=int, default=0, help="send this many nice steps lower (15: Ray's workers')")
    args = p.parse_args(argv)
    shaping = [flag for flag in SERVICE_OPTIONS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.url and shaping:
        p.error(f"{', '.join(shaping)}: for the service this script starts, not one given by --url")
    if args.max_batch_size is None and args.url is None:  # None in the JSON's args: not applied
        args.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    return args


def service_config(args):
    def adjust(config: dict) -> None:
        remover_only(config)
        app_args = config["applications"][0]["args"]
        app_args.setdefault("imaging", {}).update({"buckets": [args.side, 2 * args.side], "crop_margin": 16})
        batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.01}
        if args.large_batch_size:
            batching["per_bucket"] = {2 * args.side: {"max_batch_size": args.large_batch_size}}
        app_args["batching"] = batching
        if args.overload:
            app_args["overload"] = {**app_args.get("overload", {}), **json.loads(args.overload)}

    return adjust


def bodies(side: int) -> dict:
    return {"image": ("p.png", png(photo(side))), "mask": ("m.png", png(center_mask(side).astype(np.uint8) * 255))}


async def offer(url: str, rate: float, seconds: float, workload: str, side: int, rng: random.Random) -> dict:
    """Each latency counts from the request's scheduled (Poisson) arrival, not from when its task first ran: a
    generator that falls behind would otherwise drop its own lag from every latency (coordinated omission). A
    200 whose body is not an image of the photo's size counts as bad_result, not as a completion."""
    small, large = bodies(side), bodies(2 * side)
    results: list[tuple[str, float]] = []
    batch_sizes: dict[str, int] = {}
    lost = 0

    async def one(client: httpx.AsyncClient, files: dict, photo_side: int, due: float) -> None:
        nonlocal lost
        try:
            reply = await client.post("/remove", files=files, data={"seed": "0", "gate": "off"})
        except httpx.HTTPError:
            lost += 1
            return
        latency = time.perf_counter() - due
        status = str(reply.status_code)
        if status == "200" and not valid_image(reply.content, (photo_side, photo_side)):
            status = "bad_result"
        results.append((status, latency))
        size = reply.headers.get("X-Batch-Size")
        if size:
            batch_sizes[size] = batch_sizes.get(size, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as client:
        tasks, start = [], time.perf_counter()
        async for due in poisson_arrivals(rate, seconds, rng):
            files, photo_side = (large, 2 * side) if workload == "mixed" and rng.random() < 1 / 3 else (small, side)
            tasks.append(asyncio.create_task(one(client, files, photo_side, due)))
        sent = len(tasks)
        done, pending = await asyncio.wait(tasks, timeout=DRAIN_S) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        lost += len(pending)
        elapsed = time.perf_counter() - start
    return level_row(rate, seconds, sent, results, lost, elapsed, batch_sizes)


def level_row(
    rate: float, seconds: float, sent: int, results: list[tuple[str, float]], lost: int, elapsed: float,
    batch_sizes: dict,
) -> dict:
    """One offered rate's row from its (status, seconds) answers; percentiles of the 200s are benchlib's, as in
    every other benchmark (interpolated: the p99 of 100 answers is not simply the slowest)."""
    ok_ms = [latency * 1000 for status, latency in results if status == "200"]
    counts = collections.Counter(status for status, _ in results)
    percentiles = summarize(ok_ms) if ok_ms else {}
    return {
        "offered_per_s": rate,
        "sent": sent,
        "realized_per_s": round(sent / seconds, 3),  # what was offered: the Poisson draws, not the nominal rate
        "elapsed_s": round(elapsed, 2),  # arrivals and drain: completed_per_s's denominator
        "completed_per_s": round(len(ok_ms) / elapsed, 3),
        **{f"p{q}_ms": percentiles.get(f"p{q}_ms") for q in (50, 95, 99)},
        "share_429": round(counts["429"] / max(sent, 1), 3),
        "share_503": round(counts["503"] / max(sent, 1), 3),
        "share_504": round(counts["504"] / max(sent, 1), 3),
        "other_errors": sum(n for s, n in counts.items() if s not in ("200", "429", "503", "504", "bad_result")),
        "bad_result": counts["bad_result"],
        "lost": lost,
        # jobs by the batch they ran in: by its size ("8"), or by side and size ("512x8")
        "batch_sizes": dict(sorted(batch_sizes.items(), key=lambda kv: [int(n) for n in kv[0].split("x")])),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    child = None
    url = args.url
    if url is None:
        work = Path(tempfile.mkdtemp(prefix="rorem-open-loop-"))
        child, url = start_service(work, "open-loop", service_config(args))
    client_niced = lower_this_thread(args.client_nice)  # after the start: the service's processes keep their own
    levels = []
    try:
        with exit_if_unreachable(url):
            model = httpx.get(f"{url}/readyz", timeout=30).json().get("model")  # which code and knobs answered
            rng = random.Random(args.seed)
            asyncio.run(offer(url, 1.0, 3.0, args.workload, args.side, rng))  # warm the path
            for rate in args.rates:
                levels.append(asyncio.run(offer(url, rate, args.seconds, args.workload, args.side, rng)))
                print(levels[-1], flush=True)
    finally:
        if child is not None:
            stop_service(child)
    best = max(level["completed_per_s"] for level in levels)
    saturation = saturation_point(levels, load="offered_per_s", rate="completed_per_s")
    report = {"label": args.label, "args": {k: str(v) for k, v in vars(args).items()}, "model": model, "levels": levels,
              "service_started": args.url is None,  # with --url, --side sized the photos only, not its buckets
              "saturation_offered_per_s": saturation, "best_completed_per_s": best,
              "client_nice_applied": client_niced}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    columns = ("offered_per_s", "realized_per_s", "elapsed_s", "completed_per_s", "p50_ms", "p95_ms", "p99_ms",
               "share_429", "share_503", "share_504", "other_errors", "bad_result", "lost")  # fmt: skip
    verdict = (
        "no rate completed a removal" if saturation is None
        else f"saturation at an offered {saturation}/s (the best completed: {best} removals/s)"
    )  # fmt: skip
    print(f"\n{args.label} workload={args.workload} side={args.side}: {verdict}")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for level in levels:
        print("| " + " | ".join("-" if level[c] is None else str(level[c]) for c in columns) + " |")
    print(f"wrote {args.out}")
    if saturation is None:
        print("bench_open_loop: no rate completed a removal: nothing was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
