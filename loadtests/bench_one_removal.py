"""Latency of one 512x512 removal: the in-process engine vs HTTP and gRPC end to end (serving overhead).

    python loadtests/bench_one_removal.py --threads 1 [--url http://127.0.0.1:8000] [--grpc 127.0.0.1:9000] [--runs 20]

Compare at equal torch threads: the Remover replica runs with one (num_cpus 1), hence --threads 1.
The ratios printed are p50(HTTP) / p50(engine) and p50(gRPC) / p50(engine).

Prints a table and writes JSON (default out/bench_one_removal.json). The HTTP part needs a running
service (`make serve`) and sends gate=off (removal only, no scoring); the engine part loads the same
bundle in this process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchlib import center_mask, encode, photo, png, positive_int, summarize

from engines.jobs import RemovalJob


def bench_engine(cache: str, side: int, runs: int, threads: int | None) -> dict:
    import torch  # the model libraries load after the arguments are checked: a bad flag is refused at once

    from engines.remover import RemovalEngine
    from engines.sources import open_bundle

    if threads:
        torch.set_num_threads(threads)
    bundle = open_bundle(path=None, authors=None, cache_dir=cache)
    engine = RemovalEngine.from_bundle(bundle)
    job = RemovalJob(photo(side), center_mask(side), seed=0)
    engine.remove([job])
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.remove([job])
        samples.append((time.perf_counter() - started) * 1000)
    return {"torch_threads": torch.get_num_threads(), **summarize(samples)}


def bench_http(url: str, side: int, runs: int, fmt: str) -> dict:
    import httpx

    files = {"image": ("i", encode(photo(side), fmt)), "mask": ("m.png", png(center_mask(side).astype(np.uint8) * 255))}
    fields = {"seed": "0", "dilate": "0", "gate": "off", "output_format": fmt}
    client = httpx.Client(base_url=url, timeout=120)
    client.post("/remove", files=files, data=fields).raise_for_status()
    samples, timing = [], None
    for _ in range(runs):
        started = time.perf_counter()
        response = client.post("/remove", files=files, data=fields)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        timing = response.headers["server-timing"]
    return {**summarize(samples), "last_server_timing": timing, "bucket": response.headers["x-bucket"]}


def bench_grpc(target: str, side: int, runs: int, fmt: str) -> dict:
    from serve import rorem_pb2 as pb
    from serve.grpc_client import open_channel, stub

    request = pb.RemoveRequest(
        image=encode(photo(side), fmt), mask=png(center_mask(side).astype(np.uint8) * 255), seed=0, dilate=0,
        gate="off", output_format=fmt,
    )  # fmt: skip
    with open_channel(target) as channel:
        client = stub(channel)
        client.Remove(request, timeout=120)
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            client.Remove(request, timeout=120)
            samples.append((time.perf_counter() - started) * 1000)
    return summarize(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle-cache", default="~/.cache/rorem")
    parser.add_argument("--url", default=None)
    parser.add_argument("--grpc", default=None, help="gRPC host:port of a running service")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--runs", type=positive_int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the in-process engine")
    parser.add_argument("--format", choices=["png", "jpeg"], default="png", help="the photo's format in and out")
    parser.add_argument("--out", type=Path, default=Path("out/bench_one_removal.json"))
    args = parser.parse_args()
    result = {"side": args.side, "format": args.format, "engine": bench_engine(args.bundle_cache, args.side, args.runs, args.threads)}
    if args.url:
        result["http"] = bench_http(args.url, args.side, args.runs, args.format)
    if args.grpc:
        result["grpc"] = bench_grpc(args.grpc, args.side, args.runs, args.format)
    for name in ("http", "grpc"):
        if name in result:
            result[name]["p50_vs_engine"] = round(result[name]["p50_ms"] / result["engine"]["p50_ms"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'path':<8} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'p50/engine':>10}")
    for name in ("engine", "http", "grpc"):
        if name in result:
            r = result[name]
            print(f"{name:<8} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['mean_ms']:>8} {r.get('p50_vs_engine', 1.0):>10}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
