"""Per-stage wall time of an engine call, for Server-Timing headers, metrics and benchmarks."""

from __future__ import annotations

import time

import torch


class StageClock:
    """Seconds per stage into a dict (synchronizing CUDA so a stage's time is its own); a no-op without one."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device = torch.device(device)
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
