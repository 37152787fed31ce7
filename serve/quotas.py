"""Per-key quotas: work requests per window and work requests in progress, shared by every ingress replica.

A key in the keys file may carry `requests_per_minute` and `max_concurrent` (serve/auth.py; absent:
unlimited). Only the work routes count (`/remove`, `/score`, gRPC `Remove` / `Score`; a REST route opts in
with `dependencies=[auth.requires(...), quotas.METERED]`): the result, feedback and annotation routes are
cheap reads a reviewer's page calls many times a minute, and they neither count nor carry the fields.

- Rate: a fixed window of `auth.quota_window_s` seconds (60: "per minute"), opened by a key's first
  request after the previous window closed. Every metered request that gets past the key check counts,
  whatever its answer (a refused one does not). `t` is exact: the whole quota is back when it reaches 0.
  The price of a fixed window: up to 2 x q requests can pass across a window's end.
- Concurrency: a lease per admitted request, given back as its answer starts (or when it ends in any
  other way). The ingress names the lease before it asks, so a grant it stopped waiting for (a client that
  hung up, a ledger slower than CALL_TIMEOUT_S) is given back too: the actor runs one caller's calls in
  order, so that release comes after the grant. A lease expires after request_timeout_s + body_timeout_s + LEASE_MARGIN_S, so a replica
  that dies mid-request cannot keep a key's slot forever.

The state lives in one named Ray actor, `QuotaLedger` (num_cpus=0, detached, restarted when it dies: a
restart forgets the counts, i.e. grants fresh quotas), found or created by every ingress replica: no
external service. Being detached, it outlives a redeploy (the counts too) and stays until Ray stops. Per metered request: one actor call awaited when it starts, and, for a key with
`max_concurrent`, one call not awaited when it ends. A key without limits costs nothing, and neither does a
key past its rate: each ingress replica remembers a rate refusal until the window's reset and answers the 429
itself (its fields counting down; the concurrency's `r` as the ledger last said), so a tenant flooding the
service cannot queue the shared, serial ledger into failing open for everyone. A concurrency refusal is
remembered the same way for CONCURRENCY_REFUSAL_HOLD_S only (a lease may come back any moment; a client told
Retry-After 1 s loses nothing), or until the replica gives back a lease of that key; and a replica that itself
holds a key's max_concurrent leases refuses the key's next request without asking (exact: the leases are its
own; only for a key without a rate, whose refusal needs no window fields from the ledger). A flood of refused
requests thus costs the ledger a few calls a second per replica, whatever its size.

Unreachable ledger (dead for good, or slower than CALL_TIMEOUT_S): the request is admitted without
quota fields (fail open): a quota protects the service's fairness, and refusing every paying caller
because the bookkeeping is down is worse than a few minutes unmetered. Each failure counts in
`ray_rorem_quota_ledger_errors_total`, with at most one log line a minute (serve.log_throttle).

Answers (IETF draft-ietf-httpapi-ratelimit-headers-09 form), on every answer of a metered request of a key
with a quota, successes and errors alike; gRPC sends the same fields as trailing metadata (lower case):
    RateLimit-Policy: "minute";q=5;w=60, "concurrency";q=2;qu="concurrent-requests"
    RateLimit: "minute";r=3;t=41, "concurrency";r=1
Refused: 429 `too-many-requests` (gRPC RESOURCE_EXHAUSTED) with Retry-After (the window's reset; 1 s
for a full concurrency quota).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Depends, Request, Response
from starlette.datastructures import MutableHeaders

from serve.handles import within
from serve.log_throttle import LogThrottle
from serve.problems import Problem

LEDGER_NAME = "rorem-quota-ledger-v2"  # per application: LEDGER_NAME:<app>; bump the version with the actor's API
CALL_TIMEOUT_S = 2.0
START_TIMEOUT_S = 60.0
LEASE_MARGIN_S = 60.0
RESOLVE_EVERY_S = 5.0  # after a failure, how often the ingress looks the ledger up again
CONCURRENCY_RETRY_AFTER_S = 1
# How long an ingress replica answers a key's concurrency refusal itself before it asks the ledger again (sooner
# once it gives back a lease of that key). Refused requests cost nothing and count against no rate, so without
# it a key at its max_concurrent made one ledger call per request it sent: 300 empty POSTs, 300 calls.
CONCURRENCY_REFUSAL_HOLD_S = 0.25
RATE, CONCURRENCY = "minute", "concurrency"  # the policies' names in the RateLimit fields (RATE: a 60 s window)
RATELIMIT_POLICY, RATELIMIT = "RateLimit-Policy", "RateLimit"
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Limits:
    requests: int | None  # per window
    concurrent: int | None
    window_s: float

    @property
    def rate_policy(self) -> str:
        """The rate's name in the RateLimit fields and a 429's `quota`: "minute" for the default 60 s window, else
        the window's length ("5s"), so the name never contradicts its `w`."""
        return RATE if self.window_s == 60 else f"{_seconds(self.window_s)}s"


