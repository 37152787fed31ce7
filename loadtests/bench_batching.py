"""What dynamic batching buys: throughput at N concurrent clients, max_batch_size 8 vs 1.

    python loadtests/bench_batching.py [--clients 8] [--requests 48] [--batches 1 8] [--side 512]

For each max_batch_size it starts the local service (`python -m serve run`, tiny bundle, Remover only:
gate off, no Scorer) on free loopback ports, sends --requests removals from --clients threads, and
stops it. Prints images/s, p50/p90 latency and the batch sizes the service reported (X-Batch-Size);
writes JSON (default out/bench_batching.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from benchlib import center_mask, photo, png, remover_only, start_service, stop_service, summarize

from serve.config import ImagingSettings


def start_batching_service(work: Path, max_batch_size: int, wait_s: float, buckets: list[int], threads: int | None):
    def adjust(config: dict) -> None:
        remover_only(config)
        args = config["applications"][0]["args"]
        args["batching"] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}
        args.setdefault("imaging", {})["buckets"] = buckets
        args.setdefault("engine", {})["torch_threads"] = threads

    return start_service(work, f"batch-{max_batch_size}", adjust)


def load(url: str, clients: int, requests: int, side: int) -> dict:
    files = {"image": ("i.png", png(photo(side))), "mask": ("m.png", png(center_mask(side).astype(np.uint8) * 255))}
    client = httpx.Client(base_url=url, timeout=300)
    client.post("/remove", files=files, data={"seed": "0"}).raise_for_status()

    def one(seed: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = client.post("/remove", files=files, data={"seed": str(seed)})
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000, int(response.headers["x-batch-size"])

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    sizes = collections.Counter(size for _, size in results)
    return {
        "images_per_s": round(requests / elapsed, 3),
        **summarize([ms for ms, _ in results]),
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--wait-s", type=float, default=0.05, help="batch_wait_timeout_s")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--torch-threads", type=int, default=None, help="engine.torch_threads (default: Ray's 1 per CPU)")
    parser.add_argument(
        "--buckets", type=int, nargs="+", default=ImagingSettings().buckets, help="imaging.buckets (model input sides)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_batching.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rorem-bench-batching-"))
    result = {"clients": args.clients, "requests": args.requests, "side": args.side, "buckets": args.buckets,
              "torch_threads": args.torch_threads, "runs": {}}  # fmt: skip
    for max_batch in args.batches:
        child, url = start_batching_service(work, max_batch, args.wait_s, args.buckets, args.torch_threads)
        try:
            result["runs"][str(max_batch)] = load(url, args.clients, args.requests, args.side)
        finally:
            stop_service(child)
    first, last = (result["runs"][str(b)]["images_per_s"] for b in (args.batches[0], args.batches[-1]))
    result["speedup"] = round(last / first, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'max_batch':>9} {'images/s':>9} {'p50 ms':>8} {'p90 ms':>8}  batch sizes seen")
    for max_batch, run in result["runs"].items():
        print(f"{max_batch:>9} {run['images_per_s']:>9} {run['p50_ms']:>8} {run['p90_ms']:>8}  {run['batch_sizes']}")
    print(f"throughput max_batch {args.batches[-1]} / {args.batches[0]}: {result['speedup']}x; saved {args.out}")


if __name__ == "__main__":
    main()
