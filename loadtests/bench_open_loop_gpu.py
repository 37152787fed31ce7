"""Open-loop load at GPU rate without Ray: the Remover's batch queues and the Ingress's admission, in one process.

    python loadtests/bench_open_loop_gpu.py              # on a CUDA machine (docs/benchmarks.md); writes under $OUT
    python loadtests/bench_open_loop_gpu.py --smoke      # tiny model on the CPU: a check of this script
    python loadtests/bench_open_loop_gpu.py --simulate docs/bench_engine_gpu.json   # any machine: measured times

The GPU machine has no Ray (its wheels are more than can travel there), so loadtests/bench_open_loop.py, which
starts the service, cannot run there. This drives the parts that decide latency at load in one process: the
full-size SDXL-inpainting UNet and VAE (seeded random weights: bench_engine_gpu's models) warmed and captured as the
Remover does (`RemovalEngine.warm_up` with the shipped config's batch sizes, CUDA graphs); one
`serve.batcher.Batcher` per bucket sharing the engine's turn, each batch's engine call in a thread (as
serve.remover_deployment.Remover), behind Serve's bounds on the Remover replica from the shipped config
(`max_ongoing_requests` crops inside it, `max_queued_requests` more waiting, then 503); in front, an
`serve.admission.Admission` with the shipped overload settings,
each request going through it as serve.app and serve.service take it (`check`, `slot`, `check_deadline`, `planned`
with its work units). Not in it: the proxies, the body's read, decode, crop, paste and encode (the Ingress's CPU work,
docs/benchmarks.md "Sizing the ingress"), and the gate's scoring.

Poisson arrivals at each offered rate for --seconds, each latency from its scheduled arrival, rows as
bench_open_loop's (`level_row`; a refusal counts as "429", a result that is not an image of the crop's size as
bad_result). Workloads: `small` (every crop 512) and `mixed` (two in three 512, one in three 1024). Admission by
expected wait (the shipped `max_queue_wait_s`) at every rate, then by count only (`max_queue_wait_s: null`) at the
highest, for comparison. Issue 16's goal: at 4x the saturation load, the p99 of the admitted requests within 2x the
p99 at saturation, none lost; `goal` in the JSON says what was found. Writes bench_open_loop_gpu.json and .md into
--out-dir (after each level: a cut run keeps what it measured) and prints the table. Exits 1 when a workload
completed nothing. Each row's `answered` has the p50 / p99 by crop side and of the requests admitted before the
service rate was known (`before_the_rate`: a fresh Admission's first ~1 s of busy time, admitted by count only);
`--keep-admission` keeps one Admission across a workload's levels, as a replica that has been serving.

`--simulate JSON` runs no model: each engine call sleeps for what a bench_engine_gpu JSON's graph rows measured at
that padded batch shape. Against the H200's own runs its p99s came out within 9% at 16 of the 18 levels compared
(docs/benchmarks.md), so settings can be compared without a GPU; its rows are a model of the GPU, never its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHIPPED_CONFIG = REPO / "serve" / "configs" / "local.yaml"
DRAIN_S = 60.0  # past the shipped max_queue_wait_s (5 s) by far: an answer later than this is lost
RATES = {"small": [6, 12, 24, 48, 96], "mixed": [2.5, 5, 10, 20, 40]}  # around the H200's ~23 / ~10 per s
SMOKE_RATES = {"small": [4, 16], "mixed": [4, 16]}
SMOKE_ARGS = {"imaging": {"buckets": [64, 128]}, "batching": {"per_bucket": {128: {"max_batch_size": 4}}}}
COLUMNS = ("workload", "admission", "offered_per_s", "realized_per_s", "completed_per_s", "p50_ms", "p99_ms",
           "share_429", "lost", "bad_result", "batch_sizes")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.environ.get("OUT") or "out/bench_open_loop_gpu")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, buckets 64/128: a check of this script")
    p.add_argument("--workloads", type=parse_workloads, default="small,mixed",
                   help="which of small, mixed to run, at their default rates")
    p.add_argument("--seconds", type=float, default=12.0, help="arrivals per offered rate")
    p.add_argument("--budget-s", type=float, default=260.0, help="start no new level after this many seconds")
    p.add_argument("--rates", type=parse_rates, default=None,
                   help="workloads and their offered rates, e.g. 'small:24,96;mixed:10,40' (instead of --workloads)")
    p.add_argument(
        "--simulate", type=Path, default=None, metavar="BENCH_ENGINE_GPU_JSON",
        help="no model: each engine call sleeps for what that JSON's graph rows measured (any machine, no GPU)",
    )
    p.add_argument("--keep-admission", action="store_true",
                   help="one Admission per workload and policy across its levels (a replica serving for a while)")
    p.add_argument("--overload", default=None, help="JSON over the shipped overload, e.g. '{\"max_queue_wait_s\": 2}'")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def shipped_settings(smoke: bool, overload: str | None = None):
    """serve.config.AppSettings of the shipped Serve config (its batching and overload), smaller buckets for --smoke,
    `overload` (JSON) over its overload settings."""
    from serve.config import AppSettings

    args = yaml.safe_load(SHIPPED_CONFIG.read_text())["applications"][0].get("args") or {}
    if smoke:
        args = {**args, **SMOKE_ARGS}
    if overload:
        args = {**args, "overload": {**args.get("overload", {}), **json.loads(overload)}}
    return AppSettings.model_validate(args)


def parse_workloads(text: str) -> list[str]:
    workloads = [w.strip() for w in text.split(",") if w.strip()]
    if not workloads or set(workloads) - set(RATES):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {sorted(RATES)}, not {text!r}")
    return workloads


def parse_rates(text: str) -> dict[str, list[float]]:
    """--rates: `workload:rate,rate;workload:...`, each workload one of RATES' and each rate above 0; a workload's
    rates run lowest first (the goal compares the highest with the saturation point found below it)."""
    rates = {}
    for part in text.split(";"):
        workload, _, values = part.partition(":")
        workload = workload.strip()
        try:
            rates[workload] = sorted({float(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{workload}: the rates must be numbers, not {values!r}") from None
        if workload not in RATES or not rates[workload] or min(rates[workload]) <= 0:
            raise argparse.ArgumentTypeError(f"expected workload:rate,... with workloads {sorted(RATES)} and rates > 0")
    return rates


def planned_rates(args) -> dict[str, list[float]]:
    """The workloads to run and their offered rates: --rates, else --workloads at their defaults."""
    if args.rates:
        return args.rates
    defaults = SMOKE_RATES if args.smoke else RATES
    return {w: defaults[w] for w in args.workloads}


class BucketQueues:
    """The Remover without Ray: in front, Serve's bounds on the replica (`max_ongoing_requests` calls inside it, up to
    `max_queued_requests` more waiting in the caller's handle, first come first served, past that a 503 `overloaded`,
    as serve.service answers Ray's BackPressureError); inside, a Batcher per bucket, one engine turn, the engine call
    in a thread."""

    def __init__(self, engine, settings, max_ongoing: int, max_queued: int):
        from serve.batcher import Batcher

        turn = asyncio.Lock()
        self.engine = engine
        self.queues = {}
        for side in settings.imaging.buckets:
            size, wait = settings.batching.for_bucket(side)
            self.queues[side] = Batcher(self._run_batch, size, wait, turn=turn)
        self.ongoing = asyncio.Semaphore(max_ongoing)
        self.max_queued = max_queued
        self.waiting = 0
        self.batch_sizes: dict[str, int] = {}  # jobs by the batch they ran in, "512x8"

    async def _run_batch(self, jobs: list) -> list:
        images = await asyncio.to_thread(self.engine.remove, jobs)
        shape = f"{jobs[0].image.shape[0]}x{len(jobs)}"
        self.batch_sizes[shape] = self.batch_sizes.get(shape, 0) + len(jobs)
        return images

    async def remove(self, job):
        from serve.problems import Problem

        if self.ongoing.locked() and self.waiting >= self.max_queued:
            raise Problem("overloaded", f"the Remover's queue is full ({self.max_queued} waiting)")
        self.waiting += 1
        try:
            await self.ongoing.acquire()
        finally:
            self.waiting -= 1
        try:
            return await self.queues[job.image.shape[0]](job)
        finally:
            self.ongoing.release()


def remover_bounds() -> tuple[int, int]:
    """The shipped Serve config's Remover `max_ongoing_requests` and `max_queued_requests`."""
    deployments = yaml.safe_load(SHIPPED_CONFIG.read_text())["applications"][0]["deployments"]
    remover = next(d for d in deployments if d["name"] == "Remover")
    return remover["max_ongoing_requests"], remover["max_queued_requests"]


