"""A plain stage printer for the export CLI: one line when a stage starts, one when it ends."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.count = 0

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str):
        """`with progress.stage("export"): ...`; set `.note` on the yielded object to add a result."""
        self.count += 1
        self.say(f"[{self.count}] {name} ...")
        started = time.perf_counter()
        result = _StageResult()
        yield result
        note = f": {result.note}" if result.note else ""
        self.say(f"[{self.count}] {name}: done in {time.perf_counter() - started:.1f} s{note}")


class _StageResult:
    note: str = ""


QUIET = Progress(enabled=False)
