"""Exports recorded in the bundle manifest.

Files go under <bundle>/exports/ and are listed in manifest.files with sha256 and size, like the
weights, so `Bundle.load(verify=True)` covers them. Each export has a record in
manifest.provenance["exports"] (Manifest forbids unknown top-level keys; provenance is free-form);
serving takes only what `engines.runners.current_export` accepts: a record whose path is one of its
files, listed in manifest.files, made from the bundle's UNet weights, and for a plan, built from the
bundle's current ONNX export of its dtype (the plan's onnx_sha256 is that record's graph sha256):

    "exports": {
      "onnx.float32": {"kind": "onnx", "dtype": "float32", "path": "exports/unet.fp32.onnx",
                       "files": ["exports/unet.fp32.onnx"], "unet_sha256": "...",
                       "metadata": {... export_unet_onnx metadata ...}, "verify": {... report ...}},
      "onnx.float16": {...},
      "tensorrt.float16.sm90": {"kind": "tensorrt", "dtype": "float16", "path": "exports/unet.fp16.sm90.plan",
                       "files": [...], "unet_sha256": "...", "plan": {... PlanInfo, with onnx_sha256 ...}}
    }

A record is written by an export that passed its parity check (or was asked not to run one), by
`python -m export verify` only when the check passed at the default tolerances, and for a plan only
when it was built from the bundle's current ONNX export.

The manifest is rewritten atomically (temp file + rename) under a lock next to the bundle folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from engines.bundle import MANIFEST, UNET_WEIGHTS, Bundle, BundleError, FileEntry, Manifest, sha256_of
from engines.runners import current_export, export_command, export_key
from export.progress import QUIET, Progress


def manifest_lock(bundle_path: Path) -> FileLock:
    return FileLock(str(bundle_path.with_name(bundle_path.name + ".manifest.lock")))


def record_export(bundle: Bundle | str | Path, key: str, files: list[Path], record: dict[str, Any]) -> Bundle:
    """List `files` (inside the bundle folder) with their sha256 and store `record` (plus "files"
    and the bundle's UNet sha256) as provenance["exports"][key]; returns the reloaded bundle.
    Files listed by an earlier record under the same key and not reused are unlisted."""
    path = Path(bundle.path if isinstance(bundle, Bundle) else bundle).resolve()
    relative = []
    for file in files:
        file = Path(file).resolve()
        if not file.is_relative_to(path):
            raise ValueError(f"{file} is outside the bundle folder {path}: only files inside it are recorded")
        relative.append(file.relative_to(path).as_posix())
    with manifest_lock(path):
        manifest = Manifest.model_validate_json((path / MANIFEST).read_text())  # re-read under the lock
        provenance = copy.deepcopy(manifest.provenance)
        exports = provenance.setdefault("exports", {})
        previous = exports.get(key, {}).get("files", [])
        files_table = dict(manifest.files)
        for name in previous:
            if name not in relative and name.startswith("exports/"):
                files_table.pop(name, None)
        for name in relative:
            file = path / name
            files_table[name] = FileEntry(sha256=sha256_of(file), bytes=file.stat().st_size)
        exports[key] = {**record, "files": relative, "unet_sha256": manifest.files[UNET_WEIGHTS].sha256}
        updated = manifest.model_copy(update={"files": files_table, "provenance": provenance})
        tmp = path / (MANIFEST + ".partial")
        tmp.write_text(Manifest.model_validate(updated.model_dump()).model_dump_json(indent=2))
        os.replace(tmp, path / MANIFEST)
    return Bundle.load(path, verify=False)


def ensure_unet_onnx(
    bundle: Bundle,
    dtype: str = "float32",
    *,
    verify: bool = True,
    progress: Progress = QUIET,
) -> Path:
    """The bundle's current ONNX export of this dtype, exported (and verified, recorded) first if
    serving would refuse it (missing, unrecorded, made from other weights). Safe to call from several
    processes at once."""
    with FileLock(str(bundle.path.with_name(bundle.path.name + f".export-onnx-{dtype}.lock"))):
        try:
            return current_export(Bundle.load(bundle.path, verify=False), "onnx", dtype).path
        except BundleError as exc:
            progress.say(f"exporting again: {exc}")
        export_and_record_onnx(Bundle.load(bundle.path, verify=False), dtype, verify=verify, progress=progress)
        return current_export(Bundle.load(bundle.path, verify=False), "onnx", dtype).path


def export_and_record_onnx(
    bundle: Bundle,
    dtype: str = "float32",
    *,
    out_path: Path | None = None,
    verify: bool = True,
    progress: Progress = QUIET,
    **export_options,
) -> tuple[Path, dict[str, Any]]:
    """Export the bundle's UNet, verify it on ONNX Runtime (CPU), and record it in the manifest
    when the file is inside the bundle folder. Returns (path, record)."""
    from engines.runners import export_filename
    from export.onnx_export import export_unet_onnx, onnx_files, read_onnx_metadata
    from export.verify import verify_onnx

    out_path = Path(out_path) if out_path else bundle.path / export_filename("onnx", dtype)
    export_unet_onnx(bundle, out_path, dtype=dtype, progress=progress, **export_options)
    record: dict[str, Any] = {"kind": "onnx", "dtype": dtype, "metadata": read_onnx_metadata(out_path)}
    if verify:
        report = verify_onnx(out_path, bundle.load_unet(), progress=progress)
        record["verify"] = report
        if not report["passed"]:
            raise RuntimeError(f"{out_path} failed verification: {report}")
    if out_path.resolve().is_relative_to(bundle.path.resolve()):
        record["path"] = out_path.resolve().relative_to(bundle.path.resolve()).as_posix()
        record_export(bundle, export_key("onnx", dtype), onnx_files(out_path), record)
        progress.say(f"recorded {record['path']} in {bundle.path / MANIFEST}")
    return out_path, record



def check_plan_source(bundle: Bundle, onnx_sha256: str, dtype: str) -> None:
    """Refuse a plan built from another ONNX than the bundle's current export of its dtype: serving
    would refuse it (engines.runners.current_export)."""
    onnx = current_export(bundle, "onnx", dtype)
    if onnx_sha256 != onnx.sha256:
        raise BundleError(
            f"{bundle.path}: the plan is built from an ONNX ({onnx_sha256[:12]}) other than the bundle's current "
            f"{export_key('onnx', dtype)} export ({onnx.sha256[:12]}): run "
            f"`{export_command(bundle, 'tensorrt', dtype)}` (without --onnx)"
        )


def record_plan(bundle: Bundle, plan_path: Path, info: dict[str, Any], dtype: str = "float16") -> Bundle:
    """Record a TensorRT plan (and its .json build record) built inside the bundle folder from the
    bundle's current ONNX export of `dtype`."""
    from engines.runners import plan_sidecar

    check_plan_source(Bundle.load(bundle.path, verify=False), info["onnx_sha256"], dtype)
    key = export_key("tensorrt", dtype, info["compute_capability"])
    record = {
        "kind": "tensorrt",
        "dtype": dtype,
        "path": Path(plan_path).resolve().relative_to(bundle.path.resolve()).as_posix(),
        "plan": info,
    }
    return record_export(bundle, key, [Path(plan_path), plan_sidecar(plan_path)], record)