@dataclass(frozen=True)
class Decision:
    """The ledger's answer to one request: admitted or not, and what the key has left."""

    key: str
    limits: Limits
    allowed: bool = True
    remaining: int | None = None  # requests left in the window (None: no rate quota)
    reset_s: float = 0.0  # seconds until the window's whole quota is back
    in_flight: int = 0  # the key's requests in progress, this one included when admitted
    lease: str | None = None  # the concurrency lease to give back (None: none held)
    refused_by: str | None = None  # RATE or CONCURRENCY

    def headers(self) -> dict[str, str]:
        """The RateLimit-Policy and RateLimit fields (empty for a key without a quota)."""
        policies, states = [], []
        if self.limits.requests is not None:
            rate = self.limits.rate_policy
            policies.append(f'"{rate}";q={self.limits.requests};w={_seconds(self.limits.window_s)}')
            states.append(f'"{rate}";r={self.remaining};t={_seconds(self.reset_s)}')
        if self.limits.concurrent is not None:
            policies.append(f'"{CONCURRENCY}";q={self.limits.concurrent};qu="concurrent-requests"')
            states.append(f'"{CONCURRENCY}";r={max(0, self.limits.concurrent - self.in_flight)}')
        return {RATELIMIT_POLICY: ", ".join(policies), RATELIMIT: ", ".join(states)} if policies else {}

    def metadata(self) -> list[tuple[str, str]]:
        """The same fields as gRPC metadata (names in lower case)."""
        return [(name.lower(), value) for name, value in self.headers().items()]

    def check(self) -> None:
        """Raise the 429 of a refused request."""
        if self.allowed:
            return
        if self.refused_by == RATE:
            retry_after = max(1, math.ceil(self.reset_s))
            detail = (
                f"the key {self.key!r} has used its {self.limits.requests} requests of this "
                f"{_seconds(self.limits.window_s)} s window; the quota is back in {retry_after} s"
            )
        else:
            retry_after = CONCURRENCY_RETRY_AFTER_S
            requests = "request" if self.in_flight == 1 else "requests"
            limit = self.limits.concurrent
            detail = f"the key {self.key!r} has {self.in_flight} {requests} in progress (its limit is {limit})"
        quota = self.limits.rate_policy if self.refused_by == RATE else self.refused_by
        raise Problem("too-many-requests", detail, headers={"Retry-After": str(retry_after)}, quota=quota)


def _seconds(value: float) -> int:
    return max(0, math.ceil(value))


@dataclass
class _KeyState:
    window_start: float | None = None
    used: int = 0
    leases: dict[str, float] | None = None  # lease -> expiry


