"""Result retention without a service: the store (dedup, delete, limits, queue, relabels), the
schema migrations, the object stores' key layout, the retain decision, and `export-labels` giving
the discriminator stage a set its loader accepts."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from serve.retention import LocalObjectStore, ObjectMissing, RetentionStore, S3ObjectStore, object_key
from serve.retention.objects import MARKER
from serve.retention.store import MAX_VERDICTS, NewResult, ResultNotFound
from tests.helpers import database_driver, photo, png_bytes

T0 = dt.datetime(2025, 3, 1, 12, 0, 0)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += dt.timedelta(**delta)


def _new(result: bytes, score: float | None = 0.5, threshold: float = 0.5, source: bytes = b"the photo") -> NewResult:
    return NewResult(
        source=source,
        mask=b"mask of " + result,
        result=result,
        source_media_type="image/png",
        result_media_type="image/png",
        width=4,
        height=3,
        score=score,
        threshold=threshold,
        gate="passed" if score is not None and score >= threshold else "failed",
        seed=7,
        bucket=256,
        params={"gate": "annotate", "dilate": 20},
    )


def _files(root: Path) -> set[str]:
    """The objects' keys (the files under the key folders, which stay when emptied), not the store's marker."""
    files = {Path(folder, name).relative_to(root).as_posix() for folder, _, names in os.walk(root) for name in names}
    return files - {MARKER}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return RetentionStore.open(
        f"sqlite:///{tmp_path / 'results.db'}", LocalObjectStore(tmp_path / "objects"), clock=clock
    )


def test_saved_result_reads_back_and_the_same_photo_is_stored_once(store, tmp_path):
    first = store.save(_new(b"result one", score=0.61))
    second = store.save(_new(b"result two"))
    stored = store.get(first)
    assert stored.score == 0.61 and stored.seed == 7 and stored.params["dilate"] == 20 and stored.label is None
    assert store.read(first, "source") == (b"the photo", "image/png")
    assert store.read(first, "result")[0] == b"result one"
    assert len(_files(tmp_path / "objects")) == 5  # one photo, two masks, two results
    assert stored.keys["source"] == store.get(second).keys["source"] == object_key(b"the photo")

    assert store.delete(first)
    with pytest.raises(ResultNotFound):
        store.get(first)
    assert store.read(second, "source")[0] == b"the photo", "the photo is still referenced by the other result"
    assert len(_files(tmp_path / "objects")) == 3
    assert store.delete(second) and not store.delete(second)
    assert _files(tmp_path / "objects") == set()


def test_max_results_keeps_the_newest(tmp_path, clock):
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=2, clock=clock
    )
    ids = []
    for n in range(4):
        ids.append(store.save(_new(f"result {n}".encode())))
        clock.advance(minutes=1)
    assert store.count() == 2
    assert {r.id for r in store.queue(10)} == set(ids[2:])
    with pytest.raises(ResultNotFound):
        store.read(ids[0], "result")


def test_beyond_max_results_unlabelled_results_go_before_labelled_ones(tmp_path, clock):
    """Anyone who may remove may retain: a flood of new results pushes out unlabelled ones, never the human
    verdicts while an unlabelled result is left; when only labelled ones remain, the oldest goes."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=3, clock=clock
    )
    labelled = []
    for n in range(2):
        labelled.append(store.save(_new(f"labelled {n}".encode())))
        store.add_feedback(labelled[-1], "yes")
        clock.advance(minutes=1)
    flood = []
    for n in range(5):
        flood.append(store.save(_new(f"flood {n}".encode())))
        clock.advance(minutes=1)
    assert [r.id for r in store.labelled()] == labelled
    assert {r.id for r in store.queue(10)} == {flood[-1]} and store.count() == 3
    for result_id in flood[:-1]:
        with pytest.raises(ResultNotFound):
            store.get(result_id)
    store.add_feedback(flood[-1], "no")
    store.save(_new(b"one more"))
    assert [r.id for r in store.labelled()] == [labelled[1], flood[-1]], "all labelled: the oldest goes"


@pytest.mark.parametrize("per_owner", [None, 3])
def test_with_a_per_owner_bound_one_owner_s_labelled_flood_pushes_out_only_its_own(tmp_path, clock, per_owner):
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=10, clock=clock,
        max_results_per_owner=per_owner,
    )  # fmt: skip

    def saved(owner: str | None, label: bool) -> str:
        clock.advance(minutes=1)
        result_id = store.save(replace(_new(f"{owner} {clock.now}".encode()), owner=owner))
        if label:
            store.add_feedback(result_id, "yes")
        return result_id

    bob = [saved("bob", label=True) for _ in range(2)]
    unowned = [saved(None, label=False) for _ in range(4)]  # auth off: no owner, no per-owner bound
    alice = [saved("alice", label=True) for _ in range(12)]
    kept = {r.id for r in store.labelled()} | {r.id for r in store.queue(100)}
    if per_owner is None:
        assert not set(bob) & kept, "without it, her labelled flood took bob's labelled results"
    else:
        assert set(bob) | set(unowned) <= kept, "bob's results and the unowned ones stay"
        assert kept & set(alice) == set(alice[-per_owner:]), "alice keeps her newest 3"
    assert store.count() <= 10


def test_the_id_save_returns_is_never_the_one_the_limit_deletes(tmp_path, clock):
    """Saves in the same instant (the clock does not move): the newest by (time, id) is not always the one just
    stored, so save() names it to enforce_limits."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=1, clock=clock
    )
    for n in range(12):
        result_id = store.save(_new(f"result {n}".encode()))
        assert store.get(result_id).id == result_id and store.count() == 1


def test_the_sweeper_never_takes_a_result_whose_save_has_not_returned(tmp_path, clock):
    """The sweeper runs in its own thread: landing between a save's insert and that save's own limits, it
    must not delete the new result (the only unlabelled one here), whose id the caller is about to get."""
    from serve.retention.keeper import LocalStoreClient

    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=1, clock=clock
    )
    labelled = store.save(_new(b"labelled"))
    store.add_feedback(labelled, "yes")
    client = LocalStoreClient(lambda: store)
    try:
        enforce = store.enforce_limits

        def sweeper_lands_first(keep=None, **kwargs):
            if keep is not None:
                client.sweep()
            return enforce(keep=keep, **kwargs)

        store.enforce_limits = sweeper_lands_first
        new = store.save(_new(b"new"))
        assert store.get(new).id == new
        assert store.count() == 1, "save() still enforced max_results: the labelled one went"
    finally:
        client.close()



def _saved_at_once(store: RetentionStore, new: list[NewResult]) -> list[str]:
    """Saves in threads of their own, each enforcing the limits once every one has inserted; the ids returned."""
    all_inserted = threading.Barrier(len(new), timeout=10)
    enforce = store.enforce_limits

    def after_all_inserts(**kwargs):
        all_inserted.wait()
        return enforce(**kwargs)

    store.enforce_limits = after_all_inserts
    saved: list[str] = []
    savers = [threading.Thread(target=lambda one=one: saved.append(store.save(one))) for one in new]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join(10)
    return saved


def test_saves_in_parallel_never_evict_each_others_new_results(tmp_path, clock):
    """The ResultStore replica takes many saves at once: a save's limits landing after another save's insert
    must not delete that result, whose id its caller is about to get (they both return, and both are there)."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=3, clock=clock
    )
    for n in range(2):
        store.add_feedback(store.save(_new(f"labelled {n}".encode())), "yes")
    saved = _saved_at_once(store, [_new(f"new {n}".encode()) for n in range(2)])
    assert len(saved) == 2
    for result_id in saved:
        assert store.get(result_id).id == result_id
    assert store.count() == 3, "one labelled result made room for the two new ones"


def test_saves_at_once_at_an_owners_bound_leave_it_at_its_bound(tmp_path, clock):
    """Each save counted its owner's results without those whose saves were under way: two at once at the bound
    each found room, and the owner stayed past it (8 at once: 6 of 5), which no sweep corrects (a trial)."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results_per_owner=2, clock=clock
    )
    for n in range(2):
        store.save(replace(_new(f"old {n}".encode()), owner="team"))
    saved = _saved_at_once(store, [replace(_new(f"new {n}".encode()), owner="team") for n in range(2)])
    assert len(saved) == 2 and store.count(owner="team") == 2
    assert {r.id for r in store.queue(10, owner="team")} == set(saved), "the two new ones stay"


def test_a_save_given_up_while_its_insert_waits_on_a_locked_database_deletes_nothing_for_room(tmp_path):
    """A save given up (save_timeout_s) while another writer held the database inserted once the lock went, made
    room by deleting the owner's oldest result, a reviewed one here, then was deleted itself as nobody had its id:
    every late save cost one stored result (a trial)."""
    import sqlite3

    from serve.retention.keeper import LocalStoreClient

    database = tmp_path / "r.db"
    objects = LocalObjectStore(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{database}", objects, max_results_per_owner=2)
    client = LocalStoreClient(lambda: store)
    reviewed = [store.save(replace(_new(f"reviewed {n}".encode()), owner="team")) for n in range(2)]
    for result_id in reviewed:
        store.add_feedback(result_id, "yes", principal="reviewer")
    writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)

    async def given_up_while_locked():
        writer.execute("BEGIN EXCLUSIVE")
        threading.Timer(1.0, lambda: writer.execute("ROLLBACK")).start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.save(replace(_new(b"late"), owner="team")), 0.3)
        await asyncio.sleep(1.5)

    try:
        asyncio.run(given_up_while_locked())
        deadline = time.monotonic() + 5
        while len(_rows(store)) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(_rows(store)) == sorted(reviewed)
    finally:
        client.close()
        writer.close()


def test_a_save_given_up_as_its_insert_waited_is_rolled_back_never_seen_or_judged(tmp_path, clock):
    """Deleted after its commit, a save given up during its insert was in the review queue meanwhile (a verdict there
    went with it) and counted toward its owner's bound (another save then pushed out one result too many): a review.
    It is rolled back before its commit now."""
    from serve.retention.store import SaveGivenUp

    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), clock=clock)

    seen_by_a_reviewer = []

    class GivenUpDuringTheInsert(threading.Event):
        asked = 0

        def is_set(self):
            self.asked += 1
            if self.asked > 1:  # not before the insert; by the time the database's lock was this save's
                seen_by_a_reviewer.extend(result.id for result in store.queue(10))
            return self.asked > 1

    with pytest.raises(SaveGivenUp):
        store.save(_new(b"late"), GivenUpDuringTheInsert())
    assert seen_by_a_reviewer == [] and _rows(store) == [] and _files(tmp_path / "objects") == set()



def test_a_save_given_up_as_it_commits_makes_no_room_for_itself(tmp_path, clock):
    """Given up during a slow commit (PostgreSQL's synchronous standby, fsync), the save made room by the owner's
    bound, pushing out a reviewed result, and was deleted after by the keeper (a review)."""
    from sqlalchemy import event

    from serve.retention.store import SaveGivenUp

    objects = LocalObjectStore(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects, clock=clock, max_results_per_owner=2)
    reviewed = []
    for name in (b"one", b"two"):
        reviewed.append(store.save(replace(_new(name), owner="acme")))
        store.add_feedback(reviewed[-1], "yes", principal="reviewer")
        clock.advance(seconds=1)
    given_up = threading.Event()
    event.listen(store.engine, "commit", lambda connection: given_up.set())
    with pytest.raises(SaveGivenUp):
        store.save(replace(_new(b"three"), owner="acme"), given_up)
    assert sorted(_rows(store)) == sorted(reviewed)


def test_what_the_limits_delete_is_in_the_replica_log(tmp_path, clock, caplog):
    """The store logged under its module's name, whose INFO lines never reached the ResultStore replica's log: an
    operator could not see that results were pushed out (a trial)."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=1, clock=clock
    )
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        for n in range(2):
            store.save(_new(f"result {n}".encode()))
    assert [r.message for r in caplog.records if r.name == "ray.serve"] == ["retention limits: deleted 1 result(s)"]


def test_a_save_landing_during_another_saves_limits_is_never_the_one_they_delete(tmp_path):
    """The second interleaving (review of the fix above): save A inserts while save B's limits are selecting,
    after B took its snapshot of the saves in progress. B's limits must not pick A, whose id is on its way."""
    moments = iter(T0 + dt.timedelta(seconds=n) for n in range(1000))
    hook = {"armed": False, "calls": 0}
    saved_a: list[str] = []

    def clock() -> dt.datetime:
        if hook["armed"] and threading.current_thread() is threading.main_thread():
            hook["calls"] += 1  # B's first call stamps its row; the second is its limits' age cutoff
        if hook["armed"] and hook["calls"] == 2:
            hook["armed"] = False  # B's limits are selecting: A saves now
            threading.Thread(target=lambda: saved_a.append(store.save(_new(b"A")))).start()
            deadline = time.monotonic() + 1.0
            while store.count() < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
        return next(moments)

    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=2, max_age_days=365,
        clock=clock,
    )  # fmt: skip
    for n in range(2):
        store.add_feedback(store.save(_new(f"labelled {n}".encode())), "yes")
    hook["armed"] = True
    store.save(_new(b"B"))
    deadline = time.monotonic() + 10
    while not saved_a and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(saved_a) == 1 and store.get(saved_a[0]).id == saved_a[0], "A went while its save was in progress"
    assert store.count() == 2  # B itself may go after its save returned: A is newer, both unlabelled


