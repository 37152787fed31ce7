"""Readiness and liveness that do not queue behind model work.

`/readyz` answers from what Serve publishes about the model deployments (their replicas' states, read
from the controller at most once a second) and from the model descriptions, asked for until one answer
comes, by one call at a time per deployment whatever the number of probes. Once they are known a probe
costs the same whether the Remover is idle or saturated, so overload never turns every pod unready at
once. `EngineWatch` gives the model deployments a `check_health` that notices an engine call that never
returns, or an engine whose every call fails, so Serve restarts that replica.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

from ray import serve

RUNNING = "RUNNING"
logger = logging.getLogger("ray.serve")


FAILED_CALLS_UNHEALTHY = 5  # engine calls failing in a row with none succeeding between: a broken device
DESCRIBE_TIMEOUT_S = 5.0  # a model's describe() not answered by then: not ready yet, the next probe asks again
STALE_AFTER_S = 5.0  # a read of Serve's replica states this old is waited for (Readiness._current_states)
STALE_READ_WAIT_S = 1.0
# what a probe's call must outlast, the replica's very first probe included
READYZ_MAX_WAIT_S = STALE_READ_WAIT_S + DESCRIBE_TIMEOUT_S
NOT_READ_YET = f"Serve's replica states not read yet (the controller did not answer within {STALE_READ_WAIT_S:g} s)"


class EngineWatch:
    """When the engine call in progress started, and how many calls in a row have failed; `check` raises once
    one has run past `hung_after_s`, or once FAILED_CALLS_UNHEALTHY have failed in a row. A device left broken
    (a sticky CUDA error: an illegal address, a device-side assert) fails every later call while the replica
    looks alive; one bad batch does not count so: it counts once, however many calls it held, and the batcher's
    one-by-one reruns of its calls count nothing more (those that succeed reset the count). Before, a batch of 4
    crops that each failed alone counted 5, and one request restarted a GPU replica."""

    def __init__(self, hung_after_s: float | None, clock: Callable[[], float] = time.monotonic):
        self.hung_after_s = hung_after_s
        self.clock = clock
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()
        self._next = 0
        self.failed_in_a_row = 0
        self._last_failure = ""

    @contextmanager
    def running(self, counted: bool = True):
        """One engine call; `counted`: whether its failure counts (not a rerun of a failed batch's call)."""
        with self._lock:
            call, self._next = self._next, self._next + 1
            self._started[call] = self.clock()
        try:
            yield
        except Exception as exc:
            if counted:
                with self._lock:
                    self.failed_in_a_row += 1
                    self._last_failure = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise
        else:
            with self._lock:
                self.failed_in_a_row = 0
        finally:
            with self._lock:
                del self._started[call]

    def check(self) -> None:
        with self._lock:
            oldest = min(self._started.values(), default=None)
            failed, last = self.failed_in_a_row, self._last_failure
        if failed >= FAILED_CALLS_UNHEALTHY:
            raise RuntimeError(f"the last {failed} engine calls failed, the last with {last}")
        if self.hung_after_s is None:
            return
        if oldest is not None and self.clock() - oldest > self.hung_after_s:
            raise RuntimeError(f"an engine call has run for {self.clock() - oldest:.0f} s (hung_after_s {self.hung_after_s:g})")


class DeploymentState(NamedTuple):
    running: int  # replicas in the RUNNING state: constructed, warmed up, passing health checks
    trouble: str = ""  # why Serve cannot start one, from its status message (start_trouble); "" for none


MAX_TROUBLE_CHARS = 300


# an exception's own line in a traceback: its (qualified) class name, then its message
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception))(?:\([\w.]+\))?: ?(.*)$")


def start_trouble(message: str) -> str:
    """Serve's status message of a deployment whose replicas fail to start, as one line: its first sentence and
    the error's own line with what follows it ("A replica failed to start with exception: ValidationError: 1
    validation error for RemoverLive batch_wait_timeout_s.512 Input should be ..."); "" for another message.
    Without it /readyz said only "no running replica yet" while a replacement failed its start for minutes (a
    refused live setting that every new replica is given first, serve/live.py)."""
    if "failed to start" not in message:
        return ""
    head, _, error = message.partition("Error:\n")
    first = head.split(". ")[0].strip().rstrip(".")
    lines = error.splitlines()
    found = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not found:
        return first[:MAX_TROUBLE_CHARS]
    name, said = _EXCEPTION_LINE.match(lines[found[-1]]).groups()
    rest = [line.strip() for line in lines[found[-1] + 1 :] if not line.strip().startswith("For further information")]
    reason = " ".join(" ".join([said, *rest]).split())
    return f"{first}: {name}: {reason}"[:MAX_TROUBLE_CHARS]


