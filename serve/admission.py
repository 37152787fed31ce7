"""Admission control for one ingress replica: refuse early (429) instead of queueing without end.

A request that would wait behind `limit` others already doing model work is answered at once with a
problem+json 429 and Retry-After, before its body is read, so an overloaded service stays fast to
say no. Past this, the model deployments' own bounded queues answer 503 (serve.service).
"""

from __future__ import annotations

from contextlib import contextmanager

from serve.problems import Problem


class Admission:
    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    @contextmanager
    def slot(self):
        if self.in_flight >= self.limit:
            raise Problem(
                "too-many-requests",
                f"{self.in_flight} requests are in progress on this replica (the limit is {self.limit})",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