def test_a_verdict_landing_after_the_limit_picked_its_result_as_unlabelled_keeps_it(tmp_path, clock):
    """The count limit picks the oldest unlabelled result, then deletes it: a verdict committed in between (201
    answered) once had its result deleted right after; now the delete re-checks, and the next save meets the limit."""
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'results.db'}", LocalObjectStore(tmp_path / "objects"), max_results=2, clock=clock
    )
    judged = store.save(_new(b"judged"))
    clock.advance(seconds=1)
    unjudged = store.save(_new(b"unjudged"))
    clock.advance(seconds=1)
    select = store._select

    def verdict_after_the_picks(*args):
        picks = select(*args)
        store.add_feedback(judged, "yes", "a human verdict")
        return picks

    store._select = verdict_after_the_picks
    newest = store.save(_new(b"newest"))
    store._select = select
    assert _rows(store) == [judged, unjudged, newest] and store.get(judged).label == "yes"
    clock.advance(seconds=1)
    latest = store.save(_new(b"next"))
    assert _rows(store) == [judged, latest], "the next save meets the limit with the unlabelled ones"


def test_the_sweeper_deletes_results_past_max_age_even_when_nothing_is_saved(tmp_path, clock):
    from serve.retention.keeper import LocalStoreClient

    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_age_days=7, clock=clock
    )
    store.save(_new(b"old"))
    clock.advance(days=5)
    recent = store.save(_new(b"recent"))
    clock.advance(days=3)
    client = LocalStoreClient(lambda: store)  # sweeps at once, not SWEEP_EVERY_S after its start
    left = {object_key(b) for b in (b"the photo", b"mask of recent", b"recent")}
    try:
        deadline = time.monotonic() + 5
        while (_rows(store), _files(tmp_path / "objects")) != ([recent], left) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _rows(store) == [recent] and _files(tmp_path / "objects") == left
        assert client.sweep() == 0
    finally:
        client.close()


def test_the_sweeper_enforces_max_results_a_failed_save_left_exceeded(tmp_path, clock, monkeypatch):
    """Each save's limits failing after its insert (a locked database) is logged, 'the next save or sweep enforces
    them': the sweeper enforced the age limit alone, and the store stayed past max_results."""
    from serve.retention.keeper import LocalStoreClient

    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_results=2, clock=clock
    )
    enforce = store.enforce_limits

    def locked(**_):
        raise OSError("database is locked")

    monkeypatch.setattr(store, "enforce_limits", locked)
    saved = []
    for n in range(5):
        saved.append(store.save(_new(b"result %d" % n)))
        clock.advance(seconds=1)
    monkeypatch.setattr(store, "enforce_limits", enforce)
    assert store.count() == 5
    client = LocalStoreClient(lambda: store)
    try:
        client.sweep()
    finally:
        client.close()
    assert _rows(store) == saved[-2:], "the newest two are kept"


def _rows(store: RetentionStore) -> list[str]:
    """Every row's id, expired or not (what the readers see hides the expired ones)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from serve.retention.db import ResultRow

    with Session(store.engine) as session:
        return list(session.scalars(select(ResultRow.id).order_by(ResultRow.created_at)))


def test_a_result_past_max_age_is_gone_for_readers_before_it_is_swept(tmp_path, clock):
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_age_days=7, clock=clock
    )
    old = store.save(_new(b"old"))
    store.add_feedback(old, "no")
    unlabelled = store.save(_new(b"unlabelled"))
    clock.advance(days=7, seconds=1)
    assert _rows(store) == [old, unlabelled], "not swept yet"
    for result_id in (old, unlabelled):
        for read in (store.get, lambda rid: store.read(rid, "source"), lambda rid: store.add_feedback(rid, "yes")):
            with pytest.raises(ResultNotFound):
                read(result_id)
    assert store.queue(10) == [] and store.count() == 0 and store.labelled() == []


def test_max_age_drops_old_results_labelled_or_not(tmp_path, clock):
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"), max_age_days=7, clock=clock
    )
    old = store.save(_new(b"old"))
    store.add_feedback(old, "yes")
    clock.advance(days=5)
    recent = store.save(_new(b"recent"))
    clock.advance(days=3)
    assert store.enforce_limits() == 1
    assert [r.id for r in store.queue(10)] == [recent] and store.count() == 1
    assert store.labelled() == []
    assert len(_files(tmp_path / "objects")) == 3


def test_queue_is_unlabelled_results_least_certain_first(store, clock):
    by_score = {}
    for score, threshold in [(0.9, 0.5), (0.52, 0.5), (None, 0.5), (0.2, 0.5), (0.45, 0.5), (0.75, 0.8)]:
        by_score[score] = store.save(_new(f"result {score}".encode(), score, threshold))
        clock.advance(seconds=1)
    store.add_feedback(by_score[0.45], "no")
    queue = store.queue(10)
    assert [r.score for r in queue] == [0.52, 0.75, 0.2, 0.9, None]  # |score - own threshold|, unscored last
    assert [round(r.uncertainty(), 2) for r in queue[:4]] == [0.02, 0.05, 0.3, 0.4]
    assert [r.score for r in store.queue(2)] == [0.52, 0.75]
    assert [r.score for r in store.queue(10, threshold=0.9)] == [0.9, 0.75, 0.52, 0.2, None]
    assert store.count(labelled=False) == 5 and store.count(labelled=True) == 1


def test_results_belong_to_their_owner_in_the_queue_counts_and_every_lookup(tmp_path, store):
    from serve.auth import StoredKey, result_owner, visible_owner
    from serve.config import RetentionSettings
    from serve.problems import Problem
    from serve.retention.keeper import FeedbackBody, LocalStoreClient, Retention

    alice = StoredKey(name="alice", sha256="0" * 64, scopes=["remove", "feedback"])
    dave = StoredKey(name="dave", team="studio", sha256="1" * 64, scopes=["feedback"])
    reviewer = StoredKey(name="rev", sha256="2" * 64, scopes=["feedback", "review"])
    assert (result_owner(alice), result_owner(dave), result_owner(None)) == ("alice", "studio", None)
    assert (visible_owner(alice), visible_owner(reviewer), visible_owner(None)) == ("alice", None, None)

    mine = store.save(replace(_new(b"a"), owner="alice"))
    theirs = store.save(replace(_new(b"b"), owner="studio"))
    store.save(_new(b"c"))  # kept while auth was off: nobody's
    assert [r.id for r in store.queue(10, owner="alice")] == [mine]
    assert store.count(labelled=False, owner="studio") == 1 and store.count(labelled=False) == 3
    assert store.get(mine).owner == "alice"

    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)})
    retention = Retention(settings, metrics=None, store=LocalStoreClient(lambda: store))

    async def as_alice():
        assert (await retention.get(mine, "alice")).id == mine
        for call in (
            retention.get(theirs, "alice"),
            retention.image(theirs, "source", "alice"),
            retention.feedback(FeedbackBody(result_id=theirs, verdict="no"), "alice"),
        ):
            with pytest.raises(Problem) as caught:
                await call
            assert caught.value.problem == "not-found" and theirs not in str(await retention.queue(20, None, "alice"))
        assert (await retention.get(theirs, None)).id == theirs  # a reviewer / admin, or auth off

    asyncio.run(as_alice())
    assert store.get(theirs).label is None, "a refused verdict is not stored"


def test_a_relabel_is_appended_and_the_newest_verdict_is_the_label(store, clock):
    result_id = store.save(_new(b"r"))
    store.add_feedback(result_id, "yes", "looks clean", "ann")
    clock.advance(minutes=1)
    stored = store.add_feedback(result_id, "no", "shadow left")
    assert stored.label == "no" and stored.labelled_at == T0 + dt.timedelta(minutes=1)
    assert [(f.verdict, f.reason, f.labeller) for f in stored.feedback] == [
        ("yes", "looks clean", "ann"),
        ("no", "shadow left", None),
    ]
    assert [r.label for r in store.labelled()] == ["no"]
    assert store.labelled(since=T0 + dt.timedelta(minutes=2)) == []
    with pytest.raises(ResultNotFound):
        store.add_feedback("0" * 32, "yes")
    with pytest.raises(ValueError, match="verdict"):
        store.add_feedback(result_id, "maybe")


def test_a_verdict_racing_the_results_deletion_is_not_found(store):
    from sqlalchemy import event

    result_id = store.save(_new(b"result"))

    @event.listens_for(store.engine, "before_cursor_execute")
    def delete_in_between(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO feedback"):
            deleting = threading.Thread(target=store.delete, args=(result_id,))
            deleting.start()
            deleting.join()

    with pytest.raises(ResultNotFound):
        store.add_feedback(result_id, "yes")


def test_deleting_a_result_locks_it_before_its_verdicts_and_takes_them_with_it(store):
    """PostgreSQL: a verdict locks its result (its insert's foreign-key check) and then the key's older verdicts
    (the trim past MAX_VERDICTS); a delete that deleted the verdicts first and then the result locked the other
    way round, so a verdict racing a delete (DELETE /results, an eviction, the sweeper) deadlocked and one of
    them failed. The result row is now the first a delete touches, its verdicts going with it (the cascade)."""
    from sqlalchemy import event, text

    result_id = store.save(_new(b"judged"))
    other = store.save(_new(b"other"))
    for verdict in ("yes", "no"):
        store.add_feedback(result_id, verdict, principal="tenant")
    store.add_feedback(other, "yes")
    deleted_from = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):
        if statement.startswith("DELETE FROM"):
            deleted_from.append(statement.split()[2])

    assert store.delete(result_id)
    assert deleted_from[:1] == ["results"], f"a delete locked {deleted_from[0]} first"
    with store.engine.connect() as connection:
        verdicts = connection.execute(text("SELECT result_id FROM feedback")).scalars().all()
    assert verdicts == [other], "the deleted result's verdicts are gone, another's stay"


def test_a_result_keeps_its_newest_verdicts_only(store, clock):
    """Each answer carries the history: an unbounded one grew every answer (1,500 verdicts: 1.9 MB each)."""
    result_id = store.save(_new(b"r"))
    other = store.save(_new(b"other"))
    store.add_feedback(other, "yes", "kept")
    for n in range(MAX_VERDICTS + 5):
        clock.advance(seconds=1)
        stored = store.add_feedback(result_id, "no" if n % 2 else "yes", f"verdict {n}")
    assert [f.reason for f in stored.feedback] == [f"verdict {n}" for n in range(5, MAX_VERDICTS + 5)]
    assert stored.label == ("no" if (MAX_VERDICTS + 4) % 2 else "yes")
    assert [f.reason for f in store.get(other).feedback] == ["kept"], "another result's verdicts stay"


def test_a_keys_verdicts_never_push_out_another_keys(tmp_path):
    """The newest MAX_VERDICTS are kept per key (and those without one): a tenant judging its own result again
    and again deletes only its own older verdicts, never the reviewer's that export --labelled-by needs."""
    from training.cli import main

    store, ids = _labelled_store(tmp_path)
    result_id = ids["unlabelled"]
    store.add_feedback(result_id, "yes", "the reviewer's", principal="reviewer")
    for n in range(MAX_VERDICTS + 5):
        store.add_feedback(result_id, "no", f"tenant {n}", principal="tenant")
    for n in range(MAX_VERDICTS + 2):
        stored = store.add_feedback(result_id, "no", f"anonymous {n}")
    assert [f.reason for f in stored.feedback] == [
        "the reviewer's",
        *(f"tenant {n}" for n in range(5, MAX_VERDICTS + 5)),
        *(f"anonymous {n}" for n in range(2, MAX_VERDICTS + 2)),
    ], "each key's newest MAX_VERDICTS, oldest first; the reviewer's one stays"
    assert stored.label == "no" and stored.feedback[-1].principal is None, "the newest verdict is still the label"
    assert [f.reason for f in store.get(ids["bad"]).feedback] == ["grey box"], "another result's verdicts stay"

    out = tmp_path / "labels"
    args = ["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(out), "--labelled-by", "reviewer"]
    assert main(args) == 0
    items = json.loads((out / "summary.json").read_text())["metrics"]["items"]
    assert [(i["result_id"], i["verdict"], i["principal"]) for i in items] == [(result_id, "yes", "reviewer")]


def test_the_retention_folder_and_its_database_are_created_owner_only(tmp_path):
    """Under the usual umask (022) only objects/ was 0700: the retention folder and results.db (verdicts,
    reasons, owners, request parameters) were readable by every local user."""
    import stat

    from serve.config import RetentionSettings

    folder = tmp_path / "cache" / "rorem" / "results"
    umask = os.umask(0o022)
    try:
        store = RetentionStore.from_settings(RetentionSettings(enabled=True, object_store={"path": str(folder)}))
        store.add_feedback(store.save(_new(b"result")), "yes", "reason")
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (folder, *folder.iterdir())}
    assert {"results", "objects", "results.db"} <= modes.keys()
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o700 if "." not in name else 0o600)}
    assert wrong == {}, "folders 0700, the database and its -wal, -shm and lock files 0600"


