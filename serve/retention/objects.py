"""Content-addressed object stores: the key of some bytes is their SHA-256, so the same photo sent
twice is stored once and a key never points at other bytes than it names.

Key layout: `ab/cdef...` (the 64 hex digits, the first two as a folder, which keeps directories and
S3 listings small). A local folder is the default; an S3-compatible bucket (AWS, MinIO, Ceph, R2)
needs boto3, imported only when such a store is made.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

PARTIAL = ".partial-"  # a local object's name while it is written, beside its key, before the rename
# Beside the objects (never a key): the id of the database whose results the objects are, RetentionStore's tie
MARKER = "store-id"
# A marker without an id this old is a claim a crash or a full disk cut short, never one being written (a write of
# 32 bytes), with room for the clocks of the hosts sharing a folder to differ
STALE_MARKER_S = 300.0
# os.link's errors on a filesystem without hard links, where claim_marker falls back to an exclusive create
LINKS_UNSUPPORTED = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


class ObjectMissing(KeyError):
    """The key names no stored object (deleted, or never written)."""


def write_owner_only(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, readable by its owner alone: its folder made 0700 where missing (the one
    above must exist), the bytes written to a 0600 file beside it named PARTIAL..., then renamed over it."""
    path.parent.mkdir(exist_ok=True, mode=0o700)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def object_key(data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest[2:]}"


def _is_key(key: str) -> bool:
    head, _, tail = key.partition("/")
    return len(head) == 2 and len(tail) == 62 and all(c in "0123456789abcdef" for c in head + tail)


def _check_key(key: str) -> str:
    if not _is_key(key):
        raise ValueError(f"not an object key: {key!r}")
    return key


class ObjectStore(Protocol):
    def put(self, data: bytes) -> str:
        """Store the bytes under their content key and return it. An object's key names its bytes, so writing it
        again changes nothing; a caller that minds the cost asks `exists` first (RetentionStore.save does)."""

    def get(self, key: str) -> bytes:
        """The bytes of a key; ObjectMissing if there are none."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""

    def exists(self, key: str) -> bool: ...

    def written_before(self, moment: float) -> Iterator[str]:
        """The keys of the objects last written before `moment` (Unix time)."""

    def drop_partial_writes(self, moment: float) -> int:
        """Delete what writes cut short (a process killed mid-put) left, last written before `moment`; how many."""

    def marker(self) -> str | None:
        """The store id in the MARKER object; None if there is none."""

    def claim_marker(self, store_id: str) -> str:
        """Write `store_id` into the MARKER unless there is one already; returns the one there now."""

    def describe(self) -> str:
        """Where the objects are, for logs (no credentials)."""


class LocalObjectStore:
    """Objects as files under `root` (created with owner-only permissions)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, data: bytes) -> str:
        key = object_key(data)
        path = self.path(key)
        if not path.is_file():
            write_owner_only(path, data)
        return key

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def delete(self, key: str) -> None:
        """The key's folder stays, even emptied (256 at most): a put writing into it needs it there."""
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def written_before(self, moment: float) -> Iterator[str]:
        for path in self._written_before(moment):
            key = f"{path.parent.name}/{path.name}"
            if _is_key(key):
                yield key

    def drop_partial_writes(self, moment: float) -> int:
        """Never one written since `moment`: it may be a put's, under way."""
        dropped = 0
        for path in self._written_before(moment):
            if path.name.startswith(PARTIAL):
                path.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def marker(self) -> str | None:
        """None also while an exclusive create (a filesystem without hard links) has not written the id yet, and
        for an empty or undecodable marker (a claim a crash or a full disk cut short, before this version)."""
        return _id_in(self.root / MARKER)

    def claim_marker(self, store_id: str) -> str:
        """Written whole beside it, then linked into place: a link fails where the marker is, unlike a rename. A
        write that fails (a full disk) raises and leaves no marker, so the next sweep claims it again. A marker
        without an id (marker() None) older than STALE_MARKER_S is moved aside first; one that is another
        claim's, made just after such a move, is put back in place of ours."""
        moved = self._move_stale_marker()
        self._place_marker(moved or store_id)
        return self.marker()

    def _place_marker(self, store_id: str) -> None:
        fd, partial = tempfile.mkstemp(dir=self.root, prefix=PARTIAL)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(store_id)
            try:
                os.link(partial, self.root / MARKER)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in LINKS_UNSUPPORTED:
                    raise
                self._create_marker(store_id)
        finally:
            Path(partial).unlink(missing_ok=True)

    def _create_marker(self, store_id: str) -> None:
        """Without hard links (CIFS, some FUSE mounts): an exclusive create, removed again if its write fails, so
        that no empty marker stays to be taken for a claim under way."""
        created = False
        try:
            with open(self.root / MARKER, "x") as marker:
                created = True
                marker.write(store_id)
        except FileExistsError:
            pass
        except BaseException:
            if created:
                (self.root / MARKER).unlink(missing_ok=True)
            raise

    def _move_stale_marker(self) -> str | None:
        """Move a stale marker without an id aside (a rename: of two claims, one moves it); returns the id in what
        was moved where that was another claim's fresh marker instead (it moved the stale one first)."""
        path = self.root / MARKER
        try:
            if self.marker() is not None or time.time() - path.stat().st_mtime < STALE_MARKER_S:
                return None
            aside = self.root / f"{PARTIAL}{MARKER}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            return _id_in(aside)
        finally:
            aside.unlink(missing_ok=True)

    def _written_before(self, moment: float) -> Iterator[Path]:
        """The files in the key folders last written before `moment`; files deleted while this walks them (a delete
        elsewhere, a put's rename) are passed over, and so are folders."""
        for folder in self.root.glob("??"):
            try:
                with os.scandir(folder) as entries:
                    names = [entry.name for entry in entries]
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    if (folder / name).stat().st_mtime < moment:
                        yield folder / name
                except FileNotFoundError:
                    continue

    def describe(self) -> str:
        return f"folder {self.root}"


