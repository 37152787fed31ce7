"""Dynamic batching for one engine queue, formed when the engine is free.

Ray's `@serve.batch` seals a batch `batch_wait_timeout_s` after its first item whether or not the previous
batch is still running, and queues the sealed batches behind its semaphore: requests arriving while the
engine is busy go out in many small batches instead of one full one. Measured with the Remover's queue and
an engine call of 0.2 s whatever the batch size, 20 arrivals/s for 3 s, max_batch_size 8: at the default
wait of 0.01 s every batch held 1 job, the 60 jobs took 12.1 s (p50 latency 4.7 s) and the queue grew
without bound; a batch formed when the engine is free takes the backlog at once (tests/test_batcher.py).

A batch takes up to `max_batch_size` queued calls, waiting at most `wait_s` after its oldest call was queued
(not after the engine became free: a backlog goes at once). Queues of one engine share its `turn`: a batch
closed while another queue's batch runs takes the calls queued meanwhile, up to `max_batch_size`, once it
gets the turn. A caller that is cancelled before its batch runs is left out, and takes no place in it; one
cancelled during it is not answered. A batch of several calls whose function raises is run again one call at a
time, still holding the turn: one call the engine cannot take (or a batch too large for the device's memory)
fails only its own caller, not its companions. A call that fails alone gets the exception.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("ray.serve")


class Batcher:
    def __init__(
        self,
        run: Callable[..., Awaitable[list[Any]]],
        max_batch_size: int,
        wait_s: float,
        turn: asyncio.Lock | None = None,
    ):
        """`run` takes one list per positional argument of the calls and returns one result per call; it runs
        with `turn` held (a lock shared by the queues of one engine; None: this queue's own)."""
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size} and {wait_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.turn = turn or asyncio.Lock()
        self._queue: asyncio.Queue[tuple[float, tuple, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    def set_batch_wait_timeout_s(self, wait_s: float) -> None:
        """A live change: the next batch formed uses it."""
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.wait_s = wait_s

    async def __call__(self, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            # a context of its own: it serves every caller, so it must not carry the first one's (Serve's request id)
            self._worker = loop.create_task(self._serve(), context=contextvars.Context())
        answer = loop.create_future()
        self._queue.put_nowait((loop.time(), args, answer))
        return await answer

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            async with self.turn:
                batch = [(args, answer) for args, answer in batch if not answer.done()]
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    _, args, answer = self._queue.get_nowait()
                    if not answer.done():
                        batch.append((args, answer))
                if batch:
                    await self._run(batch)

    async def _next_batch(self, loop) -> list[tuple[tuple, asyncio.Future]]:
        queued_at, args, answer = await self._queue.get()
        while answer.done():  # a caller already gone does not start the batch wait
            queued_at, args, answer = await self._queue.get()
        items = [(args, answer)]
        deadline = queued_at + self.wait_s
        while len(items) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        _, args, answer = await self._queue.get()  # Queue.get keeps its item if cancelled
                except TimeoutError:
                    break
            else:
                _, args, answer = self._queue.get_nowait()
            if not answer.done():
                items.append((args, answer))
        return items

    async def _run(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            results = await self._call(batch)
        except Exception as exc:
            batch = [(args, answer) for args, answer in batch if not answer.done()]
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
            elif batch:
                logger.warning("a batch of %d failed (%s: %s); running it one call at a time", len(batch),
                               type(exc).__name__, exc)  # fmt: skip
                for item in batch:
                    if not item[1].done():  # its caller may have gone while another one ran
                        await self._run([item])
            return
        for (_, answer), result in zip(batch, results):
            if not answer.done():
                answer.set_result(result)

    async def _call(self, batch: list[tuple[tuple, asyncio.Future]]) -> list[Any]:
        columns = [list(column) for column in zip(*(args for args, _ in batch))]
        results = await self.run(*columns)
        if len(results) != len(batch):
            raise RuntimeError(f"the batch function answered {len(results)} results for {len(batch)} calls")
        return results