def replica_states(app_name: str) -> dict[str, DeploymentState]:
    """Each deployment's RUNNING replicas, and why Serve cannot start one where it says so."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: DeploymentState(int(d.replica_states.get(RUNNING, 0)), start_trouble(d.message or ""))
        for name, d in app.deployments.items()
    }


class Readiness:
    """The model deployments' readiness for /readyz, from Serve's published state, cached for `refresh_s`."""

    def __init__(
        self,
        handles: dict,
        app_name: str | None = None,
        refresh_s: float = 1.0,
        replica_states: Callable[[str], dict[str, DeploymentState]] = replica_states,
        describe_timeout_s: float = DESCRIBE_TIMEOUT_S,
    ):
        self.handles = {key: handle for key, handle in handles.items() if handle is not None}
        self.app_name = app_name
        self.refresh_s = refresh_s
        self.replica_states = replica_states
        self.describe_timeout_s = describe_timeout_s
        self._states: dict[str, DeploymentState] = {}
        self._read_at = float("-inf")
        self._reading: asyncio.Task | None = None
        self.descriptions: dict[str, dict] = {}
        self._describing: dict[str, asyncio.Task] = {}

    async def _current_states(self) -> dict[str, DeploymentState] | None:
        """The last read of Serve's replica states; a new read starts in the background once the last is
        `refresh_s` old, so a busy controller does not hold up probes. The very first probe, and a probe after a
        quiet spell (a read over STALE_AFTER_S old), wait for the read at most STALE_READ_WAIT_S: the latter answered
        what was true before the spell (a replica's start-up "no running replica yet" a minute after READY), the
        former waited for as long as the controller took (a probe that never answered). None: nothing read yet."""
        age = time.monotonic() - self._read_at
        if self._reading is None and age >= self.refresh_s:
            self._reading = asyncio.ensure_future(self._read())
        if self._reading is not None and age >= STALE_AFTER_S:
            try:
                await asyncio.wait_for(asyncio.shield(self._reading), STALE_READ_WAIT_S)
            except asyncio.TimeoutError:
                pass  # the controller is slow: the last read stands
        return None if self._read_at == float("-inf") else self._states

    async def _read(self) -> None:
        try:
            self._states = await asyncio.to_thread(self.replica_states, self._app())
        except Exception as exc:  # the controller restarting: keep the last known states
            logger.warning("readiness: cannot read Serve's status: %s", exc)
        finally:
            self._read_at = time.monotonic()
            self._reading = None

    def _app(self) -> str:
        if self.app_name is None:
            self.app_name = serve.get_replica_context().app_name
        return self.app_name

    async def missing(self) -> dict[str, str]:
        """Deployments the service lacks, each with why: no running replica yet, or its description not known yet
        (the describe calls of several deployments run side by side, so a probe waits one describe timeout)."""
        states = await self._current_states()
        if states is None:
            return {key: NOT_READ_YET for key in self.handles}
        missing = {}
        for key, handle in self.handles.items():
            state = states.get(handle.deployment_name, DeploymentState(0))
            if state.running < 1:
                missing[key] = "no running replica yet" + (f" (Serve: {state.trouble})" if state.trouble else "")
        undescribed = [key for key in self.handles if key not in missing and key not in self.descriptions]
        for key in undescribed:
            if key not in self._describing:
                self._describing[key] = asyncio.ensure_future(self._describe(key))
        # a probe that gives up leaves the calls to the others
        await asyncio.gather(*(asyncio.shield(self._describing[key]) for key in undescribed))
        for key in undescribed:
            if key not in self.descriptions:
                missing[key] = f"running, but its description was not answered within {self.describe_timeout_s:g} s"
        return missing

    async def _describe(self, key: str) -> None:
        """One describe call, shared by every probe that comes while it runs: the call goes through the
        deployment's queue like a request, so a probe per call would add to a saturated model's queue. A slow
        answer means "not yet"; the next probe after it asks again."""
        response = None
        try:
            response = self.handles[key].describe.remote()  # may raise at once (a router not ready yet)
            self.descriptions[key] = await asyncio.wait_for(response, timeout=self.describe_timeout_s)
        except Exception as exc:
            logger.info("readiness: no description of %s yet: %r", key, exc)
            if response is not None:
                response.cancel()
        finally:
            del self._describing[key]
