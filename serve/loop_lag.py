"""How late the ingress replica's event loop runs, measured inside the replica.

A ticker sleeps PERIOD_S at a time and records how much later than asked it woke. That lateness is what
any request waits for the loop: a callback or a C call holding it (or the GIL, from a worker thread), or
the process waiting for a core. Set beside a client's /healthz latency, it tells a stall of this loop
from delays elsewhere (the proxy, the client's machine). /healthz reports the worst since the previous
/healthz, so a prober that keeps every answer sees every stall once, and can tell when it happened.
"""

from __future__ import annotations

import asyncio
import time

PERIOD_S = 0.01


class LoopLag:
    def __init__(self, period_s: float = PERIOD_S):
        self.period_s = period_s
        self._worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> LoopLag:
        """Begin ticking on the running loop (once; again if the loop that ran it has gone)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self) -> None:
        while True:
            asked = time.perf_counter() + self.period_s
            await asyncio.sleep(self.period_s)
            self._worst = max(self._worst, time.perf_counter() - asked)

    def take_worst_ms(self) -> float:
        """The worst lateness since the previous call (or since the start), in ms; the next call starts afresh."""
        worst, self._worst = self._worst, 0.0
        return round(worst * 1000, 1)


_loop_lag: LoopLag | None = None


def loop_lag() -> LoopLag:
    """The process's one LoopLag, ticking from its first use on the replica's loop."""
    global _loop_lag
    if _loop_lag is None:
        _loop_lag = LoopLag()
    return _loop_lag.start()