def test_migrations_create_exactly_the_schema_the_models_describe(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    from serve.retention.db import MIGRATIONS, Base, alembic_config, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'fresh' / 'results.db'}")
    migrate(engine)
    migrate(engine)  # a second start finds the schema current
    assert {"results", "feedback", "alembic_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []
    assert not (MIGRATIONS.parent / "alembic.ini").exists(), "the runtime builds alembic's config in code"


class FakeS3:
    """The calls S3ObjectStore makes, over a dict."""

    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}
        self.modified: dict[str, float] = {}
        self.heads = 0

    def put_object(self, Bucket, Key, Body, IfNoneMatch=None):
        if IfNoneMatch == "*" and (Bucket, Key) in self.objects:
            raise _PreconditionFailed()
        self.objects[Bucket, Key] = Body
        self.modified[Key] = time.time()

    def get_paginator(self, name):
        assert name == "list_objects_v2"
        fake = self

        class Pages:
            def paginate(self, Bucket, Prefix):
                listed = [key for key in fake.modified if key.startswith(Prefix)]
                at = {key: dt.datetime.fromtimestamp(fake.modified[key], dt.timezone.utc) for key in listed}
                yield {"Contents": [{"Key": key, "LastModified": at[key]} for key in listed]}

        return Pages()

    def get_object(self, Bucket, Key):
        if (Bucket, Key) not in self.objects:
            raise _NotFound()
        return {"Body": io.BytesIO(self.objects[Bucket, Key])}

    def head_object(self, Bucket, Key):
        self.heads += 1
        if (Bucket, Key) not in self.objects:
            raise _NotFound()
        return {}

    def delete_object(self, Bucket, Key):
        self.objects.pop((Bucket, Key), None)


class _NotFound(Exception):
    response: ClassVar[dict] = {"Error": {"Code": "404"}}


class _PreconditionFailed(Exception):
    response: ClassVar[dict] = {"Error": {"Code": "PreconditionFailed"}}


def test_s3_store_uses_the_content_address_under_its_prefix():
    client = FakeS3()
    objects = S3ObjectStore("bucket", prefix="/rorem/results/", client=client)
    key = objects.put(b"bytes")
    assert objects.put(b"bytes") == key and len(client.objects) == 1
    digest = object_key(b"bytes").replace("/", "")
    assert list(client.objects) == [("bucket", f"rorem/results/{digest[:2]}/{digest[2:]}")]
    assert objects.get(key) == b"bytes" and objects.exists(key)
    objects.delete(key)
    assert not objects.exists(key)
    with pytest.raises(ObjectMissing):
        objects.get(key)
    with pytest.raises(ValueError, match="not an object key"):
        objects.get("../../etc/passwd")


def test_a_save_on_s3_asks_once_whether_each_object_is_there(tmp_path):
    """save checks `exists` before writing, and S3ObjectStore.put checked again: two HEAD requests an object."""
    client = FakeS3()
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", S3ObjectStore("bucket", prefix="r", client=client))
    kept = store.save(_new(b"first"))
    assert client.heads == 3 and len(client.objects) == 3 + 1, "3 objects, and the store's marker"
    assert store.read(kept, "result") == (b"first", "image/png")


def test_s3_store_without_boto3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(RuntimeError, match="pip install boto3"):
        S3ObjectStore("bucket")


def test_retain_is_refused_where_retention_is_off_and_defaults_follow_the_config(tmp_path):
    from serve.config import RetentionSettings
    from serve.problems import Problem
    from serve.retention.keeper import Retention

    off = Retention(RetentionSettings(), metrics=None)
    assert off.wanted(None) is False and off.wanted(False) is False
    with pytest.raises(Problem) as refused:
        off.wanted(True)
    assert refused.value.problem == "retention-disabled" and refused.value.status == 422
    with pytest.raises(Problem) as missing:
        off.require_enabled()
    assert missing.value.status == 404 and "retention.enabled" in missing.value.detail
    # the documented 404 comes before a check of what was asked (a queue's limit, an image's kind): it was a 422
    for asked in (off.queue(0, None), off.image("x", "thumbnail")):
        with pytest.raises(Problem) as missing:
            asyncio.run(asked)
        assert missing.value.status == 404 and "retention.enabled" in missing.value.detail

    path = {"path": str(tmp_path / "kept")}
    opt_in = Retention(RetentionSettings(enabled=True, object_store=path), metrics=None)
    assert opt_in.wanted(None) is False and opt_in.wanted(True) is True
    every = Retention(RetentionSettings(enabled=True, default_retain=True, object_store=path), metrics=None)
    assert every.wanted(None) is True and every.wanted(False) is False


def test_a_verdict_where_retention_is_off_is_the_documented_404_whatever_its_body():
    """api.md: the feedback routes answer 404 unless retention is on; an invalid verdict got a 422 first."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from serve.app import Ingress
    from serve.config import IngressArgs, RetentionSettings
    from serve.problems import Problem
    from serve.retention.keeper import Retention

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    request = Request({"type": "http", "method": "POST", "path": "/feedback", "headers": headers}, receive)
    ingress = SimpleNamespace(
        settings=IngressArgs(), service=SimpleNamespace(retention=Retention(RetentionSettings(), metrics=None))
    )
    with pytest.raises(Problem) as missing:
        asyncio.run(Ingress.func_or_class.feedback(ingress, request))
    assert missing.value.status == 404 and "retention.enabled" in missing.value.detail


def test_a_verdict_with_a_nul_character_is_bad_input_not_a_store_failure():
    """PostgreSQL text cannot hold NUL: without the check the driver failed it as a 503 the client would retry."""
    from serve.problems import Problem
    from serve.protocol import validate
    from serve.retention.keeper import FeedbackBody

    fine = {"result_id": "a" * 32, "verdict": "no", "reason": "shadow left", "labeller": "ana"}
    assert validate(FeedbackBody, fine).reason == "shadow left"
    for field in ("reason", "labeller"):
        with pytest.raises(Problem) as refused:
            validate(FeedbackBody, {**fine, field: "shadow\x00left"})
        assert refused.value.status == 422 and refused.value.problem == "invalid-request"
        assert field in refused.value.detail and "NUL" in refused.value.detail


def test_a_full_disk_is_told_as_one():
    """A store on a full disk (SQLite's or PostgreSQL's error, or the image's write) was told as "could not be reached
    or refused the operation" (a trial)."""
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from serve.retention.keeper import store_failure

    database = sqlite3.connect(":memory:")
    database.execute("CREATE TABLE t (x)")
    database.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as full:
        database.executemany("INSERT INTO t VALUES (?)", [("x" * 4096,)] * 10)
    said = "its disk is full (an operator frees space there, or lowers retention.max_results)"
    assert store_failure(OperationalError("INSERT", {}, full.value)) == said
    assert store_failure(OSError(errno.ENOSPC, "No space left on device")) == said
    locked = sqlite3.OperationalError("database is locked")
    assert store_failure(OperationalError("INSERT", {}, locked)).startswith("its database could not be reached")


def test_a_store_failure_answers_the_removal_without_a_result_id(tmp_path):
    from engines.gate import GatePolicy
    from serve.config import RetentionSettings
    from serve.protocol import RemoveOptions
    from serve.retention.keeper import Retention
    from serve.service import RemovalResult

    class Counted:
        def __init__(self):
            self.outcomes = []

        def inc(self, tags):
            self.outcomes.append(tags["outcome"])

    metrics = type("Metrics", (), {"retained": Counted()})()
    retention = Retention(RetentionSettings(enabled=True, object_store={"path": str(tmp_path)}), metrics)
    reply = RemovalResult(b"png bytes", "png", 3, [256], 1, 0.4, 1, "failed")
    mask = np.zeros((3, 4), bool)
    policy = GatePolicy("annotate", 0.5, 1, True)
    kept = asyncio.run(retention.keep(b"photo", "png", mask, reply, policy, RemoveOptions(), 20))
    assert kept is not None and retention.store.opened().get(kept).params["gate"] == "annotate"

    def broken(new):
        raise OSError("disk full")

    retention.store.opened().save = broken
    assert asyncio.run(retention.keep(b"photo", "png", mask, reply, policy, RemoveOptions(), 20)) is None
    assert metrics.retained.outcomes == ["stored", "failed"]


class _Counted:
    def __init__(self):
        self.tags = []

    def inc(self, tags):
        self.tags.append(tags)


class _Metrics:
    def __init__(self):
        self.retained, self.feedback = _Counted(), _Counted()


def _keep(retention, result: bytes = b"png bytes", owner: str | None = None, deadline_s: float | None = None):
    from engines.gate import GatePolicy
    from serve.protocol import RemoveOptions
    from serve.service import RemovalResult

    reply = RemovalResult(result, "png", 3, [256], 1, 0.4, 1, "failed")
    policy = GatePolicy("annotate", 0.5, 1, True)
    return retention.keep(b"photo", "png", np.zeros((3, 4), bool), reply, policy, RemoveOptions(), 20, owner, deadline_s)


def _sweepers() -> set:
    import threading

    return {t for t in threading.enumerate() if t.name == "retention-limits" and t.is_alive()}


def test_ingress_replicas_sharing_one_store_client_migrate_once_and_run_one_sweeper(tmp_path, monkeypatch):
    from serve.config import RetentionSettings
    from serve.retention import store as store_module
    from serve.retention.keeper import LocalStoreClient, Retention

    migrated = []
    migrate = store_module.migrate
    monkeypatch.setattr(store_module, "migrate", lambda engine: migrated.append(engine) or migrate(engine))
    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)})
    before = _sweepers()
    shared = LocalStoreClient.from_settings(settings)
    first, second = Retention(settings, _Metrics(), shared), Retention(settings, _Metrics(), shared)

    async def each_sees_the_others_results():
        kept = [await _keep(first, b"one"), await _keep(second, b"two")]
        assert [(await second.get(kept[0])).id, (await first.get(kept[1])).id] == kept
        assert (await first.queue(10, None))[1] == 2

    asyncio.run(each_sees_the_others_results())
    assert len(migrated) == 1 and _sweepers() - before == {shared.sweeper}
    shared.close()
    shared.sweeper.join(timeout=5)
    assert not shared.sweeper.is_alive()

    own = Retention(settings, _Metrics())  # no shared client: this replica opens (and migrates) its own
    assert len(migrated) == 2 and own.store is not shared
    own.store.close()


def test_a_save_whose_limit_enforcement_fails_after_its_insert_is_stored_and_answered_with_its_id(tmp_path):
    """The row is in before the limits are enforced: their failing (an object delete the bucket refuses) once
    answered the removal without X-Result-Id and counted it failed, while its result stayed stored."""
    from serve.config import RetentionSettings
    from serve.retention.keeper import LocalStoreClient, Retention

    class RefusedDeletes(LocalObjectStore):
        def delete(self, key):
            raise OSError("bucket: 503 SlowDown")

    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'results.db'}", RefusedDeletes(tmp_path / "objects"), max_results=1
    )
    client = LocalStoreClient(lambda: store)
    metrics = _Metrics()
    retention = Retention(RetentionSettings(enabled=True, object_store={"path": str(tmp_path)}), metrics, client)
    try:
        kept = [asyncio.run(_keep(retention, result)) for result in (b"one", b"two")]
    finally:
        client.close()
    assert None not in kept and [tags["outcome"] for tags in metrics.retained.tags] == ["stored", "stored"]
    assert store.get(kept[1]).id == kept[1]


class _Response:
    def __init__(self, method, args, kwargs):
        self.method, self.args, self.kwargs = method, args, kwargs
        self.cancelled = False

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self):
        import pickle

        from ray.exceptions import RayTaskError

        args, kwargs = pickle.loads(pickle.dumps((self.args, self.kwargs)))
        try:
            answer = await self.method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a replica's every error comes back this way
            raise RayTaskError(self.method.__name__, "remote traceback", exc).as_instanceof_cause() from None
        return pickle.loads(pickle.dumps(answer))

    def cancel(self):
        self.cancelled = True


class _Handle:
    """What Serve does between HandleStoreClient and a ResultStore replica: arguments and answers are
    pickled, and an error comes back as Ray's RayTaskError subclassing the error's class (its args differ)."""

    def __init__(self, replica):
        self.replica = replica
        self.responses = []

    def __getattr__(self, name):
        method, responses = getattr(self.replica, name), self.responses

        class Method:
            def remote(self, *args, **kwargs):
                responses.append(_Response(method, args, kwargs))
                return responses[-1]

        return Method()


def _result_store(settings: dict):
    from serve.retention_deployment import ResultStore

    return ResultStore.func_or_class(settings)


