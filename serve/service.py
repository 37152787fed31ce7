"""What a removal or a score request does, independent of the protocol that carried it.

REST (serve/app.py) and gRPC (serve/grpc_api.py) are thin adapters around `RemovalService`: they
turn their wire format into a `RemovalRequest` / `ScoreRequest` and a `RemovalReply` / `ScoreReply`
back, and map a raised `Problem` to their own error form.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from engines import imaging, regions
from engines.errors import ImageSizeMismatch, InputError, InvalidMask
from engines.remover import RemovalJob
from engines.scorer import ScoreJob
from serve.config import AppSettings
from serve.retention.keeper import Retention
from serve.gate import GatePolicy, ScorerUnavailable, run_gated
from serve.health import Readiness
from serve.metrics import IngressMetrics
from serve.problems import Problem
from serve.protocol import RemovalRequest, RemoveOptions, ScoreRequest
logger = logging.getLogger("ray.serve")


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

    def total(self) -> float:
        return time.perf_counter() - self.started

    def server_timing(self) -> str:
        items = [*self.stages.items(), ("total", self.total())]
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in items)


@dataclass
class RemovalReply:
    body: bytes
    format: str
    seed: int | None
    bucket: int | None  # the largest crop's bucket; None: the mask was empty, the image comes back unchanged
    batch_size: int
    score: float | None
    attempts: int
    gate: str  # the gate's verdict, see serve.gate.GateOutcome
    timings: Timings = field(default_factory=Timings)
    result_id: str | None = None  # set when the result was retained for feedback
    buckets: list[int] = field(default_factory=list)  # every crop's bucket, in the order of engines.regions' plans

    @property
    def media_type(self) -> str:
        return imaging.MEDIA_TYPES[self.format]


@dataclass
class Attempt:
    edited: np.ndarray  # the whole image with this attempt's crops pasted back
    batch_size: int  # the largest engine batch one of its crops ran in


@dataclass
class ScoreReply:
    score: float
    threshold: float
    passed: bool
    bucket: int


class RemovalService:
    def __init__(
        self,
        settings: AppSettings,
        remover: DeploymentHandle,
        scorer: DeploymentHandle | None,
        metrics: IngressMetrics,
    ):
        self.settings = settings
        self.remover = remover
        self.scorer = scorer
        self.metrics = metrics
        self.retention = Retention(settings.retention, metrics)
        self.readiness = Readiness({"Remover": remover, "Scorer": scorer})
        self._retry_after = {"Retry-After": str(settings.overload.retry_after_s)}
        cfg = settings.imaging
        self.limits = imaging.DecodeLimits(
            max_bytes=cfg.max_upload_bytes, max_megapixels=cfg.max_megapixels, max_side=cfg.max_side,
            max_chunks=cfg.max_chunks, max_jpeg_scans=cfg.max_jpeg_scans, max_exif_bytes=cfg.max_exif_bytes,
            max_rle_bytes=cfg.max_rle_bytes,
        )  # fmt: skip

    async def ready(self) -> dict:
        """Both model deployments have a running replica (the Scorer only where one is deployed), as Serve
        publishes it: never asked through the model queues, so a saturated Remover stays ready."""
        missing = await self.readiness.missing()
        if missing:
            raise Problem("not-ready", f"no running replica yet: {', '.join(missing)}", headers=self._retry_after)
        return {
            "status": "ready",
            "model": self.readiness.descriptions["Remover"],
            "scorer": self.readiness.descriptions.get("Scorer"),
            "gate": self.settings.gate.model_dump(),
        }

    async def remove(self, upload: RemovalRequest, accept: str = "", owner: str | None = None) -> RemovalReply:
        """`owner`: whose the retained result is (serve.auth.result_owner of the caller's key)."""
        timings = Timings()
        options = upload.options
        retain = self.retention.wanted(options.retain)
        policy = self._gate_policy(options)
        image, mask, plans, crops = await self._decode(self._prepare_removal, upload)
        timings.lap("decode")
        fmt = _output_format(options, accept, image.format)
        try:
            imaging.check_output(fmt, *image.rgb.shape[:2])  # before the model runs, not as a 500 from the encoder
        except InputError as exc:
            raise Problem.from_input_error(exc) from exc
        quality = options.quality or self.settings.imaging.jpeg_quality

        if not plans:
            body = upload.image
            if image.format != fmt:
                body = await asyncio.to_thread(imaging.encode_image, image.rgb, image.alpha, fmt, quality)
                timings.lap("encode")
            return RemovalReply(body, fmt, None, None, 0, None, 0, "nothing-to-remove", timings)

        seed = options.seed if options.seed is not None else random.getrandbits(63)
        feather = self.settings.imaging.feather
        policy = policy.within_calls(self.settings.gate.max_model_calls, len(plans))

        async def attempt(attempt_seed: int) -> Attempt:
            """Every crop of the request at once (they share the engine's batches), then all pasted back."""
            timings.restart()
            submitted = time.time()
            outcomes = await asyncio.gather(
                *(self._call(self.remover.remove, RemovalJob(src, m, attempt_seed), submitted) for src, m in crops)
            )
            for outcome in outcomes:
                for stage, seconds in outcome.stages.items():
                    timings.add(stage, seconds / len(outcomes))
            timings.restart()
            results = [outcome.image for outcome in outcomes]
            edited = await asyncio.to_thread(regions.paste_back_regions, image.rgb, mask, results, plans, feather)
            timings.lap("paste")
            return Attempt(edited, max(outcome.batch_size for outcome in outcomes))

        async def score(result: Attempt) -> float:
            """Score what the caller gets: the pasted result, cut like each source crop (as POST /score does);
            the worst region's score is the result's."""
            timings.restart()
            edited_crops = await asyncio.to_thread(_cut, result.edited, mask, plans)
            jobs = [ScoreJob(src, m, edited) for (src, m), edited in zip(crops, edited_crops)]
            try:
                scored = await asyncio.gather(
                    *(self._call(self.scorer.score, job, timeout_s=self.settings.scorer.timeout_s) for job in jobs)
                )
            except Problem as exc:
                raise ScorerUnavailable(exc.detail) from exc
            except Exception as exc:  # a crashed or failing Scorer must not fail the removal when failing open
                raise ScorerUnavailable(f"{type(exc).__name__}: {exc}") from exc
            timings.lap("score")
            return min(s.score for s in scored)

        deadline_s = min(options.timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        try:
            gated = await asyncio.wait_for(run_gated(policy, seed, attempt, score), timeout=deadline_s)
        except asyncio.TimeoutError as exc:
            raise Problem("timeout", f"no result within {deadline_s:g} s") from exc
        except ScorerUnavailable as exc:
            self.metrics.gate_outcomes.inc(tags={"mode": policy.mode, "verdict": "scorer-unavailable"})
            raise Problem(
                "scorer-unavailable", f"the quality gate ({policy.mode}) could not score the result: {exc}",
                headers=self._retry_after,
            ) from exc
        self.metrics.gate_outcomes.inc(tags={"mode": policy.mode, "verdict": gated.verdict})
        self.metrics.gate_attempts.observe(gated.attempts, tags={"mode": policy.mode})
        if gated.score is not None:
            self.metrics.scores.observe(gated.score, tags={"route": "/remove"})
        if not gated.accepted:
            raise Problem(
                "removal-failed",
                f"{gated.attempts} attempt(s) scored below {policy.threshold}; the best scored {gated.score:.3f}",
                score=gated.score,
                threshold=policy.threshold,
                attempts=gated.attempts,
                seed=gated.seed,
            )

        timings.restart()
        body = await asyncio.to_thread(imaging.encode_image, gated.result.edited, image.alpha, fmt, quality)
        timings.lap("encode")
        buckets = [plan.bucket for plan in plans]
        reply = RemovalReply(
            body, fmt, gated.seed, max(buckets), gated.result.batch_size, gated.score, gated.attempts, gated.verdict,
            timings, buckets=buckets,
        )  # fmt: skip
        if retain:
            dilate = self.settings.imaging.dilate if options.dilate is None else options.dilate
            reply.result_id = await self.retention.keep(
                upload.image, image.format, mask, reply, policy, options, dilate, owner
            )
        return reply

    async def score(self, upload: ScoreRequest) -> ScoreReply:
        if self.scorer is None:
            raise Problem("gate-unavailable", "this deployment runs without a Scorer")
        threshold = upload.options.gate_threshold
        if threshold is None or not self.settings.gate.allow_request_override:
            threshold = self.settings.gate.threshold
        jobs, plans = await self._decode(self._prepare_score, upload)
        try:
            scored = min(
                await asyncio.gather(*(self._call(self.scorer.score, job) for job in jobs)), key=lambda s: s.score
            )
        except Problem as exc:
            if exc.problem == "overloaded":
                raise
            raise Problem("scorer-unavailable", exc.detail, headers=self._retry_after) from exc
        except Exception as exc:  # the Scorer replica died or failed: a server-side outage, not the caller's fault
            raise Problem(
                "scorer-unavailable", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                headers=self._retry_after,
            ) from exc
        self.metrics.scores.observe(scored.score, tags={"route": "/score"})
        return ScoreReply(scored.score, threshold, scored.score >= threshold, max(plan.bucket for plan in plans))

    def _gate_policy(self, options: RemoveOptions) -> GatePolicy:
        policy = GatePolicy.resolve(self.settings.gate, options.gate, options.gate_threshold, options.max_attempts)
        if policy.mode != "off" and self.scorer is None:
            if options.gate not in (None, "off"):
                raise Problem("gate-unavailable", f"gate {options.gate!r} needs a Scorer; this deployment has none")
            return GatePolicy("off", policy.threshold, 1, policy.fail_open)
        return policy

    async def _decode(self, prepare, upload):
        """The decode limits bound its cost; the deadline is the backstop for a cost they miss. The client
        gets its answer then, though the thread runs on to the end of its (bounded) work."""
        deadline_s = self.settings.imaging.decode_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(prepare, upload), timeout=deadline_s)
        except InputError as exc:
            raise Problem.from_input_error(exc) from exc
        except asyncio.TimeoutError as exc:
            raise Problem(
                "image-too-large", f"decoding the uploads took over {deadline_s:g} s (imaging.decode_timeout_s)"
            ) from exc

    def _prepare_removal(self, upload: RemovalRequest):
        """Decode, pick the mask, dilate, plan and cut the crops: CPU work kept off the event loop."""
        image = imaging.decode_image(upload.image, self.limits)
        if upload.mask is None:
            mask = imaging.mask_from_alpha(image)
            image.alpha = None
        else:
            mask = imaging.decode_mask(upload.mask, image.rgb.shape[:2], self.limits)
        mask, plans = self._plan(mask, upload.options.dilate)
        return image, mask, plans, [imaging.crop_for_model(image.rgb, mask, plan) for plan in plans]

    def _prepare_score(self, upload: ScoreRequest):
        """The same crops the removal used: decode all three, dilate the mask as /remove does, cut."""
        source = imaging.decode_image(upload.source, self.limits)
        edited = imaging.decode_image(upload.edited, self.limits)
        if edited.rgb.shape != source.rgb.shape:
            raise ImageSizeMismatch(
                f"edited is {edited.rgb.shape[1]}x{edited.rgb.shape[0]}, source is {source.rgb.shape[1]}x{source.rgb.shape[0]}"
            )
        mask = imaging.decode_mask(upload.mask, source.rgb.shape[:2], self.limits)
        mask, plans = self._plan(mask, upload.options.dilate)
        if not plans:
            raise InvalidMask("the mask is empty: there is no removal to score")
        sources, edits = _cut(source.rgb, mask, plans, with_masks=True), _cut(edited.rgb, mask, plans)
        return [ScoreJob(src, m, e) for (src, m), e in zip(sources, edits)], plans

    def _plan(self, mask, dilate: int | None):
        cfg = self.settings.imaging
        mask = imaging.dilate_mask(mask, cfg.dilate if dilate is None else dilate)
        return mask, regions.plan_region_crops(mask, cfg.buckets, cfg.crop_margin)

    async def _call(self, method, *args, timeout_s: float | None = None):
        """One model call. A replica that dies under the call (a crash, a killed pod) is retried once:
        Serve routes the retry to a live replica or waits for the replacement, within the timeout.
        Model calls are pure functions of their inputs (the seed included), so a retry is safe.

        A call nobody waits for any more (its timeout, the request's deadline, a client that left) is
        cancelled in Serve, so it leaves the model's queue: cancelling the local await alone would not."""
        timeout_s = timeout_s or self.settings.request_timeout_s
        for attempt in (1, 2):
            response = method.remote(*args)
            try:
                return await asyncio.wait_for(response, timeout=timeout_s)
            except asyncio.TimeoutError as exc:
                response.cancel()
                raise Problem("timeout", f"no result within {timeout_s:g} s") from exc
            except asyncio.CancelledError:
                response.cancel()
                raise
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise Problem("overloaded", str(exc).splitlines()[0], headers=self._retry_after) from exc
            except RayActorError as exc:
                logger.warning("a model replica failed during a call (attempt %d): %s", attempt, type(exc).__name__)
                if attempt == 2:
                    raise Problem(
                        "replica-failed", f"a model replica failed twice: {type(exc).__name__}", headers=self._retry_after
                    ) from exc


def _cut(rgb: np.ndarray, mask: np.ndarray, plans, with_masks: bool = False) -> list:
    """Each plan's crop of `rgb` (with its mask crop when `with_masks`)."""
    crops = [imaging.crop_for_model(rgb, mask, plan) for plan in plans]
    return crops if with_masks else [image for image, _ in crops]


def _output_format(options: RemoveOptions, accept: str, source_format: str | None) -> str:
    if options.output_format:
        return options.output_format
    for fmt, media_type in imaging.MEDIA_TYPES.items():
        if media_type in accept:
            return fmt
    return source_format if source_format in imaging.OUTPUT_FORMATS else "png"
