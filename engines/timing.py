"""Per-stage time of an engine call, for Server-Timing headers, metrics and benchmarks."""

from __future__ import annotations

import time

import torch


class StageClock:
    """Seconds per stage into a dict; a no-op without one.

    On CUDA each lap records an event on the current stream and `finish` reads them once the work
    is done, so asking for timings adds no host sync to the pipeline (call `finish` after the
    result's own copy to the host, which waits anyway). On the CPU laps read the wall clock.
    """

    def __init__(self, device: torch.device | str, timings: dict[str, float] | None):
        self.timings = timings
        self.cuda = timings is not None and torch.device(device).type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.last = self._now()

    def _now(self):
        if self.timings is None:
            return None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        now = self._now()
        if self.cuda:
            self.marks.append((stage, now))
            return
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now

    def finish(self) -> None:
        """Resolve the CUDA events into seconds (waits for the last one); nothing to do on the CPU."""
        if not self.marks:
            return
        self.marks[-1][1].synchronize()
        previous = self.last
        for stage, event in self.marks:
            self.timings[stage] = self.timings.get(stage, 0.0) + previous.elapsed_time(event) / 1000.0
            previous = event
        self.marks.clear()
        self.last = previous
