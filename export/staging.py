"""Staging folders that a killed export does not leave behind for good.

An export writes its files (GBs on SDXL) into a hidden folder beside the final ones and removes it on the way
out; a SIGKILL (the OOM killer, a crash-looping replica exporting at start) skips that, and each retry left
another. Each folder now holds `.owner`, locked (flock) by the process that made it for as long as it lives: the
next staging folder made beside it removes every one whose lock it can take, i.e. whose process is gone. A lock
rather than a PID: it holds across PID namespaces (and across hosts sharing the volume where flock does: not on
NFS mounted with `nolock` or `local_lock=flock`), and a reused PID cannot hold it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER = ".owner"


@contextmanager
def staging_folder(final_folder: Path, prefix: str = ".staging-") -> Iterator[Path]:
    """A hidden folder beside the final files (same filesystem: the renames are atomic), removed on the way
    out, whatever happened; the leftovers of killed processes beside it (same `prefix`) are removed first."""
    final_folder.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final_folder, prefix)
    # made under another name and renamed once locked: a sweep never sees a live folder without its lock
    made = Path(tempfile.mkdtemp(prefix=".new" + prefix, dir=final_folder))
    owner = os.open(made / OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)
        folder = final_folder / f"{prefix}{os.getpid()}-{made.name.removeprefix('.new' + prefix)}"
        made.rename(folder)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(made, ignore_errors=True)  # only when the rename did not happen
        os.close(owner)


def sweep_leftovers(final_folder: Path, prefix: str = ".staging-") -> list[Path]:
    """Remove the staging folders beside the final files whose process is gone (their `.owner` unlocked); returns
    them. A folder without `.owner` is not one of ours (an export's --out may be any folder, another tool's
    `.staging-*` beside it; an older export still running during an upgrade): it is left alone."""
    removed = []
    for folder in sorted(final_folder.glob(prefix + "*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            owner = os.open(folder / OWNER, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live export's
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(owner)
    return removed


def sync_file(path: Path) -> None:
    """Flush a written file's bytes to disk before it is renamed into place: XFS, and ext4 without auto_da_alloc, can
    make the rename durable before the data, and a crash then leaves an empty file under the final name."""
    _fsync(path, os.O_RDONLY)


def sync_folder(path: Path) -> None:
    """Make the renames into a folder durable (its entries are written by the fsync of the folder itself)."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
