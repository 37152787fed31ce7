"""Retention and feedback as the service offers them: whether a removal is kept, keeping it without
ever failing the removal, and the operations behind /results, /feedback and the annotation queue,
with their errors as Problems (Retention); and the store client they go through (LocalStoreClient:
the RetentionStore in this process, its blocking IO in threads, off the event loop), which the
ResultStore deployment (serve/retention_deployment.py) serves to every ingress replica.

A removal whose result cannot be stored (database or object store down), or not within
retention.save_timeout_s, is still answered, only without a result id; the failure is logged and
counted (`rorem_retained_total{outcome="failed"}`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import io
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.config import GATE_THRESHOLDS, RetentionSettings
from serve.handles import within
from serve.log_throttle import LOG_EVERY_S, LogThrottle
from serve.page_headers import fill_marks, page_html, strict_page_headers
from serve.problems import Problem, invalid_request
from serve.request_ids import serve_request_id
from serve.retention.objects import ObjectMissing
from serve.retention.store import KINDS, NewResult, ResultNotFound, RetentionStore, StoredResult

if TYPE_CHECKING:
    from engines.gate import GatePolicy
    from serve.metrics import IngressMetrics
    from serve.protocol import RemoveOptions
    from serve.service import RemovalResult

logger = logging.getLogger("ray.serve")

RESULT_ID = re.compile(r"[0-9a-f]{32}")
ANNOTATION_PAGE = Path(__file__).parent.parent / "static" / "annotate.html"
REOPEN_AFTER_S = 30.0  # a store that failed to open is tried again at most this often
SWEEP_EVERY_S = 600.0  # age limits are enforced this often even when nothing is saved
MAX_QUEUE = 200  # the most results GET /annotation/queue answers at once
QUEUE_LIMITS = (1, MAX_QUEUE)  # GET /annotation/queue's `limit`; its `threshold` is a gate threshold
REASON_MAX_LENGTH = 1000  # characters of a verdict's reason
LABELLER_MAX_LENGTH = 200  # characters of a verdict's labeller
# the longest Retry-After the annotation page waits out by itself; a longer one waits for the labeller's button
PAGE_MAX_AUTO_RETRY_S = 300
# The annotation page reads these limits from its body's attributes, which the file leaves empty.
ANNOTATION_PAGE_LIMITS = {
    "data-max-queue": MAX_QUEUE,
    "data-reason-max-length": REASON_MAX_LENGTH,
    "data-labeller-max-length": LABELLER_MAX_LENGTH,
    "data-max-auto-retry-s": PAGE_MAX_AUTO_RETRY_S,
}
# Saves in progress at once per store client, in threads of their own: saves stalled on a slow store never
# take the threads that reads (GET /results, images, the queue) run in.
SAVE_THREADS = 4
# Mask PNG encodes in progress at once per ingress replica (a 40 MP mask of noise takes ~4 s): one given up at
# its request's deadline runs on while the request's admission slot is free again, so they are bounded here.
MASK_ENCODE_THREADS = 2


async def run_unless_given_up(
    executor: ThreadPoolExecutor, work: Callable[[Any], Any], item: Any, on_given_up: Callable[[Future], None] | None = None
) -> Any:
    """`work(item)` in `executor`. Given up (cancelled) while it is queued, it never runs and lets go of `item` at
    once: the queued call reaches it only through a list the giving-up caller empties, so a backlog of given-up
    calls holds no images. `on_given_up(future)`: what else a give-up does (the call may be under way)."""
    pending = [item]
    del item

    def run() -> Any:
        try:
            taken = pending.pop()
        except IndexError:  # given up while it was queued
            return None
        return work(taken)

    future = executor.submit(run)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        pending.clear()
        if on_given_up is not None:
            on_given_up(future)
        raise


class FeedbackBody(BaseModel):
    """POST /feedback: a human verdict on a retained result."""

    model_config = ConfigDict(extra="forbid")
    result_id: str = Field(description="the X-Result-Id of a retained removal")
    verdict: Literal["yes", "no"] = Field(description="yes: the object is removed well; no: it is not")
    reason: str | None = Field(None, max_length=REASON_MAX_LENGTH, description="why, in a few words (optional)")
    labeller: str | None = Field(
        None,
        max_length=LABELLER_MAX_LENGTH,
        description="who labelled (optional, free text, not checked); the service also records the API key that"
        " sent the verdict, as the verdict's `principal`",
    )

    @field_validator("reason", "labeller")
    @classmethod
    def _no_nul(cls, text: str | None) -> str | None:
        """PostgreSQL text cannot hold NUL: refused here as bad input (422), not failed in the driver (503)."""
        if text is not None and "\x00" in text:
            raise ValueError("must not contain a NUL character")
        return text


class StoreUnavailable(RuntimeError):
    """The result store is not open: opening it failed (`reason`, store_failure's words), and it is tried again
    after REOPEN_AFTER_S."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL: "database or disk is full"
POSTGRES_DISK_FULL = "53100"  # disk_full (PostgreSQL's error codes, class 53)


def _disk_full(driver_error: BaseException | None) -> bool:
    """Whether the database driver's error says its disk is full (SQLite; psycopg and psycopg2)."""
    if getattr(driver_error, "sqlite_errorcode", None) == SQLITE_FULL:
        return True
    code = getattr(driver_error, "sqlstate", None) or getattr(driver_error, "pgcode", None)
    return code == POSTGRES_DISK_FULL


def store_failure(exc: BaseException) -> str:
    """Why the store failed, in words a client may read: never the exception's text, which may quote a database URL
    with its password, a statement and its values, or a path. `exc` as raised here or come back from the ResultStore
    replica (Ray's RayTaskError subclassing the original class: its class name is "RayTaskError(...)")."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    exc = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
    if isinstance(exc, StoreUnavailable):
        return f"it could not be opened ({exc.reason}) and is tried again within {REOPEN_AFTER_S:g} s"
    if isinstance(exc, ImportError):
        return f"the Python module {exc.name or 'its database needs'} is not installed where it runs"
    if isinstance(exc, (ArgumentError, NoSuchModuleError)):
        return "its database URL cannot be used (retention.database_url)"
    if isinstance(exc, DBAPIError) and _disk_full(exc.orig) or isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return "its disk is full (an operator frees space there, or lowers retention.max_results)"
    if isinstance(exc, DBAPIError):
        return "its database could not be reached or refused the operation"
    if isinstance(exc, OSError):
        return f"a file, folder or bucket could not be used ({exc.strerror or type(exc).__name__})"
    return f"an unexpected {type(exc).__name__}"


class LocalStoreClient:
    """The store operations the ingress needs, as async methods over a RetentionStore in this process, its
    blocking IO in threads. The ResultStore deployment (serve/retention_deployment.py) is this class, shared
    by every ingress replica; an ingress without one (tests, a single process) makes its own.

    The store is opened (its migrations run) here, once; one sweeper thread enforces the age limit even
    when nothing is saved. Ids and owners are checked here, next to the data: another owner's result is
    answered as ResultNotFound, and its images never leave the store."""

    def __init__(self, open_store: Callable[[], RetentionStore]):
        self._open_store = open_store
        self._store: RetentionStore | None = None
        self._failed_at: float | None = None
        self._open_failure = "not yet opened"
        self._opening = threading.Lock()
        self._stopped = threading.Event()
        self._saves = ThreadPoolExecutor(SAVE_THREADS, thread_name_prefix="retention-save")
        self._open()
        self.sweeper = threading.Thread(target=self._sweep, name="retention-limits", daemon=True)
        self.sweeper.start()

    @classmethod
    def from_settings(cls, settings: RetentionSettings) -> LocalStoreClient:
        return cls(lambda: RetentionStore.from_settings(settings))

    async def save(self, new: NewResult) -> str:
        """A save given up on (cancelled) stores nothing: one still queued never starts, and lets go of its images
        at once (run_unless_given_up); one under way stops before its insert or, past it, deletes the result whose
        id nobody got."""
        given_up = threading.Event()

        def give_up(work: Future) -> None:
            given_up.set()
            work.add_done_callback(self._forget)

        return await run_unless_given_up(self._saves, lambda taken: self.opened().save(taken, given_up), new, give_up)

    def _forget(self, work: Future) -> None:
        if not work.cancelled() and work.exception() is None and work.result() is not None:
            self._saves.submit(lambda: self.opened().delete(work.result()))

    async def get(self, result_id: str, owner: str | None = None) -> StoredResult:
        """`owner` (here and below): only that owner's results are seen (None: every result)."""
        return await self._run(lambda store: _visible(store.get(_checked(result_id)), owner))

    async def read(self, result_id: str, kind: str, owner: str | None = None) -> tuple[bytes, str]:
        def read(store: RetentionStore) -> tuple[bytes, str]:
            _visible(store.get(_checked(result_id)), owner)
            return store.read(result_id, kind)

        return await self._run(read)

    async def delete(self, result_id: str) -> bool:
        return await self._run(lambda store: store.delete(_checked(result_id)))

    async def add_feedback(
        self,
        result_id: str,
        verdict: str,
        reason: str | None,
        labeller: str | None,
        owner: str | None = None,
        principal: str | None = None,
    ) -> StoredResult:
        def add(store: RetentionStore) -> StoredResult:
            _visible(store.get(_checked(result_id)), owner)
            return store.add_feedback(result_id, verdict, reason, labeller, principal)

        return await self._run(add)

    async def queue(
        self, limit: int, threshold: float | None, owner: str | None = None, principal: str | None = None
    ) -> tuple[list[StoredResult], int]:
        return await self._run(
            lambda store: (
                store.queue(limit, threshold, owner, principal),
                store.count(labelled=False, owner=owner, principal=principal),
            )
        )

    def opened(self) -> RetentionStore:
        store = self._store or self._open()
        if store is None:
            raise StoreUnavailable(self._open_failure)
        return store

    def close(self) -> None:
        """Stop the sweeper and the save threads (the store itself needs no closing)."""
        self._stopped.set()
        self._saves.shutdown(wait=False)

    async def _run(self, operation):
        return await asyncio.to_thread(lambda: operation(self.opened()))

    def _open(self) -> RetentionStore | None:
        """Open (and migrate) the store; a failure leaves the service up and is retried later."""
        with self._opening:
            recently_failed = self._failed_at is not None and time.monotonic() - self._failed_at < REOPEN_AFTER_S
            if self._store is not None or recently_failed:
                return self._store
            try:
                self._store = self._open_store()
                logger.info("retention: %s", self._store.describe())
            except Exception as exc:
                self._failed_at = time.monotonic()
                self._open_failure = store_failure(exc)
                logger.exception("retention: cannot open the result store; removals go on without retention")
            return self._store

    def sweep(self) -> int:
        """What the sweeper does every SWEEP_EVERY_S: the age limit and max_results (each save enforces them too,
        and its owner's bound), then the objects failed saves left; returns how many results it deleted."""
        store = self.opened()
        deleted = store.enforce_limits()
        store.drop_orphans()
        return deleted

    def _sweep(self) -> None:
        """Once at start (a store that was down for days holds results past their age), then every SWEEP_EVERY_S."""
        while True:
            try:
                self.sweep()
            except Exception:
                logger.exception("retention: enforcing the limits failed")
            if self._stopped.wait(SWEEP_EVERY_S):
                return


_EACH = (
    f' (failed saves are logged at most once per {LOG_EVERY_S:g} s; ray_rorem_retained_total{{outcome="failed"}} '
    "counts each)"
)


class Retention:
    """The ingress's view of the result store. While retention is disabled there is no store: retain=true
    is refused and the result routes answer 404; while the store cannot be opened, removals go on unretained.

    `store`: LocalStoreClient's methods, shared by every ingress replica (the ResultStore deployment behind
    serve.retention_deployment.HandleStoreClient); None: a LocalStoreClient of this replica's own. Errors
    raised in a ResultStore replica arrive as Ray's RayTaskError subclassing the original class, with
    other `args`, so they are told apart by class and described from the caller's own arguments."""

    def __init__(self, settings: RetentionSettings, metrics: IngressMetrics, store: LocalStoreClient | None = None):
        self.settings = settings
        self.metrics = metrics
        self.store: LocalStoreClient | None = None
        self._failed_saves = LogThrottle()  # a store that is down fails every save; the metric counts each
        self._mask_encodes = ThreadPoolExecutor(MASK_ENCODE_THREADS, thread_name_prefix="retention-mask")
        if settings.enabled:
            self.store = store or LocalStoreClient.from_settings(settings)

    def wanted(self, retain: bool | None) -> bool:
        """Whether to keep this removal's result; retain=true on a deployment without retention is refused."""
        if not self.settings.enabled:
            if retain:
                raise Problem(
                    "retention-disabled", "retain=true, but this deployment keeps no results (retention.enabled: false)"
                )
            return False
        return self.settings.default_retain if retain is None else retain

    async def keep(
        self,
        source: bytes,
        source_format: str | None,
        mask: np.ndarray,
        result: RemovalResult,
        policy: GatePolicy,
        options: RemoveOptions,
        dilate: int,
        owner: str | None = None,
        deadline_s: float | None = None,
    ) -> str | None:
        """Store the result as `owner`'s; its id, or None (logged and counted) when it could not be stored
        within retention.save_timeout_s and `deadline_s` (what is left of the request's deadline), the mask's
        PNG encode included (a 40 MP mask's takes a while): a slow or locked store delays the answer by that
        much at most, and the save given up stores nothing."""
        timeout_s = min(self.settings.save_timeout_s, math.inf if deadline_s is None else deadline_s)
        params = {
            **options.model_dump(exclude_none=True, exclude={"retain"}),
            "gate": policy.mode,
            "gate_threshold": policy.threshold,
            "max_attempts": policy.max_attempts,
            "dilate": dilate,
            "output_format": result.format,
            "attempts": result.attempts,
        }

        async def encode_and_save() -> str:
            new = NewResult(
                source=source,
                mask=await run_unless_given_up(self._mask_encodes, mask_png, mask),
                result=result.body,
                source_media_type=Image.MIME.get((source_format or "").upper(), "application/octet-stream"),
                result_media_type=result.media_type,
                width=mask.shape[1],
                height=mask.shape[0],
                score=result.score,
                threshold=policy.threshold,
                gate=result.gate,
                seed=result.seed,
                bucket=result.bucket,
                params=params,
                request_id=serve_request_id(),
                owner=owner,
            )
            return await self._client().save(new)

        try:
            result_id = await within(encode_and_save(), timeout_s)
        except asyncio.TimeoutError:
            if self._failed_saves.due():
                logger.warning("retention: not stored within %.3g s; answering without X-Result-Id%s", timeout_s, _EACH)
            self.metrics.retained.inc(tags={"outcome": "failed"})
            return None
        except Exception:
            if self._failed_saves.due():
                logger.exception("retention: the result could not be stored; answering without X-Result-Id%s", _EACH)
            self.metrics.retained.inc(tags={"outcome": "failed"})
            return None
        self.metrics.retained.inc(tags={"outcome": "stored"})
        return result_id

    async def get(self, result_id: str, owner: str | None = None) -> StoredResult:
        """`owner` (here and below): the caller sees only that owner's results (None: every result); another
        owner's result is answered as not found, so its existence is not disclosed."""
        return await self._call(result_id, lambda store: store.get(result_id, owner))

    async def image(self, result_id: str, kind: str, owner: str | None = None) -> tuple[bytes, str]:
        self.require_enabled()
        if kind not in KINDS:
            raise Problem("not-found", f"a result has the images {', '.join(KINDS)}, not {kind!r}")
        return await self._call(result_id, lambda store: store.read(result_id, kind, owner))

    async def delete(self, result_id: str) -> None:
        if not await self._call(result_id, lambda store: store.delete(result_id)):
            raise Problem("not-found", f"no retained result {result_id!r}")

    async def feedback(
        self, body: FeedbackBody, owner: str | None = None, principal: str | None = None
    ) -> StoredResult:
        """`principal`: the name of the API key that sent the verdict (None while auth is off), stored with it;
        the body's `labeller` is the client's own word and stays as it was sent."""
        reason = (body.reason or "").strip() or None
        stored = await self._call(
            body.result_id,
            lambda store: store.add_feedback(body.result_id, body.verdict, reason, body.labeller, owner, principal),
        )
        self.metrics.feedback.inc(tags={"verdict": body.verdict})
        return stored

    async def queue(
        self, limit: int, threshold: float | None, owner: str | None = None, principal: str | None = None
    ) -> tuple[list[StoredResult], int]:
        """The next `limit` unlabelled results, least certain first, and how many are unlabelled in all.
        `principal`: the asking key's name; judged neither by it nor without a key (None, auth off: without any
        verdict)."""
        self.require_enabled()
        invalid = [
            {"loc": ("query", name), "msg": f"must be {low:g} to {high:g}, got {value}"}
            for name, value, (low, high) in (("limit", limit, QUEUE_LIMITS), ("threshold", threshold, GATE_THRESHOLDS))
            if value is not None and not low <= value <= high
        ]  # fmt: skip
        if invalid:
            raise invalid_request(invalid)
        return await self._call(None, lambda store: store.queue(limit, threshold, owner, principal))

    def require_enabled(self) -> None:
        if not self.settings.enabled:
            raise Problem(
                "not-found", "result retention is disabled on this deployment (retention.enabled: false): no results"
            )

    def _client(self) -> LocalStoreClient:
        self.require_enabled()
        return self.store

    async def _call(self, result_id: str | None, operation: Callable[[LocalStoreClient], Awaitable[Any]]) -> Any:
        client = self._client()
        try:
            return await operation(client)
        except ResultNotFound as exc:
            raise Problem("not-found", f"no retained result {result_id!r} (never kept, deleted, or expired)") from exc
        except ObjectMissing as exc:
            raise Problem("not-found", "this result's image is no longer stored") from exc
        except Problem:
            raise
        except Exception as exc:
            logger.exception("retention store failed")
            raise Problem(
                "retention-unavailable",
                f"the result store failed: {store_failure(exc)}; the service's log says more",
                headers={"Retry-After": str(int(REOPEN_AFTER_S))},
            ) from exc


def result_document(stored: StoredResult, base: str, threshold: float | None = None) -> dict[str, Any]:
    """The JSON of a result (GET /results/{id}, queue items); links are relative to the app's root `base`."""
    own = f"{base}/results/{stored.id}"
    return {
        "id": stored.id,
        "created_at": _iso(stored.created_at),
        "request_id": stored.request_id,
        "score": stored.score,
        "threshold": stored.threshold,
        "uncertainty": stored.uncertainty(threshold),
        "gate": stored.gate,
        "seed": stored.seed,
        "bucket": stored.bucket,
        "width": stored.width,
        "height": stored.height,
        "media_types": stored.media_types,
        "bytes": {"source": stored.source_bytes, "result": stored.result_bytes},
        "params": stored.params,
        "label": stored.label,
        "feedback": [
            {
                "verdict": f.verdict,
                "reason": f.reason,
                "labeller": f.labeller,
                "principal": f.principal,
                "created_at": _iso(f.created_at),
            }
            for f in stored.feedback
        ],
        "links": {"self": own, **{kind: f"{own}/{kind}" for kind in KINDS}, "feedback": f"{base}/feedback"},
    }


@lru_cache(maxsize=1)
def annotation_page() -> tuple[str, dict[str, str]]:
    """The page, with ANNOTATION_PAGE_LIMITS filled in, and its response headers (a hash-based CSP:
    serve/page_headers.py)."""
    limits = {f'{attribute}=""': f'{attribute}="{value}"' for attribute, value in ANNOTATION_PAGE_LIMITS.items()}
    html = fill_marks(page_html(ANNOTATION_PAGE), ANNOTATION_PAGE.name, limits)
    return html, strict_page_headers(html, ANNOTATION_PAGE.name, img_src="blob:")  # images fetched with the key


def mask_png(mask: np.ndarray) -> bytes:
    """The removed region as a PNG: white = removed (the RORem mask convention). 8-bit gray, the same bytes for
    the same mask in every version: export-labels groups results by their images' bytes, and clients read 0/255.
    (A 40 MP mask of noise takes ~4 s so; keep() counts it within the save's time.)"""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _visible(stored: StoredResult, owner: str | None) -> StoredResult:
    if owner is not None and stored.owner != owner:
        raise ResultNotFound(stored.id)
    return stored


def _checked(result_id: str) -> str:
    if not RESULT_ID.fullmatch(result_id):
        raise ResultNotFound(result_id)
    return result_id


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"
