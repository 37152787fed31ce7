"""Exports recorded in the bundle manifest.

Files go under <bundle>/exports/ and are listed in manifest.files with sha256 and size, like the
weights; `Bundle.verify` leaves them to what reads them (engines.bundle.is_export). Each export has a record in
manifest.provenance["exports"] (Manifest forbids unknown top-level keys; provenance is free-form);
serving takes only what `engines.runners.current_export` accepts: a record whose path is one of its
files, listed in manifest.files, made from the bundle's UNet weights, for an ONNX graph verified at each
bucket side served (its report's "cases"), and for a plan, built from the bundle's current ONNX export of
its dtype (the plan's onnx_sha256 is that record's graph sha256); the runners load those files from bytes
checked against their sha256:

    "exports": {
      "onnx.float32": {"kind": "onnx", "dtype": "float32", "path": "exports/unet.fp32.onnx",
                       "files": ["exports/unet.fp32.onnx"], "unet_sha256": "...",
                       "metadata": {... export_unet_onnx metadata ...}, "verify": {... report ...}},
      "onnx.float16": {...},
      "tensorrt.float16.sm90": {"kind": "tensorrt", "dtype": "float16", "path": "exports/unet.fp16.sm90.plan",
                       "files": [...], "unet_sha256": "...", "plan": {... PlanInfo, with onnx_sha256 ...}}
    }

A record is written by an export that passed its parity check (or, with `verify: {"passed": false,
"skipped": true}`, by one asked not to run it: serving refuses that one), by `python -m export verify`
only when the check passed at the default tolerances, and for a plan only when it was built from the
bundle's current ONNX export. Its unet_sha256 is the UNet the files were made from (or, by `verify`,
checked against), refused under the manifest lock when the bundle's UNet is no longer that one.

An export is made in a staging folder inside exports/ and verified there; only then are its files
renamed over the current ones and the record written, so a failed or interrupted export leaves the
previous export and its record as they were; the staging folder of one killed outright (SIGKILL) is
removed by the next export beside it (export.staging).

The manifest is rewritten atomically (temp file + rename) under a lock next to the bundle folder; it and the
export files are flushed (fsync) before their renames and the folders after, so a crash leaves no empty file
under a final name. One ONNX export or verify per dtype runs at a time (`export_lock`), and a record never loses
a side the record it replaces was checked at (`check_keeps_sides`).
"""

from __future__ import annotations

import copy
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock

from engines.bundle import EXPORTS_DIR, MANIFEST, UNET_WEIGHTS, Bundle, BundleError, FileEntry, Manifest, sha256_of
from engines.runners import current_export, export_command, export_key, verified_sides
from export.progress import QUIET, Progress
from export.staging import staging_folder, sync_file, sync_folder


def manifest_lock(bundle_path: Path) -> FileLock:
    return FileLock(str(_beside(bundle_path, ".manifest.lock")))


def _beside(bundle_path: Path, suffix: str) -> Path:
    """A lock file next to the bundle folder as it resolves: one bundle reached by two paths (/models/current, a
    symlink, and the folder it names) is one lock."""
    folder = Path(bundle_path).resolve()
    return folder.with_name(folder.name + suffix)


def check_output_paths(
    bundle_path: str | Path, key: str, paths: Sequence[Path], manifest: Manifest | None = None
) -> None:
    """Refuse an output of the `key` export inside the bundle folder but outside exports/ (over the weights or the
    manifest), or over a file of another export's record: `--out` or `--plan` naming one replaced the bundle's
    own files. Outputs outside the bundle folder are not its business."""
    root = Path(bundle_path).resolve()
    manifest = manifest or Manifest.model_validate_json((root / MANIFEST).read_text())
    records = manifest.provenance.get("exports", {})
    owners = {name: k for k, r in records.items() if isinstance(r, dict) for name in r.get("files", [])}
    for path in map(Path, paths):
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            continue
        name = resolved.relative_to(root).as_posix()
        parts = PurePosixPath(name).parts
        if len(parts) < 2 or parts[0] != EXPORTS_DIR:
            raise ValueError(
                f"{path}: inside the bundle folder {root} exports are written under {EXPORTS_DIR}/, "
                "never over the bundle's own files"
            )
        owner = owners.get(name, key)  # a listed export no record owns (its record lost) is this one's to replace
        if owner != key:
            raise ValueError(f"{path} is a file of the bundle's {owner} export: not overwritten by the {key} export")


