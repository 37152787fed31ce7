"""What each test costs: wall time and CPU, its subprocesses' included (how the figures of docs/benchmarks.md,
"The test suite's time", were taken).

    PYTHONPATH=. .venv/bin/python -m pytest -p tests.costs -n 3 -m "not e2e" -o costs_dir=out/test_costs
    .venv/bin/python -m tests.costs out/test_costs        # per module, then the dearest tests

Per test: its process's CPU (user + sys; threads an earlier test left running count too) and its descendants' over
the test: those it waited for, and what the living ones (Chromium, a server) and the children they reaped spent
meanwhile. One JSON per test process (per xdist worker), in a folder emptied when a run starts.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

_rows: list[dict] = []


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _descendants() -> dict[int, float]:
    """Each living descendant's CPU, with that of the children it reaped (whose CPU would otherwise vanish)."""
    import psutil

    spent = {}
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        spent[process.pid] = times.user + times.system + times.children_user + times.children_system
    return spent


def _descendants_cpu(waited: float, before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the descendants spent between the two snapshots. `waited`: the CPU of the children this process reaped
    meanwhile (RUSAGE_CHILDREN's increase), which holds a reaped descendant's whole life: what it had spent before
    is taken off, as it is for one that a living descendant reaped."""
    grown = sum(spent - before.get(pid, 0.0) for pid, spent in after.items())
    gone = sum(spent for pid, spent in before.items() if pid not in after)
    return waited + grown - gone


def pytest_addoption(parser):
    parser.addini("costs_dir", "where tests.costs writes one JSON per test process", default="out/test_costs")


def pytest_configure(config):
    """The controller (or a run without xdist) empties the folder, before any worker starts: no stale worker's file
    is summed with this run's."""
    if not hasattr(config, "workerinput"):
        for stale in Path(config.getini("costs_dir")).glob("*.json"):
            stale.unlink()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    own, waited, living = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), _descendants()
    started = time.monotonic()
    yield
    wall = time.monotonic() - started
    waited = _cpu(resource.RUSAGE_CHILDREN) - waited
    _rows.append({
        "test": item.nodeid,
        "wall_s": wall,
        "cpu_s": _cpu(resource.RUSAGE_SELF) - own,
        "subprocess_cpu_s": _descendants_cpu(waited, living, _descendants()),
    })  # fmt: skip


def pytest_sessionfinish(session):
    if not _rows:
        return
    folder = Path(session.config.getini("costs_dir"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json").write_text(json.dumps(_rows, indent=1))


def summarize(folder: Path, top: int = 25) -> str:
    """Per module and per test, dearest first."""
    rows = [row for path in sorted(folder.glob("*.json")) for row in json.loads(path.read_text())]
    for row in rows:
        row["total_cpu_s"] = row["cpu_s"] + row["subprocess_cpu_s"]
    modules: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for row in rows:
        module = modules[row["test"].split("::")[0]]
        module[0] += row["wall_s"]
        module[1] += row["total_cpu_s"]
        module[2] += 1
    lines = [f"{len(rows)} tests: {sum(r['wall_s'] for r in rows):.0f} s of wall, "
             f"{sum(r['total_cpu_s'] for r in rows):.0f} s of CPU", f"{'wall s':>8} {'CPU s':>7} {'tests':>5}  module"]  # fmt: skip
    for name, (wall, cpu, count) in sorted(modules.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{wall:8.1f} {cpu:7.1f} {count:5d}  {name}")
    lines.append(f"{'wall s':>8} {'CPU s':>7}  test")
    for row in sorted(rows, key=lambda r: -r["total_cpu_s"])[:top]:
        lines.append(f"{row['wall_s']:8.1f} {row['total_cpu_s']:7.1f}  {row['test']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "out/test_costs")))
