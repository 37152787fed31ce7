"""What bounding a request's head costs Ray's HTTP proxy: uvicorn's httptools protocol against
serve.proxy_connections.BoundedHttpProtocol, in one run, on loopback, with a trivial ASGI app.

    python loadtests/bench_proxy_head.py [--requests 20000] [--rounds 5] [--out out/bench_proxy_head.json]

Each round sends --requests small GET requests over one keep-alive connection (one at a time: the per-request
cost, not the throughput of many clients) to a uvicorn server of each protocol, configured as Ray's proxy
configures it, alternating the protocols round by round. Prints requests per second of each and their ratio;
writes --out (docs/benchmarks.md holds the committed figures). On this shared machine the
ratio is the figure to read, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import uvicorn
from benchlib import positive_int
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.proxy_connections import BoundedHttpProtocol

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: bench-1\r\nAccept: application/json\r\n\r\n"


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(protocol) -> tuple[int, uvicorn.Server]:
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted connections inherit it (Linux): else
    sock.bind(("127.0.0.1", 0))  # Nagle's wait after the response's head, against the client's delayed ACK: 40 ms
    config = uvicorn.Config(
        lambda: _ok, factory=True, http=protocol, timeout_keep_alive=5, lifespan="off", access_log=False,
        log_level=None, log_config=None,
    )  # fmt: skip
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1], server


def _round(port: int, requests: int) -> float:
    """Requests per second, one at a time over one connection."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        began = time.perf_counter()
        for _ in range(requests):
            client.sendall(REQUEST)
            answer = b""
            while not answer.endswith(b"ok"):
                answer += client.recv(4096)
        return requests / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=positive_int, default=20000)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out/bench_proxy_head.json"))
    args = parser.parse_args()
    servers = {"httptools": _serve(HttpToolsProtocol), "bounded": _serve(BoundedHttpProtocol)}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    for name, (port, _) in servers.items():
        _round(port, args.requests // 10)  # warm-up
    for _ in range(args.rounds):
        for name, (port, _) in servers.items():
            rates[name].append(_round(port, args.requests))
    for _, server in servers.values():
        server.should_exit = True
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["bounded"] / medians["httptools"]
    print(f"{'protocol':<10} {'median req/s':>13}  rounds")
    for name, values in rates.items():
        print(f"{name:<10} {medians[name]:>13.0f}  {' '.join(f'{v:.0f}' for v in values)}")
    print(f"bounded / httptools: {ratio:.3f}")
    result = {
        "requests_per_round": args.requests, "rounds": args.rounds, "rates": rates, "median": medians,
        "ratio": ratio, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
