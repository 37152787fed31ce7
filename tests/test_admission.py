"""Admission by expected wait (serve/admission.py), with a fake clock: no Ray, no sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest

from serve.admission import Admission, ServiceRate, work_units
from serve.problems import Problem


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _serve(admission: Admission, clock: Clock, requests: int, service_s: float, units: float = 1.0) -> None:
    """`requests` one after another, each of `units` work units taking service_s."""
    for _ in range(requests):
        with admission.slot() as place:
            place.planned(units, math.inf)
            clock.now += service_s


def _steady(admission: Admission, clock: Clock, slots: list, results: int, every_s: float) -> None:
    """Keep len(slots) requests of one unit in progress, one result each every_s."""
    for _ in range(results):
        clock.now += every_s
        slots.pop(0).__exit__(None, None, None)
        slot = admission.slot()
        slot.__enter__().planned(1, math.inf)
        slots.append(slot)


def _in_progress(admission: Admission, requests: int) -> list:
    slots = [admission.slot() for _ in range(requests)]
    for slot in slots:
        slot.__enter__().planned(1, math.inf)
    return slots


def test_the_rate_counts_only_busy_time():
    clock = Clock()
    rate = ServiceRate(clock)
    admission = Admission(100, 2, clock=clock)
    admission.rate = rate
    _serve(admission, clock, 4, 0.5)
    assert rate.per_second() == pytest.approx(2.0)
    clock.now += 3600  # an idle hour does not make the service look slow
    _serve(admission, clock, 4, 0.5)
    assert rate.per_second() == pytest.approx(2.0)


def test_unknown_rate_admits_by_count_only():
    clock = Clock()
    admission = Admission(2, 3, max_queue_wait_s=0.001, clock=clock)
    with admission.slot(), admission.slot():
        with pytest.raises(Problem) as refused:
            with admission.slot():
                pass
    assert refused.value.problem == "too-many-requests" and refused.value.headers["Retry-After"] == "3"


def test_a_request_that_would_wait_too_long_is_refused_at_once_with_a_retry_after_from_the_queue():
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=5.0, clock=clock)
    _serve(admission, clock, 10, 0.5)  # 2 results per second
    held = []
    for _ in range(10):  # 10 in progress: 5 s of work ahead
        slot = admission.slot()
        slot.__enter__()
        held.append(slot)
    assert admission.expected_wait_s() == pytest.approx(5.0)
    slot = admission.slot()
    slot.__enter__()  # the 11th: 5.0 s ahead, admitted (not more than the limit)
    held.append(slot)
    with pytest.raises(Problem) as refused:
        with admission.slot():
            pass
    assert refused.value.problem == "too-many-requests"
    assert "expected wait" in refused.value.detail and "max_queue_wait_s" in refused.value.detail
    assert refused.value.headers["Retry-After"] == "1"  # 5.5 s ahead, 0.5 over the limit: ceil -> 1
    for slot in held:
        slot.__exit__(None, None, None)
    with admission.slot():  # the queue is empty again: admitted
        pass


def test_a_deadline_shorter_than_the_wait_ahead_is_refused():
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=60.0, clock=clock)
    _serve(admission, clock, 10, 1.0)  # 1 result per second
    held = [admission.slot() for _ in range(4)]
    places = [slot.__enter__() for slot in held]  # the 4th is "this" request: 3 ahead of it, 3 s
    places[-1].check_deadline(3.5)
    with pytest.raises(Problem) as refused:
        places[-1].check_deadline(2.0)
    assert "timeout_s" in refused.value.detail and refused.value.headers["Retry-After"] == "1"
    by_count_only = Admission(1000, 2, max_queue_wait_s=None, clock=clock)
    by_count_only.rate = admission.rate
    by_count_only_places = [by_count_only.slot().__enter__() for _ in range(4)]
    by_count_only_places[-1].check_deadline(0.001)  # admission by time is off: never refused for its deadline



def test_refusals_errors_and_answers_without_model_work_do_not_make_a_loaded_replica_look_fast():
    # 1 result per second from the model; between results, instant failures (refused deadlines, bad uploads,
    # hang-ups) and empty-mask answers: none of them is model throughput, so the expected wait must not fall
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=10.0, clock=clock)
    busy = [admission.slot() for _ in range(6)]
    for slot in busy:
        slot.__enter__().planned(1, math.inf)
    for _ in range(20):
        clock.now += 1.0
        busy.pop().__exit__(None, None, None)
        fresh = admission.slot()
        fresh.__enter__().planned(1, math.inf)
        busy.append(fresh)
        for error in (Problem("too-many-requests", "deadline"), ValueError("bad upload"), asyncio.CancelledError()):
            with pytest.raises(type(error)), admission.slot():
                raise error
        with admission.slot() as place:
            place.counted = False
    assert admission.rate.per_second() == pytest.approx(1.0)
    assert admission.expected_wait_s() == pytest.approx(6.0)


def test_a_gate_refusal_after_all_its_model_work_counts_as_a_result():
    # half the requests end 422 removal-failed after every attempt ran: the model served them all at 1/s
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=10.0, clock=clock)
    for n in range(20):
        with pytest.raises(Problem) if n % 2 else contextlib.nullcontext(), admission.slot() as place:
            place.planned(1, math.inf)
            clock.now += 1.0
            if n % 2:
                raise Problem("removal-failed", "every attempt scored below the threshold")
    assert admission.rate.per_second() == pytest.approx(1.0)


def test_the_wait_counts_each_request_s_model_work_not_requests():
    # single-crop 512 removals at 4/s, then removals of 8 crops at 1024: 32 units, 8 s of model work each. Counted
    # as requests, each was a 0.25 s one: 20 of them fit in max_queue_wait_s 5, 160 s of model work
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=5.0, clock=clock)
    _serve(admission, clock, 10, 0.25)
    assert admission.rate.per_second() == pytest.approx(4.0)
    big = work_units([1024] * 8, 512)
    assert big == 32 and work_units([512, 1024], 512) == 5
    slots = [admission.slot() for _ in range(3)]
    first, second, third = (slot.__enter__() for slot in slots)  # all admitted before their bodies: one unit each
    with pytest.raises(Problem) as refused:
        third.planned(1, 0.2)  # planned first, two units (0.5 s) ahead: longer than what is left of its deadline
    assert "timeout_s" in refused.value.detail and refused.value.headers["Retry-After"] == "1"
    slots.pop().__exit__(Problem, refused.value, None)
    first.planned(big, 60.0)  # one unit ahead of it
    assert admission.expected_wait_s() == pytest.approx(8.25)
    with pytest.raises(Problem) as refused:
        second.planned(big, 60.0)  # the first one's 8 s ahead
    assert refused.value.problem == "too-many-requests" and "max_queue_wait_s" in refused.value.detail
    assert refused.value.headers["Retry-After"] == "3"  # 8 s of work ahead, 3 over the limit
    slots.pop().__exit__(Problem, refused.value, None)
    assert admission.work() == big
    clock.now += 8.0
    slots.pop().__exit__(None, None, None)
    _serve(admission, clock, 4, 8.0, units=big)
    assert admission.rate.per_second() == pytest.approx(4.0)  # units per second, whatever the request mix


def test_time_in_progress_before_model_work_is_not_busy_time():
    # 2 removals per second, then three uploads alone, each 20 s in progress without reaching the model (a decode
    # refused at imaging.decode_timeout_s): counted as busy, that time brought the measured rate to a fifth
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=5.0, clock=clock)
    _serve(admission, clock, 64, 0.5)
    for _ in range(3):
        with pytest.raises(Problem), admission.slot():
            clock.now += 20.0
            raise Problem("image-too-large", "decoding the uploads took over 20 s")
        with admission.slot() as place:  # an empty mask: answered without model work
            clock.now += 1.0
            place.counted = False
        _serve(admission, clock, 1, 0.5)
    assert admission.rate.per_second() == pytest.approx(2.0)


@pytest.mark.parametrize("batch", [8, 32])
def test_a_batch_s_results_at_one_instant_do_not_make_the_rate_look_faster(batch):
    # a Remover running batches: a batch's results come back together (ms apart), 4 results per second
    clock = Clock()
    admission = Admission(1000, 2, clock=clock)  # by count: only the rate is looked at
    slots = []

    def admit():
        slot = admission.slot()
        slot.__enter__().planned(1, math.inf)
        slots.append(slot)

    for _ in range(2 * batch):
        admit()
    for n in range(12):
        clock.now += batch / 4 - (batch - 1) * 0.001
        for _ in range(batch):  # each request ends after its own paste and encode, a millisecond apart
            slots.pop(0).__exit__(None, None, None)
            clock.now += 0.001
        clock.now -= 0.001
        assert admission.rate.per_second() == (None if n == 0 else pytest.approx(4.0, rel=0.01))
        for _ in range(batch):
            admit()


def test_results_that_keep_coming_less_than_a_batch_apart_are_measured():
    # steady load at batch 1 (an H200 finishes a call every ~92 ms): 40 in progress, one result each 0.09 s, 3.6 s
    # of wait. Folded one into the next, the results made one sample: the rate stayed unknown and admission by
    # time was off, admitting requests that could only time out
    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=10.0, clock=clock)
    slots = _in_progress(admission, 40)
    _steady(admission, clock, slots, 200, 0.09)
    assert admission.expected_wait_s() == pytest.approx(3.6, rel=0.05)
    with admission.slot() as place, pytest.raises(Problem) as refused:
        place.check_deadline(0.5)
    assert "timeout_s" in refused.value.detail
    admission.max_queue_wait_s = 1.0
    with pytest.raises(Problem) as refused:
        admission.check()
    assert "max_queue_wait_s" in refused.value.detail and refused.value.headers["Retry-After"] == "3"


def test_after_a_stall_the_rate_is_back_within_a_few_results():
    # 4 results per second, then a model call hangs for 300 s (hung_after_s) and the requests waiting on it time
    # out. Counted whole, those 300 s without results stayed in the window for 64 more instants: the rate fell to
    # a twentieth of the true one and requests were refused with Retry-Afters of tens of seconds
    clock = Clock()
    admission = Admission(1000, 2, clock=clock)
    _serve(admission, clock, 3, 0.25)
    assert admission.rate.per_second() is None  # under MIN_BUSY_S of busy time: unknown, as before
    slots = _in_progress(admission, 6)
    _steady(admission, clock, slots, 100, 0.25)
    assert admission.rate.per_second() == pytest.approx(4.0)
    clock.now += 300.0
    for slot in slots:
        slot.__exit__(Problem, Problem("timeout", "no answer within request_timeout_s"), None)
    slots = _in_progress(admission, 6)
    _steady(admission, clock, slots, 8, 0.25)
    assert admission.rate.per_second() == pytest.approx(4.0, rel=0.15)
    admission.max_queue_wait_s = 1.0
    with pytest.raises(Problem) as refused:
        admission.check()  # 6 ahead: 1.5 s at 4/s
    assert refused.value.headers["Retry-After"] == "1"
    for slot in slots[:3]:
        clock.now += 0.25
        slot.__exit__(None, None, None)
    with admission.slot():  # 3 ahead: 0.75 s
        pass
    for slot in slots[3:]:
        slot.__exit__(None, None, None)
    measured = admission.rate.per_second()
    clock.now += 3600  # idle: not counted, as before
    assert admission.rate.per_second() == measured


def test_a_service_that_really_slows_down_is_measured_slower():
    # past STALL_FACTOR a slower pace is first taken for a stall, but only until the rate catches up with it
    clock = Clock()
    admission = Admission(1000, 2, clock=clock)
    slots = _in_progress(admission, 6)
    _steady(admission, clock, slots, 100, 0.25)
    assert admission.rate.per_second() == pytest.approx(4.0)
    _steady(admission, clock, slots, 8, 2.5)  # a tenth of the pace
    assert admission.rate.per_second() < 2.0
    _steady(admission, clock, slots, 70, 2.5)
    assert admission.rate.per_second() == pytest.approx(0.4)


def test_removals_and_scorings_share_the_replicas_count_while_measuring_their_rates_apart():
    """max_in_flight bounds the uploads a replica holds, whatever their route (the Ingress's own admissions): separate
    rates (a score is not a removal's work) must not double it."""
    from serve.admission import route_admissions
    from serve.config import OverloadSettings

    admissions = route_admissions(OverloadSettings(max_in_flight=1, retry_after_s=2, max_queue_wait_s=5.0))
    assert set(admissions) == {"/remove", "/score"}
    removals, scorings = admissions["/remove"], admissions["/score"]
    with removals.slot():
        with pytest.raises(Problem) as refused:
            scorings.check()
        assert refused.value.problem == "too-many-requests" and "1 requests are in progress" in refused.value.detail
    with scorings.slot():
        pass
    assert removals.everywhere is scorings.everywhere and removals.everywhere.count == 0
    assert removals.rate is not scorings.rate, "scores would be measured into the removals' rate"


def test_a_retry_after_from_the_wait_is_at_most_the_configured_ceiling():
    """A rate measured low (a stall early on) made the wait look long: Retry-Afters of 435 s and ~3500 s."""
    from serve.config import MAX_RETRY_AFTER_S

    clock = Clock()
    admission = Admission(1000, 2, max_queue_wait_s=math.inf, clock=clock)
    _serve(admission, clock, 10, 10.0)  # 0.1 units per second
    held = _in_progress(admission, 400)  # 4000 s of work ahead
    admission.max_queue_wait_s = 5.0
    with pytest.raises(Problem) as refused:
        admission.check()
    assert refused.value.headers["Retry-After"] == str(MAX_RETRY_AFTER_S) == "600"
    assert "expected wait on this replica is 4000.0 s" in refused.value.detail
    for slot in held:
        slot.__exit__(None, None, None)
