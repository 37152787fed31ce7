"""The Ingress's worker threads (body parsing, decode, paste, encode) run below its event loop's CPU priority.

On a busy machine those threads compete for cores with the event loop, which answers /healthz and moves
every other request along, and with Serve's proxy. At a higher nice value they still use every idle cycle,
but the kernel gives a core to the loop or the proxy first when both want one. Linux applies nice per
thread (setpriority on the thread's id) and lets any process lower its own priority; elsewhere, or where
it is refused, the threads keep the process's priority.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

MAX_NICE = 19


def lower_this_thread(by: int) -> bool:
    """Raise the calling thread's nice value by `by` (capped at 19). False where the platform cannot."""
    if by <= 0 or sys.platform != "linux":
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True


def worker_pool(workers: int, name: str, nice: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run `nice` steps below the thread that created them."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_this_thread, initargs=(nice,))


def default_workers() -> int:
    """asyncio's own default for `to_thread` (Python 3.8+)."""
    return min(32, (os.cpu_count() or 1) + 4)