class S3ObjectStore:
    """Objects in an S3-compatible bucket under `prefix/`. Credentials come from boto3's usual chain
    (environment, shared config, instance or pod role), never from the service's config."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client=None,
    ):
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise RuntimeError(
                    "retention.object_store.s3 needs boto3, which is not installed: pip install boto3"
                ) from exc
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url

    def name(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, data: bytes) -> str:
        key = object_key(data)
        self.client.put_object(Bucket=self.bucket, Key=self.name(key), Body=data)
        return key

    def get(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.name(key))
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectMissing(key) from exc
            raise
        return answer["Body"].read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def written_before(self, moment: float) -> Iterator[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for listed in page.get("Contents", ()):
                key = listed["Key"][len(start) :]
                if _is_key(key) and listed["LastModified"].timestamp() < moment:
                    yield key

    def drop_partial_writes(self, moment: float) -> int:
        """A PUT stores the whole object or nothing: no partial writes to delete."""
        return 0

    def marker(self) -> str | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._marker_name())
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        return answer["Body"].read().decode().strip()

    def claim_marker(self, store_id: str) -> str:
        """A conditional PUT (If-None-Match: *), which S3 refuses where the marker is. Where the conditional PUT is
        not known (an older botocore; an S3-compatible store answering 501), a read, then a plain PUT where there is
        none: only two processes making a new store at the same moment could then both write one."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._marker_name(), Body=store_id.encode(), IfNoneMatch="*")
        except Exception as exc:
            code = _error_code(exc)
            if code in ("412", "PreconditionFailed", "ConditionalRequestConflict"):
                return self.marker()
            if code not in ("501", "NotImplemented") and type(exc).__name__ != "ParamValidationError":
                raise
            if self.marker() is None:
                self.client.put_object(Bucket=self.bucket, Key=self._marker_name(), Body=store_id.encode())
        return self.marker()

    def _marker_name(self) -> str:
        return f"{self.prefix}/{MARKER}" if self.prefix else MARKER

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def _id_in(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _error_code(exc: Exception) -> str:
    """The S3 error code botocore's ClientError carries in `response` ("" for another error)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _is_not_found(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")
