"""loadtests/bench_open_loop_gpu.py: the GPU machine's open-loop load on the Remover's queues and the admission."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_script

AS_ON_THE_DEVICE = (
    "import importlib.abc, runpy, sys\n"
    "class Absent(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in {'ray', 'uvicorn', 'python_multipart', 'multipart', 'grpc'}:\n"
    "            raise ModuleNotFoundError(f'{name} is not on the GPU machine')\n"
    "sys.meta_path.insert(0, Absent())\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.slow  # a subprocess that loads the model libraries and sends ~40 removals to the tiny model
def test_the_open_loop_gpu_benchmark_runs_in_its_smoke_mode_without_ray(tmp_path):
    """Its one device run must not die at an import the GPU machine lacks (Ray, uvicorn: only the wheels of
    loadtests/gpu_wheels.sh travel) or cannot use (its grpcio, 1.84, is older than the generated gRPC stubs ask for:
    the first device run died importing benchlib, which imported serve.grpc_client), and every request of both
    admissions is answered, none lost."""
    done = subprocess.run(
        [sys.executable, "-c", AS_ON_THE_DEVICE, str(REPO / "loadtests" / "bench_open_loop_gpu.py"), "--smoke",
         "--seconds", "1", "--workloads", "small", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_open_loop_gpu.json").read_text())
    levels = [(r["admission"], r["offered_per_s"]) for r in report["levels"]]
    assert levels == [("time", 4), ("time", 16), ("count", 16)]
    for row in report["levels"]:
        assert row["sent"] > 0 and row["lost"] == 0 and row["bad_result"] == 0 and not row["errors"], row
        assert sum(row["batch_sizes"].values()) + round(row["share_429"] * row["sent"]) == row["sent"], row
    assert report["batching"]["max_batch_size"] == {"64": 8, "128": 4}
    assert report["goal"]["small"]["saturation_offered_per_s"] in (4, 16)
    assert "| small | count | 16 |" in (tmp_path / "bench_open_loop_gpu.md").read_text()


def _row(rate: float, p99: float | None, completed: float, lost: int = 0) -> dict:
    return {"offered_per_s": rate, "p99_ms": p99, "completed_per_s": completed, "lost": lost}


@pytest.mark.parametrize(
    "top, met",
    [(_row(96, 900.0, 23.0), True), (_row(96, 1300.0, 23.0), False), (_row(96, 900.0, 23.0, lost=1), False)],
)
def test_the_goal_compares_the_p99_at_4x_saturation_with_the_p99_at_saturation(top, met):
    """Issue 16's goal: at 4x the saturation load, the admitted p99 within 2x the p99 at saturation, none lost."""
    load_script("loadtests/benchlib.py")  # goal imports it, as a run from loadtests/ finds it
    bench = load_script("loadtests/bench_open_loop_gpu.py")
    rows = [_row(6, 200.0, 6.0), _row(12, 300.0, 12.0), _row(24, 600.0, 23.0), _row(48, 800.0, 23.1), top]
    found = bench.goal(rows)
    assert found["saturation_offered_per_s"] == 24 and found["p99_at_saturation_ms"] == 600.0
    assert found["met"] is met


def test_the_goal_is_not_judged_below_4x_saturation():
    load_script("loadtests/benchlib.py")  # goal imports it, as a run from loadtests/ finds it
    bench = load_script("loadtests/bench_open_loop_gpu.py")
    found = bench.goal([_row(6, 200.0, 6.0), _row(24, 600.0, 23.0), _row(48, 700.0, 23.0)])
    assert found["met"] is None and "under 4x" in found["why"]