class SimulatedEngine:
    """Stands in for the engine where there is no GPU: a call sleeps for what the H200 took at that batch's padded
    shape (a bench_engine_gpu JSON's graph rows, linear between the batch sizes measured) and answers blank images.
    For exploring queueing and admission settings against measured service times, never for figures of the model."""

    def __init__(self, measured: Path, batch_sizes: dict[int, int]):
        from engines.remover import padded_batch_sizes

        rows = [row for row in json.loads(measured.read_text())["results"] if row["mode"] == "graph"]
        self.points = {side: sorted((r["batch"], r["p50_ms"] / 1000) for r in rows if r["side"] == side)
                       for side in batch_sizes}  # fmt: skip
        missing = [side for side, points in self.points.items() if not points]
        if missing:
            raise SystemExit(f"error: {measured} has no graph rows for the sides {missing}")
        self.padded = {side: padded_batch_sizes(largest) for side, largest in batch_sizes.items()}

    def seconds(self, side: int, size: int) -> float:
        import numpy as np

        padded = min(b for b in self.padded[side] if b >= size)
        batches, seconds = zip(*self.points[side])
        return float(np.interp(padded, batches, seconds))

    def remove(self, jobs: list) -> list:
        import numpy as np

        side = jobs[0].image.shape[0]
        time.sleep(self.seconds(side, len(jobs)))
        return [np.zeros((side, side, 3), np.uint8) for _ in jobs]

    def warm_up(self, batch_sizes: dict[int, int]) -> dict:
        return {"simulated_s": {f"{side}x{b}": round(self.seconds(side, b), 4) for side in batch_sizes
                                for b in self.padded[side]}}  # fmt: skip


