"""RetentionStore: retained results (objects + metadata), the verdicts on them, the annotation queue
and the retention limits. Blocking IO: callers on an event loop run it in a thread.

Deleting a result removes its metadata, its verdicts and every object no other result refers to (a photo sent twice is
stored once and stays while one of its results does). A save claims its objects' keys before it writes them, and a
delete never removes a claimed object, so a save's object writes hold no lock, and a delete takes the lock one object at
a time (a save waits for one object delete at most). A failed save deletes the objects it created; what it cannot (the
object store failing too, a crash) the sweeper deletes once no result refers to it for ORPHAN_GRACE_S, and a write a
crash cut short once it is as old. It does so only while the database and the object store are each other's
(owns_its_objects): over another database's objects every one of them would look orphaned.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from serve.retention.db import (
    FeedbackRow,
    ResultRow,
    StoreIdRow,
    check_schema_current,
    make_engine,
    migrate,
    utcnow,
)
from serve.retention.objects import MARKER, LocalObjectStore, ObjectStore, S3ObjectStore, object_key

logger = logging.getLogger("ray.serve")  # the ResultStore replica's log: a module logger's INFO never reached it

Kind = Literal["source", "mask", "result"]
KINDS: tuple[Kind, ...] = ("source", "mask", "result")
VERDICTS = ("yes", "no")
MASK_MEDIA_TYPE = "image/png"
_CHUNK = 500  # ids per IN (...) list
# Verdicts kept per result and principal (the API key that sent them; those without one are a group of their
# own), the newest: each answer carries the history, so an unbounded one made every POST /feedback on a result
# slower and larger than the last (1,500 verdicts: 1.9 MB an answer). Per principal, so that no key's verdicts
# push out another's (a tenant's on its own result would delete a reviewer's, which export --labelled-by needs):
# a result keeps at most MAX_VERDICTS x (the keys that may judge it, + 1).
MAX_VERDICTS = 20
# An object no result refers to is deleted by the sweeper once it is this old: far longer than any save takes
# between writing an object and inserting the row that refers to it.
ORPHAN_GRACE_S = 3600.0
# A database writes its store id into a store without a marker only where at most this share of the store's objects
# are ones it does not know (the orphans of failed saves): never over another database's images.
ADOPT_UNREFERENCED = 0.01
_SAME_IN_ROW = ("request_id", "width", "height", "score", "threshold", "gate", "seed", "bucket", "owner")


class ResultNotFound(KeyError):
    """No retained result has this id (never stored, deleted, or past the retention limits)."""


class SaveGivenUp(RuntimeError):
    """The caller stopped waiting for this save before its row was inserted: nothing is stored."""


@dataclass(frozen=True)
class Feedback:
    verdict: str
    reason: str | None
    labeller: str | None  # what the client said, unchecked
    created_at: dt.datetime
    principal: str | None = None  # the API key that submitted it (serve.auth.verdict_principal); None: no key


@dataclass(frozen=True)
class NewResult:
    """What a removal leaves to retain: the uploaded photo as sent, the mask that was removed (PNG,
    white = removed, after dilation), the encoded result, and what the gate and the request said."""

    source: bytes
    mask: bytes
    result: bytes
    source_media_type: str
    result_media_type: str
    width: int
    height: int
    score: float | None
    threshold: float
    gate: str
    seed: int | None
    bucket: int | None
    params: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    owner: str | None = None  # the creating API key's team or name; None: created without auth


@dataclass(frozen=True)
class StoredResult:
    id: str
    created_at: dt.datetime
    request_id: str | None
    keys: dict[str, str]
    media_types: dict[str, str]
    width: int
    height: int
    source_bytes: int
    result_bytes: int
    score: float | None
    threshold: float
    gate: str
    seed: int | None
    bucket: int | None
    params: dict[str, Any]
    feedback: tuple[Feedback, ...] = ()
    owner: str | None = None

    @property
    def label(self) -> str | None:
        """The newest verdict: a relabel wins, the earlier verdicts stay as history."""
        return self.feedback[-1].verdict if self.feedback else None

    @property
    def labelled_at(self) -> dt.datetime | None:
        return self.feedback[-1].created_at if self.feedback else None

    def uncertainty(self, threshold: float | None = None) -> float | None:
        """How close the discriminator was to its decision: |score - threshold| (small = unsure)."""
        if self.score is None:
            return None
        return abs(self.score - (self.threshold if threshold is None else threshold))


class RetentionStore:
    def __init__(
        self,
        objects: ObjectStore,
        engine: Engine,
        max_results: int | None = None,
        max_age_days: float | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        max_results_per_owner: int | None = None,
    ):
        self.objects = objects
        self.engine = engine
        self.max_results = max_results
        self.max_results_per_owner = max_results_per_owner
        self.max_age_days = max_age_days
        self.clock = clock
        self._lock = threading.Lock()
        # Saves run in parallel (a replica takes many calls at once): results whose save has not returned yet are
        # never evicted, and one enforcement selects and deletes at a time, so two cannot doom each other's picks.
        self._saving: set[str] = set()
        self._limits_lock = threading.Lock()
        # With _lock held: how many saves in progress claim each object key, and the keys two of them claimed at once.
        self._claims: Counter[str] = Counter()
        self._shared: set[str] = set()
        self._tied = False  # owns_its_objects's last answer: a delete drops objects only while it was yes
        self._left_untied: set[str] = set()  # with _lock held: the objects deletes left while it was no

    @classmethod
    def open(cls, database_url: str, objects: ObjectStore, **limits_and_clock) -> RetentionStore:
        """Connect and bring the schema up to date (migrations run here, once per process)."""
        engine = make_engine(database_url)
        migrate(engine)
        store = cls(objects, engine, **limits_and_clock)
        try:
            store.owns_its_objects()
        except Exception:
            logger.exception("retention: cannot check that the database and the object store are each other's")
        return store

    @classmethod
    def from_settings(cls, settings) -> RetentionStore:
        """From serve.config.RetentionSettings (the service's config)."""
        if settings.object_store.s3 is None:  # owner-only: LocalObjectStore's mkdir gives folders above it the umask's
            Path(settings.object_store.path).expanduser().mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls.open(settings.resolved_database_url(), _objects_of(settings), **_limits_of(settings))

    @classmethod
    def open_existing(cls, settings) -> RetentionStore:
        """A store the service keeps, to read (export-labels): nothing is made, migrated or tied, so a mistyped path
        is refused, not made an empty store, and a newer checkout never migrates the service's schema under it.
        FileNotFoundError naming a missing objects folder or SQLite file; SchemaNotCurrent."""
        if settings.object_store.s3 is None and not settings.objects_folder().is_dir():
            raise FileNotFoundError(f"no retention objects folder {settings.objects_folder()}")
        url = settings.resolved_database_url()
        database = make_url(url).database if make_url(url).get_backend_name() == "sqlite" else None
        if database and not database.startswith("file:") and not Path(database).expanduser().is_file():
            raise FileNotFoundError(f"no retention database {Path(database).expanduser()}")
        engine = make_engine(url)
        check_schema_current(engine)
        return cls(_objects_of(settings), engine, **_limits_of(settings))

    def describe(self) -> str:
        return (
            f"objects in {self.objects.describe()}, metadata in {self.engine.url.render_as_string(hide_password=True)}"
        )

    # ------------------------------------------------------------ results

    def save(self, new: NewResult, given_up: threading.Event | None = None) -> str:
        """Store objects (once per content) and metadata; returns the new result's id. The objects are
        written first, so a reader never sees a result whose images are not there yet, and without the lock,
        so a slow object store holds up no other save or delete. `given_up`: set when the caller stops waiting;
        a save given up before its insert commits, a locked database's wait included, stores nothing and deletes
        nothing for room (SaveGivenUp): a late insert made room for a result nobody got the id of, pushing out an
        older one, a reviewed one too. One given up as it commits is deleted before any room is made. A failed
        save deletes the objects it created, without the database (which may be what failed). Once the row is in,
        the result is stored: the limits enforced after it failing is logged and left to the next save or sweep,
        and the id is returned."""
        result_id = uuid.uuid4().hex
        blobs = (new.source, new.mask, new.result)
        keys = [object_key(data) for data in blobs]
        with self._lock:
            self._saving.add(result_id)
            self._claim(keys)
        created: set[str] = set()
        try:
            for key, data in zip(keys, blobs):
                if not self.objects.exists(key):
                    self.objects.put(data)
                    created.add(key)
            row = ResultRow(
                id=result_id,
                created_at=self.clock(),
                source_key=keys[0],
                mask_key=keys[1],
                result_key=keys[2],
                source_media_type=new.source_media_type,
                result_media_type=new.result_media_type,
                source_bytes=len(new.source),
                result_bytes=len(new.result),
                params=new.params,
                **{name: getattr(new, name) for name in _SAME_IN_ROW},
            )
            if given_up is not None and given_up.is_set():
                raise SaveGivenUp(result_id)
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.flush()  # the database's write lock is this save's now: a locked database waited here
                if given_up is not None and given_up.is_set():
                    raise SaveGivenUp(result_id)  # rolled back: never seen, counted, judged or made room for
        except BaseException:
            with self._lock:
                self._saving.discard(result_id)
            self._drop_created(created)
            with self._lock:
                self._unclaim(keys)
            raise
        with self._lock:
            self._unclaim(keys)
        if given_up is not None and given_up.is_set():  # during the commit (a slow one: PostgreSQL's standby, fsync)
            try:
                self.delete(result_id)
            finally:
                with self._lock:
                    self._saving.discard(result_id)
            raise SaveGivenUp(result_id)
        try:
            self.enforce_limits(keep=result_id, owner=new.owner)
        except Exception:
            logger.exception("retention: enforcing the limits after a save failed; the next save or sweep will")
        finally:
            with self._lock:
                self._saving.discard(result_id)
        return result_id

    def get(self, result_id: str) -> StoredResult:
        with Session(self.engine) as session:
            row = session.scalar(select(ResultRow).where(ResultRow.id == result_id, *self._unexpired()))
            if row is None:
                raise ResultNotFound(result_id)
            return self._stored([row], session)[0]

    def read(self, result_id: str, kind: Kind) -> tuple[bytes, str]:
        """The bytes of one of a result's images and their media type; ObjectMissing if they are gone."""
        stored = self.get(result_id)
        return self.objects.get(stored.keys[kind]), stored.media_types[kind]

    def delete(self, result_id: str) -> bool:
        """Remove a result, its verdicts and its no longer referenced objects; whether a reader found it (False if
        there was none). One past max_age_days, which no reader finds, is removed all the same: False, as for the
        readers, but its photo is gone now, not at a sweep that may be minutes away or failing."""
        with Session(self.engine) as session:
            found = session.scalar(self._found(result_id)) is not None
        deleted, keys = self._delete_rows([result_id])
        self._drop_one_by_one(keys)
        return found and deleted == 1

    # ------------------------------------------------------------ feedback

    def add_feedback(
        self,
        result_id: str,
        verdict: str,
        reason: str | None = None,
        labeller: str | None = None,
        principal: str | None = None,
    ) -> StoredResult:
        """Append a verdict (the newest verdict is the label); returns the result with its history.
        `principal`: the API key that submitted it, as the service authenticated it (never the client's word).
        The result keeps that principal's newest MAX_VERDICTS verdicts; other principals' are never deleted."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        try:
            with Session(self.engine) as session, session.begin():
                if session.scalar(self._found(result_id)) is None:
                    raise ResultNotFound(result_id)
                session.add(
                    FeedbackRow(
                        result_id=result_id,
                        verdict=verdict,
                        reason=reason,
                        labeller=labeller,
                        principal=principal,
                        created_at=self.clock(),
                    )
                )
                session.flush()
                same = (FeedbackRow.result_id == result_id, _sent_by(principal))
                kept = (
                    select(FeedbackRow.id)
                    .where(*same)
                    .order_by(FeedbackRow.created_at.desc(), FeedbackRow.id.desc())
                    .limit(MAX_VERDICTS)
                )
                session.execute(delete(FeedbackRow).where(*same, FeedbackRow.id.not_in(kept)))
        except IntegrityError:
            self.get(result_id)  # deleted since the check above (a DELETE, an eviction, the sweeper): ResultNotFound
            raise
        return self.get(result_id)

    def queue(
        self, limit: int = 20, threshold: float | None = None, owner: str | None = None, principal: str | None = None
    ) -> list[StoredResult]:
        """Unlabelled results, the discriminator's least certain first: |score - threshold| ascending
        (each result's own threshold unless one is given); unscored results last; then oldest first.
        `owner`: only that owner's results (None: everyone's). `principal`: the API key asking; only its own
        verdicts, and verdicts without a key (auth off, or older than 0003), take a result out of its queue, so
        another key's (a tenant's) never hide a result from a reviewer (None: no key is known, and any verdict
        does)."""
        cut = ResultRow.threshold if threshold is None else threshold
        statement = (
            select(ResultRow)
            .where(~_has_feedback(principal), *_owned_by(owner), *self._unexpired())
            .order_by(ResultRow.score.is_(None), func.abs(ResultRow.score - cut), ResultRow.created_at, ResultRow.id)
            .limit(limit)
        )
        with Session(self.engine) as session:
            return self._stored(session.scalars(statement).all(), session)

    def count(self, labelled: bool | None = None, owner: str | None = None, principal: str | None = None) -> int:
        """`labelled`: only the results with (True) or without (False) a verdict; of `principal`'s or without a key,
        if given (as `queue`)."""
        statement = select(func.count()).select_from(ResultRow).where(*_owned_by(owner), *self._unexpired())
        if labelled is not None:
            statement = statement.where(_has_feedback(principal) if labelled else ~_has_feedback(principal))
        with Session(self.engine) as session:
            return session.scalar(statement) or 0

    def labelled(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        principals: Iterable[str] | None = None,
    ) -> list[StoredResult]:
        """Results with a verdict, oldest first; since / until bound the time of the newest verdict.
        `principals`: only the verdicts these API keys sent count (a verdict without a principal never does):
        each result keeps those alone, its label is the newest of them, and a result with none is left out."""
        statement = (
            select(ResultRow).where(_has_feedback(), *self._unexpired()).order_by(ResultRow.created_at, ResultRow.id)
        )
        with Session(self.engine) as session:
            results = self._stored(session.scalars(statement).all(), session)
        if principals is not None:
            trusted = set(principals)
            results = [replace(r, feedback=tuple(f for f in r.feedback if f.principal in trusted)) for r in results]
            results = [r for r in results if r.feedback]
        return [
            r for r in results
            if (since is None or r.labelled_at >= since) and (until is None or r.labelled_at < until)
        ]  # fmt: skip

    # ------------------------------------------------------------ limits

    def enforce_limits(self, keep: str | None = None, owner: str | None = None) -> int:
        """Delete results past max_age_days (labelled or not); then, beyond max_results_per_owner, `owner`'s oldest
        (unlabelled first); then, beyond max_results, everyone's oldest unlabelled ones first: a flood of new results
        (anyone with the remove scope may retain) never pushes out the human verdicts while an older unlabelled result
        is left to go, and with the per-owner bound one owner's flood, labelled or not, pushes out only its own. `keep`
        (the result save() just stored, whose id the caller is about to get) and any other result whose save has not
        returned are never the ones that go. Without `owner` (the sweeper) no owner's bound is enforced: a save enforces
        its owner's. A result picked for having no verdict is deleted only while it still has none: a verdict committed
        in between keeps it (the limit is then met by the next save or sweep). Returns how many were deleted."""
        with self._limits_lock:
            # held through the selection: no save inserts between the snapshot of saves in progress and the picks
            with self._lock:
                doomed, unjudged = self._select(keep, owner)
            if not doomed and not unjudged:
                return 0
            deleted, keys = self._delete_rows(doomed)
            deleted_unjudged, keys_unjudged = self._delete_rows(unjudged, unjudged=True)
            deleted += deleted_unjudged
        self._drop_one_by_one(keys | keys_unjudged)  # another enforcement (a save's) need not wait for the objects
        logger.info("retention limits: deleted %d result(s)", deleted)
        return deleted

    def _select(self, keep: str | None, owner: str | None) -> tuple[list[str], list[str]]:
        """The results `enforce_limits` deletes, as (those deleted as they are, those picked for having no
        verdict); with `_lock` held."""
        saving = list(self._saving | ({keep} if keep is not None else set()))
        with Session(self.engine) as session:
            eligible = []
            doomed: list[str] = []
            unjudged: list[str] = []
            if self.max_age_days is not None:
                eligible = list(self._unexpired())
                doomed = list(session.scalars(select(ResultRow.id).where(~eligible[0])).all())
            if owner is not None and self.max_results_per_owner is not None:
                # those whose saves are under way count (they are stored), though none of them is picked: counted
                # apart, saves at once each found room and the owner stayed past its bound
                owned = session.scalar(select(func.count()).select_from(ResultRow).where(*eligible, *_owned_by(owner)))
            if saving:
                eligible.append(ResultRow.id.not_in(saving))
            if owner is not None and self.max_results_per_owner is not None:
                unlabelled, labelled = self._oldest(session, (owned or 0) - self.max_results_per_owner, eligible, owner)
                unjudged += unlabelled
                doomed += labelled
                if unlabelled or labelled:
                    eligible.append(ResultRow.id.not_in(unlabelled + labelled))
            total = session.scalar(select(func.count()).select_from(ResultRow)) or 0
            picked = len(doomed) + len(unjudged)
            over = total - picked - self.max_results if self.max_results is not None else 0
            unlabelled, labelled = self._oldest(session, over, eligible)
        return doomed + labelled, unjudged + unlabelled

    # ------------------------------------------------------------ internals

    def drop_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete the objects written more than `grace_s` ago that no result refers to: what failed saves
        could not delete themselves; and the partial writes as old, what a process killed mid-write left.
        Returns how many were deleted."""
        if not self.owns_its_objects():
            return 0
        before = time.time() - grace_s
        cut_short = self.objects.drop_partial_writes(before)
        if cut_short:
            logger.info("retention: deleted %d partial write(s) a stopped process left", cut_short)
        stale = set(self.objects.written_before(before))
        if not stale:
            return cut_short
        dropped = self._drop_one_by_one(stale - self._referenced())
        if dropped:
            logger.info("retention: deleted %d object(s) no result refers to", dropped)
        return cut_short + dropped

    def owns_its_objects(self) -> bool:
        """Whether the database and the object store are each other's: the database's store id is the one in the
        store's MARKER; asked at open and by each orphan sweep, and until it says yes no delete drops an object (the
        objects a delete leaves meanwhile are remembered, and dropped once it says yes). A store without a marker
        is claimed where it holds hardly anything this database does not know (ADOPT_UNREFERENCED; an empty store
        qualifies), the database's id recorded first if it has none (a new pair; an earlier version's pair, whose
        database got its id when it was upgraded; a claim that failed once, made at the next sweep). On any doubt (a
        store mostly of images the database does not know, another's marker): False, logged as an ERROR naming both,
        and no object is deleted; saves and reads go on. The marker is read before the row: a process records an
        id before it claims the marker, so one starting beside it never sees the marker without the row."""
        marker = self.objects.marker()
        with Session(self.engine) as session:
            row = session.get(StoreIdRow, 1)
        ours = None if row is None else row.store_id
        if marker is None and self._adoptable():
            ours = ours or self._record_store_id(uuid.uuid4().hex)
            marker = self.objects.claim_marker(ours)
        self._tied = marker is not None and marker == ours
        if self._tied:
            with self._lock:
                left, self._left_untied = self._left_untied, set()
            self._drop_one_by_one(left)
            return True
        logger.error(
            "retention: the database %s (store id %s) and the object store %s (marker %s: %s) are not each other's:"
            " objects no result of this database refers to are NOT deleted. Point retention.database_url at the"
            " store's own database; if this database is the store's own, write its store id into the marker",
            self.engine.url.render_as_string(hide_password=True),
            ours or "none",
            self.objects.describe(),
            MARKER,
            marker or "none",
        )
        return False

    def _record_store_id(self, store_id: str) -> str:
        """The database's store id: `store_id`, unless another process recorded one first."""
        try:
            with Session(self.engine) as session, session.begin():
                session.add(StoreIdRow(id=1, store_id=store_id, legacy=False))
        except IntegrityError:
            pass
        with Session(self.engine) as session:
            return session.get(StoreIdRow, 1).store_id

    def _referenced(self) -> set[str]:
        """The keys of every object a result of this database refers to."""
        columns = (ResultRow.source_key, ResultRow.mask_key, ResultRow.result_key)
        with Session(self.engine) as session:
            return {key for row in session.execute(select(*columns)) for key in row}

    def _adoptable(self) -> bool:
        """The store holds at most ADOPT_UNREFERENCED of objects this database does not know (neither referred to nor
        left by its own deletes while untied; an empty store qualifies): a database over another's images (a
        fallback results.db that saved a few of its own there) knows a few of them at most. Lists the store, and
        stops as soon as the unknown ones are too many for the known ones to outweigh (a foreign store costs a few
        pages; the store's own, once, all of them)."""
        with self._lock:
            left = set(self._left_untied)
        known = self._referenced() | left
        held = unknown = 0
        for key in self.objects.written_before(math.inf):
            held += 1
            unknown += key not in known
            if unknown > ADOPT_UNREFERENCED * (unknown + len(known)):
                return False
        return unknown <= ADOPT_UNREFERENCED * held

    def _claim(self, keys: Iterable[str]) -> None:
        """With _lock held: no delete removes these objects until they are unclaimed."""
        for key in set(keys):
            if self._claims[key]:
                self._shared.add(key)
            self._claims[key] += 1

    def _drop_created(self, created: Iterable[str]) -> None:
        """The objects a failed save wrote, still claimed by it, deleted unless another save claimed them meanwhile
        (its row may refer to them: left to drop_orphans), without the database (which may be what failed); the
        lock a key at a time, as _drop_one_by_one."""
        for key in created:
            with self._lock:
                if key in self._shared:
                    continue
                try:
                    self.objects.delete(key)
                except Exception:
                    logger.exception("retention: cannot delete the object of a failed save; the sweeper will")

    def _drop_one_by_one(self, keys: Iterable[str]) -> int:
        """Delete the objects no result refers to and no save claims, holding the lock for one key at a time:
        saves claim theirs in between, so a long delete on a slow object store holds up none; how many. None
        unless the database and the store were last found each other's: another database's results may refer
        to them (the orphan sweep of the store's own database deletes them)."""
        if not self._tied:
            with self._lock:
                self._left_untied.update(keys)
            return 0
        dropped = 0
        for key in sorted(keys):
            with self._lock:
                dropped += self._drop_unreferenced([key])
            time.sleep(0.001)  # Python's locks are not fair: without a pause this thread would take it straight back
        return dropped

    def _unclaim(self, keys: Iterable[str]) -> None:
        """With _lock held."""
        for key in set(keys):
            self._claims[key] -= 1
            if not self._claims[key]:
                del self._claims[key]
                self._shared.discard(key)

    def _found(self, result_id: str):
        """The id of the result, if a reader finds it (it is not past max_age_days)."""
        return select(ResultRow.id).where(ResultRow.id == result_id, *self._unexpired())

    def _unexpired(self) -> tuple:
        """Rows within max_age_days: past it a result is gone for every reader, whether or not swept yet."""
        if self.max_age_days is None:
            return ()
        return (ResultRow.created_at >= self.clock() - dt.timedelta(days=self.max_age_days),)

    @staticmethod
    def _oldest(session: Session, count: int, eligible: list, owner: str | None = None) -> tuple[list[str], list[str]]:
        """Up to `count` eligible results (of `owner`, or anyone's), the oldest unlabelled first, then the oldest
        labelled, as (unlabelled, labelled): each an indexed walk from the oldest, stopped at `count`."""
        found: tuple[list[str], list[str]] = ([], [])
        for labelled in (False, True):
            left = count - len(found[0]) - len(found[1])
            if left <= 0:
                break
            feedback = _has_feedback() if labelled else ~_has_feedback()
            statement = select(ResultRow.id).where(*eligible, *_owned_by(owner), feedback)
            found[labelled].extend(session.scalars(statement.order_by(ResultRow.created_at, ResultRow.id).limit(left)))
        return found

    def _delete_rows(self, ids: Sequence[str], unjudged: bool = False) -> tuple[int, set[str]]:
        """Delete the results' rows; returns how many and the keys of their objects, for _drop_one_by_one: the lock is
        held for a chunk of rows, then for an object, at a time, never through all, so a save's claim waits for one.
        The results go first and their verdicts with them (ON DELETE CASCADE; SQLite's foreign keys are on,
        db.make_engine): the order add_feedback locks them in on PostgreSQL (its insert locks the result, its trim then
        the verdicts), so a verdict and a delete of its result never deadlock. `unjudged`: only those still without a
        verdict (the DELETE checks it: a verdict committed first keeps its result). The rows are locked first (FOR
        UPDATE; SQLite's writers take turns anyway): on PostgreSQL a DELETE that waited on a verdict's open transaction
        would otherwise delete by the snapshot it started from, verdict and all."""
        still = (~_has_feedback(),) if unjudged else ()
        deleted, keys = 0, set()
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start : start + _CHUNK])
            with self._lock, Session(self.engine) as session, session.begin():
                chosen = select(ResultRow).where(ResultRow.id.in_(chunk), *still).with_for_update()
                rows = session.scalars(chosen).all()
                keys |= {key for row in rows for key in (row.source_key, row.mask_key, row.result_key)}
                gone = session.execute(delete(ResultRow).where(ResultRow.id.in_(chunk), *still))
            deleted += gone.rowcount
        return deleted, keys

    def _drop_unreferenced(self, keys: Iterable[str]) -> int:
        """With _lock held: delete the objects no result refers to and no save claims; returns how many."""
        dropped = 0
        with Session(self.engine) as session:
            for key in set(keys) - set(self._claims):
                referenced = session.scalar(
                    select(ResultRow.id)
                    .where(or_(ResultRow.source_key == key, ResultRow.mask_key == key, ResultRow.result_key == key))
                    .limit(1)
                )
                if referenced is None:
                    self.objects.delete(key)
                    dropped += 1
        return dropped

    @staticmethod
    def _stored(rows: Sequence[ResultRow], session: Session) -> list[StoredResult]:
        history: dict[str, list[Feedback]] = {row.id: [] for row in rows}
        ids = list(history)
        for start in range(0, len(ids), _CHUNK):
            verdicts = session.scalars(
                select(FeedbackRow)
                .where(FeedbackRow.result_id.in_(ids[start : start + _CHUNK]))
                .order_by(FeedbackRow.created_at, FeedbackRow.id)
            )
            for v in verdicts:
                history[v.result_id].append(Feedback(v.verdict, v.reason, v.labeller, v.created_at, v.principal))
        return [
            StoredResult(
                id=row.id,
                created_at=row.created_at,
                keys={"source": row.source_key, "mask": row.mask_key, "result": row.result_key},
                media_types={
                    "source": row.source_media_type,
                    "mask": MASK_MEDIA_TYPE,
                    "result": row.result_media_type,
                },
                source_bytes=row.source_bytes,
                result_bytes=row.result_bytes,
                params=dict(row.params or {}),
                **{name: getattr(row, name) for name in _SAME_IN_ROW},
                feedback=tuple(history[row.id]),
            )
            for row in rows
        ]


def _objects_of(settings) -> ObjectStore:
    s3 = settings.object_store.s3
    if s3 is None:
        return LocalObjectStore(settings.objects_folder())
    return S3ObjectStore(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)


def _limits_of(settings) -> dict[str, Any]:
    return {
        "max_results": settings.max_results,
        "max_age_days": settings.max_age_days,
        "max_results_per_owner": settings.max_results_per_owner,
    }


def _owned_by(owner: str | None) -> tuple:
    return () if owner is None else (ResultRow.owner == owner,)


def _sent_by(principal: str | None):
    """The verdicts `principal` sent (None: those without a principal)."""
    return FeedbackRow.principal.is_(None) if principal is None else FeedbackRow.principal == principal


def _has_feedback(principal: str | None = None):
    """The result has a verdict: one `principal` sent, or one without a principal (sent before verdicts recorded
    one, or with auth off: judged by whoever ran the service), if given (None: anyone's)."""
    sent = () if principal is None else (or_(FeedbackRow.principal == principal, FeedbackRow.principal.is_(None)),)
    return select(FeedbackRow.id).where(FeedbackRow.result_id == ResultRow.id, *sent).exists()