def test_the_simulated_engine_takes_the_measured_h200_times_of_each_padded_batch(tmp_path):
    """--simulate: an engine call sleeps for the graph row of its padded shape (a batch of 3 runs in the batch-4
    graph), linear between the batch sizes measured (2: between 1 and 4)."""
    load_script("loadtests/benchlib.py")
    bench = load_script("loadtests/bench_open_loop_gpu.py")
    measured = tmp_path / "engine.json"
    rows = [(512, 1, 90.0), (512, 4, 240.0), (512, 8, 360.0), (1024, 1, 300.0), (1024, 4, 900.0)]
    results = [{"mode": "graph", "side": s, "batch": b, "p50_ms": ms} for s, b, ms in rows]
    measured.write_text(json.dumps({"results": results + [{"mode": "eager", "side": 512, "batch": 1, "p50_ms": 1.0}]}))
    engine = bench.SimulatedEngine(measured, {512: 8, 1024: 4})
    assert [engine.seconds(512, n) for n in (1, 2, 3, 4, 5, 8)] == pytest.approx([0.09, 0.14, 0.24, 0.24, 0.36, 0.36])
    assert engine.seconds(1024, 3) == pytest.approx(0.9)


@pytest.mark.slow  # two levels of 3 s each, twice
@pytest.mark.parametrize("keep", [False, True])
def test_a_kept_admission_knows_the_rate_from_the_second_level_on(keep, tmp_path):
    """Each level starts a fresh Admission, whose first second of busy time admits by count only (the rate is
    unknown), unless --keep-admission: a replica that has been serving knows its rate. 3 s levels: after a 2 s
    first level on a busy runner the rate was still unknown (it needs MIN_BUSY_S of busy time between samples)."""
    for script in ("benchlib", "bench_engine_gpu", "bench_open_loop"):  # main imports them, as a run from loadtests/
        load_script(f"loadtests/{script}.py")
    bench = load_script("loadtests/bench_open_loop_gpu.py")
    argv = ["--simulate", str(REPO / "docs" / "bench_engine_gpu.json"), "--rates", "small:10,20", "--seconds", "3",
            "--out-dir", str(tmp_path)] + ["--keep-admission"] * keep  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_open_loop_gpu.json").read_text())
    first, second = [row for row in report["levels"] if row["admission"] == "time"]
    assert report["simulated"] and first["lost"] == second["lost"] == 0
    assert "before_the_rate" in first["answered"]
    assert ("before_the_rate" in second["answered"]) is not keep


def test_rates_run_lowest_first_so_the_goal_compares_the_highest_with_saturation_below_it():
    bench = load_script("loadtests/bench_open_loop_gpu.py")
    assert bench.parse_args(["--rates", "small:96,24,6;mixed:40,10"]).rates == {"small": [6, 24, 96], "mixed": [10, 40]}


def test_the_remover_bounds_answer_503_past_the_queued_requests_as_serve_does():
    """The shipped Remover takes max_ongoing_requests crops, max_queued_requests more wait in the handle; past that
    Ray's BackPressureError, which the service answers 503 overloaded."""
    import asyncio

    import numpy as np

    from engines.jobs import RemovalJob
    from serve.config import AppSettings
    from serve.problems import Problem

    bench = load_script("loadtests/bench_open_loop_gpu.py")
    assert bench.remover_bounds() == (16, 64)  # serve/configs/local.yaml

    class SlowEngine:
        def remove(self, jobs):
            import time

            time.sleep(0.2)
            return [np.zeros((64, 64, 3), np.uint8) for _ in jobs]

    settings = AppSettings.model_validate({"imaging": {"buckets": [64]}, "batching": {"max_batch_size": 1}})

    async def three_at_once():
        queues = bench.BucketQueues(SlowEngine(), settings, max_ongoing=1, max_queued=1)
        job = RemovalJob(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8), seed=0)
        return await asyncio.gather(*(queues.remove(job) for _ in range(3)), return_exceptions=True)

    answers = asyncio.run(three_at_once())
    assert [type(a).__name__ for a in answers] == ["ndarray", "ndarray", "Problem"]
    assert isinstance(answers[2], Problem) and answers[2].problem == "overloaded" and answers[2].status == 503