async def offer(queues: BucketQueues, admission, settings, rate: float, seconds: float, workload: str,
                rng: random.Random) -> dict:  # fmt: skip
    """One offered rate: Poisson arrivals for `seconds`, every answer awaited (up to DRAIN_S after the last)."""
    from bench_open_loop import level_row
    from benchlib import center_mask, photo, poisson_arrivals, summarize

    from engines.jobs import RemovalJob
    from serve.admission import work_units
    from serve.problems import Problem

    small, large = settings.imaging.buckets[0], settings.imaging.buckets[-1]
    inputs = {side: (photo(side), center_mask(side)) for side in (small, large)}
    deadline_s = settings.request_timeout_s
    results: list[tuple[str, float]] = []
    failures: list[str] = []
    answered: dict[str, list[float]] = {}  # ms of the 200s by crop side, and of those admitted by count only
    queues.batch_sizes = {}

    async def one(side: int, due: float, seed: int) -> None:
        by_count = admission.rate.per_second() is None  # admitted before the service rate was known
        try:
            admission.check()
            with admission.slot() as place:
                place.check_deadline(deadline_s)
                place.planned(work_units([side], small), deadline_s - (time.perf_counter() - due))
                image = await queues.remove(RemovalJob(*inputs[side], seed=seed))
        except Problem as problem:
            results.append((str(problem.status), time.perf_counter() - due))
            return
        except Exception as exc:  # an engine failure: an error of the level's, and its first one shown
            if not failures:
                traceback.print_exc()
            failures.append(repr(exc))
            results.append(("error", time.perf_counter() - due))
            return
        status = "200" if getattr(image, "shape", None) == (side, side, 3) else "bad_result"
        results.append((status, time.perf_counter() - due))
        if status == "200":
            answered.setdefault(str(side), []).append(results[-1][1] * 1000)
            if by_count:
                answered.setdefault("before_the_rate", []).append(results[-1][1] * 1000)

    tasks, start = [], time.perf_counter()
    async for due in poisson_arrivals(rate, seconds, rng):
        side = large if workload == "mixed" and rng.random() < 1 / 3 else small
        tasks.append(asyncio.create_task(one(side, due, len(tasks))))
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_S) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - start
    row = level_row(rate, seconds, len(tasks), results, len(pending), elapsed, queues.batch_sizes)
    parts = {key: {k: v for k, v in summarize(ms).items() if k in ("runs", "p50_ms", "p99_ms")}
             for key, ms in sorted(answered.items())}  # fmt: skip
    return {**row, "errors": sorted(set(failures))[:3], "answered": parts}


