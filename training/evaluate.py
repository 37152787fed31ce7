"""`evaluate`: run one configured engine over a test set the way the service runs it, and measure it.

Why: before a new bundle, a retrained discriminator or an exported engine (ONNX, TensorRT fp16) goes
to production, an operator must know that removal quality did not drop. `compare` (training.compare)
then sets two runs side by side and gates on allowed deltas.

Every entry of the metadata file (RORem's format: source and mask, and GT when the set has one) runs
through engines.pipeline's RemovalPipeline, the class the service runs: decode, dilate the mask, a crop per
region at its bucket, one RemovalEngine call per crop (batch 1, seed = seed + index), paste back inside the
dilated mask, and the discriminator's score of the pasted result cut like each crop (the worst region's).
The engine is started (built and warmed up) by the Remover deployment's own code (engines.remover_start).
Only the engine call is timed, after `warmup` untimed calls per bucket.

Outputs (under out/):
    outputs/NNNNN.png   each result: the full image with the mask region repainted
    per_image.csv       one row per entry: its files and their sha256, status, bucket, seed, seconds, score and
                        every measure
    summary.json        config, bundle and engine, each measure's mean (or why it was skipped), timing
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from serve.config import EngineSettings, GateSettings, GateThreshold, ImagingSettings, runner_path_refused
from training.common import DEFAULT_CACHE, RunSummary, StageSettings, TrainingError, progress_bar, training_device
from training.data import Triplet
from training.quality import LpipsNet, load_embedder, load_lpips, psnr, ssim
from training.synthetic import degrade

if TYPE_CHECKING:
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine

PER_IMAGE_CSV = "per_image.csv"
OUTPUTS_DIR = "outputs"
OUTPUT_NAME = re.compile(r"\d{5,}\.png")  # outputs/NNNNN.png: an entry's id (its index, 5 digits or more)


@dataclass(frozen=True)
class Measure:
    """One per-image number: its name (summary.json, thresholds), CSV column, direction and meaning."""

    name: str
    column: str
    higher_is_better: bool
    needs_gt: bool
    meaning: str


MEASURES = (
    Measure("success_rate", "success", True, False, "1 if the discriminator scores the result >= threshold, else 0"),
    Measure("score", "score", True, False, "the discriminator's score of the result"),
    Measure("psnr", "psnr", True, True, "PSNR (dB) of the whole image against GT"),
    Measure("ssim", "ssim", True, True, "SSIM of the whole image against GT"),
    Measure("psnr_masked", "psnr_masked", True, True, "PSNR (dB) against GT over the dilated mask's pixels"),
    Measure("ssim_masked", "ssim_masked", True, True, "SSIM map against GT averaged over the dilated mask"),
    Measure("psnr_outside", "psnr_outside", True, False, "PSNR (dB) against the source outside the given mask"),
    Measure("ssim_outside", "ssim_outside", True, False, "SSIM map against the source averaged outside the mask"),
    Measure("lpips", "lpips", False, True, "LPIPS of the model's crop window against GT's (lower is closer)"),
    Measure("dino", "dino", True, True, "cosine similarity of DINOv2 embeddings, crop window against GT's"),
    Measure("clip", "clip", True, True, "cosine similarity of CLIP image embeddings, crop window against GT's"),
    Measure("seconds_per_image", "seconds", False, False, "seconds in the engine call (encode, UNet steps, decode)"),
)
MEASURES_BY_NAME = {m.name: m for m in MEASURES}
LEARNED_MEASURES = ("lpips", "dino", "clip")  # measured by a model: summary.json's measuring_models names it
IMAGE_KINDS = ("source", "mask", "gt")
# each entry's files and the sha256 of the bytes evaluated: the test set's identity, which `compare` checks per pair
ROW_FIELDS = (
    "id", "index", "status", "error", *IMAGE_KINDS, *(f"{kind}_sha256" for kind in IMAGE_KINDS),
    "output", "bucket", "seed", "score_seconds",
)  # fmt: skip
CSV_COLUMNS = (*ROW_FIELDS, *(m.column for m in MEASURES))
DegradeKind = Literal["none", "blur", "noise", "downsample", "mixed", "no-change"]  # training.synthetic.NEGATIVE_KINDS


_IMAGING = ImagingSettings.model_fields
_ENGINE = EngineSettings.model_fields


class EvaluateSettings(StageSettings):
    MARKS_ITS_START: ClassVar[bool] = True  # evaluate() marks it once its inputs are checked: see there

    bundle: str = Field(description="project bundle folder, or 'tiny'")
    data: Path = Field(description="metadata JSON: source + mask, and GT when the set has one (RORem format)")
    runner: Literal["torch", "onnx", "tensorrt"] = _ENGINE["runner"]
    runner_path: Path | None = Field(None, description="the exported UNet file; None: the bundle's recorded export")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _ENGINE["dtype"]
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    compile: bool = _ENGINE["compile"]
    cuda_graph: bool = Field(
        _ENGINE["cuda_graph"].default,
        description="CUDA graphs (torch runner: captured by RemovalEngine.warm_up; TensorRT: per UNet shape); no "
        "effect on the CPU or with the onnx runner, as in the service",
    )
    export_missing: bool = _ENGINE["export_missing"]
    torch_threads: int | None = _ENGINE["torch_threads"]
    steps: int | None = _ENGINE["steps"]
    strength: float | None = _ENGINE["strength"]
    # the service's crop settings, with their defaults and bounds (serve.config.ImagingSettings)
    buckets: list[int] = _IMAGING["buckets"]  # with its validator (serve.config.Buckets)
    crop_margin: int = _IMAGING["crop_margin"]
    dilate: int = _IMAGING["dilate"]
    feather: int = _IMAGING["feather"]
    # the service's decode limits: an image the service refuses is recorded invalid-input, never evaluated
    max_upload_bytes: int = Field(
        _IMAGING["max_upload_bytes"].default,
        ge=1024,
        description="each file's bytes (the service bounds the files of one request together)",
    )
    max_megapixels: float = _IMAGING["max_megapixels"]
    max_side: int = _IMAGING["max_side"]
    max_chunks: int = _IMAGING["max_chunks"]
    max_jpeg_scans: int = _IMAGING["max_jpeg_scans"]
    max_exif_bytes: int = _IMAGING["max_exif_bytes"]
    max_rle_bytes: int = _IMAGING["max_rle_bytes"]
    threshold: GateThreshold = Field(
        GateSettings().threshold, description="a removal succeeds when the discriminator scores >= this (gate.threshold)"
    )
    max_model_calls: int = GateSettings.model_fields["max_model_calls"]  # bounds the crops, as in the service
    lpips_net: LpipsNet = Field("alex", description="LPIPS backbone (needs torchvision and its cached weights)")
    clip_model: Path | None = Field(None, description="local transformers CLIP folder for CLIP similarity")
    dino_model: Path | None = Field(None, description="local transformers DINOv2 folder for DINO similarity")
    warmup: int = Field(1, ge=0, description="untimed engine calls per bucket before the first timed one")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N entries")
    degrade: DegradeKind = Field(
        "none",
        description="gate self-check: deliberately spoil every result inside the dilated mask "
        "(training.synthetic.degrade), after timing",
    )
    cache_dir: Path = Field(Path(DEFAULT_CACHE), description="where bundle 'tiny' is generated")
    tiny_seed: int = 0

    @model_validator(mode="after")
    def _runner_path_for_an_exported_runner(self) -> "EvaluateSettings":
        refused = runner_path_refused(self.runner, self.runner_path)
        if refused:
            raise ValueError(refused)
        return self

    def imaging(self) -> ImagingSettings:
        """The service's imaging section with this run's crop settings and decode limits (the rest its defaults)."""
        shared = ImagingSettings.model_fields.keys() & type(self).model_fields.keys()
        return ImagingSettings(**{name: getattr(self, name) for name in shared})


def evaluate(settings: EvaluateSettings) -> dict:
    from engines.pipeline import PIPELINE_VERSION
    from engines.sources import open_bundle
    from training.data import load_metadata

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    summary = RunSummary("evaluate", settings)
    device = training_device(settings.device)
    summary.data["device"] = str(device)
    from engines.bundle import sha256_of

    records = load_metadata(settings.data, require=("source", "mask"))[: settings.limit]  # a folder, a typo: refused
    summary.data["data_sha256"] = sha256_of(Path(settings.data))  # the test set's identity, which `compare` checks
    summary.data["pipeline_version"] = PIPELINE_VERSION  # so is the removal path's
    tiny = settings.bundle == "tiny"
    bundle = open_bundle(
        path=None if tiny else settings.bundle, authors=None, cache_dir=settings.cache_dir, tiny_seed=settings.tiny_seed
    )
    scorer, skipped = _open_scorer(bundle, device)
    summary.data["discriminator"] = discriminator_identity(bundle, scorer)
    learned, learned_skipped, summary.data["measuring_models"] = _open_learned_measures(settings, device)
    skipped.update(learned_skipped)
    remover = _start_remover(settings, bundle, device)
    bundle = remover.bundle
    engines = _Engines(remover.engine, scorer, learned, settings)

    # the checks passed (data, bundle, discriminator, measuring models, engine): from here on the run changes out/
    # (a failure is recorded); a rerun refused above leaves a finished evaluation in out/ as it was
    out = Path(settings.out)
    summary.write()
    clear_previous_results(out)
    (out / OUTPUTS_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    with progress_bar(len(records), 0, "evaluate", True) as bar:  # closed before a Ctrl-C's line is printed
        for index, record in enumerate(records):
            rows.append(_evaluate_entry(index, record, settings, engines, out))
            bar.update(1)

    _write_rows(out / PER_IMAGE_CSV, rows)
    skipped.update(_unmeasured_reasons(rows, skipped))
    summary.data["engine"] = {
        "bundle": bundle.summary(),
        "runner": settings.runner,
        "runner_path": str(settings.runner_path) if settings.runner_path else None,
        "unet_file": exported_unet_file(bundle, settings.runner, engines.remover.dtype, settings.runner_path),
        "dtype": str(engines.remover.dtype).removeprefix("torch."),
        "device": str(device),
        "cuda_graphs": remover.cuda_graphs,
        "steps": engines.remover.sampling.steps,
        "strength": engines.remover.sampling.strength,
        "degrade": settings.degrade,
    }
    summary.data["metrics"] = _aggregate(rows, skipped, settings.threshold, time.perf_counter() - started)
    summary.data["outputs"] = {"per_image": str(out / PER_IMAGE_CSV), "images": str(out / OUTPUTS_DIR)}
    summary.write("completed")
    return {**summary.data, "report": format_metrics(summary.data["metrics"])}  # printed by the CLI, not stored


def number_cell(value: float | None, sign: str = "") -> str:
    """A table cell of 10 characters: 4 significant digits, or '-' for no value."""
    return f"{'-':>10}" if value is None else f"{value:>{sign}10.4g}"


def format_metrics(metrics: dict) -> str:
    """The headline numbers of a run, from its summary's metrics: each measure's mean, std and n, the skipped
    measures by name (summary.json says why), the counts and the engine's speed."""
    lines = [f"{'measure':<18} {'mean':>10} {'std':>10} {'n':>5}"]
    skipped = []
    for measure in MEASURES:
        stats = metrics[measure.name]
        if "skipped" in stats:
            skipped.append(measure.name)
            continue
        infinite = f"  (and {stats['infinite']} infinite: identical pixels)" if stats.get("infinite") else ""
        mean, std = number_cell(stats["mean"]), number_cell(stats["std"])
        lines.append(f"{measure.name:<18} {mean} {std} {stats['n']:>5}{infinite}")
    if skipped:
        lines.append(f"skipped (summary.json says why): {', '.join(skipped)}")
    lines.append(
        f"{metrics['evaluated']} of {metrics['entries']} entries evaluated ({metrics['with_gt']} with GT; "
        f"empty mask {metrics['empty_mask']}, invalid input {metrics['invalid_input']}); "
        f"success: score >= {metrics['threshold']}"
    )
    time = metrics["time"]
    if time["images_per_second"] is not None:
        lines.append(
            f"engine: {time['images_per_second']:.3g} images/s, median {time['seconds_per_image_median']:.3g} s, "
            f"p95 {time['seconds_per_image_p95']:.3g} s per image; whole run {time['wall_seconds']:.1f} s"
        )
    return "\n".join(lines)