def test_retention_through_the_result_store_deployment_answers_as_in_process(tmp_path):
    from serve.config import RetentionSettings
    from serve.problems import Problem
    from serve.retention.keeper import FeedbackBody, Retention
    from serve.retention_deployment import HandleStoreClient

    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)})
    replica = _result_store(settings.model_dump(mode="json"))
    metrics, handle = _Metrics(), _Handle(replica)
    retention = Retention(settings, metrics, HandleStoreClient(handle))

    async def through_the_handle():
        mine, theirs = await _keep(retention, b"mine", "alice"), await _keep(retention, b"theirs", "bob")
        assert (await retention.get(mine, "alice")).owner == "alice"
        assert await retention.image(mine, "result", "alice") == (b"mine", "image/png")
        stored = await retention.feedback(FeedbackBody(result_id=mine, verdict="yes", reason=" ok "), "alice")
        assert stored.label == "yes" and stored.feedback[0].reason == "ok"
        items, unlabelled = await retention.queue(10, None)
        assert [r.id for r in items] == [theirs] and unlabelled == 1
        for call in (retention.get(theirs, "alice"), retention.image(theirs, "source", "alice")):
            with pytest.raises(Problem) as hidden:
                await call
            assert hidden.value.problem == "not-found" and hidden.value.detail == (
                f"no retained result {theirs!r} (never kept, deleted, or expired)"
            )
        (tmp_path / "objects" / object_key(b"theirs")).unlink()
        with pytest.raises(Problem, match="no longer stored"):
            await retention.image(theirs, "result")
        await retention.delete(mine)
        with pytest.raises(Problem) as gone:
            await retention.delete(mine)
        assert gone.value.problem == "not-found"

    asyncio.run(through_the_handle())
    assert {r.args[0] for r in handle.responses} == {"save", "get", "read", "add_feedback", "queue", "delete"}
    assert {r.method.__name__ for r in handle.responses} == {"operation"}
    assert [t["outcome"] for t in metrics.retained.tags] == ["stored", "stored"]
    assert metrics.feedback.tags == [{"verdict": "yes"}]
    replica.close()


def test_a_result_the_store_does_not_find_is_an_answer_of_the_replica_not_its_error(tmp_path):
    """Raised in the ResultStore replica, every 404 of the result routes (an unknown, expired or another owner's id,
    any key with the feedback scope may ask) was a Ray ERROR with a ~40-line traceback in the replica's log and a count
    in ray_serve_deployment_error_counter_total. The replica answers a miss; the ingress raises it as before."""
    from serve.config import RetentionSettings
    from serve.retention_deployment import Missing

    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)})
    replica = _result_store(settings.model_dump(mode="json"))

    async def misses():
        unknown = "0" * 32
        return [await replica.operation("get", unknown), await replica.operation("read", "nope", "source"),
                await replica.operation("add_feedback", unknown, "yes", None, None)]  # fmt: skip

    answers = asyncio.run(misses())
    replica.close()
    assert [type(answer) for answer in answers] == [Missing] * 3
    assert isinstance(answers[0].raised(), ResultNotFound)


def test_a_store_failing_every_save_is_logged_once_a_while_and_counted_each_time(tmp_path, monkeypatch):
    """A store that is down fails every removal's save: a traceback per request buried the log."""
    from types import SimpleNamespace

    from serve.config import RetentionSettings
    from serve.retention import keeper

    async def save(new):
        raise OSError("the disk is gone")

    logged = []
    monkeypatch.setattr(keeper, "logger", SimpleNamespace(exception=lambda *args: logged.append(args[0] % args[1:])))
    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)})
    retention = keeper.Retention(settings, metrics := _Metrics(), SimpleNamespace(save=save))
    assert [asyncio.run(_keep(retention)) for _ in range(3)] == [None] * 3
    assert metrics.retained.tags == [{"outcome": "failed"}] * 3
    assert len(logged) == 1 and "could not be stored" in logged[0]


def test_a_result_store_that_cannot_open_stays_healthy_and_removals_go_on(tmp_path, monkeypatch):
    from serve.config import RetentionSettings
    from serve.problems import Problem
    from serve.retention import keeper
    from serve.retention.keeper import Retention
    from serve.retention_deployment import HandleStoreClient

    (tmp_path / "db").write_text("a file where the database's folder should be")
    settings = RetentionSettings(
        enabled=True, object_store={"path": str(tmp_path)}, database_url=f"sqlite:///{tmp_path / 'db' / 'r.db'}"
    )
    replica = _result_store(settings.model_dump(mode="json"))
    replica.check_health()  # the database being down is no reason to replace the replica
    metrics = _Metrics()
    retention = Retention(settings, metrics, HandleStoreClient(_Handle(replica)))
    assert asyncio.run(_keep(retention)) is None and metrics.retained.tags == [{"outcome": "failed"}]
    with pytest.raises(Problem) as down:
        asyncio.run(retention.get("a" * 32))
    assert down.value.problem == "retention-unavailable" and down.value.headers == {"Retry-After": "30"}
    assert down.value.detail == (
        "the result store failed: it could not be opened (a file, folder or bucket could not be used (File exists)) "
        "and is tried again within 30 s; the service's log says more"
    ), "in words, not Ray's class name RayTaskError(StoreUnavailable)"

    (tmp_path / "db").unlink()
    monkeypatch.setattr(keeper, "REOPEN_AFTER_S", 0.0)
    assert asyncio.run(_keep(retention)) is not None, "the store is opened again on a later call"

    slow = _Handle(replica)
    replica_save = replica.save

    async def stuck(new):
        await asyncio.sleep(10)
        return await replica_save(new)

    replica.save = stuck
    assert asyncio.run(_keep(Retention(settings, metrics, HandleStoreClient(slow, timeout_s=0.05)))) is None
    assert slow.responses[-1].cancelled, "a store call given up on is cancelled in Serve"

    replica.close()
    replica.sweeper.join(timeout=5)
    with pytest.raises(RuntimeError, match="sweeper"):
        replica.check_health()


# ---------------------------------------------------------------- export-labels


def _jpeg_turned_on_its_side(rgb: np.ndarray) -> bytes:
    """A JPEG stored rotated, with EXIF orientation 6 saying how to show it upright (as phones do)."""
    stored = Image.fromarray(np.rot90(rgb, k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _labelled_store(tmp_path) -> tuple[RetentionStore, dict[str, str]]:
    upright = photo(64, 96)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'kept' / 'results.db'}", LocalObjectStore(tmp_path / "kept" / "objects")
    )
    ids = {}
    for name, source, media_type in [
        ("good", png_bytes(upright), "image/png"),
        ("bad", png_bytes(upright), "image/png"),
        ("phone", _jpeg_turned_on_its_side(upright), "image/jpeg"),
        ("unlabelled", png_bytes(upright), "image/png"),
    ]:
        edited = upright.copy()
        edited[20:40, 30:60] = {"good": 128, "bad": 0, "phone": 140, "unlabelled": 90}[name]
        new = NewResult(
            source, png_bytes(mask), png_bytes(edited), media_type, "image/png", 96, 64, 0.5, 0.5, "passed", 1, 256
        )
        ids[name] = store.save(new)
    store.add_feedback(ids["good"], "no")
    store.add_feedback(ids["good"], "yes", "relabelled after a second look")
    store.add_feedback(ids["bad"], "no", "grey box")
    store.add_feedback(ids["phone"], "yes")
    return store, ids


