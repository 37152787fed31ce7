"""Admission control for one ingress replica: refuse early (429) instead of queueing without end.

Two limits, both answered at once with a problem+json 429 and a Retry-After, before the body is read:
- by time: the replica measures the rate at which it gets results while it has work in progress
  (`ServiceRate`); a request that would wait longer than `max_queue_wait_s` behind the requests
  already admitted is refused, with Retry-After = how long until the queue is back under that wait.
  A request whose own `timeout_s` is shorter than the expected wait is refused too (`check_deadline`):
  admitting it would only spend model time on an answer nobody waits for.
- by count: at most `limit` requests in progress (a backstop while the rate is still unknown).
Past these, the model deployments' own bounded queues answer 503 (serve.service).
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

from serve.problems import Problem

RATE_WINDOW = 64  # completions the service rate is measured over
# Problems answered after the model did all its work for the request: they count as results of the rate.
AFTER_MODEL_WORK = frozenset({"removal-failed"})  # every gate attempt ran and scored below the threshold
MIN_BUSY_S = 1.0  # below this much measured busy time the rate is unknown (admit by count only)


class ServiceRate:
    """Results per second while busy: completions over the time with at least one request in
    progress, over the last RATE_WINDOW completions. Idle time does not count, so a quiet period
    does not make the service look slow."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.busy_s = 0.0  # total time with work in progress
        self.completed = 0
        self._busy_since: float | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)  # (busy_s, completed)

    def _busy_now(self) -> float:
        return self.busy_s + (self.clock() - self._busy_since if self._busy_since is not None else 0.0)

    def started(self, in_flight_before: int) -> None:
        if in_flight_before == 0:
            self._busy_since = self.clock()

    def finished(self, in_flight_after: int, counted: bool = True) -> None:
        """`counted`: the request got a result from the model path; its time in progress counts either way."""
        busy = self._busy_now()
        if in_flight_after == 0:
            self.busy_s, self._busy_since = busy, None
        if counted:
            self.completed += 1
            self._samples.append((busy, self.completed))

    def per_second(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (busy0, done0), (busy1, done1) = self._samples[0], self._samples[-1]
        if busy1 - busy0 < MIN_BUSY_S:
            return None
        return (done1 - done0) / (busy1 - busy0)


@dataclass
class Place:
    counted: bool | None = None  # None: by how the request ends (see Admission.slot)


class Admission:
    def __init__(self, limit: int, retry_after_s: int, max_queue_wait_s: float | None = None, clock=time.monotonic):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.max_queue_wait_s = max_queue_wait_s
        self.in_flight = 0
        self.rate = ServiceRate(clock)

    def expected_wait_s(self) -> float | None:
        """Seconds a request admitted now would wait behind those in progress; None while unknown."""
        rate = self.rate.per_second()
        return None if rate is None else self.in_flight / rate

    def check(self) -> None:
        """Refuse now what `slot` would refuse, without taking a slot: called before a body is read, so an
        overloaded replica does not read uploads it will refuse, and a slow upload holds no slot."""
        if self.in_flight >= self.limit:
            raise Problem(
                "too-many-requests",
                f"{self.in_flight} requests are in progress on this replica (the limit is {self.limit})",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        wait = self.expected_wait_s()
        if self.max_queue_wait_s is not None and wait is not None and wait > self.max_queue_wait_s:
            raise self._too_long(wait, self.max_queue_wait_s, "overload.max_queue_wait_s")

    @contextmanager
    def slot(self):
        """Hold one of the replica's places in progress. The request counts as a result of the service rate if
        its body ends normally or with a problem answered after all its model work (AFTER_MODEL_WORK), unless it
        set `counted`: refusals, errors, hang-ups and answers without model work (an empty mask) take no model
        time, and counting them would make a loaded replica look fast (admitting more than it can serve); not
        counting a gate's refusal would make it look slow."""
        self.check()
        self.rate.started(self.in_flight)
        self.in_flight += 1
        place, result = Place(), False
        try:
            yield place
            result = True
        except Problem as problem:
            result = problem.problem in AFTER_MODEL_WORK
            raise
        finally:
            self.in_flight -= 1
            self.rate.finished(self.in_flight, result if place.counted is None else place.counted)

    def check_deadline(self, timeout_s: float | None) -> None:
        """Refuse a request (already holding a slot) whose own deadline is shorter than the wait ahead of it."""
        rate = self.rate.per_second()
        if timeout_s is None or rate is None or self.max_queue_wait_s is None:  # None: admission by count only
            return
        ahead = (self.in_flight - 1) / rate
        if ahead > timeout_s:
            raise self._too_long(ahead, timeout_s, "its timeout_s")

    def _too_long(self, wait: float, allowed: float, which: str) -> Problem:
        retry_after = max(1, math.ceil(wait - allowed))
        return Problem(
            "too-many-requests",
            f"the expected wait on this replica is {wait:.1f} s, longer than {which} ({allowed:g} s)",
            headers={"Retry-After": str(retry_after)},
        )