def entry_id(index: int) -> str:
    return f"{index:05d}"


def clear_previous_results(out: Path) -> None:
    """A rerun into the same --out holds only its own results: a previous run's per_image.csv and
    outputs/NNNNN.png would sit beside fewer new ones (--limit) or another bundle's. Only the images a previous
    per_image.csv names (its `output` column) are removed, then that file: a folder without one (a user's
    outputs/20240101.png) is left as it is, as is every other file."""
    previous = out / PER_IMAGE_CSV
    try:
        with open(previous, newline="") as f:
            written = [row.get("output") or "" for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    for name in written:
        path = out / name
        if path.parent == out / OUTPUTS_DIR and OUTPUT_NAME.fullmatch(path.name) and path.is_file():
            path.unlink()
    previous.unlink(missing_ok=True)


class _Engines:
    """The engines, and the service's pipeline over them (in this process, one crop at a time)."""

    def __init__(self, remover: RemovalEngine, scorer: ScoringEngine | None, learned: dict, settings: EvaluateSettings):
        from engines.pipeline import CropSettings, LocalModels, RemovalPipeline

        self.remover, self.scorer, self.learned = remover, scorer, learned
        self.models = LocalModels(remover, scorer, warmup=settings.warmup)
        imaging = settings.imaging()
        self.pipeline = RemovalPipeline(self.models, CropSettings.from_imaging(imaging), imaging.decode_limits())


def _evaluate_entry(index: int, record: Triplet, settings: EvaluateSettings, engines: _Engines, out: Path) -> dict:
    """One entry through engines.pipeline, the service's own path; its CSV row (status other than ok: nothing
    was run)."""
    import asyncio

    from engines import imaging
    from engines.errors import InputError
    from engines.gate import GatePolicy, max_crops

    row = {"id": entry_id(index), "index": index, "source": record.source, "mask": record.mask, "gt": record.gt}
    read = {kind: path.read_bytes() for kind in IMAGE_KINDS if (path := getattr(record, kind)) is not None}
    row.update({f"{kind}_sha256": hashlib.sha256(data).hexdigest() for kind, data in read.items()})
    pipeline, models = engines.pipeline, engines.models
    # annotate: one attempt, scored as the service scores what it returns; off without a discriminator
    policy = GatePolicy("annotate" if engines.scorer else "off", settings.threshold, 1, fail_open=False)
    crops = max_crops(settings.max_model_calls, scored=engines.scorer is not None)  # as the service plans them
    try:
        prepared = pipeline.prepare(read["source"], read["mask"], max_crops=crops)
        gt = imaging.decode_image(read["gt"], pipeline.limits).rgb if "gt" in read else None
    except InputError as exc:  # what the service answers with a 4xx
        return {**row, "status": "invalid-input", "error": str(exc)}
    if not prepared.plans:
        return {**row, "status": "empty-mask"}
    seed = settings.seed + index
    spoil = None
    if settings.degrade != "none":
        rng = np.random.default_rng([settings.seed, index])
        source, dilated = prepared.image.rgb, prepared.mask

        def spoil(edited: np.ndarray) -> np.ndarray:
            return degrade(settings.degrade, source, dilated, edited, rng)

    models.engine_seconds = models.score_seconds = 0.0
    gated = asyncio.run(pipeline(prepared, seed, policy, spoil=spoil))
    if engines.scorer is not None and gated.verdict == "unscored":  # annotate keeps a result it could not score
        raise TrainingError(f"entry {index} ({record.source}): the discriminator failed to score the result")
    edited = gated.result.edited
    row["seconds"] = models.engine_seconds
    if gated.score is not None:
        row.update(
            score=gated.score, success=float(gated.score >= settings.threshold), score_seconds=models.score_seconds
        )
    output = Path(OUTPUTS_DIR) / f"{row['id']}.png"
    (out / output).write_bytes(imaging.encode_image(edited, None, "png"))
    row.update(status="ok", output=output, bucket=max(prepared.buckets), seed=seed)
    row.update(
        _measure(edited, prepared.image.rgb, gt, prepared.given_mask, prepared.mask, prepared.plans, engines.learned)
    )
    return row


def _start_remover(settings: EvaluateSettings, bundle, device: torch.device):
    """The engine as the Remover deployment starts it (engines.remover_start), warmed at batch 1 per bucket:
    evaluate runs one crop at a time."""
    from engines.remover_start import start_removal_engine
    from serve.placement import pick_dtype

    try:
        return start_removal_engine(
            bundle, settings, device, pick_dtype(settings.dtype), dict.fromkeys(settings.buckets, 1)
        )
    except ValueError as exc:  # a runner, dtype and device that do not go together, or an export that cannot serve
        raise TrainingError(f"cannot build the {settings.runner} engine: {exc}") from exc


def exported_unet_file(bundle, runner: str, dtype: torch.dtype, runner_path: Path | None) -> dict | None:
    """The exported UNet an onnx or tensorrt engine ran (None: the torch runner, the bundle's own weights) and
    whether it is the bundle's recorded export for that runner and precision (told by its path, from the
    manifest: a --runner-path is served unchecked, so a graph exported from another bundle's UNet runs too, and
    `compare` must say which file each run ran)."""
    from engines.errors import BundleError
    from engines.runners import recorded_export

    if runner == "torch":
        return None
    try:
        recorded = recorded_export(bundle, runner, dtype)[1].path.resolve()
    except (BundleError, ValueError):  # no export of this kind recorded, or not one for this precision
        recorded = None
    path = Path(runner_path).resolve() if runner_path else recorded
    return {"path": str(path), "bundle_export": path == recorded}


def _open_scorer(bundle, device: torch.device):
    """The bundle's discriminator, or (None, why the score-based measures are skipped)."""
    from engines.scorer import ScoringEngine

    if not bundle.has_discriminator:
        reason = f"bundle {bundle.path} has no discriminator"
        return None, {"success_rate": reason, "score": reason}
    return ScoringEngine.from_bundle(bundle, device=device), {}


def discriminator_identity(bundle, scorer) -> dict | None:
    """What the scores depend on besides the result: the files the Scorer reads (the discriminator's and the VAE
    it encodes with: their sha256 from the bundle's manifest, which `Bundle.read` checks), its score size and
    the precision it runs at (bf16 on CUDA, fp32 on CPU); None without one. `compare` gates only runs scored
    alike."""
    from engines.bundle import DISCRIMINATOR_PROMPT_EMBEDS, DISCRIMINATOR_WEIGHTS, VAE_WEIGHTS

    manifest = bundle.manifest
    if manifest.discriminator is None or scorer is None:
        return None
    names = (DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_PROMPT_EMBEDS, VAE_WEIGHTS)
    return {
        "files": {name: manifest.files[name].sha256 for name in names},
        "score_size": manifest.discriminator.score_size,
        "dtype": str(scorer.dtype).removeprefix("torch."),
    }


def _open_learned_measures(settings: EvaluateSettings, device: torch.device):
    """name -> measure(edited, reference) for the learned measures whose weights are here; the others' reasons;
    and which model measures each (None: skipped), which `compare` checks: another model gives other numbers."""
    measures, skipped, models = {}, {}, {}
    lpips, reason = load_lpips(settings.lpips_net, device)
    if lpips is None:
        skipped["lpips"] = reason
    else:
        measures["lpips"] = lpips
    models["lpips"] = {"net": settings.lpips_net} if lpips is not None else None
    for kind, path in (("dino", settings.dino_model), ("clip", settings.clip_model)):
        embedder, reason = load_embedder(kind, path, device)
        if embedder is None:
            skipped[kind] = reason
        else:
            measures[kind] = embedder.similarity
        models[kind] = {"path": str(path), "sha256": folder_sha256(path)} if embedder is not None else None
    return measures, skipped, models


def folder_sha256(folder: Path) -> str:
    """One sha256 over a model folder's files, names and contents (hidden ones, such as the download cache
    `huggingface-cli download --local-dir` leaves, left out): the model's identity, whatever its path.
    Hashing a 1.7 GB CLIP ViT-L takes seconds, against minutes of evaluation; a path, size or mtime would
    miss a folder overwritten with another model, or call a copy another."""
    from engines.bundle import sha256_of

    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def _measure(edited, source, gt, mask, dilated, plans, learned) -> dict[str, float | None]:
    """Fidelity outside the given mask against the source; with a GT, the whole image, the dilated mask
    (what the service repaints) and, for the learned measures, the model's crop windows against it (their mean)."""
    from engines.imaging import crop_for_model

    values = {"psnr_outside": psnr(edited, source, ~mask), "ssim_outside": ssim(edited, source, ~mask)}
    if gt is None:
        return values
    values.update(
        psnr=psnr(edited, gt),
        ssim=ssim(edited, gt),
        psnr_masked=psnr(edited, gt, dilated),
        ssim_masked=ssim(edited, gt, dilated),
    )
    if learned:
        pairs = [tuple(crop_for_model(image, dilated, plan)[0] for image in (edited, gt)) for plan in plans]
        values.update(
            {name: float(np.mean([measure(e, g) for e, g in pairs])) for name, measure in learned.items()}
        )
    return values


def _unmeasured_reasons(rows: list[dict], skipped: dict[str, str]) -> dict[str, str]:
    """Why a measure has no value in any row, for those not already explained."""
    reasons = {}
    ok = [row for row in rows if row.get("status") == "ok"]
    for measure in MEASURES:
        if measure.name in skipped or any(row.get(measure.column) is not None for row in ok):
            continue
        if not ok:
            reasons[measure.name] = "no entry was evaluated (see the status column of per_image.csv)"
        elif measure.needs_gt and not any(row["gt"] for row in ok):
            reasons[measure.name] = "no entry of the set has a GT (a pair set): only the *_outside measures apply"
        else:
            reasons[measure.name] = "its region was empty in every image"
    return reasons


def _aggregate(rows: list[dict], skipped: dict[str, str], threshold: float, wall_seconds: float) -> dict:
    statuses = [row.get("status") for row in rows]
    metrics = {
        "entries": len(rows),
        "evaluated": statuses.count("ok"),
        "empty_mask": statuses.count("empty-mask"),
        "invalid_input": statuses.count("invalid-input"),
        "with_gt": sum(1 for row in rows if row.get("status") == "ok" and row["gt"]),
        "threshold": threshold,
    }
    for measure in MEASURES:
        if measure.name in skipped:
            metrics[measure.name] = {"skipped": skipped[measure.name]}
        else:
            metrics[measure.name] = describe([row.get(measure.column) for row in rows])
    seconds = [row["seconds"] for row in rows if row.get("seconds") is not None]
    metrics["time"] = {
        "seconds_per_image_median": statistics.median(seconds) if seconds else None,
        "seconds_per_image_p95": float(np.percentile(seconds, 95)) if seconds else None,
        "images_per_second": len(seconds) / sum(seconds) if seconds else None,
        "wall_seconds": wall_seconds,
        "timed": "the engine call only (batch 1): no decoding, pasting, scoring, metrics or file writes",
    }
    return metrics


def describe(values: list[float | None]) -> dict:
    """Mean, standard deviation and count of the finite values; identical-pixel PSNRs (inf) are counted apart."""
    present = [v for v in values if v is not None]
    finite = [v for v in present if math.isfinite(v)]
    stats = {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "n": len(finite),
    }
    if len(present) > len(finite):
        stats["infinite"] = len(present) - len(finite)
    return stats


# ---------------------------------------------------------------- the per-image file


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Floats as repr (exact round trip: a run compared with itself gives deltas of exactly 0)."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    tmp.replace(path)


@dataclass
class EvaluationRun:
    """A finished `evaluate` run, read back: its summary and its per-image rows (numbers parsed)."""

    folder: Path
    summary: dict
    rows: list[dict]

    def skip_reason(self, name: str) -> str | None:
        entry = self.summary["metrics"].get(name)
        return entry.get("skipped") if isinstance(entry, dict) else None



def load_run(folder: str | Path) -> EvaluationRun:
    from training.common import read_summary

    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    summary = read_summary(folder)
    if summary is None or summary.get("stage") != "evaluate":
        raise TrainingError(f"{folder} is not an evaluate run (no summary.json of stage evaluate)")
    if summary.get("status") != "completed":
        raise TrainingError(f"the evaluate run in {folder} has not completed (status {summary.get('status')})")
    numeric = {m.column for m in MEASURES} | {"index", "bucket", "seed", "score_seconds"}
    with open(folder / PER_IMAGE_CSV, newline="") as f:
        rows = [
            {key: (float(value) if key in numeric else value) if value != "" else None for key, value in row.items()}
            for row in csv.DictReader(f)
        ]
    return EvaluationRun(folder, summary, rows)
