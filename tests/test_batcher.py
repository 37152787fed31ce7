"""Dynamic batching (serve/batcher.py) without Ray: batches formed when the engine is free, per-bucket limits,
cancellation, errors; and the Remover deployment's queues under a load above batch-of-1 capacity."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np
import pytest

from engines.jobs import RemovalJob
from serve.batcher import Batcher
from serve.config import RemoverArgs
from serve.health import EngineWatch


class SlowEngine:
    """A GPU at small batches: one call takes `call_s` whatever the batch size; one call at a time, under a
    lock, as RemovalEngine.remove runs."""

    def __init__(self, call_s: float):
        self.call_s = call_s
        self.batches: list[int] = []
        self.seeds: list[list[int]] = []  # each batch's jobs
        self._lock = threading.Lock()

    def remove(self, jobs, stages):
        with self._lock:
            self.batches.append(len(jobs))
            self.seeds.append([job.seed for job in jobs])
            time.sleep(self.call_s)
            return [job.image for job in jobs]


class _NoMetrics:
    def batch(self, size):
        pass

    class stages:
        @staticmethod
        def observe(values):
            pass


def _remover(engine, wait_s: float, hung_after_s: float | None = None):
    """The Remover deployment's own object, with an engine stand-in (no model, no Ray)."""
    from serve.remover_deployment import Remover

    remover = object.__new__(Remover.func_or_class)
    remover.settings = RemoverArgs.model_validate(
        {"imaging": {"buckets": [256, 512]}, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": wait_s}}
    )
    remover.engine, remover.metrics, remover.watch = engine, _NoMetrics(), EngineWatch(hung_after_s)
    remover.engine_turn = asyncio.Lock()
    remover.queues = {side: remover._bucket_queue(side) for side in remover.settings.imaging.buckets}
    return remover


def _job(side: int = 256, seed: int = 0) -> RemovalJob:
    return RemovalJob(np.zeros((side, side, 3), np.uint8), np.zeros((side, side), bool), seed)


@pytest.mark.timing
def test_a_backlog_goes_out_in_full_batches_while_the_engine_is_busy():
    """What a review measured with Ray's @serve.batch: 20 arrivals/s, an engine call of 0.2 s, max batch 8 and
    the default wait of 0.01 s: every batch held 1 job, 60 jobs took 12.1 s and the queue grew without bound
    (each sealed batch waited behind the running one). Full batches serve 40/s."""
    engine = SlowEngine(0.2)
    remover = _remover(engine, wait_s=0.01)

    async def offered_load(rate: float, seconds: float) -> tuple[float, list[float]]:
        latencies = []

        async def one():
            sent = time.perf_counter()
            await remover.remove(_job(), time.time())
            latencies.append(time.perf_counter() - sent)

        started, calls = time.perf_counter(), []
        while time.perf_counter() - started < seconds:
            calls.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*calls)
        return time.perf_counter() - started, sorted(latencies)

    took, latencies = asyncio.run(offered_load(rate=20, seconds=3.0))
    sizes = collections.Counter(engine.batches)
    assert sum(engine.batches) == len(latencies) >= 50
    assert len(engine.batches) <= len(latencies) / 3, f"batch sizes {dict(sizes)}"
    assert took < 5.0 and latencies[len(latencies) // 2] < 1.0, (took, latencies[len(latencies) // 2], dict(sizes))


@pytest.mark.timing
def test_a_batch_waits_for_companions_only_up_to_the_wait_after_its_oldest_call():
    calls = []

    async def run(values):
        calls.append(list(values))
        return values

    async def main():
        batcher = Batcher(run, max_batch_size=4, wait_s=0.2)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher(2))
        started = time.perf_counter()
        assert await asyncio.gather(first, second) == [1, 2]
        waited = time.perf_counter() - started
        full = await asyncio.gather(*(batcher(n) for n in range(10, 15)))  # more than one batch holds
        return waited, full

    waited, full = asyncio.run(main())
    assert calls[0] == [1, 2] and waited < 0.2, "the wait counts from the oldest call, not the newest"
    assert full == [10, 11, 12, 13, 14] and [len(c) for c in calls[1:]] == [4, 1]


