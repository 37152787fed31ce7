"""SIGTERM stopping a command line as Ctrl-C does: a pod's eviction, `kill`, `timeout` send it, and Python's
default ends the process at once, skipping every `finally` (a training stage's summary left `running`, an export's
staging folder left behind)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time

# SIGTERMs this soon after the first are its repeats (a process group's kill and a launcher's forward come
# milliseconds apart), ignored so as not to cut what the command writes as it stops (a stage's failed summary)
SIGTERM_REPEAT_S = 5.0


class Sigterm:
    """What stopping_on_sigterm caught: `signal` once SIGTERM came (at `at`); `stopping` once main handles it."""

    signal: int | None = None
    at = -math.inf
    stopping = False


@contextlib.contextmanager
def stopping_on_sigterm():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the command stops through its `finally` blocks and
    says where. Its repeats (within SIGTERM_REPEAT_S) and any once main handles the stop (`stopping`) are ignored,
    so as not to cut what is written as it stops; a later one raises again, as one raised where Python swallows
    exceptions (a `__del__`) stopped nothing. The previous handler is put back. Outside the main thread (where
    Python runs no handler) nothing is installed."""
    caught = Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def terminate(signum, _frame):
        now = time.monotonic()
        if caught.stopping or now - caught.at < SIGTERM_REPEAT_S:
            return
        caught.signal, caught.at = signum, now
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)