def check_writable(paths: Sequence[Path], record_in: Path | None = None) -> None:
    """Refuse, before minutes of exporting, checking or building, files that cannot be written where they go (a
    read-only mount, another user's folder, one made immutable with chattr +i, which stops root too), and with
    `record_in` (a bundle folder) its manifest: the OSError names the file, as the write at the end would have.
    The folders are made where missing, as the export makes them; a path that is a folder is refused too (it failed
    after the whole export, naming the staging folder)."""
    for path in [*map(Path, paths), *([_manifest_partial(record_in)] if record_in else [])]:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a folder, not a file to write (name the file in it)", str(path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".probe-"):
                pass
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None


def _manifest_partial(bundle_path: Path) -> Path:
    """Where the manifest is written before it is renamed over the current one."""
    return bundle_path / (MANIFEST + ".partial")


def check_keeps_sides(bundle_path: Path, key: str, replaced: Any, record: dict[str, Any]) -> None:
    """Refuse a passed ONNX check that leaves out a side the record it replaces was checked at: the export or verify
    read that record before minutes of work (`sides_to_check`), and another one recorded more sides meanwhile
    (serving refuses the graph at a side its record lacks). A check recorded as skipped (--no-verify) is asked for;
    a report without its cases (an older exporter's) says no sides to compare."""
    report = record.get("verify")
    checked = isinstance(report, dict) and report.get("passed") is True and "cases" in report
    if not isinstance(replaced, dict) or not checked:
        return
    lost = verified_sides(replaced) - verified_sides(record)
    if lost:
        covering = ",".join(str(side) for side in sorted(verified_sides(replaced) | verified_sides(record)))
        raise BundleError(
            f"{bundle_path}: the {key} record was checked at {sorted(verified_sides(replaced))} px (recorded "
            f"meanwhile by another export or verify); this check, without {sorted(lost)} px, would drop them: not "
            f"recorded; run it again with --buckets {covering}"
        )


def check_inside_bundle(bundle_path: Path, default_path: Path) -> None:
    """Refuse a default output path (under exports/) that resolves outside the bundle folder: exports/ (or the file)
    a symlink out of it, the export was written there, reported as passing and never recorded, so never served."""
    root = Path(bundle_path).resolve()
    if default_path.resolve().is_relative_to(root):
        return
    below = [part for part in (*reversed(default_path.parents), default_path) if part.is_relative_to(bundle_path)]
    link = next((part for part in below if part != bundle_path and part.is_symlink()), default_path)
    raise BundleError(
        f"{link} is a symlink to {link.resolve()}, outside the bundle folder {root}: an export written there is not "
        f"recorded, and serving reads only recorded exports; make {EXPORTS_DIR}/ a folder of the bundle (or name an "
        "output outside it: written, not recorded)"
    )


