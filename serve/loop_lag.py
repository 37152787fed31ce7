"""How late the ingress replica's event loop runs, measured inside the replica.

A ticker sleeps PERIOD_S at a time and records how much later than asked it woke. That lateness is what
any request waits for the loop: a callback or a C call holding it (or the GIL, from a worker thread), or
the process waiting for a core. Set beside a client's /healthz latency, it tells a stall of this loop
from delays elsewhere (the proxy, the client's machine). /healthz reports the worst since the previous
/healthz that replica answered, whoever asked: the route is public and the window is one per replica, shared
by all its callers, so a stall another caller's /healthz took is missing from the next prober's answer. The
complete record is the histogram (`rorem_loop_lag_seconds`): the worst of each second, which no caller resets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

PERIOD_S = 0.01
REPORT_EVERY_S = 1.0


class LoopLag:
    def __init__(self, period_s: float = PERIOD_S, report_every_s: float = REPORT_EVERY_S):
        self.period_s = period_s
        self.report_every_s = report_every_s
        self.report: Callable[[float], object] | None = None  # given each window's worst lateness, in seconds
        self._worst = 0.0
        self._window_worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> LoopLag:
        """Begin ticking on the running loop (once; again if the loop that ran it has gone)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self) -> None:
        window_ends = time.perf_counter() + self.report_every_s
        while True:
            asked = time.perf_counter() + self.period_s
            await asyncio.sleep(self.period_s)
            now = time.perf_counter()
            late = now - asked
            self._worst = max(self._worst, late)
            self._window_worst = max(self._window_worst, late)
            if now >= window_ends:
                if self.report is not None:
                    self.report(self._window_worst)
                self._window_worst = 0.0
                window_ends = now + self.report_every_s

    def take_worst_ms(self) -> float:
        """The worst lateness since the previous call, by any caller (or since the start), in ms; the next call
        starts afresh."""
        worst, self._worst = self._worst, 0.0
        return round(worst * 1000, 1)


_loop_lag: LoopLag | None = None


def loop_lag() -> LoopLag:
    """The process's one LoopLag, ticking from its first use on the replica's loop."""
    global _loop_lag
    if _loop_lag is None:
        _loop_lag = LoopLag()
    return _loop_lag.start()