class QuotaBook:
    """Every key's window and leases (plain Python, so its rules are tested with a fake clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._swept = clock()

    def acquire(self, key: str, limits: Limits, lease_s: float, lease: str | None = None) -> Decision:
        """`lease`: the name of the concurrency lease to grant (the ingress's, so it can give back a grant it
        never saw); a new one if None."""
        now = self.clock()
        self._sweep(now, limits.window_s)
        state = self._keys.setdefault(key, _KeyState(leases={}))
        if state.window_start is not None and now >= state.window_start + limits.window_s:
            state.window_start, state.used = None, 0
        state.leases = {lease: expiry for lease, expiry in state.leases.items() if expiry > now}
        refused_by = None
        if limits.requests is not None and state.used >= limits.requests:
            refused_by = RATE
        elif limits.concurrent is not None and len(state.leases) >= limits.concurrent:
            refused_by = CONCURRENCY
        granted = None
        if refused_by is None:
            if state.window_start is None:
                state.window_start = now
            state.used += 1
            if limits.concurrent is not None:
                granted = lease or uuid.uuid4().hex
                state.leases[granted] = now + lease_s
        reset_s = limits.window_s if state.window_start is None else state.window_start + limits.window_s - now
        return Decision(
            key=key,
            limits=limits,
            allowed=refused_by is None,
            remaining=None if limits.requests is None else max(0, limits.requests - state.used),
            reset_s=reset_s,
            in_flight=len(state.leases),
            lease=granted,
            refused_by=refused_by,
        )

    def release(self, key: str, lease: str) -> None:
        """Give a lease back; an unknown one (expired, or forgotten by a restart) is ignored."""
        state = self._keys.get(key)
        if state is not None:
            state.leases.pop(lease, None)

    def _sweep(self, now: float, window_s: float) -> None:
        """Forget keys with a closed window and no lease, at most once a window: memory stays bounded by the
        keys active lately."""
        if now - self._swept < window_s:
            return
        self._swept = now
        for key, state in list(self._keys.items()):
            closed = state.window_start is None or now >= state.window_start + window_s
            if closed and not any(expiry > now for expiry in state.leases.values()):
                del self._keys[key]


class QuotaLedger:
    """The Ray actor (serial: one call at a time, so the book needs no lock) every ingress replica shares."""

    def __init__(self):
        self.book = QuotaBook()

    def acquire(self, key: str, limits: Limits, lease_s: float, lease: str | None = None) -> Decision:
        return self.book.acquire(key, limits, lease_s, lease)

    def release(self, key: str, lease: str) -> None:
        self.book.release(key, lease)

    def ready(self) -> bool:
        return True


class RayLedger:
    """The ingress's handle on the QuotaLedger actor, looked up (or created) by name."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None
        self._last_handle = None  # releases go to the actor the acquires went to, even after a failed call
        self._looked_up = -math.inf

    def _lookup(self):
        import ray

        actor = ray.remote(QuotaLedger).options(
            name=self.name, get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1, max_task_retries=1
        )
        return actor.remote()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Find or create the actor and wait until it answers (a new actor's process takes a few seconds to
        start: waited for here, at the replica's start, not by its first requests). Failing here fails open."""
        try:
            handle = self._lookup()
            handle.ready.remote().future().result(timeout=timeout_s)
            self._handle = self._last_handle = handle
        except Exception as exc:
            self._looked_up = time.monotonic()
            logger.warning("quota ledger %s not available at start (%s): admitting requests unmetered", self.name, exc)

    async def handle(self):
        """The actor handle; looked up off the event loop (a GCS round trip), at most every RESOLVE_EVERY_S."""
        if self._handle is None:
            now = time.monotonic()
            if now - self._looked_up < RESOLVE_EVERY_S:
                raise RuntimeError("the quota ledger was not found recently")
            self._looked_up = now
            self._handle = self._last_handle = await asyncio.to_thread(self._lookup)
        return self._handle

    async def acquire(self, key: str, limits: Limits, lease_s: float, lease: str | None) -> Decision:
        handle = await self.handle()
        try:
            return await within(_awaited(handle.acquire.remote(key, limits, lease_s, lease)), CALL_TIMEOUT_S)
        except Exception:
            self._handle = None  # look it up again: it may have been replaced
            raise

    def release(self, key: str, lease: str) -> None:
        if self._last_handle is not None:
            self._last_handle.release.remote(key, lease)  # not awaited: the answer is already on its way


async def _awaited(ref):
    return await ref


class Quotas:
    """The ingress's side: a key's limits, one ledger call when a metered request starts, one when it ends."""

    def __init__(
        self,
        ledger,
        window_s: float,
        lease_s: float,
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ledger = ledger
        self.window_s = window_s
        self.lease_s = lease_s
        self.on_error = on_error or (lambda: None)
        self.clock = clock
        self._unreachable = LogThrottle()
        # key -> its last refusal, when it was asked, and until when it holds (the window's reset; a moment for
        # a concurrency refusal)
        self._refused: dict[str, tuple[Decision, float, float]] = {}
        self._held: dict[str, dict[str, float]] = {}  # key -> the leases this replica holds -> their expiry

    @classmethod
    def from_settings(cls, settings, app_name: str, on_error: Callable[[], None] | None = None) -> Quotas:
        """`settings`: serve.config.IngressArgs. No ledger while auth is off: there are no keys to meter."""
        ledger = RayLedger(f"{LEDGER_NAME}:{app_name}") if settings.auth.enabled else None
        lease_s = settings.request_timeout_s + settings.overload.body_timeout_s + LEASE_MARGIN_S
        return cls(ledger, settings.auth.quota_window_s, lease_s, on_error)

    def start(self) -> Quotas:
        if self.ledger is not None:
            self.ledger.start()
        return self

    def limits(self, key) -> Limits | None:
        """`key`: the caller's serve.auth.StoredKey (None while auth is off)."""
        if key is None or (key.requests_per_minute is None and key.max_concurrent is None):
            return None
        return Limits(key.requests_per_minute, key.max_concurrent, self.window_s)

    async def acquire(self, key) -> Decision | None:
        """The ledger's decision for a request of `key`; None: not metered (no quota, or the ledger unreachable).

        A grant this request stops waiting for (cancelled, timed out) is given back: nobody else would."""
        limits = self.limits(key)
        if limits is None or self.ledger is None:
            return None
        refused = self._still_refused(key.name, limits) or self._full_here(key.name, limits)
        if refused is not None:
            return refused
        lease = uuid.uuid4().hex if limits.concurrent is not None else None
        asked = self.clock()
        try:
            decision = await self.ledger.acquire(key.name, limits, self.lease_s, lease)
        except BaseException as exc:
            if lease is not None:
                self.release(Decision(key.name, limits, lease=lease))
            if not isinstance(exc, Exception):
                raise
            self.on_error()
            if self._unreachable.due():
                logger.warning(
                    "quota ledger unreachable (%s: %s): admitting requests unmetered", type(exc).__name__, exc
                )
            return None
        if decision.refused_by == RATE:  # from when it was asked: never refused here past the ledger's reset
            self._refused[key.name] = (decision, asked, asked + decision.reset_s)
        elif decision.refused_by == CONCURRENCY:
            self._refused[key.name] = (decision, asked, asked + min(CONCURRENCY_REFUSAL_HOLD_S, decision.reset_s))
        if decision.lease is not None:
            self._held.setdefault(key.name, {})[decision.lease] = asked + self.lease_s
        return decision

    def _full_here(self, name: str, limits: Limits) -> Decision | None:
        """The concurrency refusal of a key without a rate whose max_concurrent leases this replica holds itself:
        exact without the ledger (they are its own), which a key's flood of refused requests asked every time.
        A key with a rate asks the ledger: a refusal carries the window's fields, which only it knows."""
        held = self._held.get(name)
        if limits.requests is not None or limits.concurrent is None or not held:
            return None
        now = self.clock()
        for lease in [lease for lease, expiry in held.items() if expiry <= now]:  # as the ledger lets them expire
            del held[lease]
        if len(held) < limits.concurrent:
            return None
        return Decision(name, limits, allowed=False, in_flight=len(held), refused_by=CONCURRENCY)

    def _still_refused(self, name: str, limits: Limits) -> Decision | None:
        """The key's remembered refusal, its window's reset counted down; None once it no longer holds (or the
        key's limits changed: the keys file was rotated)."""
        refused = self._refused.get(name)
        if refused is None:
            return None
        decision, asked, until = refused
        now = self.clock()
        if now >= until or decision.limits != limits:
            del self._refused[name]
            return None
        return dataclasses.replace(decision, reset_s=decision.reset_s - (now - asked))

    def release(self, decision: Decision | None) -> None:
        if decision is None or decision.lease is None:
            return
        held = self._held.get(decision.key, {})
        held.pop(decision.lease, None)
        if not held:
            self._held.pop(decision.key, None)
        refused = self._refused.get(decision.key)
        if refused is not None and refused[0].refused_by == CONCURRENCY:  # a slot is free: ask again
            del self._refused[decision.key]
        try:
            self.ledger.release(decision.key, decision.lease)
        except Exception:  # the lease expires by itself
            self.on_error()


_quotas = Quotas(None, 60.0, 0.0)


def install(quotas: Quotas) -> Quotas:
    """Set this ingress process's quotas (METERED and QuotaFields read them)."""
    global _quotas
    _quotas = quotas
    return _quotas


def installed() -> Quotas:
    return _quotas


class _Meter:
    async def __call__(self, request: Request) -> None:
        if not hasattr(request.state, "principal"):
            raise RuntimeError("quotas.METERED must follow the route's access rule (auth.requires) in its dependencies")
        decision = await installed().acquire(request.state.principal)
        if decision is not None:
            request.state.quota = decision  # QuotaFields adds the fields to the answer and gives the lease back
            decision.check()


METERED = Depends(_Meter())
"""Declare a REST route metered, after its access rule: `dependencies=[auth.requires("remove"), quotas.METERED]`."""


def is_metered(route) -> bool:
    return any(dependency.dependency is METERED.dependency for dependency in route.dependencies)


class QuotaFields:
    """ASGI middleware: the RateLimit fields of the request's decision on its answer, whatever the answer
    (the Problem handlers run inside it). The concurrency lease is given back as the answer starts (before the
    client can see it and send its next request), or when the request ends without one (a client gone).

    An unhandled exception's 500 is answered outside every middleware (Starlette's ServerErrorMiddleware): for a
    metered request it is answered here instead, by `internal_error` (the app's Exception handler), with the
    fields, as gRPC's INTERNAL carries them. The exception is raised on, as that middleware does, for Ray's log
    and error count (the middleware then calls the handler again; its answer goes nowhere)."""

    def __init__(self, app, internal_error: Callable[[Request, Exception], Awaitable[Response]] | None = None):
        self.app = app
        self.internal_error = internal_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        released = started = False

        async def send_with_fields(message):
            nonlocal released, started
            if message["type"] == "http.response.start":
                started = True
                decision = scope.get("state", {}).get("quota")
                if decision is not None:
                    MutableHeaders(scope=message).update(decision.headers())
                    installed().release(decision)
                    released = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_fields)
        except Exception as exc:
            if started or self.internal_error is None or scope.get("state", {}).get("quota") is None:
                raise
            response = await self.internal_error(Request(scope, receive), exc)
            await response(scope, receive, send_with_fields)
            raise
        finally:
            decision = scope.get("state", {}).get("quota")
            if not released:
                installed().release(decision)