def record_export(
    bundle: Bundle | str | Path,
    key: str,
    files: list[Path],
    record: dict[str, Any],
    *,
    made_from: str | None,
    staged: Path | None = None,
    checked: dict[str, str] | None = None,
) -> Bundle:
    """List `files` (inside the bundle folder) with their sha256 and store `record` (plus "files" and
    "unet_sha256") as provenance["exports"][key]; returns the reloaded bundle.
    Files listed by an earlier record under the same key and not reused are unlisted.

    `made_from`: the sha256 of the UNet weights the files were made from (or checked against): refused
    (BundleError) unless it is the bundle's UNet as its manifest lists it under the lock, so an export that
    raced a bundle replacement is not recorded as current.

    `staged`: a folder holding the new content of each file under its name; they are hashed there, then
    renamed over the files just before the manifest is written (under its lock), and the earlier record's
    files the new one does not list are deleted.

    `checked`: the sha256 of a file (by its name in the bundle) as it was when it was checked: one that differs
    under the lock (replaced during a minutes-long check) is refused, not recorded as the bytes that passed."""
    path = Path(bundle.path if isinstance(bundle, Bundle) else bundle).resolve()
    relative = []
    for file in files:
        file = Path(file).resolve()
        if not file.is_relative_to(path):
            raise ValueError(f"{file} is outside the bundle folder {path}: only files inside it are recorded")
        relative.append(file.relative_to(path).as_posix())
    with manifest_lock(path):
        manifest = Manifest.model_validate_json((path / MANIFEST).read_text())  # re-read under the lock
        check_output_paths(path, key, [path / name for name in relative], manifest)
        unet_sha256 = manifest.files[UNET_WEIGHTS].sha256
        if made_from != unet_sha256:
            raise BundleError(
                f"{path}: the {key} export was made from UNet weights {(made_from or 'unrecorded')[:12]}, the "
                f"bundle's are now {unet_sha256[:12]} (replaced meanwhile): not recorded; export it again"
            )
        provenance = copy.deepcopy(manifest.provenance)
        exports = provenance.setdefault("exports", {})
        check_keeps_sides(path, key, exports.get(key), record)
        previous = exports.get(key, {}).get("files", [])
        dropped = [name for name in previous if name not in relative and name.startswith("exports/")]
        files_table = dict(manifest.files)
        for name in dropped:
            files_table.pop(name, None)
        for name in relative:
            content = staged / Path(name).name if staged else path / name
            sha256 = sha256_of(content)
            if staged:
                sync_file(content)
            if checked and checked.get(name, sha256) != sha256:
                raise BundleError(
                    f"{path}: {name} changed while it was checked ({checked[name][:12]} checked, {sha256[:12]} "
                    f"now): not recorded; check it again"
                )
            files_table[name] = FileEntry(sha256=sha256, bytes=content.stat().st_size)
        exports[key] = {**record, "files": relative, "unet_sha256": unet_sha256}
        updated = manifest.model_copy(update={"files": files_table, "provenance": provenance})
        tmp = _manifest_partial(path)
        tmp.write_text(Manifest.model_validate(updated.model_dump()).model_dump_json(indent=2))
        sync_file(tmp)
        if staged:
            for name in relative:
                os.replace(staged / Path(name).name, path / name)
            for folder in {(path / name).parent for name in relative}:
                sync_folder(folder)  # the files' renames are on disk before the manifest that lists them
        os.replace(tmp, path / MANIFEST)
        sync_folder(path)
        if staged:
            for name in dropped:
                (path / name).unlink(missing_ok=True)
    return Bundle.load(path, verify=False)


@contextmanager
def export_lock(bundle_path: Path, dtype: str, *, required: bool = True) -> Iterator[None]:
    """One ONNX export or verify of `dtype` at a time on a bundle (the CLI's, a replica's export_missing), each reading
    the record it replaces once it holds the lock: a second one waits, then checks the sides the first recorded.
    Not `required` (nothing to record, or a check a read-only mount cannot record anyway), it goes on without the lock
    where the lock file cannot be made."""
    with ExitStack() as held:
        try:
            held.enter_context(FileLock(str(_beside(bundle_path, f".export-onnx-{dtype}.lock"))))
        except OSError:
            if required:
                raise
        yield


