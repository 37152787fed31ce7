"""The retention metadata: tables, the engine, and migrations applied at startup.

SQLite by default (a file next to the objects) or PostgreSQL by URL (others are untried: the verdict trim's
NOT IN a LIMITed subquery of its own table fails on MySQL, and migrations take a lock on these two alone). The
schema is owned by the Alembic revisions in migrations/ (applied with `migrate`, no alembic.ini);
the models below must describe the same tables (a test compares them).
Times are naive UTC.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x524F52454D  # pg_advisory_lock key: "RORem"; replicas starting together migrate one at a time


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class ResultRow(Base):
    """One retained removal: the objects' keys, what the gate saw, and the request's parameters."""

    __tablename__ = "results"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    request_id: Mapped[str | None] = mapped_column(String(128))
    source_key: Mapped[str] = mapped_column(String(65), index=True)
    mask_key: Mapped[str] = mapped_column(String(65), index=True)
    result_key: Mapped[str] = mapped_column(String(65), index=True)
    source_media_type: Mapped[str] = mapped_column(String(64))
    result_media_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    source_bytes: Mapped[int] = mapped_column(Integer)
    result_bytes: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    gate: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    bucket: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)  # the creating key's team or name


class FeedbackRow(Base):
    """One verdict on a result. Verdicts are appended; the newest one is the result's label."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(String(32), ForeignKey("results.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)
    labeller: Mapped[str | None] = mapped_column(String(200))  # free text from the client: who says they labelled
    # the name of the API key that submitted the verdict, set by the service; None: auth off, or before 0003
    principal: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)


class StoreIdRow(Base):
    """The one row (id 1) naming the object store this database's results are in: its MARKER holds the same id.
    `legacy`: given when an earlier version's database was upgraded (serve.retention.db._upgrade), not when a new
    pair was tied: for the operator reading the row."""

    __tablename__ = "store_id"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    store_id: Mapped[str] = mapped_column(String(32))
    legacy: Mapped[bool] = mapped_column(Boolean)


def make_engine(url: str) -> Engine:
    """An engine; for SQLite: its folder and file made owner-only where missing (SQLite gives the -wal and -shm
    files the file's mode), WAL (readers never block the writer), foreign keys on, and a busy timeout so several
    ingress replicas can share one file."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):  # URIs as given
        database = Path(parsed.database).expanduser()
        database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            database.touch(mode=0o600, exist_ok=False)
        except FileExistsError:
            pass
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def alembic_config(url: str):
    """Alembic's Config built in code: no alembic.ini is needed where the service runs."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision, one process at a time (a file lock next to a SQLite
    file, an advisory lock on PostgreSQL)."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        from filelock import FileLock

        with FileLock(str(Path(engine.url.database).expanduser()) + ".migrate.lock", mode=0o600):
            _upgrade(command, config, engine)
    else:
        _upgrade(command, config, engine)


class SchemaNotCurrent(RuntimeError):
    """The database's schema is not this checkout's newest revision, and the reader must not migrate it."""


def check_schema_current(engine: Engine) -> None:
    """SchemaNotCurrent unless the schema is at this checkout's newest revision: for readers that must not migrate
    a database the service owns (only the service's own start does)."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise SchemaNotCurrent(
            f"the retention database {engine.url.render_as_string(hide_password=True)} is at schema revision "
            f"{current or 'none'}, this checkout's newest is {head}: read it with the service's own version, or "
            "let the service of this version start on it first (its start migrates it)"
        )


# the revisions before the store id (0004): a database upgraded from one of them is an earlier version's
_BEFORE_STORE_ID = ("0001", "0002", "0003")


def _upgrade(command, config, engine: Engine) -> None:
    """The whole upgrade is one transaction, so a start stopped mid-migration leaves the schema as it was. Python's
    sqlite3 opens none before DDL (each statement would commit alone: a revision half applied, its next run failing
    on what the first half made), hence the explicit BEGIN on SQLite, whose DDL is transactional.

    A database upgraded from before 0004 gets its store id as legacy, whether it holds results or not: its store
    may hold images, and the operator's way to tie the two (docs/operations.md) needs the id."""
    from alembic.migration import MigrationContext

    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        started_at = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(config, "head")
        if started_at in _BEFORE_STORE_ID:
            connection.execute(insert(StoreIdRow), {"id": 1, "store_id": uuid.uuid4().hex, "legacy": True})