def test_cancelled_callers_are_left_out_and_an_error_reaches_only_the_caller_that_causes_it():
    """A batch that fails is run again one call at a time: before, one call the engine could not take failed
    every companion of its batch with it (a 500 each)."""
    seen = []

    async def run(values):
        seen.append(list(values))
        if "bad" in values:
            raise ValueError("one bad call")
        await asyncio.sleep(0.05)
        return [v.upper() for v in values]

    async def main():
        batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
        gone = asyncio.create_task(batcher("gone"))
        kept = asyncio.create_task(batcher("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == "KEPT"
        failing = [asyncio.create_task(batcher(v)) for v in ("bad", "other")]
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        assert isinstance(outcomes[0], ValueError) and outcomes[1] == "OTHER"
        assert await batcher("after") == "AFTER", "the queue serves on after a failed batch"

    asyncio.run(asyncio.wait_for(main(), 10))
    assert seen == [["kept"], ["bad", "other"], ["bad"], ["other"], ["after"]]


def test_a_batch_too_large_for_the_device_completes_one_call_at_a_time_and_a_broken_engine_fails_each_once():
    """A batch that runs out of device memory (any batch over one here) still answers every caller; an engine
    that fails every call fails each caller with its own error, one retry each, and the queue serves on."""
    calls = []

    async def out_of_memory_above_one(values):
        calls.append(len(values))
        if len(values) > 1:
            raise RuntimeError("CUDA out of memory")
        return [v * 2 for v in values]

    async def broken(values):
        calls.append(len(values))
        raise RuntimeError("engine broken")

    async def main():
        batcher = Batcher(out_of_memory_above_one, max_batch_size=4, wait_s=0.05)
        assert await asyncio.gather(*(batcher(v) for v in range(4))) == [0, 2, 4, 6]
        assert calls == [4, 1, 1, 1, 1]
        calls.clear()
        batcher = Batcher(broken, max_batch_size=4, wait_s=0.05)
        outcomes = await asyncio.gather(*(batcher(v) for v in range(3)), return_exceptions=True)
        assert [str(o) for o in outcomes] == ["engine broken"] * 3 and calls == [3, 1, 1, 1]

    asyncio.run(asyncio.wait_for(main(), 10))


def _slow_and_out_of_memory_above_one(calls: list):
    """A batch function that takes 0.1 s and runs out of device memory on any batch over one call."""

    async def run(values):
        calls.append(list(values))
        await asyncio.sleep(0.1)
        if len(values) > 1:
            raise RuntimeError("CUDA out of memory")
        return [v * 2 for v in values]

    return run


def test_a_caller_gone_while_its_failed_batch_is_rerun_one_by_one_is_not_run():
    """The one-by-one re-run checked its callers only before it began: one that hung up meanwhile still ran."""
    calls = []
    out_of_memory_above_one = _slow_and_out_of_memory_above_one(calls)

    async def main():
        batcher = Batcher(out_of_memory_above_one, max_batch_size=4, wait_s=0.05)
        callers = [asyncio.create_task(batcher(v)) for v in range(3)]
        while calls != [[0, 1, 2], [0]]:  # the batch failed; its first call runs again alone
            await asyncio.sleep(0.005)
        callers[2].cancel()
        return await asyncio.gather(*callers, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(main(), 10))
    assert outcomes[:2] == [0, 2] and isinstance(outcomes[2], asyncio.CancelledError)
    assert calls == [[0, 1, 2], [0], [1]]


@pytest.mark.timing
def test_a_live_wait_change_applies_to_the_next_batch():
    async def run(values):
        return values

    async def main():
        batcher = Batcher(run, max_batch_size=8, wait_s=5.0)
        batcher.set_batch_wait_timeout_s(0.0)
        started = time.perf_counter()
        await batcher("x")
        return time.perf_counter() - started

    assert asyncio.run(main()) < 1.0
    with pytest.raises(ValueError):
        Batcher(run, max_batch_size=0, wait_s=0.0)


@pytest.mark.timing
def test_a_batch_waiting_for_another_bucket_is_not_counted_as_a_hung_engine_call():
    """Each bucket has its own queue and the engine runs one batch at a time: a 512 batch behind a 1024 one
    counted its wait as engine time, so hung_after_s (meant for one slow batch) restarted healthy replicas."""
    engine = SlowEngine(0.6)
    remover = _remover(engine, wait_s=0.0, hung_after_s=1.0)

    async def main():
        first = asyncio.create_task(remover.remove(_job(256), time.time()))
        second = asyncio.create_task(remover.remove(_job(512), time.time()))
        failures = []
        while not (first.done() and second.done()):
            try:
                remover.check_health()
            except RuntimeError as exc:
                failures.append(str(exc))
            await asyncio.sleep(0.05)
        return failures, [first.result().model_ms, second.result().model_ms]

    failures, model_ms = asyncio.run(main())
    assert failures == [] and max(model_ms) < 1000, (failures, model_ms)


@pytest.mark.timing
def test_a_batch_closed_while_another_bucket_runs_takes_the_crops_queued_meanwhile_and_leaves_out_callers_gone():
    """Each bucket's queue closed its batch, then waited for the engine: a caller cancelled during that wait
    still had its crop run, and the crops queued meanwhile waited for one more engine call."""
    engine = SlowEngine(0.6)
    remover = _remover(engine, wait_s=0.01)

    async def main():
        running = asyncio.create_task(remover.remove(_job(512, seed=512), time.time()))
        await asyncio.sleep(0.1)
        first = asyncio.create_task(remover.remove(_job(256, seed=100), time.time()))
        gone = asyncio.create_task(remover.remove(_job(256, seed=99), time.time()))
        await asyncio.sleep(0.1)  # their batch is closed: it waits for the 512 batch
        gone.cancel()
        later = [asyncio.create_task(remover.remove(_job(256, seed=n), time.time())) for n in range(7)]
        outcomes = await asyncio.gather(first, *later)
        await running
        return [outcome.stages["queue_wait"] for outcome in outcomes]

    queue_waits = asyncio.run(main())
    assert engine.seeds == [[512], [100, *range(7)]]
    assert min(queue_waits) > 0.1, "the wait for the other bucket's batch is queue_wait"


class _Echo:
    """A batch function that answers each call its own value; `calls`: the batches it ran."""

    def __init__(self):
        self.calls: list[list] = []

    async def __call__(self, values):
        self.calls.append(list(values))
        return values


def test_callers_already_gone_take_no_place_in_a_batch():
    """A cancelled caller counted toward max_batch_size: the batch ran without it, one place short."""
    run = _Echo()

    async def main():
        batcher = Batcher(run, max_batch_size=2, wait_s=0.5)
        calls = [asyncio.create_task(batcher(v)) for v in ("gone", "first", "gone too", "second")]
        await asyncio.sleep(0)
        calls[0].cancel()
        calls[2].cancel()
        return await asyncio.gather(calls[1], calls[3])

    assert asyncio.run(main()) == ["first", "second"]
    assert run.calls == [["first", "second"]]


def test_the_batch_worker_does_not_carry_the_first_callers_context():
    """Serve keeps a request's id in a context variable; the worker that runs every later batch must not log
    or tag them with the first caller's."""
    import contextvars

    request_id = contextvars.ContextVar("request_id", default=None)
    seen = []

    async def run(values):
        seen.append(request_id.get())
        return values

    async def main():
        batcher = Batcher(run, max_batch_size=8, wait_s=0.0)
        request_id.set("first-caller")
        await batcher(1)

    asyncio.run(main())
    assert seen == [None]


def test_the_one_caller_left_of_a_failed_batch_is_run_alone_before_it_is_failed():
    """A batch of four ran out of device memory while three of its callers hit their deadlines: the fourth got
    the batch's error (a 500) where alone it succeeds; it is run alone first."""
    calls = []
    out_of_memory_above_one = _slow_and_out_of_memory_above_one(calls)

    async def main():
        batcher = Batcher(out_of_memory_above_one, max_batch_size=4, wait_s=0.05)
        callers = [asyncio.create_task(batcher(v)) for v in range(4)]
        while not calls:
            await asyncio.sleep(0.005)
        for caller in callers[:3]:
            caller.cancel()
        return await callers[3]

    assert asyncio.run(asyncio.wait_for(main(), 10)) == 6
    assert calls == [[0, 1, 2, 3], [3]]


def test_callers_gone_from_the_queue_while_the_engine_is_busy_hold_no_arguments():
    """While one engine call ran, the crops of callers that had left stayed queued until the engine was free:
    under a stalled engine, as many images as arrived. They are let go when the caller leaves."""
    import gc
    import weakref

    class Crop:
        pass

    release = None

    async def stalled(values):
        await release.wait()
        return values

    async def main():
        nonlocal release
        release = asyncio.Event()
        batcher = Batcher(stalled, max_batch_size=1, wait_s=0.0)
        running = asyncio.create_task(batcher(Crop()))
        await asyncio.sleep(0.02)  # the engine is busy with the first call
        crops = [Crop() for _ in range(5)]
        refs = [weakref.ref(crop) for crop in crops]

        async def leave_early(crop):
            try:
                await asyncio.wait_for(batcher(crop), 0.02)
            except TimeoutError:
                pass

        await asyncio.gather(*(leave_early(crop) for crop in crops))
        del crops
        gc.collect()
        held = sum(ref() is not None for ref in refs)
        release.set()
        await running
        return held

    held = asyncio.run(asyncio.wait_for(main(), 10))
    assert held == 0, f"{held} of 5 crops of callers that left are still held while the engine is busy"


def test_one_request_whose_crops_each_fail_does_not_make_the_remover_unhealthy():
    """A batch of 4 crops that each fail alone counted 5 failures in a row (the batch, then each rerun): one
    request reached FAILED_CALLS_UNHEALTHY, and Serve restarted the GPU replica (minutes of reload). A failed
    batch now counts once; a device left broken, failing every batch, still is caught."""
    from engines.regions import MAX_CROPS
    from serve.health import FAILED_CALLS_UNHEALTHY

    class FailingEngine:
        batches: list[int] = []

        def remove(self, jobs, stages):
            FailingEngine.batches.append(len(jobs))
            raise RuntimeError("the engine cannot take this crop")

    remover = _remover(FailingEngine(), wait_s=0.05)

    async def crops(n: int):
        return await asyncio.gather(*(remover.remove(_job(), time.time()) for _ in range(n)), return_exceptions=True)

    async def main():
        outcomes = await crops(MAX_CROPS)  # the most crops one request cuts: two batches of 8, each failing alone
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert FailingEngine.batches == [8] + [1] * 8 + [8] + [1] * 8
        remover.watch.check()
        for _ in range(FAILED_CALLS_UNHEALTHY - 2):  # then every request fails: a broken device
            await crops(1)
        with pytest.raises(RuntimeError, match=f"last {FAILED_CALLS_UNHEALTHY} engine calls failed"):
            remover.watch.check()

    asyncio.run(asyncio.wait_for(main(), 10))
