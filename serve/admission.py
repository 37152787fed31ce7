"""Admission control for one ingress replica: refuse early (429) instead of queueing without end.

Two limits, both answered at once with a problem+json 429 and a Retry-After, before the body is read:
- by time: the replica measures the rate at which it gets model work done while it has work in progress
  (`ServiceRate`), in work units (`work_units`: a request counts one unit until it is decoded and planned,
  then its crops, each by its bucket's area); a request that would wait longer than `max_queue_wait_s`
  behind the work already admitted is refused, with Retry-After = how long until the queue is back under
  that wait (at most MAX_RETRY_AFTER_S). A request whose own deadline is shorter than the expected wait is
  refused too (`check_deadline`): admitting it would only spend model time on an answer nobody waits for. Once a
  request is planned (`Place.planned`) both are checked again with its real work.
- by count: at most `limit` requests in progress (a backstop while the rate is still unknown).
Past these, the model deployments' own bounded queues answer 503 (serve.service).
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

from serve.config import MAX_RETRY_AFTER_S
from serve.problems import Problem

RATE_WINDOW = 64  # instants with results (a batch's are one) the service rate is measured over
# Problems answered after the model did all its work for the request: they count as results of the rate.
AFTER_MODEL_WORK = frozenset({"removal-failed"})  # every gate attempt ran and scored below the threshold
MIN_BUSY_S = 1.0  # below this much measured busy time the rate is unknown (admit by count only)
# Results within this much busy time of a sample's first result join it: a batch's results come back together, but
# each request ends after its own paste and encode, milliseconds apart. Measured from the first, not the latest, so
# results that keep coming less than this apart (steady load) still make a new sample each SAME_BATCH_S.
SAME_BATCH_S = 0.1
# The busy time between two instants with results counts at most this many times what their work units take at the
# rate measured before: past that it is a stall (a hung model call, an outage whose requests time out), which would
# make the service look slow (needless 429s, long Retry-Afters) for RATE_WINDOW more instants. Above the spread of
# gaps under steady work (a batch of 1 costs more per unit than a full one). What it misjudges errs towards
# admitting: a service that really slows down more than this (lone requests after full batches, gate retries, which
# multiply a request's work) is measured slower at each instant (each capped gap lowers the rate, which raises the
# cap), reaching the new rate within about a window; and a stall before the rate is first known is not capped.
STALL_FACTOR = 8


def work_units(buckets: list[int], smallest_bucket: int) -> float:
    """A removal's model work in units of one crop at the smallest bucket: each crop is a model call, and a
    crop costs about its area (a 1024 crop ~4x a 512 one). Requests differ by up to gate.max_model_calls
    crops of any bucket, so a rate counted in requests says nothing about the work queued."""
    return sum((side / smallest_bucket) ** 2 for side in buckets)


class ServiceRate:
    """Work units done per second while busy: the units of completed results over the time with at least
    one request's model work in progress, over the last RATE_WINDOW instants with results. Idle time does not
    count, so a quiet period does not make the service look slow; nor does time in progress before model work
    (the upload's decode, a refusal after it, an empty mask), so requests that never reach the model do not."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.busy_s = 0.0  # total time with model work in progress
        self.working = 0  # requests whose model work has begun and not ended
        self.completed = 0.0  # work units of the results so far
        self._busy_since: float | None = None
        self._samples: deque[tuple[float, float]] = deque(maxlen=RATE_WINDOW + 1)  # (busy_s less stalls, completed)
        self._sample_start = 0.0  # busy_s at the last sample's first result
        self._last_result = 0.0  # busy_s at the latest result
        # the sample before the last: busy_s at its latest result, its own (busy_s, completed), the rate then
        self._before: tuple[float, float, float, float | None] | None = None

    def _busy_now(self) -> float:
        return self.busy_s + (self.clock() - self._busy_since if self._busy_since is not None else 0.0)

    def started(self) -> None:
        """A request's model work begins."""
        if self.working == 0:
            self._busy_since = self.clock()
        self.working += 1

    def finished(self, worked: bool, units: float) -> None:
        """`worked`: the request's model work had begun (`started`); `units`: its work units if it got a result
        from the model path, else 0. Its time in model work counts either way. A batch's results (within
        SAME_BATCH_S of its first) are one sample: as many, the window's first sample would sit inside a batch, its
        results counted without the busy time they took. A sample's busy time since the one before is capped at
        STALL_FACTOR times what its units take at the rate measured then, so a stall does not stay in the window."""
        busy = self._busy_now()
        if worked:
            self.working -= 1
            if self.working == 0:
                self.busy_s, self._busy_since = busy, None
        if units:
            self.completed += units
            if self._samples and busy - self._sample_start < SAME_BATCH_S:
                self._samples.pop()
            else:
                self._sample_start = busy
                self._before = (self._last_result, *self._samples[-1], self.per_second()) if self._samples else None
            self._last_result = busy
            self._samples.append(self._sample(busy))

    def _sample(self, busy: float) -> tuple[float, float]:
        if self._before is None:
            return busy, self.completed
        result_at, counted, done, rate = self._before
        took = busy - result_at
        if rate is not None:
            took = min(took, STALL_FACTOR * (self.completed - done) / rate)
        return counted + took, self.completed

    def per_second(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (busy0, done0), (busy1, done1) = self._samples[0], self._samples[-1]
        if busy1 - busy0 < MIN_BUSY_S:
            return None
        return (done1 - done0) / (busy1 - busy0)


@dataclass(eq=False)
class Place:
    """A request in progress (Admission.slot)."""

    admission: Admission
    units: float = 1.0  # its work units: one until it is planned (`planned`)
    working: bool = False  # its model work has begun (`planned`)
    counted: bool | None = None  # None: by how the request ends (see Admission.slot)

    def check_deadline(self, deadline_s: float) -> None:
        """Refuse the request if its deadline (serve.service.request_deadline_s) is shorter than the wait ahead
        of it."""
        self.admission._check_wait_ahead(self, deadline_s, None)

    def planned(self, units: float, deadline_s: float) -> None:
        """The request is decoded and planned, its model work begins: from now on it counts its real work
        (`work_units`) and the service rate's busy time runs. It is refused first (the 429 of `Admission.slot`)
        if the work ahead of it no longer fits in max_queue_wait_s or in `deadline_s`, what is left of its
        deadline."""
        self.units = units
        self.admission._check_wait_ahead(self, deadline_s, self.admission.max_queue_wait_s)
        self.working = True
        self.admission.rate.started()


@dataclass(eq=False)
class InFlight:
    """Requests in progress on a replica, whatever their route: what Admission's `limit` bounds, since each holds
    its uploads in memory. Shared by the routes' Admissions, which measure their rates apart."""

    count: int = 0


class Admission:
    def __init__(
        self,
        limit: int,
        retry_after_s: int,
        max_queue_wait_s: float | None = None,
        clock=time.monotonic,
        in_flight: InFlight | None = None,
    ):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.max_queue_wait_s = max_queue_wait_s
        self.places: list[Place] = []  # this route's requests in progress
        self.everywhere = in_flight or InFlight()
        self.rate = ServiceRate(clock)

    @property
    def in_flight(self) -> int:
        return len(self.places)

    def work(self) -> float:
        """Work units in progress."""
        return sum(place.units for place in self.places)

    def expected_wait_s(self) -> float | None:
        """Seconds a request admitted now would wait behind the work in progress; None while unknown."""
        rate = self.rate.per_second()
        return None if rate is None else self.work() / rate

    def check(self) -> None:
        """Refuse now what `slot` would refuse, without taking a slot: called before a body is read, so an
        overloaded replica does not read uploads it will refuse, and a slow upload holds no slot."""
        if self.everywhere.count >= self.limit:
            raise Problem(
                "too-many-requests",
                f"{self.everywhere.count} requests are in progress on this replica (the limit is {self.limit})",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        wait = self.expected_wait_s()
        if self.max_queue_wait_s is not None and wait is not None and wait > self.max_queue_wait_s:
            raise self._too_long(wait, self.max_queue_wait_s, "overload.max_queue_wait_s")

    @contextmanager
    def slot(self):
        """Hold one of the replica's places in progress. The request's work units count as results of the rate if
        its body ends normally or with a problem answered after all its model work (AFTER_MODEL_WORK), unless it
        set `counted`: refusals, errors, hang-ups and answers without model work (an empty mask) take no model
        time, and counting them would make a loaded replica look fast (admitting more than it can serve); not
        counting a gate's refusal would make it look slow."""
        self.check()
        place, result = Place(self), False
        self.places.append(place)
        self.everywhere.count += 1
        try:
            yield place
            result = True
        except Problem as problem:
            result = problem.problem in AFTER_MODEL_WORK
            raise
        finally:
            self.places.remove(place)
            self.everywhere.count -= 1
            counted = result if place.counted is None else place.counted
            self.rate.finished(place.working, place.units if counted else 0.0)

    def _check_wait_ahead(self, place: Place, deadline_s: float, max_wait_s: float | None) -> None:
        """Refuse `place` if the work in progress other than its own would take longer than its deadline or
        `max_wait_s`."""
        rate = self.rate.per_second()
        if rate is None or self.max_queue_wait_s is None:  # None: admission by count only
            return
        ahead = (self.work() - place.units) / rate
        if max_wait_s is not None and ahead > max_wait_s:
            raise self._too_long(ahead, max_wait_s, "overload.max_queue_wait_s")
        if ahead > deadline_s:
            raise self._too_long(ahead, deadline_s, "its deadline (timeout_s, at most request_timeout_s)")

    def _too_long(self, wait: float, allowed: float, which: str) -> Problem:
        """The 429, its Retry-After at most MAX_RETRY_AFTER_S: a rate measured low (an early stall) can make the
        wait look like an hour, and clients that wait that long take the service for gone."""
        retry_after = min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait - allowed)))
        return Problem(
            "too-many-requests",
            f"the expected wait on this replica is {wait:.1f} s, longer than {which} ({allowed:g} s)",
            headers={"Retry-After": str(retry_after)},
        )


ADMITTED_ROUTES = ("/remove", "/score")


def route_admissions(overload) -> dict[str, Admission]:
    """An Admission per work route, sharing the replica's one in-flight count (`max_in_flight` bounds the uploads a
    replica holds, whatever their route). Their rates are measured apart: a score and a removal run on different
    deployments at different rates, and fast scores counted into the removals' rate would admit removals the
    Remover cannot serve in time. `overload`: serve.config.OverloadSettings."""
    in_flight = InFlight()
    return {
        route: Admission(overload.max_in_flight, overload.retry_after_s, overload.max_queue_wait_s, in_flight=in_flight)
        for route in ADMITTED_ROUTES
    }