def ensure_unet_onnx(
    bundle: Bundle,
    dtype: str = "float32",
    *,
    buckets: Sequence[int] = (),
    progress: Progress = QUIET,
) -> Path:
    """The bundle's current ONNX export of this dtype, exported, verified (on the default cases and
    each of `buckets`, image sides) and recorded first if serving would refuse it (missing, unrecorded,
    unverified or not at each of `buckets`, made from other weights). Safe to call from several processes
    at once. The lock (a file beside the bundle) is taken only to export: a current export is served from a
    read-only mount; a bundle there that needs one is a BundleError saying where to export it."""
    try:
        return current_export(Bundle.load(bundle.path, verify=False), "onnx", dtype, buckets=buckets).path
    except BundleError as exc:
        needed = exc
    try:
        with export_lock(bundle.path, dtype):
            try:  # again: another process may have exported it meanwhile
                return current_export(Bundle.load(bundle.path, verify=False), "onnx", dtype, buckets=buckets).path
            except BundleError as exc:
                progress.say(f"exporting again: {exc}")
            _export_and_record_onnx(bundle.path, dtype, buckets=buckets, progress=progress)
    except OSError as exc:
        raise BundleError(
            f"engine.export_missing cannot export the UNet into the bundle ({exc}): run the command below where the "
            f"bundle is writable (not on a read-only mount), or set engine.export_missing: false. {needed}"
        ) from exc
    return current_export(Bundle.load(bundle.path, verify=False), "onnx", dtype, buckets=buckets).path


def sides_to_check(bundle: Bundle, dtype: str, buckets: Sequence[int]) -> list[int]:
    """`buckets` and each side the bundle's current ONNX record of `dtype` was checked at: an export or a
    verify that replaces the record checks them all, so a record never loses a side (a bundle served at 1024
    px stays served after `export onnx` / `verify` without --buckets, or a re-export at start)."""
    record = bundle.manifest.provenance.get("exports", {}).get(export_key("onnx", dtype))
    return sorted(set(buckets) | (verified_sides(record) if isinstance(record, dict) else set()))


def export_and_record_onnx(
    bundle: Bundle,
    dtype: str = "float32",
    *,
    out_path: Path | None = None,
    verify: bool = True,
    buckets: Sequence[int] = (),
    progress: Progress = QUIET,
    **export_options,
) -> tuple[Path, dict[str, Any]]:
    """Export the bundle's UNet into a staging folder beside `out_path`, verify it there on ONNX Runtime
    (CPU; the default cases plus each of `buckets` and each side the record it replaces was checked at
    (`sides_to_check`), image sides), then move it to `out_path` and record it in the manifest when that is
    inside the bundle folder. A failed check raises and leaves the previous export (and its record) in place.
    Without `verify` the record says the check was skipped, and serving refuses it. Returns (path, record).
    Under `export_lock`; the default `out_path` resolving outside the bundle folder is refused (check_inside_bundle).
    """
    from engines.runners import export_filename

    target = Path(out_path) if out_path else bundle.path / export_filename("onnx", dtype)
    with export_lock(bundle.path, dtype, required=target.resolve().is_relative_to(bundle.path.resolve())):
        return _export_and_record_onnx(bundle.path, dtype, out_path=out_path, verify=verify, buckets=buckets,
                                       progress=progress, **export_options)  # fmt: skip


