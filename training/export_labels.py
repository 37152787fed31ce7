"""`export-labels`: the verdicts people gave on the service's retained results, as a labelled set
for the `discriminator` stage (the paper's human-annotation round, on real user images).

Reads the retention store (serve/retention) named by a Serve config's `retention` section, or by
the objects folder (+ database URL), and writes into out/ the labelled metadata format that
`discriminator` reads (training/data.py): `GT` is the judged result, `score` is 1 for yes, 0 for no.

    source/<sha256>.png     the photo as the service decoded it (EXIF orientation applied)
    mask/<sha256>.png       the removed region (white), as the service dilated it
    edited/<sha256>.<ext>   the result that was judged
    metadata.json           [{"source", "mask", "GT", "score"}], paths relative to it
    summary.json            counts, filters, and each exported result with its verdict and reason

Files are named by content, so one photo behind several results is one source file, and the
discriminator's held-out split (by source) keeps all of its results on one side. Only a result's
newest verdict counts. Files of earlier exports that are no longer labelled (deleted, expired,
filtered out) are removed from these three folders, so the export mirrors the store.

Results with the same content (source, mask and result: the service is deterministic and the store
keeps one object per content) are one example, exported once: a verdict given several times counts
once, and a group whose results were judged differently (one "yes", one "no") is left out and
listed under `conflicting` in summary.json, since its label is unknown.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import yaml
from pydantic import Field, field_validator, model_validator

from training.common import RunSummary, StageSettings, TrainingError
from training.data import Triplet, write_metadata

FOLDERS = ("source", "mask", "edited")
_EXPORTED_NAME = re.compile(r"^[0-9a-f]{64}\.[a-z]+$")
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_MAX_MEGAPIXELS = 1000.0  # the service already refused larger images; this only guards the decoder


class ExportLabelsSettings(StageSettings):
    serve_config: Path | None = Field(None, description="Serve config YAML whose application args hold `retention`")
    objects: Path | None = Field(None, description="or: the retention object_store.path folder")
    database_url: str | None = Field(None, description="with --objects: the metadata URL (default: results.db there)")
    since: dt.datetime | None = Field(None, description="only results labelled at or after this time (ISO 8601, UTC)")
    until: dt.datetime | None = Field(None, description="only results labelled before this time (ISO 8601, UTC)")
    min_count: int = Field(1, ge=1, description="fail unless at least this many labelled results are exported")

    @field_validator("since", "until")
    @classmethod
    def _naive_utc(cls, moment: dt.datetime | None) -> dt.datetime | None:
        if moment is None or moment.tzinfo is None:
            return moment
        return moment.astimezone(dt.timezone.utc).replace(tzinfo=None)

    @model_validator(mode="after")
    def _one_source(self) -> ExportLabelsSettings:
        if (self.serve_config is None) == (self.objects is None):
            raise ValueError("name the store with either serve_config or objects (+ database_url)")
        return self


SERVE_APP = "serve.app:build_app"


def retention_settings(settings: ExportLabelsSettings):
    from serve.config import AppSettings, RetentionSettings

    if settings.objects is not None:
        return RetentionSettings(object_store={"path": str(settings.objects)}, database_url=settings.database_url)
    config = yaml.safe_load(Path(settings.serve_config).read_text()) or {}
    for app in config.get("applications", []):
        if app.get("import_path", SERVE_APP) == SERVE_APP:  # its args name only what differs from the defaults
            return AppSettings.model_validate(app.get("args") or {}).retention
    raise TrainingError(f"{settings.serve_config}: no application imports {SERVE_APP}")


def export_labels(settings: ExportLabelsSettings) -> dict:
    from serve.retention import ObjectMissing, RetentionStore

    summary = RunSummary("export-labels", settings)
    retention = retention_settings(settings)
    try:
        store = RetentionStore.from_settings(retention)
        labelled = store.labelled(settings.since, settings.until)
    except Exception as exc:
        raise TrainingError(f"cannot read the retention store ({type(exc).__name__}: {exc})") from exc
    if len(labelled) < settings.min_count:
        raise TrainingError(
            f"{len(labelled)} labelled result(s) in the store, fewer than min_count {settings.min_count}"
        )
    out = Path(settings.out)
    groups, conflicting = same_content_groups(labelled)
    records, items, skipped = [], [], []
    for group in groups:
        result = group[-1]
        try:
            files = _write_files(store, result, out)
        except (ObjectMissing, ValueError) as exc:
            skipped.append({"result_id": result.id, "why": f"{type(exc).__name__}: {exc}"})
            continue
        records.append(Triplet(*files, score=1.0 if result.label == "yes" else 0.0))
        last = result.feedback[-1]
        items.append(
            {
                "result_id": result.id,
                "same_content": [other.id for other in group[:-1]],
                "verdict": last.verdict,
                "reason": last.reason,
                "labeller": last.labeller,
                "labelled_at": last.created_at.isoformat() + "Z",
                "discriminator_score": result.score,
                "threshold": result.threshold,
                "GT": files[2].relative_to(out).as_posix(),
            }
        )
    if len(records) < settings.min_count:
        raise TrainingError(
            f"{len(records)} labelled result(s) to export ({len(skipped)} unreadable, {len(conflicting)} "
            f"conflicting of {len(labelled)}), fewer than min_count {settings.min_count}"
        )
    metadata = write_metadata(out / "metadata.json", records)
    pruned = _prune(out, {path for record in records for path in (record.source, record.mask, record.gt)})
    positives = sum(record.score == 1.0 for record in records)
    summary.data["metrics"] = {
        "exported": len(records),
        "positives": positives,
        "negatives": len(records) - positives,
        "skipped": skipped,
        "conflicting": conflicting,
        "duplicates": sum(len(group) - 1 for group in groups),
        "pruned_files": pruned,
        "store": store.describe(),
        "items": items,
    }
    summary.data["outputs"] = {"metadata": str(metadata), "folder": str(out)}
    summary.write("completed")
    return summary.data


def same_content_groups(labelled) -> tuple[list[list], list[dict]]:
    """Results grouped by (source, mask, result) content, each group newest verdict last; the groups whose
    results disagree are returned apart, as {"result_ids", "verdicts"}, and not labelled."""
    groups: dict[tuple[str, str, str], list] = {}
    for result in labelled:
        groups.setdefault((result.keys["source"], result.keys["mask"], result.keys["result"]), []).append(result)
    agreed, conflicting = [], []
    for group in groups.values():
        group.sort(key=lambda result: (result.labelled_at, result.id))
        if len({result.label for result in group}) == 1:
            agreed.append(group)
        else:
            ids = [result.id for result in group]
            conflicting.append({"result_ids": ids, "verdicts": [result.label for result in group]})
    return agreed, conflicting


def _write_files(store, result, out: Path) -> tuple[Path, Path, Path]:
    """Source as decoded by the service (EXIF applied, so it matches the mask), mask and result as kept."""
    from PIL import Image

    from engines import imaging
    from engines.errors import InputError

    source_name = result.keys["source"].replace("/", "")
    source = out / "source" / f"{source_name}.png"
    if not source.is_file():
        data = store.objects.get(result.keys["source"])
        try:
            decoded = imaging.decode_image(
                data, imaging.DecodeLimits(max_bytes=len(data), max_megapixels=_MAX_MEGAPIXELS)
            )
        except InputError as exc:
            raise ValueError(f"the source cannot be decoded: {exc}") from exc
        source.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(decoded.rgb).save(source)
    mask = _copy(store, result.keys["mask"], "png", out / "mask")
    edited = _copy(store, result.keys["result"], _EXTENSIONS.get(result.media_types["result"], "png"), out / "edited")
    with Image.open(source) as img:
        if img.size != (result.width, result.height):
            raise ValueError(f"the source is {img.size[0]}x{img.size[1]}, the result {result.width}x{result.height}")
    return source, mask, edited


def _copy(store, key: str, extension: str, folder: Path) -> Path:
    path = folder / f"{key.replace('/', '')}.{extension}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(store.objects.get(key))
        partial.replace(path)
    return path


def _prune(out: Path, keep: set[Path]) -> int:
    """Remove exported image files (content-named) that this export does not list."""
    pruned = 0
    for folder in FOLDERS:
        for path in (out / folder).glob("*") if (out / folder).is_dir() else ():
            if _EXPORTED_NAME.match(path.name) and path not in keep:
                path.unlink()
                pruned += 1
    return pruned
