"""/healthz latency while the ingress takes large uploads: nothing heavy may run on its event loop.

    python loadtests/bench_healthz_under_load.py [--seconds 30] [--clients 8] [--out out/bench_healthz.json]
    python loadtests/bench_healthz_under_load.py --smoke        # a few seconds, small images: a working check
    python loadtests/bench_healthz_under_load.py --worker-nice 0  # the ingress's worker threads at the loop's priority
    python loadtests/bench_healthz_under_load.py --client-nice 15  # the upload clients at Ray's workers' priority

Starts the local service (`python -m serve run`, tiny bundle, Remover only: gate off, no Scorer) on free
loopback ports, unless --url names a running one. --clients threads then send 12 MP uploads in a loop
for --seconds: scikit-image's astronaut resized to 4000x3000 (plus a little grain) as JPEG and as PNG,
each as multipart and as JSON (base64, answered as JSON with Accept: application/json). Meanwhile a
probe in its own process sends GET /healthz every 50 ms (an idle probe first, for reference), each latency
counted from the probe's scheduled time (a stall delays every probe due during it). Prints and
saves (JSON, --out) /healthz p50/p95/p99/max under load and idle (a failed probe counted at its 10 s timeout;
the p99 goal's verdict misses on any failed probe), and the uploads' throughput and statuses
(a 200 without an image of the upload's size is a bad_result); exits 1, without a verdict, when no upload was
served or no probe answered under load.
Beside each latency it keeps the replica's own event-loop lag that /healthz reports (`loop_lag_ms`, the
worst since the previous probe): a slow probe with a small loop lag waited elsewhere (the proxy, a core),
not for the ingress's loop.

The mask is empty by default (--mask empty): each request takes the ingress's whole path (body read and
parse, decode, reply; the image comes back unchanged, as JSON in base64 where asked) with no model work.
On a CPU the tiny model takes seconds per 12 MP removal (--mask box: a box in the middle), so the
Remover would set the pace and most uploads would wait; an empty mask loads the ingress at the rate a GPU
deployment feeds it, which is what this benchmark is about.

The upload clients run on the same cores as the service. In production they are other machines; here their
8 threads (sending 12 MP bodies, reading the replies) run at this process's priority, nice 0, while Ray runs
every worker process (proxy, Ingress) at nice 15: the kernel then gives the load generator a core before the
service. --client-nice 15 puts them on an equal footing (the probe keeps nice 0 either way).

Only 127.0.0.1 is contacted; every loop ends by count or by time.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import multiprocessing
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from benchlib import exit_if_unreachable, remover_only, start_service, stop_service, summarize, valid_image
from PIL import Image

from serve.worker_threads import lower_this_thread

PROBE_PERIOD_S = 0.05
PROBE_TIMEOUT_S = 10.0
KINDS = (("jpeg", "multipart"), ("png", "multipart"), ("jpeg", "json"), ("png", "json"))


def photo(width: int, height: int, grain: float) -> Image.Image:
    """scikit-image's astronaut (a real photograph) resized to width x height, with Gaussian grain of std
    `grain` (seeded): upscaled, the photo is smoother than a camera's, and its PNG would be a third of the size."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    image = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if not grain:
        return image
    noise = np.random.default_rng(0).normal(0.0, grain, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def mask_png(width: int, height: int, kind: str) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    if kind == "box":
        mask[height * 2 // 5 : height * 3 // 5, width * 2 // 5 : width * 3 // 5] = 255
    return encoded(Image.fromarray(mask), "png")


def request_bodies(
    width: int, height: int, grain: float, mask_kind: str
) -> dict[tuple[str, str], tuple[bytes, dict[str, str]]]:
    """Each kind's request body and headers, built once (the clients only send bytes)."""
    image = photo(width, height, grain)
    mask = mask_png(width, height, mask_kind)
    fields = {"gate": "off", "dilate": "8"}
    bodies = {}
    for fmt, body_kind in KINDS:
        data = encoded(image, fmt)
        if body_kind == "multipart":
            boundary = uuid.uuid4().hex
            parts = [(f'name="image"; filename="photo.{fmt}"', data), ('name="mask"; filename="mask.png"', mask)]
            parts += [(f'name="{k}"', v.encode()) for k, v in fields.items()]
            body = b"".join(
                b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (boundary.encode(), d.encode(), v)
                for d, v in parts
            ) + b"--%s--\r\n" % boundary.encode()
            headers = {"content-type": f"multipart/form-data; boundary={boundary}", "accept": f"image/{fmt}"}
        else:
            document = {"image": base64.b64encode(data).decode(), "mask": base64.b64encode(mask).decode(), **fields}
            body = json.dumps(document).encode()
            headers = {"content-type": "application/json", "accept": "application/json"}
        bodies[(fmt, body_kind)] = (body, headers)
    return bodies


def probe(url: str, seconds: float, queue) -> None:
    """GET /healthz every PROBE_PERIOD_S for `seconds` (its own process: the clients' GIL cannot delay it).
    Each latency counts from the probe's scheduled time, not its send: after a slow answer the probes that fell
    due meanwhile go out back to back and each is fast, so timing from the send hid the stall from every one
    of them but the first (coordinated omission). A failed probe counts at its timeout (or later), not as a gap."""
    samples, lags, errors = [], [], 0
    with httpx.Client(base_url=url, timeout=PROBE_TIMEOUT_S) as client:
        client.get("/healthz")  # connect first (and start the replica's lag ticker)
        deadline = time.monotonic() + seconds
        tick = time.monotonic()
        while tick < deadline:
            try:
                response = client.get("/healthz")
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed_ms = (time.monotonic() - tick) * 1000
            if ok:
                samples.append(elapsed_ms)
                lags.append(response.json().get("loop_lag_ms", 0.0))
            else:  # at its timeout at least: left out, a probe that timed out was missing from p99 and max
                samples.append(max(elapsed_ms, PROBE_TIMEOUT_S * 1000))
                errors += 1
            tick += PROBE_PERIOD_S
            time.sleep(max(0.0, tick - time.monotonic()))
    queue.put({"samples_ms": samples, "loop_lag_ms": lags, "errors": errors})


def meets_goal(healthz: dict, goal_p99_ms: float) -> bool:
    """Whether /healthz under load met its p99 goal: no probe failed (a failed /healthz is no fast one, however
    few), and the p99 of every probe is under the goal."""
    return healthz["errors"] == 0 and healthz.get("p99_ms", float("inf")) < goal_p99_ms


def run_probe(url: str, seconds: float) -> tuple[multiprocessing.Process, object]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=probe, args=(url, seconds, queue), daemon=True)
    process.start()
    return process, queue


def probe_result(process, queue, timeout_s: float) -> dict:
    try:
        result = queue.get(timeout=timeout_s)
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    samples = result["samples_ms"]
    if not samples:
        return {"runs": 0, "errors": result["errors"]}
    lags = result["loop_lag_ms"]
    loop_lag = {**summarize(lags), "max_ms": round(max(lags), 1)} if any(lags) else None
    return {**summarize(samples), "max_ms": round(max(samples), 1), "errors": result["errors"], "loop_lag": loop_lag}


def returned_image(reply: httpx.Response, body_kind: str, size: tuple[int, int]) -> bool:
    """Whether a 200 carries an image of the upload's size (benchlib.valid_image: its header), as bytes or, for a
    JSON upload, base64 in the JSON's `image`: a 200 without one is no upload served."""
    if body_kind == "multipart":
        return valid_image(reply.content, size)
    try:
        return valid_image(base64.b64decode(reply.json()["image"], validate=True), size)
    except (ValueError, KeyError, TypeError):
        return False


def load(url: str, bodies: dict, clients: int, seconds: float, size: tuple[int, int], nice: int = 0) -> dict:
    """`clients` threads, `nice` steps below this process, send the kinds in turn until `seconds` have passed;
    counts what came back (a 200 without the image of `size` as bad_result)."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    statuses: collections.Counter = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    sent_bytes = [0]

    def client(index: int) -> None:
        lower_this_thread(nice)
        with httpx.Client(base_url=url, timeout=300) as http:
            turn = index
            while time.monotonic() < stop:
                kind = KINDS[turn % len(KINDS)]
                turn += 1
                body, headers = bodies[kind]
                started = time.perf_counter()
                try:
                    reply = http.post("/remove", content=body, headers=headers)
                    status = str(reply.status_code)
                    if status == "200" and not returned_image(reply, kind[1], size):
                        status = "bad_result"
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed_ms = (time.perf_counter() - started) * 1000
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies["/".join(kind)].append(elapsed_ms)
                        sent_bytes[0] += len(body)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 600)
    elapsed = time.monotonic() - started
    completed = sum(len(v) for v in latencies.values())
    return {
        "seconds": round(elapsed, 1),
        "completed": completed,
        "per_s": round(completed / elapsed, 3),
        "request_mb_per_s": round(sent_bytes[0] / elapsed / 2**20, 2),
        "statuses": dict(statuses),
        "latency_by_kind": {kind: summarize(ms) for kind, ms in sorted(latencies.items())},
    }


def bench(url: str, args) -> dict:
    bodies = request_bodies(args.width, args.height, args.grain, args.mask)
    with httpx.Client(base_url=url, timeout=300) as http:  # warm up: every kind once
        for body, headers in bodies.values():
            http.post("/remove", content=body, headers=headers).raise_for_status()
    idle_s = max(2.0, min(5.0, args.seconds / 6))
    process, queue = run_probe(url, idle_s)
    idle = probe_result(process, queue, idle_s + 60)
    process, queue = run_probe(url, args.seconds)
    uploads = load(url, bodies, args.clients, args.seconds, (args.width, args.height), args.client_nice)
    healthz = probe_result(process, queue, args.seconds + 60)
    return {
        "seconds": args.seconds,
        "width": args.width,
        "height": args.height,
        "grain": args.grain,
        "mask": args.mask,
        "clients": args.clients,
        "worker_nice": args.worker_nice,
        "client_nice": args.client_nice,
        "body_mb": {"/".join(kind): round(len(body) / 2**20, 2) for kind, (body, _) in bodies.items()},
        "healthz": healthz,
        "healthz_idle": idle,
        "uploads": uploads,
        "goal_p99_ms": 50,
    }


FULL_RUN = {"seconds": 30.0, "clients": 8, "width": 4000, "height": 3000}
SMOKE_RUN = {"seconds": 4.0, "clients": 2, "width": 640, "height": 480}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, help="of load (default 30, --smoke 4)")
    parser.add_argument("--clients", type=int, help="uploading at once (default 8, --smoke 2)")
    parser.add_argument("--width", type=int, help="of the photo (default 4000, --smoke 640)")
    parser.add_argument("--height", type=int, help="of the photo (default 3000, --smoke 480)")
    parser.add_argument("--grain", type=float, default=3.0, help="noise std added to the photo (3: an 18 MB PNG)")
    parser.add_argument("--mask", choices=["empty", "box"], default="empty", help="box: removals by the model too")
    parser.add_argument("--url", default=None, help="a running service on 127.0.0.1 (default: start one)")
    parser.add_argument(
        "--worker-nice", type=int, default=None, help="the started service's overload.worker_nice (default: the config's)"
    )
    parser.add_argument(
        "--client-nice", type=int, default=0, help="upload threads this many nice steps lower (15: Ray's workers')"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 s, 2 clients, 640x480 unless given: checks that it all works"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_healthz.json"))
    args = parser.parse_args()
    for name, value in (SMOKE_RUN if args.smoke else FULL_RUN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.url and not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit("--url must be a loopback address")
    if args.url and args.worker_nice is not None:
        parser.error("--worker-nice: for the service this script starts, not one given by --url")
    child = None
    if args.url:
        url = args.url
    else:

        def adjust(config: dict) -> None:
            remover_only(config)
            if args.worker_nice is not None:
                config["applications"][0]["args"].setdefault("overload", {})["worker_nice"] = args.worker_nice

        child, url = start_service(Path(tempfile.mkdtemp(prefix="rorem-bench-healthz-")), "healthz", adjust)
    try:
        with exit_if_unreachable(url):
            result = {"smoke": args.smoke, **bench(url, args)}
    finally:
        if child is not None:
            stop_service(child)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    h, idle, u = result["healthz"], result["healthz_idle"], result["uploads"]
    print(f"{'GET /healthz':<14} {'runs':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}")
    for name, r in (("under load", h), ("idle", idle)):
        print(f"{name:<14} {r['runs']:>5} {r.get('p50_ms', '-'):>7} {r.get('p95_ms', '-'):>7} "
              f"{r.get('p99_ms', '-'):>7} {r.get('max_ms', '-'):>7} {r['errors']:>6}")  # fmt: skip
        if r.get("loop_lag"):  # the replica's own event-loop lag over the same probes
            lag = r["loop_lag"]
            columns = "".join(f"{lag[key]:>8}" for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
            print(f"{'  loop lag':<14} {'':>5}{columns}")
    print(f"uploads: {u['completed']} in {u['seconds']} s ({u['per_s']}/s, {u['request_mb_per_s']} MB/s sent), "
          f"statuses {u['statuses']}")  # fmt: skip
    if not u["completed"] or h["runs"] == h["errors"]:
        what = "no upload was served" if not u["completed"] else "no /healthz probe was answered under load"
        print(f"bench_healthz_under_load: {what}: nothing was measured; saved {args.out}", file=sys.stderr)
        return 1
    verdict = "meets" if meets_goal(h, result["goal_p99_ms"]) else "misses"
    failed = f" ({h['errors']} probes failed, each counted at {PROBE_TIMEOUT_S:g} s)" if h["errors"] else ""
    print(f"/healthz p99 {verdict} the {result['goal_p99_ms']} ms goal{failed}; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
