"""`annotate`: one automated data round of RORem: remove, score, keep what the discriminator admits.

For each unlabelled (source, mask) pair (a metadata file with `source` and `mask`): the bundle's
remover (RORem-4S) fills the mask at `resolution`, its discriminator scores the result, and results
scoring >= `threshold` (0.9 in the paper) become new training triplets. Every pair is brought to
the square `resolution` first (shorter side resized, center crop; the mask optionally dilated), and
those prepared source and mask images are what the new triplets point at, so source, mask and GT
always have one size.

Output (under out/):
    source/NNNNN.png, mask/NNNNN.png, result/NNNNN.png   every processed pair and its result
    metadata.json    the admitted triplets: source, mask, GT (= the result), score (the discriminator's)
    scores.jsonl     one line per processed pair (appended as it goes): with --resume, a later run with
                     the same bundle and settings reuses them (continue a round, or re-threshold it)
    summary.json     kept / total, the threshold, a score histogram, every item's score
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from serve.config import ImagingSettings

from training.common import DEFAULT_CACHE, RunSummary, StageSettings, TrainingError, progress_bar, training_device
from training.data import Triplet, load_mask, load_metadata, load_rgb, save_image, write_metadata

SCORE_LOG = "scores.jsonl"
# the models get each mask as the service gives it (engines.pipeline.removal_mask, score_mask): a thin stroke off
# the latent grid was blacked out with no latent cell to fill; in the resume key, so older scores are not reused
MASKS_AS_THE_SERVICE = "masks: whole latent cells"
HISTOGRAM_EDGES = [round(0.1 * i, 1) for i in range(11)] + [float("inf")]


class AnnotateSettings(StageSettings):
    MARKS_ITS_START: ClassVar[bool] = True  # annotate() marks it once its data and bundle are checked

    bundle: str = Field(description="project bundle folder (with a discriminator), or 'tiny'")
    data: Path = Field(description="metadata JSON with source and mask (GT and score are ignored)")
    threshold: float = Field(0.9, ge=0, description="admit results scoring >= this (0.9 in RORem)")
    resolution: int = Field(512, description="side the pairs are processed at, a multiple of 64")
    batch_size: int = Field(4, ge=1)
    # the service's default and bounds (serve.config.ImagingSettings): a round at 0 scored masks the service never sends
    dilate: int = ImagingSettings.model_fields["dilate"]
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    cache_dir: Path = Field(Path(DEFAULT_CACHE), description="where bundle 'tiny' is generated")
    tiny_seed: int = 0
    resume: bool = Field(
        False,
        description="reuse the scores logged in out/scores.jsonl by an earlier run with the same bundle and "
        "settings (to continue an interrupted round, or to re-threshold without running the models again)",
    )


def annotate(settings: AnnotateSettings) -> dict:
    from engines.bundle import MANIFEST, sha256_of
    from engines.imaging import dilate_mask
    from engines.jobs import RemovalJob, ScoreJob
    from engines.pipeline import removal_mask, score_mask
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine
    from engines.sources import open_bundle

    if settings.resolution <= 0 or settings.resolution % 64:
        raise TrainingError(f"resolution must be a positive multiple of 64, got {settings.resolution}")
    summary = RunSummary("annotate", settings)
    device = training_device(settings.device)
    summary.data["device"] = str(device)
    records = load_metadata(settings.data, require=("source", "mask"))
    tiny = settings.bundle == "tiny"
    bundle = open_bundle(
        path=None if tiny else settings.bundle, authors=None, cache_dir=settings.cache_dir, tiny_seed=settings.tiny_seed
    )
    if not bundle.has_discriminator:
        raise TrainingError(f"bundle {bundle.path} has no discriminator: annotate needs one to score results")
    summary.write()  # the round starts: its checks passed (a rerun they refuse leaves a finished round as it was)

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    # what a result depends on besides its pair: a logged score is reused only if all of it matches
    key = json.dumps(
        [sha256_of(bundle.path / MANIFEST), settings.resolution, settings.dilate, settings.seed, MASKS_AS_THE_SERVICE]
    )
    log_path = out / SCORE_LOG
    done = _read_log(log_path, key, out) if settings.resume else {}
    if not settings.resume:
        log_path.unlink(missing_ok=True)
    todo = [i for i, r in enumerate(records) if (str(r.source), str(r.mask)) not in done.get(i, {})]
    engines = None
    seconds = []
    with progress_bar(len(records), len(records) - len(todo), "annotate", True) as bar:  # closed before a Ctrl-C line
        for first in range(0, len(todo), settings.batch_size):
            began = time.perf_counter()
            chunk = todo[first : first + settings.batch_size]
            prepared, logged = [], []
            for index in chunk:
                record = records[index]
                image = load_rgb(record.source, settings.resolution)
                mask = dilate_mask(load_mask(record.mask, settings.resolution), settings.dilate)
                if mask.any():
                    prepared.append((index, image, mask))
                else:
                    logged.append(_log_entry(key, index, record, None))
            if prepared:
                if engines is None:  # loaded only when something is left to do
                    engines = (
                        RemovalEngine.from_bundle(bundle, device=device),
                        ScoringEngine.from_bundle(bundle, device=device),
                    )
                remover, scorer = engines
                jobs = [RemovalJob(image, removal_mask(mask), settings.seed + index) for index, image, mask in prepared]
                results = remover.remove(jobs)
                scores = scorer.score(
                    [ScoreJob(image, score_mask(mask), result) for (_, image, mask), result in zip(prepared, results)]
                )
                for (index, image, mask), result, score in zip(prepared, results, scores):
                    if not math.isfinite(float(score)):  # counted, not logged (a resume tries it again) nor put in JSON
                        done.setdefault(index, {})[(str(records[index].source), str(records[index].mask))] = math.nan
                        continue
                    name = f"{index:05d}.png"
                    save_image(image, out / "source" / name)
                    save_image(mask, out / "mask" / name)
                    save_image(result, out / "result" / name)
                    logged.append(_log_entry(key, index, records[index], round(float(score), 6)))
            with open(log_path, "a") as log:  # after the images: a logged entry always has its files
                for entry in logged:
                    log.write(json.dumps(entry) + "\n")
                    done.setdefault(entry["index"], {})[(entry["source"], entry["mask"])] = entry["score"]
            seconds.append(time.perf_counter() - began)
            bar.update(len(chunk))

    items, kept, skipped, non_finite = [], [], 0, 0
    for index, record in enumerate(records):
        score = done[index][(str(record.source), str(record.mask))]
        if score is None:
            skipped += 1
            continue
        if math.isnan(score):
            non_finite += 1
            continue
        items.append({"index": index, "source": str(record.source), "score": score})
        if score >= settings.threshold:
            name = f"{index:05d}.png"
            kept.append(Triplet(out / "source" / name, out / "mask" / name, out / "result" / name, score=score))

    metadata = write_metadata(out / "metadata.json", kept) if kept else None
    if metadata is None:  # an empty metadata file would not load; say so instead
        (out / "metadata.json").unlink(missing_ok=True)
    scores = np.asarray([item["score"] for item in items], dtype=float)
    counts, _ = np.histogram(scores, bins=HISTOGRAM_EDGES) if len(scores) else (np.zeros(11, int), None)
    summary.data["metrics"] = {
        "total": len(records),
        "scored": len(items),
        "skipped_empty_mask": skipped,
        "skipped_non_finite_score": non_finite,
        "kept": len(kept),
        "kept_fraction": len(kept) / len(items) if items else 0.0,
        "threshold": settings.threshold,
        "mean_score": float(scores.mean()) if len(scores) else None,
        "histogram": {
            _bin_name(lo, hi): int(c) for lo, hi, c in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], counts)
        },
        "reused_from_log": len(records) - len(todo),
        "seconds_per_item": round(sum(seconds) / len(todo), 4) if todo else None,
        "batch_seconds": [round(x, 4) for x in seconds],
        "items": items,
        "bundle": str(bundle.path),
    }
    summary.data["outputs"] = {"metadata": str(metadata) if metadata else None, "folder": str(out)}
    summary.write("completed")
    return summary.data


def _log_entry(key: str, index: int, record: Triplet, score: float | None) -> dict:
    return {"key": key, "index": index, "source": str(record.source), "mask": str(record.mask), "score": score}


def _read_log(path: Path, key: str, out: Path) -> dict[int, dict[tuple[str, str], float | None]]:
    """Scores logged by earlier runs with the same bundle and settings, whose result files exist."""
    done: dict[int, dict[tuple[str, str], float | None]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption
            continue
        if entry.get("key") != key:
            continue
        name = f"{entry['index']:05d}.png"
        if entry["score"] is not None and not (out / "result" / name).is_file():
            continue
        done.setdefault(entry["index"], {})[(entry["source"], entry["mask"])] = entry["score"]
    return done


def _bin_name(lo: float, hi: float) -> str:
    return f">={lo}" if hi == float("inf") else f"{lo}-{hi}"


