"""`export-labels`: the verdicts people gave on the service's retained results, as a labelled set
for the `discriminator` stage (the paper's human-annotation round, on real user images).

Reads the retention store (serve/retention) named by a Serve config's `retention` section, or by the objects folder (+
database URL), as it is: a folder or SQLite file that is not there, or a schema not at this checkout's newest revision,
is refused (nothing is created or migrated), and writes into out/ the labelled metadata format that `discriminator`
reads (training/data.py): `GT` is the judged result, `score` is 1 for yes, 0 for no.

What is written is what the service's Scorer sees, not the whole photo: the windows POST /score
cuts (engines.pipeline.RemovalPipeline.prepare_score: a square crop per mask region at its bucket,
with the config's imaging.buckets / crop_margin and the crop cap of gate.max_model_calls; without
--serve-config, the service defaults), one record per window. The discriminator stage then trains
and measures on the pixels it will score; a resized whole photo could hold none of the mask.

    source/<sha256>.png     a window of the photo as the service decoded it (EXIF orientation applied)
    mask/<sha256>.png       the same window of the removed region (white), as the service dilated it
    edited/<sha256>.png     the same window of the result that was judged
    metadata.json           [{"source", "mask", "GT", "score", "group"}], paths relative to it
    summary.json            counts, filters, the principals whose verdicts were exported, and each exported
                            result with its verdict, reason, labeller and principal

The windows are of user photos: out/ and its image folders are made owner-only (0700) where missing and
the images are written 0600, as the retention store keeps the photos (a folder an earlier export made keeps
its mode). Files are named by the sha256 of their bytes; `group` is the photo's (the sha256 of its pixels as the service
decoded them, so one photo stored in other bytes is one group), and the discriminator's held-out split keeps
every result of one photo on one side. A "no" on a result of several windows
is left out (`ambiguous_negatives`): the service scores the worst window, and which window failed
is unknown; a "yes" labels each window. A window whose mask is empty at the Scorer's 512 view (a
stroke thinner than the downscale) is left out and counted (`empty_mask_views`). Only a result's
newest verdict counts. Files of earlier exports that are no longer labelled (deleted, expired,
filtered out) are removed from these three folders, so the export mirrors the store, and so are the partial
writes of an export stopped mid-write.

Each verdict records its principal: the name of the API key that sent it (POST /feedback), set by the
service; `labeller` is the client's own free text. --labelled-by ops,reviewer exports only those keys'
verdicts (the others are dropped before the newest verdict is taken, so a later verdict of another key
neither overrides nor hides theirs); a verdict without a principal (given while auth was off, or before
migration 0003) is never kept by the filter, which names whom to trust. Without it every verdict is
exported, as before; summary.json's `principals` counts the exported labels by key ("" for none).

Results with the same content (source, mask and result: the service is deterministic and the store
keeps one object per content) are one example, exported once: a verdict given several times counts
once, and a group whose results were judged differently (one "yes", one "no") is left out and
listed under `conflicting` in summary.json, since its label is unknown. The same holds for results whose
windows are the same files, though stored in other bytes (a PNG saved at another compression level): the
same pixels are one example.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from training.common import RunSummary, StageSettings, TrainingError, read_yaml_mapping
from training.data import Triplet, write_metadata

FOLDERS = ("source", "mask", "edited")
# an exported image; `.partial`: one an earlier version was writing when it was stopped
_EXPORTED_NAME = re.compile(r"^[0-9a-f]{64}\.[a-z]+(\.partial)?$")
_MAX_MEGAPIXELS = 1000.0  # the service already refused larger images; this only guards the decoder


SERVE_APP = "serve.app:build_app"
SERVE_CONFIG = "a Serve config (a mapping: applications, http_options, ...)"


class ExportLabelsSettings(StageSettings):
    OUT_MODE: ClassVar[int] = 0o700  # the windows are of user photos

    serve_config: Path | None = Field(None, description="Serve config YAML whose application args hold `retention`")
    objects: Path | None = Field(None, description="or: the retention object_store.path folder")
    database_url: str | None = Field(None, description="with --objects: the metadata URL (default: results.db there)")
    since: dt.datetime | None = Field(None, description="only results labelled at or after this time (ISO 8601, UTC)")
    until: dt.datetime | None = Field(None, description="only results labelled before this time (ISO 8601, UTC)")
    min_count: int = Field(1, ge=1, description="fail unless at least this many labelled results are exported")
    labelled_by: list[str] | None = Field(
        None,
        min_length=1,  # an empty list (an unset variable in a script) is refused, not read as "no filter"
        description="only verdicts sent by these API keys (key names, comma-separated): a result's label is the newest"
        " of theirs; a verdict without a principal (auth off, or older than principals) is left out; absent: all",
    )

    @field_validator("serve_config")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        """Read as --config is: a file that is not there, not readable or no YAML mapping is invalid settings (exit 2,
        before --out is touched), not an OSError once the run started (exit 1)."""
        if path is not None:
            read_yaml_mapping(path, SERVE_CONFIG)
        return path

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


def service_settings(settings: ExportLabelsSettings):
    """The service's AppSettings: the config's (with the Ingress's live gate), or the defaults with --objects."""
    from serve.config import AppSettings, RetentionSettings, with_live

    if settings.objects is not None:
        retention = RetentionSettings(object_store={"path": str(settings.objects)}, database_url=settings.database_url)
        return AppSettings(retention=retention)
    config = read_yaml_mapping(settings.serve_config, SERVE_CONFIG)
    for app in config.get("applications", []):
        if app.get("import_path", SERVE_APP) == SERVE_APP:  # its args name only what differs from the defaults
            service = AppSettings.model_validate(app.get("args") or {})
            for deployment in app.get("deployments") or []:
                if deployment.get("name") == "Ingress" and deployment.get("user_config"):
                    service = with_live(service, "Ingress", deployment["user_config"])
            return service
    raise TrainingError(f"{settings.serve_config}: no application imports {SERVE_APP}")


def export_labels(settings: ExportLabelsSettings) -> dict:
    from engines.gate import max_crops
    from engines.pipeline import CropSettings
    from serve.retention import ObjectMissing, RetentionStore

    summary = RunSummary("export-labels", settings)
    service = service_settings(settings)
    retention = service.retention
    crops = CropSettings.from_imaging(service.imaging)
    most_crops = max_crops(service.gate.max_model_calls, scored=True)  # what the Scorer is given
    try:
        store = RetentionStore.open_existing(retention)
        labelled = store.labelled(settings.since, settings.until, settings.labelled_by)
    except Exception as exc:
        raise TrainingError(f"cannot read the retention store ({type(exc).__name__}: {exc})") from exc
    if len(labelled) < settings.min_count:
        raise TrainingError(
            f"{len(labelled)} labelled result(s) in the store{_by(settings.labelled_by)}, fewer than min_count "
            f"{settings.min_count}"
        )
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True, mode=settings.OUT_MODE)
    cut, skipped = [], []
    for group in same_content_groups(labelled):
        try:
            cut.append((group, *_write_views(store, group[-1], out, crops, most_crops)))
        except (ObjectMissing, ValueError) as exc:
            skipped.append({"result_id": group[-1].id, "why": f"{type(exc).__name__}: {exc}"})
    examples, conflicting = same_window_groups(cut)
    records, items, ambiguous, empty_views = [], [], [], 0
    for group, views, empty, photo in examples:
        result = group[-1]
        empty_views += empty
        if result.label == "no" and len(views) + empty > 1:
            ambiguous.append(result.id)
            continue
        if not views:
            skipped.append({"result_id": result.id, "why": "every window's mask is empty at the Scorer's view"})
            continue
        score = 1.0 if result.label == "yes" else 0.0
        records += [Triplet(*files, score=score, group=photo) for files in views]
        last = result.feedback[-1]
        items.append(
            {
                "result_id": result.id,
                "same_content": [other.id for other in group[:-1]],
                "verdict": last.verdict,
                "reason": last.reason,
                "labeller": last.labeller,
                "principal": last.principal,
                "labelled_at": last.created_at.isoformat() + "Z",
                "discriminator_score": result.score,
                "threshold": result.threshold,
                "GT": [files[2].relative_to(out).as_posix() for files in views],
            }
        )
    if len(items) < settings.min_count:
        raise TrainingError(
            f"{len(items)} labelled result(s) to export ({len(skipped)} unreadable, {len(conflicting)} "
            f"conflicting, {len(ambiguous)} ambiguous of {len(labelled)}), fewer than min_count {settings.min_count}"
        )
    metadata = write_metadata(out / "metadata.json", records)
    pruned = _prune(out, {path for record in records for path in (record.source, record.mask, record.gt)})
    positives = sum(item["verdict"] == "yes" for item in items)
    summary.data["metrics"] = {
        "exported": len(items),
        "positives": positives,
        "negatives": len(items) - positives,
        "records": len(records),
        "imaging": {"buckets": list(crops.buckets), "crop_margin": crops.crop_margin, "max_crops": most_crops},
        "skipped": skipped,
        "ambiguous_negatives": ambiguous,
        "empty_mask_views": empty_views,
        "conflicting": conflicting,
        "duplicates": sum(len(group) - 1 for group, *_ in examples),
        "pruned_files": pruned,
        "store": store.describe(),
        "labelled_by": settings.labelled_by,
        "principals": _principals(items),
        "items": items,
    }
    summary.data["outputs"] = {"metadata": str(metadata), "folder": str(out)}
    summary.write("completed")
    return summary.data


