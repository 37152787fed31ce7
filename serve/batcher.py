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
gets the turn. A caller that is cancelled before its batch runs is left out, and takes no place in it; its
arguments (an image crop) are let go at once, not when the engine is next free. One cancelled during its batch is
not answered. A batch of several calls whose function raises is run again one call at a time, still holding the
turn: one call the engine cannot take (or a batch too large for the device's memory) fails only its own caller,
not its companions, even where they all left but one while it ran. A call that fails alone gets the exception.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")
_RERUN = contextvars.ContextVar("batcher_rerun", default=False)


def rerunning() -> bool:
    """Whether the batch function runs one call of a batch that failed (for a health count: the batch counted)."""
    return _RERUN.get()


@dataclass(slots=True)
class _Call:
    queued_at: float
    args: tuple | None  # None once its caller has gone: a queued call whose caller left holds no image
    answer: asyncio.Future

    def forget_args(self, _: asyncio.Future) -> None:
        self.args = None


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
        self._queue: asyncio.Queue[_Call] | None = None
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
        call = _Call(loop.time(), args, loop.create_future())
        call.answer.add_done_callback(call.forget_args)
        self._queue.put_nowait(call)
        return await call.answer

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            async with self.turn:
                batch = [call for call in batch if not call.answer.done()]
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    call = self._queue.get_nowait()
                    if not call.answer.done():
                        batch.append(call)
                if batch:
                    await self._run(batch)

    async def _next_batch(self, loop) -> list[_Call]:
        call = await self._queue.get()
        while call.answer.done():  # a caller already gone does not start the batch wait
            call = await self._queue.get()
        batch = [call]
        deadline = call.queued_at + self.wait_s
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        call = await self._queue.get()  # Queue.get keeps its item if cancelled
                except TimeoutError:
                    break
            else:
                call = self._queue.get_nowait()
            if not call.answer.done():
                batch.append(call)
        return batch

    async def _run(self, batch: list[_Call]) -> None:
        try:
            results = await self._call(batch)
        except Exception as exc:
            if len(batch) == 1:  # as it ran: a call that ran with others is run alone before it is failed
                if not batch[0].answer.done():
                    batch[0].answer.set_exception(exc)
                return
            waiting = [call for call in batch if not call.answer.done()]
            if waiting:
                logger.warning("a batch of %d failed (%s: %s); running its %d waiting calls one at a time",
                               len(batch), type(exc).__name__, exc, len(waiting))  # fmt: skip
            rerun = _RERUN.set(True)
            try:
                for call in waiting:
                    if not call.answer.done():  # its caller may have gone while another one ran
                        await self._run([call])
            finally:
                _RERUN.reset(rerun)
            return
        for call, result in zip(batch, results):
            if not call.answer.done():
                call.answer.set_result(result)

    async def _call(self, batch: list[_Call]) -> list[Any]:
        columns = [list(column) for column in zip(*(call.args for call in batch))]
        results = await self.run(*columns)
        if len(results) != len(batch):
            raise RuntimeError(f"the batch function answered {len(results)} results for {len(batch)} calls")
        return results
