"""The removal path in one readable place: decode -> plan crops -> run the engine on the crops -> paste back
-> score -> gate.

Every caller runs this class: the service drives it with model calls over Serve handles
(serve.service.ServeModels), the release gate (training.evaluate) and the benchmarks run it in-process on the
engines themselves (`LocalModels`). No step exists twice: change how crops are planned, cut, pasted or scored
here and the service, the release gate and the benchmarks all see it.

What is not here is protocol: reading bodies, choosing and encoding the output format, deadlines, retention,
metrics (serve/).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from engines import imaging, regions
from engines.errors import ImageSizeMismatch, InvalidMask
from engines.gate import GateOutcome, GatePolicy, ScorerUnavailable, run_gated
from engines.jobs import LATENT_CELL, SCORE_SIZE, RemovalJob, ScoreJob

if TYPE_CHECKING:  # the service drives the pipeline without loading the model libraries
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine

logger = logging.getLogger("ray.serve")  # where a replica's log lines go (formatted, with the request id)

T = TypeVar("T")


# Raised whenever the pipeline gives the models or the paste other pixels for the same request and settings: an
# evaluation run records it, and `compare` gates only runs of one version. 2: masks in whole latent cells, the
# feather at most dilate + 1, the smaller bucket within MAX_BUCKET_DOWNSCALE.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class CropSettings:
    """How a mask becomes model crops and how results go back (serve.config.ImagingSettings holds the defaults)."""

    buckets: tuple[int, ...]
    crop_margin: int
    dilate: int
    feather: int

    @classmethod
    def from_imaging(cls, imaging_settings) -> CropSettings:
        s = imaging_settings
        return cls(tuple(s.buckets), s.crop_margin, s.dilate, s.feather)

    def feather_for(self, dilate: int) -> int:
        """The blend ramp a removal dilated by `dilate` gets: `feather`, but at most dilate + 1.

        The ramp runs inward from the dilated mask's edge and is whole at `feather` px (Euclidean) in; a pixel
        of the mask as given lies at least dilate + 1 px from any pixel the square dilation leaves out, so
        every pixel the client marked is the model's, whatever the dilation (a 1 px stroke at dilate 0 kept 84%
        of the object under the whole ramp)."""
        return min(self.feather, dilate + 1)


class Timings:
    """Stage durations of one request (seconds), reported as Server-Timing (ms) and as metrics."""

    def __init__(self):
        self.started = time.perf_counter()
        self.mark = self.started
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.add(stage, now - self.mark)
        self.mark = now

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def took_before(self, stage: str, seconds: float) -> None:
        """A stage that ran before these timings started (the upload's read): listed first, and in the total."""
        self.stages = {stage: seconds, **self.stages}
        self.started -= seconds

    def total(self) -> float:
        return time.perf_counter() - self.started

    def server_timing(self) -> str:
        items = [*self.stages.items(), ("total", self.total())]
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in items)


@dataclass
class Prepared:
    """A decoded request, planned: the crops the model will see."""

    image: imaging.DecodedImage  # where the alpha channel was the mask: opaque inside it, kept outside
    mask: np.ndarray  # the dilated mask: what the model repaints
    given_mask: np.ndarray  # the mask as uploaded (or the alpha channel's), before dilation
    plans: list[imaging.CropPlan]  # [] when the mask is empty: nothing to remove
    crops: list[tuple[np.ndarray, np.ndarray]]  # each plan's (image crop, mask crop) at its bucket, as cut
    dilate: int  # the dilation applied (the request's, else the settings')
    fills: list[np.ndarray]  # each mask crop as the remover is given it (removal_mask)

    @property
    def buckets(self) -> list[int]:
        return [plan.bucket for plan in self.plans]


def removal_mask(crop_mask: np.ndarray) -> np.ndarray:
    """The mask crop grown to whole latent cells. The engine blacks out every mask pixel of its input but tells
    the UNet only the cells whose first pixel is masked (nearest, as diffusers does), so a thin stroke between
    those pixels was blacked out with nothing to fill it. Grown here, not in the engine, the engine stays
    diffusers' for a given (image, mask); the paste keeps the full-resolution mask."""
    return imaging.whole_cells(crop_mask, LATENT_CELL)


def score_mask(crop_mask: np.ndarray) -> np.ndarray:
    """The mask crop with no region hidden from the discriminator, which sees one pixel per cell of its view's
    latent grid (nearest to SCORE_SIZE, then to latent size: every side / 64th pixel of the crop). Only a region
    with none of those pixels is grown to whole cells; the rest stays as the discriminator was trained on it."""
    return imaging.seen_on_grid(crop_mask, crop_mask.shape[0] * LATENT_CELL // SCORE_SIZE)


@dataclass
class Attempt:
    edited: np.ndarray  # the whole image with this attempt's crops pasted back
    batch_size: int  # the largest engine batch one of its crops ran in


class CropOutcome(Protocol):
    image: np.ndarray  # the crop's result, (S, S, 3) uint8
    batch_size: int
    stages: dict[str, float]  # seconds per stage, reported in Server-Timing


class Models(Protocol):
    """The two model calls the pipeline needs; crops of one request are called concurrently, so a batching
    implementation (the Serve deployments) runs them in one batch."""

    async def remove(self, job: RemovalJob) -> CropOutcome: ...

    async def score(self, job: ScoreJob) -> float: ...


def outage_detail(exc: Exception) -> str:
    """What a client is told of a model call that failed on the server's side: the detail of a problem of ours,
    else the exception's type alone. Its text (a replica's traceback, paths, pid and address) goes to the log."""
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str):
        return detail
    logger.warning("a model call failed: %s", exc)
    return type(exc).__name__


