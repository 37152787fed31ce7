"""`compare`: two evaluation runs side by side, paired per image, and a release gate on allowed deltas.

Why: an exported engine, another precision or a retrained bundle must not ship if it removes worse
than the one in production. A (the baseline) and B (the candidate) are `evaluate` runs over the same
metadata file; images are paired by id (the entry's index; source and mask must be the same files, with the
same bytes).

Per measure: the means of A and B over the paired images, the mean paired delta B - A with a
t confidence interval (scipy), and the verdict against the thresholds file (infinite PSNRs: see Delta).
Also: the share of images whose discriminator verdict (score >= threshold) flipped, and the mean absolute
pixel difference of the two outputs. A learned measure measured by another model in each run (summary.json's
measuring_models) is skipped as not comparable, which fails a gate that names it. A contact sheet (PNG)
shows source | dilated mask | A | B, cut around the mask, for the largest disagreements (flipped verdicts
first, then the largest score change, then pixels).

Thresholds file (YAML; see training/configs/eval_thresholds.yaml):
    max_flip_share: 0.05      # at most this share of paired images may change verdict
    allowed_deltas:           # the worst allowed mean delta B - A, per measure (evaluate.MEASURES)
      success_rate: -0.02     # higher-is-better measures fail below it
      lpips: 0.02             # lower-is-better ones (lpips, seconds_per_image) fail above it
A measure only one run has fails the gate (the runs are not comparable); one neither run has is
listed as not checked, with the reason. A file that names nothing to check is refused, and a gate
that checked no measure fails.

The gate also fails when the runs are not a like-for-like comparison: a different test set (the
metadata file's sha256, and each paired entry's source, mask and GT sha256: they stop the comparison),
another version of the removal pipeline (engines.pipeline.PIPELINE_VERSION), another discriminator (its
files' sha256: the scores would be another judge's; RECORDED), other imaging settings, seed or crop cap
(SAME_SETTINGS: these change the pixels each image gets), or images that are not evaluated in both (a run
with --limit, an entry that failed in one run). `allow_partial` accepts the last kind (COVERAGE_SETTINGS
and unpaired images): the gate then runs on the paired images and the report says how many were left out.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from training.common import RunSummary, StageSettings, TrainingError
from training.evaluate import (
    IMAGE_KINDS, LEARNED_MEASURES, MEASURES, MEASURES_BY_NAME, EvaluationRun, load_run, number_cell,
)  # fmt: skip

PAIRED_CSV = "paired.csv"
CONTACT_SHEET = "contact_sheet.png"
SAME_SETTINGS = ("buckets", "crop_margin", "dilate", "feather", "seed", "max_model_calls")
COVERAGE_SETTINGS = ("limit",)


@dataclass(frozen=True)
class Recorded:
    """A fact `evaluate` writes into summary.json that must be the same in both runs; a run without it is from
    before it was recorded and cannot be gated."""

    what: str
    noun: str
    why: str
    show: Callable[[Any], str] = str


def _short_digest(value: Any) -> str:
    return value[:12] if isinstance(value, str) else str(value)


def _discriminator_digest(value: dict | None) -> str:
    from engines.bundle import DISCRIMINATOR_WEIGHTS

    return "none" if value is None else _short_digest(value["files"].get(DISCRIMINATOR_WEIGHTS))


RECORDED = {
    "data_sha256": Recorded("its data file's sha256", "data files", "another test set", _short_digest),
    "pipeline_version": Recorded(
        "its pipeline version",
        "pipelines",
        "engines.pipeline.PIPELINE_VERSION: the same settings give other pixels; evaluate the baseline again",
    ),
    "discriminator": Recorded(
        "which discriminator scored it",
        "discriminators",
        "scores and verdicts are another judge's: evaluate both runs with the same discriminator",
        _discriminator_digest,
    ),
}


class CompareSettings(StageSettings):
    MARKS_ITS_START: ClassVar[bool] = True  # compare() marks it once both runs and the thresholds are read

    a: Path = Field(description="the baseline: an evaluate run folder")
    b: Path = Field(description="the candidate: an evaluate run folder over the same metadata file")
    thresholds: Path | None = Field(None, description="YAML of allowed deltas; without it: report only, exit 0")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the delta intervals")
    sheet_rows: int = Field(8, ge=0, description="contact sheet rows: the largest disagreements")
    sheet_side: int = Field(192, ge=32, description="contact sheet cell side in pixels")
    allow_partial: bool = Field(
        False,
        description="gate on the images both runs evaluated although some are not (a different --limit, an entry "
        "one run could not evaluate): reported, not failed",
    )


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_flip_share: float | None = Field(None, ge=0, le=1)
    allowed_deltas: dict[str, float] = {}

    @field_validator("allowed_deltas")
    @classmethod
    def _known_measures(cls, deltas: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(deltas) - set(MEASURES_BY_NAME))
        if unknown:
            raise ValueError(f"unknown measures {unknown}; measures are {list(MEASURES_BY_NAME)}")
        return deltas


def load_thresholds(path: Path) -> Thresholds:
    from serve.config import invalid_because

    try:
        thresholds = Thresholds.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except (ValidationError, yaml.YAMLError) as exc:  # in one line (PyYAML's and pydantic's own take several)
        raise TrainingError(f"thresholds file {path}: {invalid_because(exc, 'thresholds')}") from exc
    if not thresholds.allowed_deltas and thresholds.max_flip_share is None:
        raise TrainingError(f"thresholds file {path} sets no allowed_deltas and no max_flip_share: it checks nothing")
    return thresholds


@dataclass(frozen=True)
class Delta:
    """Mean paired delta B - A of one measure. A PSNR of identical pixels is infinite: a pair infinite in both
    is equal (difference 0, counted in n and `infinite_equal`); a pair infinite in one run only is left out of
    the mean and counted as worse or better in B (`infinite_worse` fails the gate: B lost identical pixels).
    mean_a and mean_b are over the pairs finite in both (None: none is); delta None: no pair in the mean."""

    n: int
    mean_a: float | None
    mean_b: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    infinite_equal: int = 0
    infinite_worse: int = 0
    infinite_better: int = 0


def paired_delta(pairs: list[tuple[float, float]], confidence: float, higher_is_better: bool = True) -> Delta:
    """t interval of the mean difference (None below two pairs)."""
    from scipy import stats

    finite = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    equal = sum(1 for x, y in pairs if math.isinf(x) and x == y)
    unequal = [(x, y) for x, y in pairs if (math.isinf(x) or math.isinf(y)) and x != y]
    worse = sum(1 for x, y in unequal if (y < x) == higher_is_better)
    differences = np.array([y - x for x, y in finite] + [0.0] * equal, dtype=float)
    mean = float(differences.mean()) if len(differences) else None
    low = high = None
    if len(differences) > 1:
        half = float(stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * stats.sem(differences))
        low, high = mean - half, mean + half
    means = [float(np.mean(side)) for side in zip(*finite)] if finite else [None, None]
    return Delta(len(differences), *means, mean, low, high, equal, worse, len(unequal) - worse)


def compare(settings: CompareSettings) -> dict:
    summary = RunSummary("compare", settings)
    out = Path(settings.out)
    thresholds = load_thresholds(settings.thresholds) if settings.thresholds else None
    a, b = load_run(settings.a), load_run(settings.b)
    threshold = a.summary["metrics"]["threshold"]
    if b.summary["metrics"]["threshold"] != threshold:
        raise TrainingError(
            f"A judges success at {threshold}, B at {b.summary['metrics']['threshold']}: evaluate both at one threshold"
        )
    summary.write()  # the comparison starts: a rerun refused above leaves a finished one as it was
    if (out / PAIRED_CSV).is_file():  # a previous compare's (it writes both): this run may write no contact sheet
        for name in (PAIRED_CSV, CONTACT_SHEET):
            (out / name).unlink(missing_ok=True)
    pairs, unpaired = _pair(a, b)
    differences = comparability(a, b, unpaired)
    deltas: dict[str, Delta | dict] = {}
    for measure in MEASURES:
        values = _present_pairs(pairs, measure.column)
        other_models = _other_models(measure.name, a, b)
        if values and other_models:
            deltas[measure.name] = {"skipped": other_models}
        elif values:
            deltas[measure.name] = paired_delta(values, settings.confidence, measure.higher_is_better)
        else:
            deltas[measure.name] = {"skipped": _why_unpaired(measure.name, a, b)}
    disagreements = _disagreements(pairs, threshold, a.folder, b.folder)
    scored = [d for d in disagreements if d.flipped is not None]
    flips = {"flipped": sum(d.flipped for d in scored), "of": len(scored)} if scored else None
    if flips:
        flips["share"] = flips["flipped"] / flips["of"]

    out.mkdir(parents=True, exist_ok=True)
    _write_paired(out / PAIRED_CSV, pairs, disagreements)
    worst = sorted(disagreements, key=lambda d: d.rank_key, reverse=True)[: settings.sheet_rows]
    sheet = contact_sheet(worst, a, b, settings.sheet_side) if worst else None
    if sheet is not None:  # the service's PNG encoder: ~4x quicker than Pillow's default level for a sheet
        from engines.imaging import encode_image

        (out / CONTACT_SHEET).write_bytes(encode_image(np.asarray(sheet), None, "png"))

    gate = check_gate(thresholds, deltas, flips, a, b, differences, settings.allow_partial) if thresholds else None
    mads = [d.output_mad for d in disagreements]
    summary.data["metrics"] = {
        "paired": len(pairs),
        "unpaired": unpaired,
        "threshold": threshold,
        "deltas": {name: asdict(d) if isinstance(d, Delta) else d for name, d in deltas.items()},
        "verdict_flips": flips or {"skipped": _why_unpaired("score", a, b)},
        "output_mean_abs_diff": float(np.mean(mads)),
        "identical_outputs": sum(m == 0 for m in mads),
        "confidence": settings.confidence,
        "differences": differences,
        "allow_partial": settings.allow_partial,
    }
    summary.data["a"] = _describe_run(a)
    summary.data["b"] = _describe_run(b)
    summary.data["gate"] = gate
    summary.data["report"] = format_report(summary.data, thresholds)
    summary.data["outputs"] = {
        "paired": str(out / PAIRED_CSV),
        "contact_sheet": str(out / CONTACT_SHEET) if sheet is not None else None,
    }
    summary.write("completed")
    return summary.data


def _pair(a: EvaluationRun, b: EvaluationRun) -> tuple[list[tuple[dict, dict]], dict[str, int]]:
    """Rows evaluated in both runs, by id; source and mask must be the same files, with the same bytes (and GT's,
    where both recorded one: a set regenerated in place keeps its paths and metadata file)."""
    b_rows = {row["id"]: row for row in b.rows}
    pairs, not_evaluated = [], 0
    for row in a.rows:
        other = b_rows.get(row["id"])
        if other is None:
            continue
        if (row["source"], row["mask"]) != (other["source"], other["mask"]):
            raise TrainingError(
                f"entry {row['id']}: A evaluated {row['source']} with {row['mask']}, B {other['source']} with "
                f"{other['mask']}: the runs are over different test sets"
            )
        for kind in IMAGE_KINDS:
            digests = row.get(f"{kind}_sha256"), other.get(f"{kind}_sha256")
            if None not in digests and digests[0] != digests[1]:
                raise TrainingError(
                    f"entry {row['id']}: its {kind} file {row[kind]} is not the one the other run evaluated "
                    f"(sha256 A {digests[0][:12]}, B {digests[1][:12]}): the runs are over different test sets"
                )
        if row["status"] == other["status"] == "ok":
            pairs.append((row, other))
        else:
            not_evaluated += 1
    if not pairs:
        raise TrainingError(f"no image was evaluated in both {a.folder} and {b.folder}")
    a_ids = {row["id"] for row in a.rows}
    unpaired = {
        "only_in_a": len(a_ids - set(b_rows)),
        "only_in_b": len(set(b_rows) - a_ids),
        "not_evaluated_in_both": not_evaluated,
    }
    return pairs, unpaired


def comparability(a: EvaluationRun, b: EvaluationRun, unpaired: dict[str, int]) -> dict[str, list[str]]:
    """{"settings": [...], "coverage": [...], "engine": [...]}: why the runs are not a like-for-like comparison.
    Settings differences (and a baseline spoiled with --degrade) always fail the gate; coverage ones (images not
    evaluated in both, or a --limit on either side that cut the test set) unless allow_partial; engine ones (a
    UNet file that is not the bundle's, in one run or both) are reported, not gated: comparing engines is the
    gate's purpose, and their pixels are what it measures."""
    found: dict[str, list[str]] = {"settings": [], "coverage": [], "engine": []}
    for label, run in (("A", a), ("B", b)):
        if run.rows and "source_sha256" not in run.rows[0]:
            found["settings"].append(f"{label} does not record its images' sha256 (evaluate it again)")
    for key, recorded in RECORDED.items():
        missing = [label for label, run in (("A", a), ("B", b)) if key not in run.summary]
        found["settings"] += [f"{label} does not record {recorded.what} (evaluate it again)" for label in missing]
        if not missing and a.summary[key] != b.summary[key]:
            shown = (recorded.show(run.summary[key]) for run in (a, b))
            found["settings"].append(f"the {recorded.noun} differ: A {next(shown)}, B {next(shown)} ({recorded.why})")
    config_a, config_b = a.summary.get("config", {}), b.summary.get("config", {})
    for kind, names in (("settings", SAME_SETTINGS), ("coverage", COVERAGE_SETTINGS)):
        for name in names:
            if config_a.get(name) != config_b.get(name):
                found[kind].append(f"{name} differs: A {config_a.get(name)}, B {config_b.get(name)}")
    limit = config_a.get("limit")
    if limit is not None and limit == config_b.get("limit") and max(len(a.rows), len(b.rows)) >= limit:
        # the same --limit pairs every image and differs in nothing, yet gates a subset of the test set
        found["coverage"].append(f"both runs evaluated only the first {limit} entries of the test set (--limit)")
    if config_a.get("degrade", "none") != "none":
        # B degraded is the gate's self-check (it must fail); a spoiled baseline lets a worse candidate pass
        found["settings"].append(f"A (the baseline) was evaluated with --degrade {config_a['degrade']}")
    ran = [_unet_file(run.summary.get("engine", {})) for run in (a, b)]
    if _from_elsewhere(ran[0]) != _from_elsewhere(ran[1]):
        found["engine"].append(f"the UNets differ: A ran {_unet_shown(ran[0])}, B {_unet_shown(ran[1])}")
    left_out = {where: count for where, count in unpaired.items() if count}
    if left_out:
        described = ", ".join(f"{count} {where.replace('_', ' ')}" for where, count in left_out.items())
        found["coverage"].append(f"{sum(left_out.values())} image(s) not evaluated in both runs ({described})")
    return found


def _present_pairs(pairs: list[tuple[dict, dict]], column: str) -> list[tuple[float, float]]:
    values = ((ra[column], rb[column]) for ra, rb in pairs)
    return [(x, y) for x, y in values if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]


def _other_models(name: str, a: EvaluationRun, b: EvaluationRun) -> str | None:
    """Why a learned measure's values are not comparable (another model measured them), or None. Only
    compared where both runs measured it; a run without `measuring_models` is from before it was recorded."""
    if name not in LEARNED_MEASURES:
        return None
    recorded = [run.summary.get("measuring_models") for run in (a, b)]
    models = [None if found is None else found.get(name) for found in recorded]
    if None in recorded:
        missing = " and ".join(label for label, found in zip("AB", recorded) if found is None)
        return f"not comparable: {missing} does not record which model measured it (evaluate it again)"
    if _model_identity(models[0]) != _model_identity(models[1]):
        shown = [m.get("sha256", "")[:12] or m for m in models]
        return f"not comparable: another model measured it (A {shown[0]}, B {shown[1]})"
    return None


def _model_identity(model: dict | None):
    """A measuring model as compared: an embedder by its weights' sha256 (a copy in another folder is the same
    model), LPIPS by its net."""
    return model.get("sha256", model) if model else model


def _why_unpaired(name: str, a: EvaluationRun, b: EvaluationRun) -> str:
    reason_a, reason_b = a.skip_reason(name), b.skip_reason(name)
    if reason_a and reason_a == reason_b:
        return f"in both runs: {reason_a}"
    reasons = [f"{label}: {reason}" for label, reason in (("A", reason_a), ("B", reason_b)) if reason]
    return "; ".join(reasons) or "no image has a value in both runs"


def _describe_run(run: EvaluationRun) -> dict:
    engine = run.summary.get("engine", {})
    shown = ("runner", "dtype", "device", "cuda_graphs", "steps", "strength", "runner_path")  # cuda_graphs: timing
    return {"folder": str(run.folder), **{k: engine.get(k) for k in shown}, "unet_file": _unet_file(engine)}


def _unet_file(engine: dict) -> dict | None:
    """evaluate's `unet_file` (None: the torch runner, the bundle's weights); for a run from before it was recorded,
    what its runner_path tells (none given: the bundle's recorded export ran)."""
    if "unet_file" in engine:
        return engine["unet_file"]
    if engine.get("runner", "torch") == "torch":
        return None
    path = engine.get("runner_path")
    return {"path": path, "bundle_export": None if path else True}


def _from_elsewhere(file: dict | None) -> str | None:
    """The path of a UNet file that is not (or not known to be) the bundle's own; None for the bundle's."""
    return None if file is None or file["bundle_export"] is True else file["path"]


def _unet_shown(file: dict | None) -> str:
    if file is None:
        return "the bundle's UNet weights"
    if file["path"] is None:
        return "the bundle's recorded export"
    where = {True: "the bundle's recorded export", False: "not the bundle's recorded export"}
    return f"{file['path']} ({where.get(file['bundle_export'], 'not recorded whether it is the bundle export')})"


# ---------------------------------------------------------------- disagreements and the contact sheet


@dataclass(frozen=True)
class Disagreement:
    id: str
    row_a: dict
    row_b: dict
    flipped: bool | None  # None: a run has no scores
    score_change: float  # |score B - score A|, 0 without scores
    output_mad: float  # mean |B - A| over all pixels and channels, 0..255

    @property
    def rank_key(self) -> tuple[bool, float, float]:
        return (bool(self.flipped), self.score_change, self.output_mad)


def _disagreements(pairs, threshold: float, folder_a: Path, folder_b: Path) -> list[Disagreement]:
    found = []
    for ra, rb in pairs:
        out_a, out_b = (_read_rgb(folder / row["output"]) for folder, row in ((folder_a, ra), (folder_b, rb)))
        scored = ra["score"] is not None and rb["score"] is not None
        found.append(
            Disagreement(
                id=ra["id"],
                row_a=ra,
                row_b=rb,
                flipped=((ra["score"] >= threshold) != (rb["score"] >= threshold)) if scored else None,
                score_change=abs(rb["score"] - ra["score"]) if scored else 0.0,
                output_mad=float(np.abs(out_b.astype(np.int16) - out_a.astype(np.int16)).mean()),
            )
        )
    return found


def _read_rgb(path: Path) -> np.ndarray:
    """Pixels as evaluate read them: through the service's decoder (EXIF orientation applied)."""
    from engines.imaging import DecodeLimits, decode_image

    return decode_image(Path(path).read_bytes(), DecodeLimits()).rgb


def contact_sheet(rows: list[Disagreement], a: EvaluationRun, b: EvaluationRun, side: int) -> Image.Image:
    """One row per disagreement: source | dilated mask over the source | A | B, each cut as one square box around
    the whole mask (A's imaging settings; where the pipeline ran one crop per region, the box holds them all,
    so a reader sees every region of a row side by side), with a caption of the scores and the pixel
    difference."""
    from engines import imaging

    config = a.summary["config"]
    pad, header, caption = 4, 30, 14
    sheet = Image.new("RGB", (4 * side + 5 * pad, header + len(rows) * (side + caption + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    titles = [
        "source",
        "mask (dilated; outside dimmed)",
        f"A: {a.folder.name}\n{_label(_describe_run(a))}",
        f"B: {b.folder.name}\n{_label(_describe_run(b))}",
    ]
    for column, title in enumerate(titles):
        draw.multiline_text((pad + column * (side + pad), 2), title, fill="black", spacing=2)
    for number, row in enumerate(rows):
        source = _read_rgb(row.row_a["source"])
        mask = imaging.decode_mask(Path(row.row_a["mask"]).read_bytes(), source.shape[:2], imaging.DecodeLimits())
        dilated = imaging.dilate_mask(mask, config["dilate"])
        plan = imaging.plan_crop(dilated, config["buckets"], config["crop_margin"])
        crops = [imaging.crop_for_model(image, dilated, plan)[0] for image in (
            source,
            _read_rgb(a.folder / row.row_a["output"]),
            _read_rgb(b.folder / row.row_b["output"]),
        )]  # fmt: skip
        mask_crop = imaging.crop_for_model(source, dilated, plan)[1]
        overlay = crops[0].copy()
        overlay[~mask_crop] = overlay[~mask_crop] // 3
        cells = [crops[0], overlay, crops[1], crops[2]]
        top = header + number * (side + caption + pad)
        for column, cell in enumerate(cells):
            thumbnail = Image.fromarray(cell).resize((side, side), Image.Resampling.LANCZOS)
            sheet.paste(thumbnail, (pad + column * (side + pad), top))
        draw.text((pad, top + side + 1), _caption(row), fill="black")
    return sheet


def _pixel_difference(value: float) -> str:
    """Never 0.000 for outputs that differ: a pixel off by one in a 512 px image is a mean of 1e-6."""
    return "< 0.0005" if 0 < value < 0.0005 else f"{value:.3f}"


def _label(described: dict) -> str:
    return f"{described['runner']} {described['dtype']} on {described['device']}, {described['steps']} steps"


def _caption(row: Disagreement) -> str:
    text = f"{row.id}"
    if row.flipped is not None:
        text += f"  score A {row.row_a['score']:.3f}  B {row.row_b['score']:.3f}" + ("  FLIPPED" if row.flipped else "")
    return text + f"  mean |B-A| {_pixel_difference(row.output_mad)}"


def _write_paired(path: Path, pairs, disagreements: list[Disagreement]) -> None:
    columns = ["id", "flipped", "output_mad", *(f"delta_{m.name}" for m in MEASURES)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for (ra, rb), found in zip(pairs, disagreements):
            row = {"id": ra["id"], "flipped": found.flipped, "output_mad": found.output_mad}
            for m in MEASURES:
                a_value, b_value = ra[m.column], rb[m.column]
                row[f"delta_{m.name}"] = (
                    "" if a_value is None or b_value is None else 0.0 if a_value == b_value else b_value - a_value
                )
            writer.writerow(row)


# ---------------------------------------------------------------- the gate and the report


def check_gate(
    thresholds: Thresholds,
    deltas: dict,
    flips: dict | None,
    a: EvaluationRun,
    b: EvaluationRun,
    differences: dict[str, list[str]] | None = None,
    allow_partial: bool = False,
) -> dict:
    """{"passed", "verdicts": {measure or "verdict_flips": ok | FAIL | not checked}, "failures": [why, ...],
    "not_checked": [why, ...]}. `differences`: `comparability`'s; each fails the gate (coverage ones are
    only reported with `allow_partial`). A gate that checked no measure fails: it would pass anything."""
    verdicts, failures, not_checked = {}, [], []
    differences = differences or {}
    failures += [f"not comparable: {why}" for why in differences.get("settings", [])]
    partial = [f"partial: {why}" for why in differences.get("coverage", [])]
    if allow_partial:
        not_checked += partial
    else:
        failures += [f"{why} (--allow-partial gates on the paired images)" for why in partial]

    def record(name: str, verdict: str, why: str | None = None) -> None:
        verdicts[name] = verdict
        if why:
            (failures if verdict == "FAIL" else not_checked).append(f"{name}: {why}")

    for name, allowed in thresholds.allowed_deltas.items():
        delta = deltas[name]
        if not isinstance(delta, Delta):
            in_neither = a.skip_reason(name) and b.skip_reason(name)
            record(name, "not checked" if in_neither else "FAIL", delta["skipped"])
        elif delta.infinite_worse:
            record(name, "FAIL", f"{delta.infinite_worse} image(s) infinite (identical pixels) in A and not in B")
        elif delta.delta is None:
            record(name, "ok")
        elif (delta.delta < allowed) if MEASURES_BY_NAME[name].higher_is_better else (delta.delta > allowed):
            record(name, "FAIL", f"mean delta B - A {delta.delta:+.4g} is past the allowed {allowed:+g}")
        else:
            record(name, "ok")
    if thresholds.max_flip_share is not None:
        if flips is None:
            in_neither = a.skip_reason("score") and b.skip_reason("score")
            record("verdict_flips", "not checked" if in_neither else "FAIL", _why_unpaired("score", a, b))
        elif flips["share"] > thresholds.max_flip_share:
            record(
                "verdict_flips",
                "FAIL",
                f"{flips['flipped']} of {flips['of']} ({flips['share']:.1%}) is past the allowed "
                f"{thresholds.max_flip_share:.1%}",
            )
        else:
            record("verdict_flips", "ok")
    if not any(verdict != "not checked" for verdict in verdicts.values()):
        failures.append("nothing checked: no measure the thresholds file names was measured in both runs")
    return {"passed": not failures, "verdicts": verdicts, "failures": failures, "not_checked": not_checked}


def format_report(data: dict, thresholds: Thresholds | None) -> str:
    """The table a person reads: one line per measure, then flips, skipped measures and the gate's verdict."""
    metrics = data["metrics"]
    allowed = thresholds.allowed_deltas if thresholds else {}
    gate = data.get("gate")
    verdicts = gate["verdicts"] if gate else {}
    level = f"{metrics['confidence']:.0%} CI"
    lines = [
        f"A: {data['a']['folder']} ({_label(data['a'])}; UNet: {_unet_shown(data['a']['unet_file'])})",
        f"B: {data['b']['folder']} ({_label(data['b'])}; UNet: {_unet_shown(data['b']['unet_file'])})",
        f"{metrics['paired']} paired images; unpaired: {metrics['unpaired']}",
        f"{'measure':<18} {'A':>10} {'B':>10} {'B - A':>10} {level:>23} {'allowed':>9}  verdict",
    ]
    skipped, notes = [], []
    for name, delta in metrics["deltas"].items():
        limit = f"{allowed[name]:+g}" if name in allowed else ""
        if "skipped" in delta:
            skipped.append(f"  {name}: {delta['skipped']}")
            columns = f"{'-':>10} {'-':>10} {'-':>10} {'skipped':>23}"
        else:
            interval = "" if delta["ci_low"] is None else f"[{delta['ci_low']:+.4g}, {delta['ci_high']:+.4g}]"
            means = (number_cell(delta[key], sign) for key, sign in (("mean_a", ""), ("mean_b", ""), ("delta", "+")))
            columns = f"{next(means)} {next(means)} {next(means)} {interval:>23}"
            infinite = {kind: delta[f"infinite_{kind}"] for kind in ("equal", "worse", "better")}
            if any(infinite.values()):
                notes.append(
                    f"  {name}: infinite (identical pixels) in both: {infinite['equal']} (delta 0); "
                    f"in one run only, worse in B: {infinite['worse']}, better: {infinite['better']}"
                )
        lines.append(f"{name:<18} {columns} {limit:>9}  {verdicts.get(name, '')}".rstrip())
    lines += notes
    flips = metrics["verdict_flips"]
    if "skipped" in flips:
        skipped.append(f"  verdict flips: {flips['skipped']}")
    else:
        limit = ""
        if thresholds and thresholds.max_flip_share is not None:
            limit = f", allowed {thresholds.max_flip_share:.1%}  {verdicts.get('verdict_flips', '')}"
        lines.append(
            f"verdict flips (score >= {metrics['threshold']}): {flips['flipped']} of {flips['of']} "
            f"({flips['share']:.1%}){limit}"
        )
    lines.append(
        f"outputs: mean |B - A| {_pixel_difference(metrics['output_mean_abs_diff'])} (0-255), identical in "
        f"{metrics['identical_outputs']} of {metrics['paired']}"
    )
    if skipped:
        lines += ["skipped:", *skipped]
    found = metrics["differences"]
    differences = [*found["settings"], *found["coverage"], *(f"{why} (reported, not gated)" for why in found["engine"])]
    if differences:
        lines += ["runs differ:", *(f"  {why}" for why in differences)]
    if gate is None:
        lines.append("gate: no thresholds file, nothing checked")
    else:
        lines.append(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}")
        lines += [f"  failed: {why}" for why in gate["failures"]]
        not_checked = [name for name, verdict in verdicts.items() if verdict == "not checked"]
        if not_checked:
            lines.append(f"  not checked (measured in neither run, see skipped): {', '.join(not_checked)}")
    return "\n".join(lines)