def test_export_labels_writes_the_set_the_discriminator_loader_reads(tmp_path):
    from training.cli import main
    from training.data import TripletDataset, load_metadata
    from training.discriminator import split_by_source

    store, ids = _labelled_store(tmp_path)
    out = tmp_path / "labels"
    assert main(["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(out), "--min-count", "3"]) == 0

    raw = json.loads((out / "metadata.json").read_text())
    assert all(set(entry) == {"source", "mask", "GT", "score", "group"} for entry in raw)
    records = load_metadata(out / "metadata.json", require=("source", "mask", "GT", "score"))
    summary = json.loads((out / "summary.json").read_text())
    by_gt = {record.gt.name: record for record in records}
    by_id = {item["result_id"]: by_gt[Path(item["GT"][0]).name] for item in summary["metrics"]["items"]}
    assert set(by_id) == {ids["good"], ids["bad"], ids["phone"]}, "unlabelled results are not exported"
    assert by_id[ids["good"]].score == 1.0 and by_id[ids["bad"]].score == 0.0 and by_id[ids["phone"]].score == 1.0
    assert summary["metrics"]["positives"] == 2 and summary["metrics"]["negatives"] == 1
    assert summary["metrics"]["items"][0]["reason"] == "relabelled after a second look"

    phone = np.asarray(Image.open(by_id[ids["phone"]].source))
    assert phone.shape == (512, 512, 3), "the window the Scorer sees, at its bucket (the service's default 512)"
    assert by_id[ids["phone"]].mask == by_id[ids["good"]].mask, "the EXIF orientation is applied: the same window"
    assert by_id[ids["good"]].source == by_id[ids["bad"]].source, "one photo, one source file"
    assert by_id[ids["good"]].group == by_id[ids["bad"]].group != by_id[ids["phone"]].group
    train, held_out = split_by_source(records, 0.5, seed=0)
    assert {r.group for r in train}.isdisjoint({r.group for r in held_out})
    item = TripletDataset(records, 64)[0]
    assert item["gt"].shape == (3, 64, 64) and item["score"].item() in (0.0, 1.0)

    store.delete(ids["bad"])
    assert main(["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(out)]) == 0
    assert len(load_metadata(out / "metadata.json")) == 2
    assert len(list((out / "edited").iterdir())) == 2, "a deleted result's files leave the export too"


def test_export_labels_labelled_by_keeps_only_the_named_keys_verdicts_and_says_whose_it_exported(tmp_path, capsys):
    """A tenant's key may label its own results "yes" and call itself anyone (labeller): --labelled-by keeps the
    verdicts of the named keys only, whatever came after them, and never a verdict without a key."""
    from training.cli import main

    store, ids = _labelled_store(tmp_path)  # good, bad, phone: verdicts without a principal (auth off)
    store.add_feedback(ids["good"], "no", labeller="qa-staff", principal="tenant")
    store.add_feedback(ids["bad"], "no", "grey box", principal="reviewer")
    store.add_feedback(ids["phone"], "yes", principal="ops")
    store.add_feedback(ids["phone"], "no", labeller="ops", principal="tenant")
    store.add_feedback(ids["unlabelled"], "yes", labeller="qa-staff", principal="tenant")
    kept, out = tmp_path / "kept", tmp_path / "labels"

    assert main(["export-labels", "--objects", str(kept), "--out", str(out), "--labelled-by", "ops, reviewer"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    items = {item["result_id"]: item for item in summary["metrics"]["items"]}
    assert {rid: (i["verdict"], i["principal"]) for rid, i in items.items()} == {
        ids["bad"]: ("no", "reviewer"),
        ids["phone"]: ("yes", "ops"),
    }, "the tenant's later verdict neither overrides nor hides ops'; unattributed and tenant-only results are out"
    assert summary["config"]["labelled_by"] == summary["metrics"]["labelled_by"] == ["ops", "reviewer"]
    assert summary["metrics"]["principals"] == {"ops": 1, "reviewer": 1}
    assert len(json.loads((out / "metadata.json").read_text())) == 2

    assert main(["export-labels", "--objects", str(kept), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metrics"]["items"]) == 4, "without the filter every newest verdict is exported, as before"
    assert summary["metrics"]["labelled_by"] is None
    assert summary["metrics"]["principals"] == {"reviewer": 1, "tenant": 3}

    assert main(["export-labels", "--objects", str(kept), "--out", str(out), "--labelled-by", " , "]) == 2
    assert "labelled_by: List should have at least 1 item" in capsys.readouterr().err, "not read as no filter"


def test_export_labels_refuses_a_store_that_is_not_there_and_creates_none(tmp_path, capsys):
    """A mistyped --objects path was made into a new, empty store (folders, results.db, migrations), and the
    export said "0 labelled results"."""
    from training.cli import main

    typo = tmp_path / "reslts"
    assert main(["export-labels", "--objects", str(typo), "--out", str(tmp_path / "labels")]) == 1
    assert f"no retention objects folder {typo / 'objects'}" in capsys.readouterr().err
    assert not typo.exists()

    (typo / "objects").mkdir(parents=True)
    assert main(["export-labels", "--objects", str(typo), "--out", str(tmp_path / "labels")]) == 1
    assert f"no retention database {typo / 'results.db'}" in capsys.readouterr().err
    assert sorted(typo.rglob("*")) == [typo / "objects"]


def test_export_labels_never_migrates_the_services_database(tmp_path, capsys):
    """An export from a newer checkout upgraded the production schema under the running service."""
    from sqlalchemy import text

    from serve.retention.db import make_engine
    from training.cli import main

    _labelled_store(tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'kept' / 'results.db'}")
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0003'"))
        connection.execute(text("DROP TABLE store_id"))
    assert main(["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(tmp_path / "labels")]) == 1
    assert "is at schema revision 0003" in capsys.readouterr().err
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"


def test_export_labels_refuses_too_few_labels(tmp_path, capsys):
    from training.cli import main

    _labelled_store(tmp_path)
    config = tmp_path / "serve.yaml"
    config.write_text(
        json.dumps({"applications": [{"args": {"retention": {"object_store": {"path": str(tmp_path / "kept")}}}}]})
    )
    args = ["export-labels", "--serve-config", str(config), "--out", str(tmp_path / "o"), "--min-count", "10"]
    assert main(args) == 1
    assert "3 labelled result(s) in the store, fewer than min_count 10" in capsys.readouterr().err
    assert main(["export-labels", "--out", str(tmp_path / "o")]) == 2
    assert "either serve_config or objects" in capsys.readouterr().err


def test_metrics_label_result_routes_by_template_never_by_id():
    from fastapi.testclient import TestClient

    import serve.app  # noqa: F401 (its Ingress class registers the routes on the api)
    from serve.rest_api import _route_label, api

    labels = {}

    @api.middleware("http")
    async def record(request, call_next):
        try:  # outside a replica the endpoints fail (no Serve context) after routing; the label is known by then
            return await call_next(request)
        finally:
            labels[request.url.path] = _route_label(request.scope)

    api.middleware_stack = None  # rebuilt with the recording middleware; removed again below
    try:
        client = TestClient(api, root_path="/api/v1", raise_server_exceptions=False)
        for path in ("/results/" + "a" * 32, "/results/" + "a" * 32 + "/mask", "/results/x/y/z", "/annotation/queue"):
            client.get(path)
    finally:
        api.user_middleware.pop(0)
        api.middleware_stack = None
    assert {path.removeprefix("/api/v1"): label for path, label in labels.items()} == {
        "/results/" + "a" * 32: "/results/{id}",
        "/results/" + "a" * 32 + "/mask": "/results/{id}/{kind}",
        "/results/x/y/z": "other",
        "/annotation/queue": "/annotation/queue",
    }


def test_export_labels_exports_same_content_once_and_drops_conflicting_verdicts(tmp_path):
    """The service is deterministic and the store keeps one object per content: two results of the same
    photo, mask and seed are one example. Judged 'yes' and 'no', its label is unknown; judged 'yes' twice,
    it is one positive, not two."""
    from training.export_labels import ExportLabelsSettings, export_labels

    upright = photo(64, 96)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'kept' / 'results.db'}", LocalObjectStore(tmp_path / "kept" / "objects")
    )

    def save(fill: int) -> str:
        edited = upright.copy()
        edited[20:40, 30:60] = fill
        new = NewResult(
            png_bytes(upright), png_bytes(mask), png_bytes(edited), "image/png", "image/png", 96, 64, 0.5, 0.5,
            "passed", 1, 256,
        )  # fmt: skip
        return store.save(new)

    judged_both, judged_no = save(128), save(128)
    twice_yes = [save(60), save(60)]
    store.add_feedback(judged_both, "yes", labeller="alice")
    store.add_feedback(judged_no, "no", labeller="bob")
    for result_id in twice_yes:
        store.add_feedback(result_id, "yes")
    single = save(200)
    store.add_feedback(single, "no")

    result = export_labels(ExportLabelsSettings(objects=tmp_path / "kept", out=tmp_path / "labels"))
    metrics = result["metrics"]
    assert metrics["exported"] == 2 and metrics["positives"] == 1 and metrics["negatives"] == 1
    assert metrics["conflicting"] == [{"result_ids": [judged_both, judged_no], "verdicts": ["yes", "no"]}]
    assert metrics["duplicates"] == 1
    entries = json.loads((tmp_path / "labels" / "metadata.json").read_text())
    assert len(entries) == 2 and len({entry["GT"] for entry in entries}) == 2
    exported = {item["result_id"]: item for item in metrics["items"]}
    kept = next(result_id for result_id in twice_yes if result_id in exported)
    assert exported[kept]["same_content"] == [other for other in twice_yes if other != kept] and single in exported


def test_export_labels_treats_the_same_pixels_in_other_bytes_as_one_example_and_one_photo(tmp_path):
    """A photo re-saved at another PNG compression level is other bytes, the same pixels: its results once wrote
    the same window files twice, with opposite scores when judged both ways, and under two groups (one photo on
    both sides of the held-out split). Now they are one example (a conflict when judged both ways) of one group."""
    from tests.helpers import encoded
    from training.export_labels import ExportLabelsSettings, export_labels

    upright = photo(64, 96)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'kept' / 'results.db'}", LocalObjectStore(tmp_path / "kept" / "objects")
    )

    def judged(fill: int, level: int, verdict: str) -> str:
        edited = upright.copy()
        edited[20:40, 30:60] = fill
        source = encoded(Image.fromarray(upright), compress_level=level)
        new = NewResult(
            source, png_bytes(mask), png_bytes(edited), "image/png", "image/png", 96, 64, 0.5, 0.5, "passed", 1, 256
        )
        result_id = store.save(new)
        store.add_feedback(result_id, verdict)
        return result_id

    both = [judged(128, 6, "yes"), judged(128, 1, "no")]
    twice = [judged(60, 6, "yes"), judged(60, 1, "yes")]
    other = judged(200, 1, "no")
    # one stored content judged both ways, and the same pixels in other bytes judged yes: one example, unknown label
    mixed = [judged(90, 6, "yes"), judged(90, 6, "no"), judged(90, 1, "yes")]
    result = export_labels(ExportLabelsSettings(objects=tmp_path / "kept", out=tmp_path / "labels"))
    metrics = result["metrics"]
    assert len({store.get(result_id).keys["source"] for result_id in both + twice}) == 2, "two stored photos"
    assert metrics["conflicting"] == [
        {"result_ids": both, "verdicts": ["yes", "no"]},
        {"result_ids": mixed, "verdicts": ["yes", "no", "yes"]},
    ]
    assert metrics["exported"] == 2 and metrics["duplicates"] == 1
    items = {item["result_id"]: item["same_content"] for item in metrics["items"]}
    assert items == {twice[1]: [twice[0]], other: []}
    entries = json.loads((tmp_path / "labels" / "metadata.json").read_text())
    assert sorted(entry["score"] for entry in entries) == [0.0, 1.0]
    assert len({entry["group"] for entry in entries}) == 1, "one photo, one group, whatever bytes stored it"
    assert len(list((tmp_path / "labels" / "edited").iterdir())) == 2, "the conflicting example's files are pruned"


def test_export_labels_keeps_the_windows_of_user_photos_owner_only(tmp_path):
    """The store keeps the photos 0700 / 0600; their export was written with the umask's modes (world-readable)."""
    from training.cli import main

    _labelled_store(tmp_path)
    out = tmp_path / "labels"
    umask = os.umask(0o022)
    try:
        assert main(["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(out)]) == 0
    finally:
        os.umask(umask)
    folders = [out, *(out / folder for folder in ("source", "mask", "edited"))]
    assert {folder.stat().st_mode & 0o777 for folder in folders} == {0o700}
    images = [path for folder in folders[1:] for path in folder.iterdir()]
    assert images and {path.stat().st_mode & 0o777 for path in images} == {0o600}


def test_export_labels_removes_the_partial_writes_a_stopped_export_left(tmp_path):
    """An export killed mid-write leaves a partial file (a window of a user photo): no later export removed it."""
    from serve.retention.objects import PARTIAL
    from training.cli import main

    _labelled_store(tmp_path)
    out = tmp_path / "labels"
    left = [out / "source" / f"{PARTIAL}k3x9", out / "edited" / f"{'ab' * 32}.png.partial"]  # now's and before's
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a window")
    assert main(["export-labels", "--objects", str(tmp_path / "kept"), "--out", str(out)]) == 0
    assert not [path for path in left if path.exists()]
    assert json.loads((out / "summary.json").read_text())["metrics"]["pruned_files"] == 2


def _one_labelled_result(tmp_path, source: np.ndarray, mask: np.ndarray, edited: np.ndarray, verdict: str):
    store = RetentionStore.open(
        f"sqlite:///{tmp_path / 'kept' / 'results.db'}", LocalObjectStore(tmp_path / "kept" / "objects")
    )
    height, width = mask.shape
    new = NewResult(
        png_bytes(source), png_bytes(mask.astype(np.uint8) * 255), png_bytes(edited), "image/png", "image/png",
        width, height, 0.5, 0.5, "passed", 1, 512,
    )  # fmt: skip
    store.add_feedback(store.save(new), verdict)
    return store


def test_export_labels_trains_the_discriminator_on_the_windows_the_scorer_sees(tmp_path):
    """A wide photo with the object at its left edge: resized and center-cropped, the training view held no mask
    pixel and identical source and edited; the export now cuts the window POST /score cuts."""
    from engines import imaging
    from engines.pipeline import CropSettings, RemovalPipeline
    from training.data import TripletDataset, load_metadata
    from training.export_labels import ExportLabelsSettings, export_labels

    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (256, 1024, 3), dtype=np.uint8)
    mask = np.zeros((256, 1024), bool)
    mask[80:180, 20:140] = True
    edited = source.copy()
    edited[mask] = 0
    _one_labelled_result(tmp_path, source, mask, edited, "no")
    config = tmp_path / "serve.yaml"
    args = {"retention": {"object_store": {"path": str(tmp_path / "kept")}}, "imaging": {"buckets": [256, 512]}}
    config.write_text(json.dumps({"applications": [{"args": args}]}))

    result = export_labels(ExportLabelsSettings(serve_config=config, out=tmp_path / "labels"))
    records = load_metadata(tmp_path / "labels" / "metadata.json", require=("source", "mask", "GT", "score"))
    assert len(records) == 1 and result["metrics"]["records"] == 1 and result["metrics"]["empty_mask_views"] == 0
    item = TripletDataset(records, 512)[0]
    assert item["mask"].sum() > 0 and (item["gt"] - item["source"]).abs().max() > 0 and item["score"] == 0.0

    pipeline = RemovalPipeline(None, CropSettings((256, 512), 128, 0, 6), imaging.DecodeLimits())
    (job,) = pipeline.prepare_score(png_bytes(source), png_bytes(mask.astype(np.uint8) * 255), png_bytes(edited))
    assert np.array_equal(np.asarray(Image.open(records[0].source)), job.source), "POST /score's window"
    assert np.array_equal(np.asarray(Image.open(records[0].gt)), job.edited)


def test_export_labels_leaves_out_empty_views_and_ambiguous_negatives(tmp_path, monkeypatch):
    import torch

    import engines.scorer
    from training.export_labels import ExportLabelsSettings, export_labels

    two = np.zeros((64, 2048), bool)
    two[20:40, 10:40] = two[20:40, 2000:2030] = True  # far apart: one window each
    one = np.zeros((64, 2048), bool)
    one[20:40, 10:40] = True
    image = np.random.default_rng(1).integers(0, 255, (64, 2048, 3), dtype=np.uint8)
    store = _one_labelled_result(tmp_path, image, two, image, "no")
    _one_labelled_result(tmp_path, image, one, image, "yes")
    metrics = export_labels(ExportLabelsSettings(objects=tmp_path / "kept", out=tmp_path / "labels"))["metrics"]
    assert metrics["exported"] == 1 and metrics["ambiguous_negatives"] == [store.labelled()[0].id], (
        "which of the two windows failed is unknown"
    )

    real, calls = engines.scorer.score_view_mask, []

    def empty_first_two(masks, size):
        calls.append(size)
        return torch.zeros((1, 1, size, size)) if len(calls) <= 2 else real(masks, size)

    monkeypatch.setattr(engines.scorer, "score_view_mask", empty_first_two)
    _one_labelled_result(tmp_path / "b", image, two, image, "yes")
    _one_labelled_result(tmp_path / "b", image, one, image, "yes")
    settings = ExportLabelsSettings(objects=tmp_path / "b" / "kept", out=tmp_path / "b" / "labels")
    metrics = export_labels(settings)["metrics"]
    assert metrics["empty_mask_views"] == 2 and metrics["exported"] == metrics["records"] == 1
    assert "empty" in metrics["skipped"][0]["why"]


# ---------------------------------------------------------------- a slow or failing store


class _GatedPuts(LocalObjectStore):
    """Object writes that wait for `go` (a stalled S3 PUT, a hung NFS mount), or fail on the `fail_at`th write."""

    def __init__(self, root: Path, fail_at: int | None = None):
        super().__init__(root)
        self.go = threading.Event()
        self.go.set()
        self.fail_at = fail_at
        self.writes = 0

    def put(self, data: bytes) -> str:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        self.go.wait(10)
        return super().put(data)


def test_a_failed_save_deletes_the_objects_it_wrote_without_the_database(tmp_path):
    objects = _GatedPuts(tmp_path / "objects", fail_at=2)
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    with pytest.raises(OSError, match="No space"):
        store.save(_new(b"result"))
    assert _files(tmp_path / "objects") == set() and _rows(store) == []

    from sqlalchemy import create_engine

    store.engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'r.db'}")  # the database went away
    with pytest.raises(Exception, match="unable to open database"):
        store.save(_new(b"result"))
    assert _files(tmp_path / "objects") == set()


def test_a_failed_save_keeps_the_objects_a_save_of_the_same_content_stored_meanwhile(tmp_path):
    from sqlalchemy import event

    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"))
    inserting, hold = threading.Event(), threading.Event()

    def insert_fails(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO results") and threading.current_thread().name == "failing":
            inserting.set()
            hold.wait(10)
            raise OSError("the database went away")

    event.listen(store.engine, "before_cursor_execute", insert_fails)
    raised = []

    def save_that_fails():
        try:
            store.save(_new(b"same"))
        except OSError as exc:
            raised.append(exc)

    failing = threading.Thread(target=save_that_fails, name="failing")
    failing.start()
    assert inserting.wait(10)  # it wrote the objects, its insert is under way
    stored = store.save(_new(b"same"))
    hold.set()
    failing.join(10)
    assert not failing.is_alive() and len(raised) == 1, "the first save failed at its insert"
    assert _rows(store) == [stored] and store.read(stored, "result") == (b"same", "image/png")
    assert len(_files(tmp_path / "objects")) == 3


def test_the_sweeper_deletes_old_objects_no_result_refers_to(tmp_path):
    import os

    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"))
    kept = store.save(_new(b"kept"))
    orphan, young = store.objects.put(b"left by a crash"), store.objects.put(b"a save in another process")
    long_ago = time.time() - 2 * 3600
    for key in (*store.get(kept).keys.values(), orphan):
        os.utime(store.objects.path(key), (long_ago, long_ago))
    assert store.drop_orphans() == 1
    assert not store.objects.exists(orphan) and store.objects.exists(young)
    assert store.read(kept, "source") == (b"the photo", "image/png")

    bucket = FakeS3()
    s3 = S3ObjectStore("bucket", prefix="rorem", client=bucket)
    old = s3.put(b"old")
    s3.put(b"new")
    bucket.modified[s3.name(old)] = long_ago
    assert list(s3.written_before(time.time() - 3600)) == [old]


def _age(objects: LocalObjectStore) -> None:
    """Every object as old as a kept result's, past ORPHAN_GRACE_S."""
    long_ago = time.time() - 2 * 3600
    for key in objects.written_before(time.time() + 1):
        os.utime(objects.path(key), (long_ago, long_ago))


def test_an_orphan_sweep_on_another_database_leaves_the_stores_objects(tmp_path, caplog):
    """A pod whose database URL did not load fell back to a fresh results.db over the real object store: its
    start-up sweep found no result referring to any object and deleted them all, labelled results' too."""
    objects = LocalObjectStore(tmp_path / "objects")
    real = RetentionStore.open(f"sqlite:///{tmp_path / 'real.db'}", objects)
    kept = [real.save(_new(b"result %d" % i)) for i in range(5)]
    real.add_feedback(kept[0], "no", "shadow left")
    orphan = objects.put(b"left by a crash")
    _age(objects)
    before = _files(tmp_path / "objects")

    for database in ("fallback.db", "real-copy-without-rows.db"):
        other = RetentionStore.open(f"sqlite:///{tmp_path / database}", objects)
        other.save(_new(b"saved meanwhile"))
        assert other.drop_orphans() == 0
        assert other.delete(other.save(_new(b"result 1"))), "a result of the same images as one of the store's"
    assert before <= _files(tmp_path / "objects")
    assert "are not each other's" in caplog.text and str(tmp_path / "fallback.db") in caplog.text
    assert real.read(kept[0], "source") == (b"the photo", "image/png")

    assert real.drop_orphans() == 1, "the store's own database still collects its orphans"
    assert not objects.exists(orphan) and real.read(kept[4], "result") == (b"result 4", "image/png")


def _at_revision(path, revision: str):
    """A SQLite database at `path` of an earlier version: its schema at `revision` (0003: before store ids)."""
    from alembic import command

    from serve.retention.db import alembic_config, make_engine

    engine = make_engine(f"sqlite:///{path}")
    config = alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return engine


def test_a_store_kept_before_markers_is_adopted_by_its_own_database_only(tmp_path):
    """Upgrading: a database and store of an earlier version have no store id; the upgrade gives the database one
    as legacy, and it adopts the store whose objects are its results'. A database made since never adopts a
    populated store, even once saves gave it results there; nor does an earlier version's database over a store
    of another's images (a fallback results.db that saved one result of its own there)."""
    from serve.retention.db import migrate

    objects = LocalObjectStore(tmp_path / "objects")
    engine = _at_revision(tmp_path / "old.db", "0003")
    kept = RetentionStore(objects, engine).save(_new(b"kept before markers"))
    stranger = _at_revision(tmp_path / "fallback.db", "0003")
    RetentionStore(objects, stranger).save(_new(b"the fallback's"))
    migrate(stranger)
    assert not RetentionStore(objects, stranger).owns_its_objects()
    fresh = RetentionStore.open(f"sqlite:///{tmp_path / 'fresh.db'}", objects)
    fresh.save(_new(b"saved by the fresh database"))
    assert fresh.drop_orphans() == 0 and objects.marker() is None

    own = LocalObjectStore(tmp_path / "own")  # the old database's own store, which no other database wrote to
    mine = RetentionStore(own, engine)
    for key in RetentionStore(objects, engine).get(kept).keys.values():
        own.put(objects.get(key))
    migrate(engine)
    assert not RetentionStore(objects, engine).owns_its_objects(), "the other databases' images are there too"
    assert mine.owns_its_objects() and own.marker() is not None
    orphan = own.put(b"left by a crash")
    _age(own)
    assert mine.drop_orphans() == 1 and not own.exists(orphan)
    assert mine.read(kept, "result") == (b"kept before markers", "image/png")


def test_an_earlier_versions_database_without_results_gets_its_store_id_too(tmp_path):
    """The legacy id was given only to a database holding results: one whose results had all gone, over a store
    holding an orphan, was never tied, and the documented way to tie them by hand (its store id) had no id."""
    from sqlalchemy.orm import Session

    from serve.retention.db import StoreIdRow, migrate

    engine = _at_revision(tmp_path / "old.db", "0003")
    migrate(engine)
    with Session(engine) as session:
        row = session.get(StoreIdRow, 1)
    assert row is not None and row.legacy
    store = RetentionStore(LocalObjectStore(tmp_path / "objects"), engine)
    assert store.owns_its_objects(), "an empty store is adopted"


def test_a_marker_claim_that_failed_once_is_made_at_the_next_sweep(tmp_path, monkeypatch):
    """The database recorded its id, the marker write failed (an object store error): once saves had put objects
    there, the store was never tied, and no delete or expiry removed an image again."""
    objects = LocalObjectStore(tmp_path / "objects")
    claim = objects.claim_marker
    failures = iter([OSError("the disk is busy")])

    def failing_once(store_id):
        for error in failures:
            raise error
        return claim(store_id)

    monkeypatch.setattr(objects, "claim_marker", failing_once)
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects, max_results=2)
    assert objects.marker() is None
    for i in range(6):  # max_results deletes 4 while untied: their images were then unknown, and past 1% for good
        store.save(_new(b"result %d" % i))
    store.drop_orphans()
    assert objects.marker() is not None and len(_rows(store)) == 2
    assert _files(tmp_path / "objects") == {k for r in _rows(store) for k in store.get(r).keys.values()}, "no more"
    for result in _rows(store):
        assert store.delete(result)
    assert _files(tmp_path / "objects") == set(), "every image of the deleted results"


def test_a_marker_is_claimed_without_hard_links_or_a_conditional_put(tmp_path, monkeypatch):
    """A filesystem without hard links (CIFS, some FUSE mounts) and an S3 client or store without If-None-Match
    refused every claim: the store was never tied."""
    import errno

    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    local = LocalObjectStore(tmp_path / "objects")
    assert local.claim_marker("a" * 32) == "a" * 32 and local.claim_marker("b" * 32) == "a" * 32
    assert not list((tmp_path / "objects").glob(".partial-*"))

    class OldClient(FakeS3):
        def put_object(self, **kwargs):
            if "IfNoneMatch" in kwargs:
                raise type("ParamValidationError", (Exception,), {})("Unknown parameter in input: IfNoneMatch")
            return super().put_object(**kwargs)

    s3 = S3ObjectStore("bucket", prefix="rorem", client=OldClient())
    assert s3.claim_marker("c" * 32) == "c" * 32 and s3.claim_marker("d" * 32) == "c" * 32


def _disk_full(monkeypatch, partial_writes: bool = True) -> None:
    """The object store's files are created and their writes fail with ENOSPC (a full disk, a quota): those of
    its exclusive creates, and of its partial writes unless `partial_writes` is False."""
    import types

    from serve.retention import objects

    def mkstemp(**where):
        fd, path = tempfile.mkstemp(**where)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), path

    def full(path, mode="r", *args, **kwargs):
        if "x" not in mode:
            return open(path, mode, *args, **kwargs)
        open(path, mode).close()
        return open("/dev/full", "w")

    if partial_writes:
        monkeypatch.setattr(objects, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
    monkeypatch.setattr(objects, "open", full, raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_marker_write_a_full_disk_failed_leaves_no_marker_and_the_store_ties_itself_once_there_is_room(
    tmp_path, monkeypatch, links
):
    """The failed write of the marker took the no-hard-links fallback, whose write failed too: an empty marker
    stayed, no claim could replace it, and no image of a deleted or expired result was removed again. Without
    hard links the fallback's own write is the one that fails."""
    import errno

    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    objects = LocalObjectStore(tmp_path / "objects")
    with monkeypatch.context() as full:
        _disk_full(full, partial_writes=links)
        if not links:
            full.setattr(os, "link", no_links)
        store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    assert os.listdir(tmp_path / "objects") == [], "neither a marker nor a partial write"
    result = store.save(_new(b"saved once there is room"))
    assert store.owns_its_objects() and objects.marker() is not None
    assert store.delete(result) and _files(tmp_path / "objects") == set()


def test_a_stale_marker_without_an_id_is_replaced_a_fresh_one_is_left_to_its_claim(tmp_path, monkeypatch):
    """An empty marker (an earlier version's claim cut short) kept the store untied for good. A fresh one may be a
    claim without hard links whose id is being written; one that another claim put in place of the stale one
    just before this claim's move is put back."""
    from serve.retention.objects import STALE_MARKER_S

    objects = LocalObjectStore(tmp_path / "objects")
    marker = tmp_path / "objects" / MARKER
    marker.write_bytes(b"")
    assert objects.claim_marker("a" * 32) is None and marker.read_bytes() == b"", "fresh: left alone"
    long_ago = time.time() - STALE_MARKER_S - 1
    os.utime(marker, (long_ago, long_ago))
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    assert store.owns_its_objects() and objects.marker() is not None

    marker.write_bytes(b"\xff\xfe")
    os.utime(marker, (long_ago, long_ago))
    rename = os.rename

    def another_claim_first(source, target):
        rename(source, tmp_path / "moved by another claim")
        marker.write_text("b" * 32)
        rename(source, target)

    monkeypatch.setattr(os, "rename", another_claim_first)
    assert objects.claim_marker("a" * 32) == "b" * 32
    assert os.listdir(tmp_path / "objects") == [MARKER], "what this claim moved aside is gone"


def test_the_sweeper_deletes_old_partial_writes_a_killed_process_left_never_a_fresh_one(tmp_path):
    """An object is written to `.partial-...` in its folder and then renamed: a ResultStore killed mid-write (OOM,
    SIGKILL, a node lost) left that file, which the sweeper never deleted, however old and large. A fresh one may
    be a save's write under way."""
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"))
    kept = store.save(_new(b"kept"))
    (tmp_path / "objects" / "ab").mkdir()
    old, fresh = tmp_path / "objects" / "ab" / ".partial-k3j2h1", tmp_path / "objects" / "ab" / ".partial-x9y8z7"
    old.write_bytes(b"\0" * 1000)
    fresh.write_bytes(b"\0" * 1000)
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    assert store.drop_orphans() == 1
    assert not old.exists() and fresh.exists()
    assert store.read(kept, "result") == (b"kept", "image/png")


@pytest.mark.timing
def test_an_orphan_sweep_over_a_slow_object_store_lets_saves_in_between(tmp_path):
    """drop_orphans deleted every orphan under the store's lock, which each save takes to claim its objects: on
    a slow object store one sweep held up every save for all its deletes."""
    import os
    import threading

    class SlowDeletes(LocalObjectStore):
        def delete(self, key):
            time.sleep(0.05)
            super().delete(key)

    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", SlowDeletes(tmp_path / "objects"))
    long_ago = time.time() - 2 * 3600
    for i in range(40):  # 2 s of deletes
        os.utime(store.objects.path(store.objects.put(b"orphan %d" % i)), (long_ago, long_ago))
    sweep = threading.Thread(target=store.drop_orphans)
    sweep.start()
    time.sleep(0.2)
    started = time.monotonic()
    store.save(_new(b"during the sweep"))
    waited = time.monotonic() - started
    sweep.join()
    assert waited < 1.0, f"the save waited {waited:.2f} s for the sweep (2 s of deletes)"
    assert len(list(store.objects.written_before(time.time() - 3600))) == 0


@pytest.mark.timing
def test_a_sweep_expiring_many_results_on_a_slow_object_store_lets_saves_in_between(tmp_path, clock):
    """Deleting results held the store's lock through every chunk, each object delete included: while the sweeper
    expired 100 results on S3 every save waited at its claim, past save_timeout_s (answered without an id)."""

    class SlowDeletes(LocalObjectStore):
        delay = 0.0

        def delete(self, key):
            time.sleep(self.delay)
            super().delete(key)

    objects = SlowDeletes(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects, max_age_days=30, clock=clock)
    for i in range(100):
        store.save(_new(b"expiring %d" % i, source=b"photo %d" % i))
    objects.delay = 0.01  # 300 objects: 3 s of deletes
    clock.advance(days=31)
    sweep = threading.Thread(target=store.enforce_limits)
    sweep.start()
    time.sleep(0.2)
    started = time.monotonic()
    saved = store.save(_new(b"during the sweep", source=b"another photo"))
    waited = time.monotonic() - started
    sweep.join()
    assert waited < 1.0, f"the save waited {waited:.2f} s for the sweep (3 s of deletes)"
    assert _rows(store) == [saved] and len(_files(tmp_path / "objects")) == 3


def test_a_save_racing_the_delete_of_the_last_object_in_its_folder_is_stored(tmp_path, monkeypatch):
    """An object is written into its key's folder (`ab/`); deleting the last object of a folder removed the
    folder, so a save whose new object fell in that folder while another result was deleted (DELETE /results,
    an eviction, the sweeper) could find it gone between making it and writing into it, and failed: that
    removal was answered without X-Result-Id."""
    from serve.retention import objects as objects_module

    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", LocalObjectStore(tmp_path / "objects"))
    old = store.save(_new(b"old", source=b"old photo"))
    folder = object_key(b"old")[:2]
    result = next(b"new %d" % i for i in range(10_000) if object_key(b"new %d" % i)[:2] == folder)
    mkstemp = objects_module.tempfile.mkstemp

    def delete_old_first(*args, dir, **kwargs):
        if Path(dir).name == folder:
            assert store.delete(old)
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(objects_module.tempfile, "mkstemp", delete_old_first)
    new = store.save(_new(result, source=b"new photo"))
    assert store.read(new, "result") == (result, "image/png") and _rows(store) == [new]


def test_listing_old_objects_passes_over_objects_deleted_meanwhile(tmp_path):
    """The sweeper lists objects while deletes elsewhere remove them (the sweep at start runs beside saves and
    deletes): the listing raised FileNotFoundError for a folder gone between glob and scandir (a clean-clone CI
    run met it, when a delete also removed an emptied folder); a file gone between scandir and stat is passed
    over too."""
    import threading

    objects = LocalObjectStore(tmp_path / "objects")
    for round in range(10):
        keys = [objects.put(b"object %d-%d" % (round, i)) for i in range(300)]
        deleting = threading.Thread(target=lambda keys=keys: [objects.delete(key) for key in keys])
        deleting.start()
        while deleting.is_alive():
            list(objects.written_before(time.time() + 10))
        deleting.join()


def test_saves_stalled_on_the_object_store_leave_reads_their_threads(tmp_path):
    from serve.retention.keeper import LocalStoreClient

    objects = _GatedPuts(tmp_path / "objects")
    client = LocalStoreClient(lambda: RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects))

    async def read_while_saves_stall():
        old = await client.save(_new(b"old"))
        objects.go.clear()
        saves = [asyncio.ensure_future(client.save(_new(b"stalled %d" % i))) for i in range(40)]
        await asyncio.sleep(0.2)
        try:
            assert (await asyncio.wait_for(client.get(old), 3)).id == old
        finally:
            objects.go.set()
        assert len(set(await asyncio.gather(*saves))) == 40

    try:
        asyncio.run(read_while_saves_stall())
    finally:
        client.close()


def test_saves_given_up_during_a_stall_hold_none_of_their_images(tmp_path):
    """While the object store stalls, SAVE_THREADS saves hold the save threads and every later retained removal
    gives its save up: each of those stayed queued for a thread, photo and result with it (50 removals of 4 MB
    photos held 216 MB), so memory grew with every removal for as long as the stall lasted."""
    import gc
    import weakref

    from serve.retention.keeper import SAVE_THREADS, LocalStoreClient

    objects = _GatedPuts(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    client = LocalStoreClient(lambda: store)
    given_up = []

    async def give_up(i: int) -> None:
        new = _new(b"given up %d" % i)
        given_up.append(weakref.ref(new))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.save(new), 0.01)

    async def stall():
        objects.go.clear()
        stalled = [asyncio.ensure_future(client.save(_new(b"stalled %d" % i))) for i in range(SAVE_THREADS)]
        deadline = time.monotonic() + 5
        while objects.writes < SAVE_THREADS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for i in range(20):
            await give_up(i)
        gc.collect()
        held = sum(ref() is not None for ref in given_up)
        objects.go.set()
        assert held == 0, f"{held} of 20 saves given up still hold their images"
        await asyncio.gather(*stalled)
        return await client.save(_new(b"after the stall"))

    try:
        after = asyncio.run(stall())
        assert len(_rows(store)) == SAVE_THREADS + 1 and after in _rows(store), "the given-up saves stored nothing"
    finally:
        objects.go.set()
        client.close()


def test_a_store_client_saves_from_one_event_loop_after_another(tmp_path):
    """A save limiter bound to the first event loop a save waited on refused every waiting save on the next one
    (RuntimeError: the removal answered without a result id): the client serves a single process's loops."""
    from serve.retention.keeper import SAVE_THREADS, LocalStoreClient

    objects = _GatedPuts(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    client = LocalStoreClient(lambda: store)

    async def more_saves_than_threads(tag: bytes) -> list:
        objects.go.clear()
        saves = [asyncio.ensure_future(client.save(_new(b"%s %d" % (tag, i)))) for i in range(SAVE_THREADS + 1)]
        await asyncio.sleep(0.1)
        objects.go.set()
        return await asyncio.gather(*saves, return_exceptions=True)

    try:
        for tag in (b"first", b"second"):
            saved = asyncio.run(more_saves_than_threads(tag))
            assert all(isinstance(result_id, str) for result_id in saved), saved
        assert len(_rows(store)) == 2 * (SAVE_THREADS + 1)
    finally:
        objects.go.set()
        client.close()


@pytest.mark.parametrize("stalled", ["object writes", "limits after the insert"])
def test_a_save_given_up_on_stores_nothing(tmp_path, monkeypatch, stalled):
    from serve.retention.keeper import LocalStoreClient

    objects = _GatedPuts(tmp_path / "objects")
    store = RetentionStore.open(f"sqlite:///{tmp_path / 'r.db'}", objects)
    client = LocalStoreClient(lambda: store)
    go = objects.go
    if stalled == "limits after the insert":
        go = threading.Event()
        enforce = store.enforce_limits
        monkeypatch.setattr(store, "enforce_limits", lambda **limits: go.wait(10) and enforce(**limits))

    async def give_up():
        go.clear()
        saving = asyncio.ensure_future(client.save(_new(b"result")))
        deadline = time.monotonic() + 5
        while stalled == "limits after the insert" and not _rows(store) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert len(_rows(store)) == (stalled == "limits after the insert")
        saving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await saving
        go.set()

    try:
        asyncio.run(give_up())
        deadline = time.monotonic() + 5
        # the stalled write resumes in its thread: until the last of the three has begun, nothing may be written
        # yet, and an empty listing would end the wait below before the save wrote (then deleted) its objects
        while stalled == "object writes" and objects.writes < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        while (_rows(store) or _files(tmp_path / "objects")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _rows(store) == [] and _files(tmp_path / "objects") == set()
    finally:
        client.close()


@pytest.mark.timing
@pytest.mark.parametrize(("deadline_s", "waited_s"), [(None, 0.3), (0.1, 0.1)])
def test_a_removal_waits_for_a_stalled_store_at_most_save_timeout_s_or_its_deadline(tmp_path, deadline_s, waited_s):
    from serve.config import RetentionSettings
    from serve.retention.keeper import Retention

    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)}, save_timeout_s=0.3)
    metrics = _Metrics()
    retention = Retention(settings, metrics)
    store = retention.store.opened()
    store.objects = _GatedPuts(tmp_path / "objects")
    store.objects.go.clear()
    try:
        keeping = _keep(retention, deadline_s=deadline_s)
        started = time.monotonic()
        assert asyncio.run(keeping) is None
        assert waited_s <= time.monotonic() - started < waited_s + 0.5
        assert metrics.retained.tags == [{"outcome": "failed"}]
        store.objects.go.set()
        # the store back, a save is kept again; given more than 0.3 s, which a busy runner's save once took
        retention.settings = settings.model_copy(update={"save_timeout_s": 10.0})
        assert asyncio.run(_keep(retention, b"later")) is not None
        assert len(_rows(store)) == 1, "the save given up stored nothing"
    finally:
        store.objects.go.set()
        retention.store.close()


def test_the_principal_migration_keeps_older_verdicts_with_no_principal(tmp_path):
    """0003 on a database the earlier revisions made, holding a verdict: the verdict stays, its principal NULL."""
    from sqlalchemy import inspect, text

    from serve.retention.db import migrate

    engine = _at_revision(tmp_path / "old" / "results.db", "0002")
    assert "principal" not in {column["name"] for column in inspect(engine).get_columns("feedback")}
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO results (id, created_at, source_key, mask_key, result_key, source_media_type,"
                " result_media_type, width, height, source_bytes, result_bytes, threshold, gate, params, owner)"
                " VALUES ('r1', '2026-11-30 12:00:00', 's', 'm', 'r', 'image/png', 'image/png', 4, 3, 1, 1, 0.5,"
                " 'passed', '{}', 'acme')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO feedback (result_id, verdict, labeller, created_at)"
                " VALUES ('r1', 'yes', 'qa-staff', '2026-11-30 12:01:00')"
            )
        )
    migrate(engine)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT result_id, verdict, labeller, principal FROM feedback")).all()
    assert [tuple(row) for row in rows] == [("r1", "yes", "qa-staff", None)]


def test_a_migration_stopped_midway_leaves_the_schema_as_it_was_and_the_next_start_migrates(tmp_path, monkeypatch):
    """SQLite: a start stopped after 0002 added its column, before its index, once left the column committed with
    alembic_version at 0001, and every later start failed on "duplicate column name: owner"."""
    from alembic import op
    from sqlalchemy import inspect, text

    from serve.retention.db import migrate

    engine = _at_revision(tmp_path / "old" / "results.db", "0001")
    create_index = op.create_index

    def stopped(name, *args, **kwargs):
        if name == "ix_results_owner":
            raise KeyboardInterrupt("stopped mid-migration")
        return create_index(name, *args, **kwargs)

    monkeypatch.setattr(op, "create_index", stopped)
    with pytest.raises(KeyboardInterrupt):
        migrate(engine)
    monkeypatch.setattr(op, "create_index", create_index)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    assert "owner" not in {column["name"] for column in inspect(engine).get_columns("results")}
    migrate(engine)
    assert "owner" in {column["name"] for column in inspect(engine).get_columns("results")}


def _keyed_ingress(tmp_path, monkeypatch, **retention_settings):
    """The service's own REST routes (serve/app.py's Ingress over serve/rest_api.py's api) with keys on and
    retention in this process (`retention_settings` besides its folder), without Ray: the routes find their
    Ingress as Serve's replica context would give it. Returns the client and the keys by name."""
    from types import SimpleNamespace

    import yaml
    from fastapi.testclient import TestClient
    from ray import serve as ray_serve

    from serve import auth
    from serve.app import Ingress
    from serve.config import AppSettings
    from serve.rest_api import api
    from serve.retention.keeper import Retention

    entries = {
        "tenant": auth.new_key_entry("tenant", auth.DEFAULT_SCOPES, team="acme"),
        "reviewer": auth.new_key_entry("reviewer", ["feedback", "review"]),
        "admin": auth.new_key_entry("admin", ["feedback", "admin"]),
    }
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [entry for _, entry in entries.values()]}))
    settings = AppSettings.model_validate(
        {
            "auth": {"enabled": True, "keys_file": str(tmp_path / "keys.yaml")},
            "retention": {"enabled": True, "object_store": {"path": str(tmp_path / "kept")}, **retention_settings},
        }
    )
    monkeypatch.setattr(auth, "_policy", auth.policy())
    auth.install(settings.auth)
    retention = Retention(settings.retention, _Metrics())
    ingress = object.__new__(Ingress.func_or_class.__bases__[0])  # not @serve.ingress's wrapper: its __del__ is async
    ingress.settings = settings
    ingress.service = SimpleNamespace(settings=settings, retention=retention)
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    # as it was after the test: the client builds the shared app's middleware stack, and a later test adding
    # middleware to that app (test_metrics_label_result_routes_by_template_never_by_id) would be refused
    monkeypatch.setattr(api, "middleware_stack", api.middleware_stack)
    client = TestClient(api, raise_server_exceptions=False)
    client.retention = retention
    return client, {name: key for name, (key, _) in entries.items()}


def test_a_verdict_records_the_key_that_sent_it_whatever_the_labeller_says(tmp_path, monkeypatch):
    client, keys = _keyed_ingress(tmp_path, monkeypatch)
    result_id = asyncio.run(_keep(client.retention, owner="acme"))
    try:
        posted = client.post(
            "/feedback",
            json={"result_id": result_id, "verdict": "yes", "labeller": "qa-staff"},
            headers={"x-api-key": keys["tenant"]},
        )
        assert posted.status_code == 201, posted.text
        assert [(f["labeller"], f["principal"]) for f in posted.json()["feedback"]] == [("qa-staff", "tenant")]
        spoofed = client.post(
            "/feedback",
            json={"result_id": result_id, "verdict": "no", "labeller": "reviewer", "principal": "reviewer"},
            headers={"x-api-key": keys["tenant"]},
        )
        assert spoofed.status_code == 422, "the principal is not the client's to say"
        client.post("/feedback", json={"result_id": result_id, "verdict": "no"}, headers={"x-api-key": keys["reviewer"]})
        read = client.get(f"/results/{result_id}", headers={"x-api-key": keys["reviewer"]})
        assert [(f["verdict"], f["labeller"], f["principal"]) for f in read.json()["feedback"]] == [
            ("yes", "qa-staff", "tenant"),
            ("no", None, "reviewer"),
        ]
        stored = client.retention.store.opened().get(result_id)
        assert [f.principal for f in stored.feedback] == ["tenant", "reviewer"]
    finally:
        client.retention.store.close()


def test_a_tenants_verdicts_on_its_own_result_never_delete_a_reviewers(tmp_path, monkeypatch):
    """feedback is a default scope: a tenant key posting verdict after verdict on its own result deletes only its
    own older ones, so the reviewer's verdict stays, is shown, and is the label export --labelled-by takes."""
    client, keys = _keyed_ingress(tmp_path, monkeypatch)
    result_id = asyncio.run(_keep(client.retention, owner="acme"))
    try:
        as_reviewer, as_tenant = ({"x-api-key": keys[name]} for name in ("reviewer", "tenant"))
        posted = client.post("/feedback", json={"result_id": result_id, "verdict": "yes"}, headers=as_reviewer)
        assert posted.status_code == 201, posted.text
        for _ in range(MAX_VERDICTS + 1):
            posted = client.post("/feedback", json={"result_id": result_id, "verdict": "no"}, headers=as_tenant)
            assert posted.status_code == 201, posted.text
        read = client.get(f"/results/{result_id}", headers=as_reviewer).json()
        assert [f["principal"] for f in read["feedback"]] == ["reviewer"] + ["tenant"] * MAX_VERDICTS
        assert read["label"] == "no", "the newest verdict is the label, as before"
        trusted = client.retention.store.opened().labelled(principals=["reviewer"])
        assert [(r.id, r.label) for r in trusted] == [(result_id, "yes")]
    finally:
        client.retention.store.close()


def test_the_annotation_queue_refuses_unknown_repeated_or_out_of_range_query_parameters_naming_each(
    tmp_path, monkeypatch
):
    """`?offset=5` was ignored and `?limit=5&limit=6` read as 6, where /remove refuses a query parameter; a limit out of
    range named no field in `errors` (a contract trial)."""
    client, keys = _keyed_ingress(tmp_path, monkeypatch)
    reviewer = {"x-api-key": keys["reviewer"]}
    try:
        for query, fields in [
            ("offset=5", ["query.offset"]), ("limit=5&limit=6", ["query.limit"]), ("limit=0", ["query.limit"]),
            ("threshold=11&limit=201", ["query.limit", "query.threshold"]),
        ]:  # fmt: skip
            refused = client.get(f"/annotation/queue?{query}", headers=reviewer)
            assert refused.status_code == 422 and refused.json()["type"].endswith("/invalid-request"), query
            assert sorted(error["field"] for error in refused.json()["errors"]) == fields, refused.json()
        assert client.get("/annotation/queue?limit=5&threshold=0.5", headers=reviewer).status_code == 200
    finally:
        client.retention.store.close()


def test_the_result_routes_answer_head_as_their_get_with_the_same_access(tmp_path, monkeypatch):
    """`curl -I` on a stored result was 405 (a contract trial; RFC 9110 9.1: a server supports GET and HEAD)."""
    client, keys = _keyed_ingress(tmp_path, monkeypatch)
    reviewer = {"x-api-key": keys["reviewer"]}
    try:
        result_id = asyncio.run(_keep(client.retention, owner="acme"))
        for path in (f"/results/{result_id}", f"/results/{result_id}/mask", "/annotation/queue"):
            got, head = client.get(path, headers=reviewer), client.head(path, headers=reviewer)
            assert (got.status_code, head.status_code, head.content) == (200, 200, b""), path
            assert head.headers["content-type"] == got.headers["content-type"], path
        assert client.head(f"/results/{result_id}").status_code == 401, "HEAD is checked as GET is"
    finally:
        client.retention.store.close()


def test_only_the_asking_keys_own_verdict_takes_a_result_out_of_its_annotation_queue(tmp_path, monkeypatch):
    """A tenant's verdict on its own result leaves the result in a reviewer's queue, whose verdict export
    --labelled-by needs; the reviewer's own verdict takes it out of the reviewer's queue. A verdict without a key
    (older than principals, or given with auth off) takes a result out of every queue, as every verdict did
    before: turning keys on does not send every labelled result back to each reviewer."""
    client, keys = _keyed_ingress(tmp_path, monkeypatch)
    result_id = asyncio.run(_keep(client.retention, owner="acme"))
    store = client.retention.store.opened()
    try:
        as_reviewer, as_tenant = ({"x-api-key": keys[name]} for name in ("reviewer", "tenant"))

        def queue(headers) -> tuple[list[str], int]:
            answer = client.get("/annotation/queue", headers=headers)
            assert answer.status_code == 200, answer.text
            return [item["id"] for item in answer.json()["items"]], answer.json()["unlabelled"]

        assert queue(as_reviewer) == queue(as_tenant) == ([result_id], 1)
        posted = client.post("/feedback", json={"result_id": result_id, "verdict": "yes"}, headers=as_tenant)
        assert posted.status_code == 201, posted.text
        assert queue(as_reviewer) == ([result_id], 1), "another key's verdict never hides a result from a reviewer"
        assert queue(as_tenant) == ([], 0), "the tenant judged it"
        posted = client.post("/feedback", json={"result_id": result_id, "verdict": "no"}, headers=as_reviewer)
        assert posted.status_code == 201, posted.text
        assert queue(as_reviewer) == ([], 0), "the reviewer judged it"
        assert store.queue() == [] and store.count(labelled=False) == 0, "no key known: any verdict counts"
        older = asyncio.run(_keep(client.retention, owner="acme"))
        store.add_feedback(older, "yes")  # one without a key (auth off, or older than principals)
        assert queue(as_reviewer) == queue(as_tenant) == ([], 0), "judged before keys: out of every queue"
    finally:
        client.retention.store.close()


def test_a_result_past_max_age_is_not_found_by_delete_either_but_deleted_at_once(tmp_path, monkeypatch):
    """Past max_age_days and not swept yet, a result answered 404 to GET and POST /feedback but 204 to DELETE; then
    DELETE answered 404 and deleted nothing, so the photo stayed until a sweep (for good while sweeps failed)."""
    from tests.helpers import assert_problem

    client, keys = _keyed_ingress(tmp_path, monkeypatch, max_age_days=1)
    result_id = asyncio.run(_keep(client.retention, owner="acme"))
    store = client.retention.store.opened()
    as_admin = {"x-api-key": keys["admin"]}
    try:
        now = store.clock
        monkeypatch.setattr(store, "clock", lambda: now() + dt.timedelta(days=1, seconds=1))
        assert_problem(client.get(f"/results/{result_id}", headers=as_admin), 404, "not-found")
        assert_problem(client.delete(f"/results/{result_id}", headers=as_admin), 404, "not-found")
        assert _rows(store) == [] and _files(tmp_path / "kept" / "objects") == set(), "not left to the sweeper"
        assert_problem(client.delete(f"/results/{result_id}", headers=as_admin), 404, "not-found")
    finally:
        client.retention.store.close()


@pytest.mark.timing
def test_the_masks_png_encode_counts_within_the_saves_time_and_reads_back_as_the_mask(tmp_path, monkeypatch):
    """A 40 MP mask of noise takes ~4 s to encode as a PNG, and it ran before the save's timeout began: a
    removal's answer waited for it whatever its deadline. The encode now counts against that timeout; the PNG
    reads back as the mask the removal used."""
    from engines import imaging
    from serve.config import RetentionSettings
    from serve.retention import keeper
    from serve.retention.keeper import Retention

    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) > 0.5
    stored = imaging.decode_mask(keeper.mask_png(mask), mask.shape, imaging.DecodeLimits(max_bytes=1 << 20))
    assert (stored == mask).all()

    settings = RetentionSettings(enabled=True, object_store={"path": str(tmp_path)}, save_timeout_s=5)
    retention = Retention(settings, _Metrics())
    store = retention.store.opened()
    encode = keeper.mask_png
    monkeypatch.setattr(keeper, "mask_png", lambda mask: time.sleep(1.0) or encode(mask))

    async def answered_after(keeping) -> tuple[str | None, float]:  # asyncio.run's end waits for the encode's thread
        started = time.monotonic()
        return await keeping, time.monotonic() - started

    try:
        result_id, waited_s = asyncio.run(answered_after(_keep(retention, deadline_s=0.2)))
        assert result_id is None and waited_s < 0.7
        time.sleep(0.2)
        assert _rows(store) == [], "the save given up stored nothing"
    finally:
        retention.store.close()


