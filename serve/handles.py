"""Waiting with a deadline in the Ingress: for a Serve deployment's answer through its handle, and for a
request's own work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`awaitable`'s result within `timeout_s`, else asyncio.TimeoutError (the work is cancelled).

    Not asyncio.wait_for: before Python 3.12 it returns the inner result when that is done at the moment the
    caller is cancelled (the cancellation is lost, cpython gh-86296), so a request cut at its deadline could
    run on through the model and answer 200 after it. Here the caller's cancellation always propagates."""
    if timeout_s <= 0:  # nothing starts: a task would run its first step (a model call sent) before its cancel
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        elif isinstance(awaitable, asyncio.Future):
            awaitable.cancel()
        raise asyncio.TimeoutError
    inner = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({inner}, timeout=timeout_s)
    except asyncio.CancelledError:
        inner.cancel()
        inner.add_done_callback(_retrieve)  # a Serve call cancelled ends in RequestCancelledError: nobody's answer
        raise
    if not done:
        inner.cancel()
        inner.add_done_callback(_retrieve)  # its own end (a cancellation, an error) is nobody's answer now
        raise asyncio.TimeoutError
    return inner.result()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def answer_or_cancel(response: Any, timeout_s: float) -> Any:
    """A handle call's answer within `timeout_s`. On a timeout, or when the caller stops waiting, the call is
    cancelled in Serve too: cancelling the local await alone would leave it in the deployment's queue."""
    try:
        return await within(response, timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        response.cancel()
        raise