def goal(rows: list[dict]) -> dict:
    """Issue 16's goal for one workload's `time` rows: the p99 of the admitted at the highest rate offered, if it is
    at least 4x the saturation point, within 2x the p99 at saturation, and nothing lost."""
    from benchlib import saturation_point

    saturation = saturation_point(rows, load="offered_per_s", rate="completed_per_s")
    if saturation is None:
        return {"saturation_offered_per_s": None, "met": None, "why": "no rate completed a removal"}
    at_saturation = next(row for row in rows if row["offered_per_s"] == saturation)
    top = rows[-1]
    found = {
        "saturation_offered_per_s": saturation,
        "p99_at_saturation_ms": at_saturation["p99_ms"],
        "highest_offered_per_s": top["offered_per_s"],
        "p99_at_highest_ms": top["p99_ms"],
        "lost": sum(row["lost"] for row in rows),
    }
    if top["offered_per_s"] < 4 * saturation:
        return {**found, "met": None, "why": "the highest rate offered is under 4x the saturation point"}
    met = top["p99_ms"] is not None and top["p99_ms"] <= 2 * at_saturation["p99_ms"] and found["lost"] == 0
    return {**found, "met": met}


async def run_levels(args, settings, engine, report: dict, out_dir: Path, started: float) -> None:
    from serve.admission import Admission

    rates = planned_rates(args)
    queues = BucketQueues(engine, settings, *remover_bounds())
    overload = settings.overload
    admissions = {}
    for workload in rates:
        plan = [("time", rate) for rate in rates[workload]] + [("count", rates[workload][-1])]
        for policy, rate in plan:
            if time.monotonic() - started > args.budget_s:
                report["notes"].append(f"budget reached before {workload} {policy} {rate}/s")
                continue
            wait = overload.max_queue_wait_s if policy == "time" else None
            if not (args.keep_admission and (workload, policy) in admissions):  # else a fresh rate per level
                admissions[(workload, policy)] = Admission(overload.max_in_flight, overload.retry_after_s, wait)
            admission = admissions[(workload, policy)]
            rng = random.Random(f"{args.seed}-{workload}-{rate:g}")  # a rate's arrivals, whichever the admission
            row = await offer(queues, admission, settings, rate, args.seconds, workload, rng)
            row = {"workload": workload, "admission": policy, **row}
            report["levels"].append(row)
            print(json.dumps(row), flush=True)
            save(out_dir, report)
        by_wait = [r for r in report["levels"] if r["workload"] == workload and r["admission"] == "time"]
        report["goal"][workload] = goal(by_wait)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from bench_engine_gpu import build_engine, build_models, environment

    started = time.monotonic()
    device = torch.device("cpu" if args.smoke or args.simulate else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the tiny model on the CPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = shipped_settings(args.smoke, args.overload)
    report = {"environment": environment(device), "levels": [], "goal": {}, "notes": [],
              "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
              "simulated": args.simulate is not None,  # sleeps for measured engine times: no model ran
              "batching": {"max_batch_size": settings.batch_sizes(), "wait_s": settings.batch_waits()},
              "overload": settings.overload.model_dump(),
              "remover_bounds": dict(zip(("max_ongoing_requests", "max_queued_requests"), remover_bounds())),
              }  # fmt: skip
    print(json.dumps(report["environment"]), flush=True)
    if args.simulate:
        engine = SimulatedEngine(args.simulate, settings.batch_sizes())
    else:
        unet, vae, scheduler, embeds = build_models(args.smoke, device, args.seed)
        if not args.smoke:
            unet.to(torch.bfloat16)
            vae.to(torch.bfloat16)
        engine = build_engine(unet, vae, scheduler, embeds, device, graphs=device.type == "cuda")
    report["warm_up"] = engine.warm_up(settings.batch_sizes())
    print(f"warmed: {report['warm_up']}", flush=True)
    asyncio.run(run_levels(args, settings, engine, report, out_dir, started))
    report["seconds"] = round(time.monotonic() - started, 1)
    save(out_dir, report)
    print(table(report))
    empty = [w for w, found in report["goal"].items() if found["saturation_offered_per_s"] is None]
    if empty or not report["levels"]:
        print(f"bench_open_loop_gpu: nothing completed ({', '.join(empty) or 'no level ran'})", file=sys.stderr)
        return 1
    return 0


def table(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["levels"]:
        lines.append("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")
    for workload, found in report["goal"].items():
        lines.append(f"\n{workload}: {json.dumps(found)}")
    return "\n".join(lines)


def save(out_dir: Path, report: dict) -> None:
    (out_dir / "bench_open_loop_gpu.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_open_loop_gpu.md").write_text(table(report) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
