"""Calling a Serve deployment through its handle, from the Ingress."""

from __future__ import annotations

import asyncio
from typing import Any


async def answer_or_cancel(response: Any, timeout_s: float) -> Any:
    """A handle call's answer within `timeout_s`. On a timeout, or when the caller stops waiting, the call is
    cancelled in Serve too: cancelling the local await alone would leave it in the deployment's queue."""
    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        response.cancel()
        raise