def test_mask_encodes_given_up_at_their_deadline_hold_none_of_their_masks(tmp_path, monkeypatch):
    """A removal's answer no longer waits for its mask's encode past its deadline, so its admission slot is free
    while the encode runs on: the encodes are bounded (MASK_ENCODE_THREADS), and those given up while queued let
    go of their masks at once (40 MB each at 40 MP), or a stream of retained removals would pile them up."""
    import gc
    import weakref

    from engines.gate import GatePolicy
    from serve.config import RetentionSettings
    from serve.protocol import RemoveOptions
    from serve.retention import keeper
    from serve.retention.keeper import MASK_ENCODE_THREADS, Retention
    from serve.service import RemovalResult

    go = threading.Event()
    encode = keeper.mask_png
    monkeypatch.setattr(keeper, "mask_png", lambda mask: go.wait(10) and encode(mask))
    retention = Retention(RetentionSettings(enabled=True, object_store={"path": str(tmp_path)}), _Metrics())
    reply = RemovalResult(b"png bytes", "png", 3, [256], 1, 0.4, 1, "failed")
    policy = GatePolicy("annotate", 0.5, 1, True)
    given_up = []

    async def keep(i: int):
        mask = np.zeros((30, 40), bool)
        given_up.append(weakref.ref(mask))
        return await retention.keep(b"photo", "png", mask, reply, policy, RemoveOptions(), 20, None, 0.05)

    async def main():
        results = [await keep(i) for i in range(MASK_ENCODE_THREADS + 10)]
        await asyncio.sleep(0.05)  # the last one's cancelled encode task ends on the loop's next turns
        gc.collect()
        held = sum(ref() is not None for ref in given_up)
        go.set()
        return results, held

    try:
        results, held = asyncio.run(main())
        assert results == [None] * (MASK_ENCODE_THREADS + 10)
        assert held <= MASK_ENCODE_THREADS, f"{held} masks held; at most the {MASK_ENCODE_THREADS} encodes under way"
    finally:
        go.set()
        retention.store.close()


def test_a_store_whose_driver_is_missing_says_so_in_its_503_without_the_url(tmp_path, monkeypatch):
    """Its 503 said "the result store failed: RayTaskError(StoreUnavailable)"; the reason is said in words, never
    quoting the URL (its password) or an error's text."""
    from serve.config import RetentionSettings
    from serve.problems import Problem
    from serve.retention.keeper import Retention
    from serve.retention_deployment import HandleStoreClient

    database_driver(monkeypatch, "psycopg", installed=False)
    settings = RetentionSettings(
        enabled=True, object_store={"path": str(tmp_path)}, database_url="postgresql+psycopg://rorem:s3cret@db/results"
    )
    replica = _result_store(settings.model_dump(mode="json"))
    retention = Retention(settings, _Metrics(), HandleStoreClient(_Handle(replica)))
    with pytest.raises(Problem) as down:
        asyncio.run(retention.queue(10, None))
    assert down.value.problem == "retention-unavailable"
    assert down.value.detail.startswith(
        "the result store failed: it could not be opened (the Python module psycopg is not installed where it runs)"
    ) and "s3cret" not in down.value.detail and "db/results" not in down.value.detail
    replica.close()