def _export_and_record_onnx(
    bundle_path: Path,
    dtype: str,
    *,
    out_path: Path | None = None,
    verify: bool = True,
    buckets: Sequence[int] = (),
    progress: Progress = QUIET,
    **export_options,
) -> tuple[Path, dict[str, Any]]:
    """export_and_record_onnx under the export lock: the bundle's manifest as it is now."""
    from engines.runners import export_filename
    from export.onnx_export import EXAMPLE_SHAPE, export_unet_onnx, onnx_files, read_onnx_metadata
    from export.verify import cases_for_graph, static_cases, verify_onnx

    bundle = Bundle.load(bundle_path, verify=False)
    buckets = sides_to_check(bundle, dtype, buckets)
    if out_path is None:
        out_path = bundle.path / export_filename("onnx", dtype)
        check_inside_bundle(bundle.path, out_path)
    out_path = Path(out_path)
    check_output_paths(bundle.path, export_key("onnx", dtype), [out_path, out_path.with_name(out_path.name + ".data")])
    if verify and not export_options.get("dynamic", True):
        static_cases(out_path, EXAMPLE_SHAPE, buckets)  # before minutes of exporting, not after
    recorded = out_path.resolve().is_relative_to(bundle.path.resolve())
    check_writable([out_path], record_in=bundle.path if recorded else None)  # before them too
    # the weights file of the graph this export replaces (one it makes without one leaves it stale); outside the
    # bundle, one beside no graph is not an export's: it was deleted all the same
    replaces_data = recorded or out_path.is_file()
    with staging_folder(out_path.parent) as staging:
        staged = export_unet_onnx(bundle, staging / out_path.name, dtype=dtype, progress=progress, **export_options)
        record: dict[str, Any] = {"kind": "onnx", "dtype": dtype, "metadata": read_onnx_metadata(staged)}
        if verify:
            report = verify_onnx(
                staged, bundle.load_unet(), cases=cases_for_graph(staged, buckets), progress=progress,
                sequence_length=bundle.manifest.architecture.prompt.sequence_length,
            )  # fmt: skip
            record["verify"] = report
            if not report["passed"]:
                raise RuntimeError(f"{out_path} failed verification (the previous export, if any, is kept): {report}")
        else:
            record["verify"] = {"passed": False, "skipped": True}
        final_files = [out_path.parent / file.name for file in onnx_files(staged)]
        if recorded:
            record["path"] = out_path.resolve().relative_to(bundle.path.resolve()).as_posix()
            made_from = record["metadata"].get("unet_sha256")
            record_export(bundle, export_key("onnx", dtype), final_files, record, made_from=made_from, staged=staging)
            progress.say(f"recorded {record['path']} in {bundle.path / MANIFEST}")
        else:
            for file in final_files:
                sync_file(staging / file.name)
                os.replace(staging / file.name, file)
            progress.say(f"{out_path}: written, not recorded: outside the bundle folder {bundle.path}")
        stale_data = out_path.with_name(out_path.name + ".data")
        if stale_data not in final_files and replaces_data:
            stale_data.unlink(missing_ok=True)
    return out_path, record


def check_plan_source(bundle: Bundle, onnx_sha256: str, dtype: str, buckets: Sequence[int] = ()) -> None:
    """Refuse a plan for `buckets` (image sides) that serving would refuse (engines.runners.current_export):
    built from another ONNX than the bundle's current export of its dtype, or from one not verified at each."""
    onnx = current_export(bundle, "onnx", dtype, buckets=buckets)
    if onnx_sha256 != onnx.sha256:
        raise BundleError(
            f"{bundle.path}: the plan is built from an ONNX ({onnx_sha256[:12]}) other than the bundle's current "
            f"{export_key('onnx', dtype)} export ({onnx.sha256[:12]}): run "
            f"`{export_command(bundle, 'tensorrt', dtype, buckets)}` (without --onnx)"
        )


def record_plan(
    bundle: Bundle,
    plan_path: Path,
    info: dict[str, Any],
    dtype: str = "float16",
    *,
    buckets: Sequence[int] = (),
    staged: Path | None = None,
) -> Bundle:
    """Record a TensorRT plan (and its .json build record) built inside the bundle folder for `buckets` from the
    bundle's current ONNX export of `dtype` (check_plan_source); `staged`: the folder it was built in, moved to
    `plan_path` only once it is recorded (see record_export)."""
    from engines.runners import plan_sidecar

    current = Bundle.load(bundle.path, verify=False)
    check_plan_source(current, info["onnx_sha256"], dtype, buckets)
    key = export_key("tensorrt", dtype, info["compute_capability"])
    record = {
        "kind": "tensorrt",
        "dtype": dtype,
        "path": Path(plan_path).resolve().relative_to(bundle.path.resolve()).as_posix(),
        "plan": info,
    }
    files, made_from = [Path(plan_path), plan_sidecar(plan_path)], current.manifest.files[UNET_WEIGHTS].sha256
    return record_export(bundle, key, files, record, made_from=made_from, staged=staged)