def _by(principals: list[str] | None) -> str:
    return "" if principals is None else f" by {', '.join(principals)}"


def _principals(items: list[dict]) -> dict[str, int]:
    """How many exported results each API key's verdict labels; "" counts the verdicts without one (auth off,
    or given before verdicts recorded their key)."""
    return dict(sorted(Counter(item["principal"] or "" for item in items).items()))


def same_content_groups(labelled) -> list[list]:
    """Results grouped by (source, mask, result) content; whether a group's verdicts agree is decided once its
    windows are written (same_window_groups), where other bytes of the same pixels join it."""
    groups: dict[tuple[str, str, str], list] = {}
    for result in labelled:
        groups.setdefault((result.keys["source"], result.keys["mask"], result.keys["result"]), []).append(result)
    return list(groups.values())


def same_window_groups(cut: list[tuple]) -> tuple[list[tuple], list[dict]]:
    """Content groups (group, views, empty, photo) whose windows are the same files (the same pixels stored in
    other bytes) are one example, their results merged, newest verdict last; the examples whose results were
    judged differently are returned apart, as {"result_ids", "verdicts"}, and not labelled. A group with no
    window is its own."""
    results: dict[object, list] = {}
    windows: dict[object, tuple] = {}
    for group, *written in cut:
        key = tuple(written[0]) or group[-1].id
        results.setdefault(key, []).extend(group)
        windows.setdefault(key, written)
    agreed, conflicting = [], []
    for key, group in results.items():
        group.sort(key=lambda result: (result.labelled_at, result.id))
        if len({result.label for result in group}) == 1:
            agreed.append((group, *windows[key]))
        else:
            conflicting.append({"result_ids": [r.id for r in group], "verdicts": [r.label for r in group]})
    return agreed, conflicting