async def all_or_none(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, in order; when one fails, the others are cancelled and awaited before its error
    propagates, so a request already answered leaves no model call running (ServeModels cancels a call
    nobody waits for in Serve too).

    Not bare asyncio.gather: on an error it leaves the others running. Not asyncio.TaskGroup: its
    ExceptionGroup would hide the Problem / ScorerUnavailable the callers handle."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class RemovalPipeline:
    def __init__(
        self,
        models: Models,
        crops: CropSettings,
        limits: imaging.DecodeLimits,
        run: Callable[..., Awaitable] = asyncio.to_thread,
    ):
        """`run(fn, *args)`: where the CPU steps (paste, cut) run off the event loop; the service passes its
        bounded pool (serve.uploads.Offload.run)."""
        self.models = models
        self.crops = crops
        self.limits = limits
        self.run = run

    async def __call__(
        self,
        prepared: Prepared,
        seed: int,
        policy: GatePolicy,
        timings: Timings | None = None,
        spoil: Callable[[np.ndarray], np.ndarray] | None = None,
        deadline: float | None = None,
        transient: Callable[[Exception], bool] | None = None,
    ) -> GateOutcome[Attempt]:
        """Remove, score and gate a prepared request with a non-empty mask.

        `spoil` (the release gate's self-check, training.evaluate --degrade) alters each pasted result before
        it is scored. `deadline` and `transient`: when an attempt after the first gives way to the ones before
        it (engines.gate.run_gated)."""
        timings = timings or Timings()

        async def attempt(attempt_seed: int) -> Attempt:
            result = await self.attempt(prepared, attempt_seed, timings)
            return Attempt(spoil(result.edited), result.batch_size) if spoil else result

        async def score(result: Attempt) -> float:
            try:
                return await self.score(prepared, result.edited, timings)
            except ScorerUnavailable:
                raise
            except Exception as exc:  # a failing Scorer is the gate's concern: fail open or closed by policy
                raise ScorerUnavailable(outage_detail(exc)) from exc

        return await run_gated(policy, seed, attempt, score, deadline, transient)

    # ------------------------------------------------------------------ the steps, in order

    def prepare(
        self, image: bytes, mask: bytes | None, dilate: int | None = None, max_crops: int = regions.MAX_CROPS
    ) -> Prepared:
        """Decode, pick the mask (the upload's, or the image's alpha), dilate, plan and cut the crops.
        `max_crops`: what the gate's model-call cap allows (engines.gate.max_crops). CPU work: the service runs
        it in a thread."""
        decoded = imaging.decode_image(image, self.limits)
        if mask is None:
            mask_pixels = imaging.mask_from_alpha(decoded)
            if decoded.alpha is not None:
                # the removed pixels are filled in, so opaque; the alpha outside the mask (soft edges) is the photo's
                opaque_inside = np.where(mask_pixels, np.uint8(255), decoded.alpha)
                decoded.alpha = opaque_inside if opaque_inside.min() < 255 else None
        else:
            mask_pixels = imaging.decode_mask(mask, decoded.rgb.shape[:2], self.limits)
        return self.prepare_pixels(decoded, mask_pixels, dilate, max_crops)

    def prepare_pixels(
        self,
        image: imaging.DecodedImage,
        mask: np.ndarray,
        dilate: int | None = None,
        max_crops: int = regions.MAX_CROPS,
    ) -> Prepared:
        """Dilate, plan and cut, for pixels already decoded (benchmarks start here)."""
        dilate = self.crops.dilate if dilate is None else dilate
        dilated, plans = self.plan(mask, dilate, max_crops)
        crops = self.cut(image.rgb, dilated, plans)
        return Prepared(image, dilated, mask, plans, crops, dilate, [removal_mask(m) for _, m in crops])

    def plan(
        self, mask: np.ndarray, dilate: int | None = None, max_crops: int = regions.MAX_CROPS
    ) -> tuple[np.ndarray, list[imaging.CropPlan]]:
        """The dilated mask and a crop per region (engines.regions), at most `max_crops` (else regions share)."""
        dilated = imaging.dilate_mask(mask, self.crops.dilate if dilate is None else dilate)
        plans = regions.plan_region_crops(
            dilated, self.crops.buckets, self.crops.crop_margin, max_crops=min(max_crops, regions.MAX_CROPS)
        )
        return dilated, plans

    @staticmethod
    def cut(rgb: np.ndarray, mask: np.ndarray, plans: Sequence[imaging.CropPlan]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [imaging.crop_for_model(rgb, mask, plan) for plan in plans]

    async def attempt(self, prepared: Prepared, seed: int, timings: Timings | None = None) -> Attempt:
        """Every crop at once (they share the engine's batches), then each pasted back in its own window:
        pixels outside the mask stay bit-identical."""
        timings = timings or Timings()
        timings.restart()
        outcomes = await all_or_none(
            self.models.remove(RemovalJob(crop, fill, seed)) for (crop, _), fill in zip(prepared.crops, prepared.fills)
        )
        for outcome in outcomes:
            for stage, seconds in outcome.stages.items():
                timings.add(stage, seconds / len(outcomes))
        timings.restart()
        edited = await self.run(
            regions.paste_back_regions, prepared.image.rgb, prepared.mask, [o.image for o in outcomes],
            prepared.plans, self.crops.feather_for(prepared.dilate),
        )  # fmt: skip
        timings.lap("paste")
        return Attempt(edited, max(outcome.batch_size for outcome in outcomes))

    async def score(self, prepared: Prepared, edited: np.ndarray, timings: Timings | None = None) -> float:
        """Score what the caller gets: the pasted result cut like each source crop (as POST /score cuts it);
        the worst region's score is the result's."""
        timings = timings or Timings()
        timings.restart()
        jobs = await self.run(self.score_jobs, prepared.crops, edited, prepared.mask, prepared.plans)
        worst = await self.worst_score(jobs)
        timings.lap("score")
        return worst

    # ------------------------------------------------------------------ scoring a finished removal (POST /score)

    def prepare_score(
        self,
        source: bytes,
        mask: bytes,
        edited: bytes,
        dilate: int | None = None,
        max_crops: int = regions.MAX_CROPS,
    ) -> list[ScoreJob]:
        """The crops the removal used: decode all three, dilate the mask as a removal does, cut both images."""
        source_image = imaging.decode_image(source, self.limits, "source image")
        edited_image = imaging.decode_image(edited, self.limits, "edited image")
        if edited_image.rgb.shape != source_image.rgb.shape:
            (eh, ew), (sh, sw) = edited_image.rgb.shape[:2], source_image.rgb.shape[:2]
            raise ImageSizeMismatch(f"edited is {ew}x{eh}, source is {sw}x{sh}")
        given = imaging.decode_mask(mask, source_image.rgb.shape[:2], self.limits)
        dilated, plans = self.plan(given, dilate, max_crops)
        if not plans:
            raise InvalidMask("the mask is empty: there is no removal to score")
        return self.score_jobs(self.cut(source_image.rgb, dilated, plans), edited_image.rgb, dilated, plans)

    def score_jobs(
        self, sources: Sequence[tuple[np.ndarray, np.ndarray]], edited: np.ndarray, mask: np.ndarray,
        plans: Sequence[imaging.CropPlan],
    ) -> list[ScoreJob]:  # fmt: skip
        """Each source crop with its mask as the Scorer is given it (score_mask) and the edited image cut alike."""
        edits = self.cut(edited, mask, plans)
        return [ScoreJob(src, score_mask(m), e) for (src, m), (e, _) in zip(sources, edits)]

    async def worst_score(self, jobs: Sequence[ScoreJob]) -> float:
        """All crops scored at once (one Scorer batch); the lowest score. A non-finite score (a discriminator
        overflow) is the Scorer's failure: NaN compares false, so it would pass the gate or hide a lower score."""
        scores = await all_or_none(self.models.score(job) for job in jobs)
        if not all(math.isfinite(score) for score in scores):
            raise ScorerUnavailable("the discriminator returned a non-finite score")
        return min(scores)


@dataclass
class LocalOutcome:
    image: np.ndarray
    batch_size: int = 1
    stages: dict[str, float] = field(default_factory=dict)


class LocalModels:
    """The engines themselves, in this process (evaluation, benchmarks): one call per crop, in the caller's
    thread, so a sequential caller times the engine alone (`engine_seconds`).

    `warmup` untimed calls run the first time a bucket side is seen (the first call of a shape compiles
    kernels and allocates)."""

    def __init__(self, remover: RemovalEngine, scorer: ScoringEngine | None = None, warmup: int = 0):
        self.remover = remover
        self.scorer = scorer
        self.warmup = warmup
        self.warmed: set[int] = set()
        self.engine_seconds = 0.0
        self.score_seconds = 0.0

    async def remove(self, job: RemovalJob) -> LocalOutcome:
        side = job.image.shape[0]
        if side not in self.warmed:
            for _ in range(self.warmup):
                self.remover.remove([job])
            self.warmed.add(side)
        stages: dict[str, float] = {}
        began = time.perf_counter()
        image = self.remover.remove([job], timings=stages)[0]
        self.engine_seconds += time.perf_counter() - began
        return LocalOutcome(image, 1, stages)

    async def score(self, job: ScoreJob) -> float:
        if self.scorer is None:
            raise ScorerUnavailable("no discriminator in this bundle")
        began = time.perf_counter()
        value = self.scorer.score([job])[0]
        self.score_seconds += time.perf_counter() - began
        return value
