"""At most one log line per LOG_EVERY_S for a failure that can repeat with every request (an unreachable quota
ledger, a result store that cannot save): a metric counts each one, the log says that it is happening and why,
without a traceback per request burying everything else."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

LOG_EVERY_S = 60.0


class LogThrottle:
    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._logged = -math.inf

    def due(self) -> bool:
        """Whether to log now: true at most once per `every_s` (the first time, then once the interval is over)."""
        now = self.clock()
        if now - self._logged < self.every_s:
            return False
        self._logged = now
        return True