def _write_views(store, result, out: Path, crops, most_crops: int) -> tuple[list[tuple[Path, Path, Path]], int, str]:
    """(source, mask, edited) files of each window the Scorer sees, cut as POST /score cuts them (the stored mask
    is already dilated: no second dilation), how many windows were left out for an empty mask at its view, and
    the photo's group: the sha256 of its decoded pixels, whatever bytes stored them."""
    import hashlib

    import torch

    from engines import imaging
    from engines.errors import InputError
    from engines.pipeline import RemovalPipeline
    from engines.scorer import SCORE_SIZE, score_view_mask

    data = [store.objects.get(result.keys[kind]) for kind in ("source", "mask", "result")]
    limits = imaging.DecodeLimits(max_bytes=max(map(len, data)), max_megapixels=_MAX_MEGAPIXELS)
    try:
        jobs = RemovalPipeline(None, crops, limits).prepare_score(*data, dilate=0, max_crops=most_crops)
    except InputError as exc:
        raise ValueError(f"the images cannot be cut as the service cuts them: {exc}") from exc
    pixels = imaging.decode_image(data[0], limits).rgb
    photo = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    views, empty = [], 0
    for job in jobs:
        files = tuple(
            _save(pixels, out / folder) for pixels, folder in zip((job.source, job.mask, job.edited), FOLDERS)
        )
        if score_view_mask(torch.from_numpy(job.mask)[None, None], SCORE_SIZE).any():  # as the discriminator sees it
            views.append(files)
        else:
            empty += 1
    return views, empty, photo


def _save(pixels, folder: Path) -> Path:
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    from serve.retention.objects import write_owner_only

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.is_file():
        write_owner_only(path, data)
    return path


def _prune(out: Path, keep: set[Path]) -> int:
    """Remove exported image files (content-named) that this export does not list, and the partial writes an
    export stopped mid-write left (this one's are all done by now)."""
    from serve.retention.objects import PARTIAL

    pruned = 0
    for folder in FOLDERS:
        for path in (out / folder).glob("*") if (out / folder).is_dir() else ():
            exported = _EXPORTED_NAME.match(path.name) or path.name.startswith(PARTIAL)
            if exported and path not in keep:
                path.unlink()
                pruned += 1
    return pruned
