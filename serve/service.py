"""What a removal or a score request does, independent of the protocol that carried it.

REST (serve/app.py's routes over serve/rest_api.py) and gRPC (serve/grpc_api.py) are thin adapters around
`RemovalService`: they
turn their wire format into a `RemovalRequest` / `ScoreRequest` and a `RemovalResult` / `ScoreResult`
back, and map a raised `Problem` to their own error form. The removal itself is engines.pipeline's
`RemovalPipeline`, its model calls sent to the Remover and Scorer deployments (`ServeModels`); what is
left here is the service's part: deadlines, the output format, retention and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from engines import imaging
from engines.errors import InputError
from engines.gate import (
    MAX_SAFE_SEED, NOTHING_TO_REMOVE, GatePolicy, OutcomeLabel, ReplyVerdict, ScorerUnavailable, max_crops,
)
from engines.jobs import RemovalJob, ScoreJob
from engines.pipeline import CropSettings, Models, Prepared, RemovalPipeline, Timings, outage_detail
from serve.admission import Place, work_units
from serve.config import GateSettings, IngressArgs
from serve.handles import answer_or_cancel, within
from serve.health import Readiness
from serve.metrics import IngressMetrics
from serve.negotiation import output_format
from serve.problems import Problem
from serve.protocol import RemovalRequest, RemoveOptions, ScoreOptions, ScoreRequest
from serve.retention.keeper import Retention
from serve.retention_deployment import HandleStoreClient
from serve.uploads import Offload
from serve.worker_threads import default_workers

logger = logging.getLogger("ray.serve")
MIN_ENCODE_RESERVE_S = 0.1  # the least a gate attempt after the first leaves of the deadline (encode_reserve_s)


@dataclass
class RemovalResult:
    """What a removal answers, before a protocol writes it: REST as the image and headers or as the JSON
    serve.openapi.RemoveReply, gRPC as rorem.proto's RemoveReply."""

    body: bytes
    format: str
    seed: int | None
    buckets: list[int]  # every crop's bucket, in the order of engines.regions' plans; []: the mask was empty
    batch_size: int | None  # None: no model ran (the mask was empty)
    score: float | None
    attempts: int
    gate: ReplyVerdict
    timings: Timings = field(default_factory=Timings)
    result_id: str | None = None  # set when the result was retained for feedback

    @property
    def bucket(self) -> int | None:
        """The largest crop's bucket; None: the mask was empty, the image comes back unchanged."""
        return max(self.buckets, default=None)

    @property
    def media_type(self) -> str:
        return imaging.MEDIA_TYPES[self.format]


@dataclass
class ScoreResult:
    """What a score answers: REST writes it as serve.openapi.ScoreReply, gRPC as rorem.proto's ScoreReply."""

    score: float
    threshold: float
    passed: bool
    bucket: int


def late(deadline_s: float) -> Problem:
    """The answer to work its deadline cut."""
    return Problem("timeout", f"no result within {deadline_s:g} s")


class ServeModels:
    """engines.pipeline's model calls, sent to the Remover and Scorer deployments over Serve handles.

    A replica that dies under a call (a crash, a killed pod) is retried once: Serve routes the retry to a
    live replica or waits for the replacement, within the timeout. Model calls are pure functions of their
    inputs (the seed included), so a retry is safe. A call nobody waits for any more (its timeout, the
    request's deadline, a client that left) is cancelled in Serve, so it leaves the model's queue:
    cancelling the local await alone would not."""

    def __init__(
        self,
        remover: DeploymentHandle,
        scorer: DeploymentHandle | None,
        settings: IngressArgs,
        retry_after: dict,
        score_timeout_s: float | None = None,
    ):
        """`score_timeout_s`: how long a scoring may take (default scorer.timeout_s, the gate's wait)."""
        self.remover = remover
        self.scorer = scorer
        self.settings = settings
        self.retry_after = retry_after
        self.score_timeout_s = score_timeout_s or settings.scorer.timeout_s

    async def remove(self, job: RemovalJob):
        return await self.call(self.remover.remove, job, time.time())

    async def score(self, job: ScoreJob) -> float:
        outcome = await self.call(self.scorer.score, job, timeout_s=self.score_timeout_s)
        return outcome.score

    async def call(self, method, *args, timeout_s: float | None = None):
        """`timeout_s` bounds the call, its retry included: the retry gets what is left, not a fresh timeout."""
        timeout_s = timeout_s or self.settings.request_timeout_s
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                return await answer_or_cancel(method.remote(*args), left)
            except asyncio.TimeoutError as exc:
                raise late(timeout_s) from exc
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise Problem("overloaded", str(exc).splitlines()[0], headers=self.retry_after) from exc
            except RayActorError as exc:
                logger.warning("a model replica failed during a call (attempt %d): %s", attempt, type(exc).__name__)
                if attempt == 2:
                    raise Problem(
                        "replica-failed", f"a model replica failed twice: {type(exc).__name__}", headers=self.retry_after
                    ) from exc


def is_transient(error: Exception) -> bool:
    """A model call lost to the deadline, a full queue or failed replicas (ServeModels.call's problems): a gate
    attempt after the first that fails so leaves the answer to the attempts before it."""
    return isinstance(error, Problem) and error.problem in ("timeout", "overloaded", "replica-failed")


class RemovalService:
    def __init__(
        self,
        settings: IngressArgs,
        remover: DeploymentHandle,
        scorer: DeploymentHandle | None,
        metrics: IngressMetrics,
        models: Models | None = None,
        result_store: DeploymentHandle | None = None,
    ):
        """`models`: the model calls; by default ServeModels over the two handles (tests pass fakes, no Ray).
        `result_store`: the ResultStore deployment (None: a store in this process, for tests)."""
        self.metrics = metrics
        store = HandleStoreClient(result_store) if result_store is not None else None
        self.retention = Retention(settings.retention, metrics, store)
        self.readiness = Readiness({"Remover": remover, "Scorer": scorer})
        self._retry_after = {"Retry-After": str(settings.overload.retry_after_s)}
        self.models = models or ServeModels(remover, scorer, settings, self._retry_after)
        self.has_scorer = scorer is not None
        cfg = settings.imaging
        limits = cfg.decode_limits()
        # Decode, paste and encode: as many jobs at once as requests are admitted, each slot held until its job
        # ends. A request whose client left is cancelled and frees its admission slot and key lease, but its
        # thread runs on: counted here, the next requests wait for it rather than add to it.
        overload = settings.overload
        self.cpu = Offload(default_workers(), overload.max_in_flight, overload.worker_nice, "rorem-cpu")
        self.encodes = EncodeCosts()
        self.pipeline = RemovalPipeline(self.models, CropSettings.from_imaging(cfg), limits, self.cpu.run)
        # POST /score is a request of its own: its scoring may take request_timeout_s, not the gate's scorer.timeout_s
        scoring = models or ServeModels(
            remover, scorer, settings, self._retry_after, score_timeout_s=settings.request_timeout_s
        )
        self.score_pipeline = RemovalPipeline(scoring, CropSettings.from_imaging(cfg), limits, self.cpu.run)
        self.settings = settings  # swapped whole by Ingress.reconfigure (the gate); ServeModels reads only static knobs

    async def ready(self) -> dict:
        """The deployments the service cannot answer without have a running replica, as Serve publishes it:
        once the models' descriptions are known (serve.health.Readiness), never asked through the model queues,
        so a saturated Remover stays ready. The Scorer is one of them only when the gate fails closed for its
        mode; otherwise its absence is "degraded" (results go out unscored, as gate.on_scorer_error promises): in
        Kubernetes readiness is every worker pod's, and a lost Scorer replica must not take every pod out of the
        Services."""
        missing = await self.readiness.missing()
        gate = self.settings.gate
        scorer_needed = gate.on_scorer_error == "fail_closed" and gate.mode in ("retry", "reject")
        blocking = [name for name in missing if name != "Scorer" or scorer_needed]
        if blocking:
            why = "; ".join(f"{name}: {missing[name]}" for name in blocking)
            raise Problem("not-ready", f"not ready yet: {why}", headers=self._retry_after)
        return {
            "status": "degraded" if missing else "ready",
            "missing": list(missing),
            "why": missing,
            "model": self.readiness.descriptions["Remover"],
            "scorer": self.readiness.descriptions.get("Scorer"),
            "gate": gate.model_dump(),
        }

    async def remove(
        self, upload: RemovalRequest, accept: str = "", owner: str | None = None, admitted: Place | None = None
    ) -> RemovalResult:
        """`owner`: whose the retained result is (serve.auth.result_owner of the caller's key). `admitted`: the
        request's admission place, told its work once the request is planned (it may refuse it then).

        The request's deadline (its timeout_s, at most request_timeout_s) counts from here: the wait for an
        image-work slot and the decode count against it, and model work and encode are cut at it. The decode
        is cut only where the machine delayed it (_decode: its own limits and decode_timeout_s of CPU bound
        it), so a bad upload is answered as such; a retained result's save comes after, within what is left of the
        deadline (at most retention.save_timeout_s), or the removal is answered without a result id."""
        loop = asyncio.get_running_loop()
        options = upload.options
        retain = self.retention.wanted(options.retain)
        deadline_s = request_deadline_s(options, self.settings)
        deadline = loop.time() + deadline_s
        timings = Timings()
        gate = self.settings.gate  # one request, one gate: a reconfigure during its awaits does not mix two
        policy = self._gate_policy(gate, options)
        prepared = await self._decode(
            timings, self.pipeline.prepare, upload.image, upload.mask, options.dilate,
            max_crops(gate.max_model_calls, scored=self.has_scorer), deadline=deadline, request_deadline_s=deadline_s,
        )  # fmt: skip
        timings.lap("decode")
        image = prepared.image
        fmt = output_format(options.output_format, accept, image.format, *image.rgb.shape[:2], image.alpha is not None)
        try:
            imaging.check_output(fmt, *prepared.image.rgb.shape[:2])  # before the model runs, not from the encoder
        except InputError as exc:
            raise Problem.from_input_error(exc) from exc
        if loop.time() >= deadline:  # spent in the decode: admission would refuse it as too much work (429)
            raise late(deadline_s)
        if admitted is not None and prepared.plans:
            admitted.planned(work_units(prepared.buckets, min(self.pipeline.crops.buckets)), deadline - loop.time())
        try:
            removal = self._remove(upload, prepared, fmt, gate, policy, timings, deadline)
            result = await within(removal, deadline - loop.time())
        except asyncio.TimeoutError as exc:
            raise late(deadline_s) from exc
        if retain and result.bucket is not None:
            result.result_id = await self.retention.keep(
                upload.image, prepared.image.format, prepared.mask, result, policy, upload.options, prepared.dilate,
                owner, deadline - loop.time(),
            )  # fmt: skip
        return result

    async def _remove(
        self, upload: RemovalRequest, prepared: Prepared, fmt: str, gate: GateSettings, policy: GatePolicy,
        timings: Timings, deadline: float,
    ) -> RemovalResult:  # fmt: skip
        """Model work, paste and encode of a decoded request. A gate attempt after the first gives way to the
        ones before it at the deadline less `encode_reserve_s`, so that the answer it leaves is encoded in time."""
        options, image = upload.options, prepared.image
        quality = options.quality or self.settings.imaging.jpeg_quality
        if not prepared.plans:
            body = upload.image
            if image.format != fmt:
                body = await self.cpu.run(
                    imaging.encode_image, image.rgb, image.alpha, fmt, quality, image.icc_profile, image.webp_lossless,
                    image.has_alpha,
                )
                timings.lap("encode")
            return RemovalResult(body, fmt, None, [], None, None, 0, NOTHING_TO_REMOVE, timings)

        seed = options.seed if options.seed is not None else random.randint(0, MAX_SAFE_SEED)
        policy = policy.within_calls(gate.max_model_calls, len(prepared.plans))
        encode = _encode_kind(fmt, image.webp_lossless)
        megapixels = image.rgb.shape[0] * image.rgb.shape[1] / 1e6
        expected_encode_s = self.encodes.expected_s(encode, megapixels)
        gate_deadline = deadline - encode_reserve_s(timings, expected_encode_s)
        try:
            gated = await self.pipeline(
                prepared, seed, policy, timings, deadline=gate_deadline, transient=is_transient
            )
        except ScorerUnavailable as exc:
            unscored: OutcomeLabel = "scorer-unavailable"
            self.metrics.gate_outcomes.inc(tags={"mode": policy.mode, "verdict": unscored})
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
                f"{gated.attempts} attempt(s) scored below {policy.threshold}; the best scored {gated.score!r}",
                score=gated.score,
                threshold=policy.threshold,
                attempts=gated.attempts,
                seed=gated.seed,
            )

        timings.restart()
        body = await self.cpu.run(
            self.encodes.timed, encode, megapixels,
            imaging.encode_image, gated.result.edited, image.alpha, fmt, quality, image.icc_profile, image.webp_lossless,
            image.has_alpha,
        )  # fmt: skip
        timings.lap("encode")
        return RemovalResult(
            body, fmt, gated.seed, prepared.buckets, gated.result.batch_size, gated.score, gated.attempts,
            gated.kept_verdict, timings,
        )  # fmt: skip

    async def score(self, upload: ScoreRequest, admitted: Place | None = None) -> ScoreResult:
        """`admitted`: the request's admission place (of /score's own Admission, where a request is one unit),
        told when its model work begins.

        The request's deadline (its timeout_s, at most request_timeout_s) counts from here, as a removal's does:
        the wait for an image-work thread, the decode and the scoring all count against it."""
        if not self.has_scorer:
            raise Problem("gate-unavailable", "this deployment runs without a Scorer")
        loop = asyncio.get_running_loop()
        deadline_s = request_deadline_s(upload.options, self.settings)
        deadline = loop.time() + deadline_s
        threshold = upload.options.gate_threshold
        if threshold is None or not self.settings.gate.allow_request_override:
            threshold = self.settings.gate.threshold
        jobs = await self._decode(
            None, self.score_pipeline.prepare_score, upload.source, upload.mask, upload.edited, upload.options.dilate,
            max_crops(self.settings.gate.max_model_calls, scored=self.has_scorer),  # as /remove cut them
            deadline=deadline, request_deadline_s=deadline_s,
        )  # fmt: skip
        if loop.time() >= deadline:
            raise late(deadline_s)
        if admitted is not None:
            admitted.planned(1.0, deadline - loop.time())
        try:
            score = await within(self.score_pipeline.worst_score(jobs), deadline - loop.time())
        except asyncio.TimeoutError as exc:
            raise late(deadline_s) from exc
        except Problem as exc:
            if exc.problem == "overloaded":
                raise
            raise Problem("scorer-unavailable", exc.detail, headers=self._retry_after) from exc
        except Exception as exc:  # the Scorer replica died or failed: a server-side outage, not the caller's fault
            raise Problem("scorer-unavailable", outage_detail(exc), headers=self._retry_after) from exc
        self.metrics.scores.observe(score, tags={"route": "/score"})
        bucket = max(job.source.shape[0] for job in jobs)
        return ScoreResult(score, threshold, score >= threshold, bucket)

    def _gate_policy(self, gate: GateSettings, options: RemoveOptions) -> GatePolicy:
        policy = GatePolicy.resolve(gate, options.gate, options.gate_threshold, options.max_attempts)
        if policy.mode != "off" and not self.has_scorer:
            if options.gate not in (None, "off"):
                raise Problem("gate-unavailable", f"gate {options.gate!r} needs a Scorer; this deployment has none")
            return GatePolicy("off", policy.threshold, 1, policy.fail_open)
        return policy

    async def _decode(self, timings: Timings | None, prepare, *uploads, deadline: float, request_deadline_s: float):
        """The decode limits bound its cost; decode_timeout_s is the backstop for a cost they miss, counted in
        the CPU time the decode's thread spends (wall time where the platform cannot tell): on a busy machine a
        valid photo that costs 3 s took over 20 s and was answered 413 image-too-large, which no client
        retries. The client gets its answer then, though the thread runs on to the end of its (bounded) work,
        holding its slot. A decode that has not spent its CPU time when the request's `deadline` (the loop's
        time; `request_deadline_s` after the request came) has passed, and at least decode_timeout_s since it
        started, is the machine's delay: 504 timeout. The wait for a slot or a thread is not the decode's
        (`timings` gets it as its own stage, cpu_wait) and is cut at `deadline`: a decode nobody waits for never
        runs."""
        deadline_s = self.settings.imaging.decode_timeout_s
        job = None
        try:
            async with asyncio.timeout_at(deadline):
                job = await self.cpu.start(prepare, *uploads)
                await job.started.wait()
        except (asyncio.CancelledError, TimeoutError) as exc:
            if job is not None:
                job.result.cancel()  # not started yet: off the queue, its slot free
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Problem("timeout", "the request's deadline passed before an image-work thread could start on it") from exc
        if timings is not None:
            timings.lap("cpu_wait")
        loop = asyncio.get_running_loop()
        started = loop.time()
        wall_limit = max(deadline, started + deadline_s)
        try:
            while not job.result.done():
                spent = job.cpu.seconds()
                left = deadline_s - (loop.time() - started if spent is None else spent)
                if left <= 0:
                    raise Problem(
                        "image-too-large", f"decoding the uploads took over {deadline_s:g} s (imaging.decode_timeout_s)"
                    )
                if loop.time() >= wall_limit:
                    raise late(request_deadline_s)
                await asyncio.wait({job.result}, timeout=min(left, wall_limit - loop.time()))
            return job.result.result()
        except InputError as exc:
            raise Problem.from_input_error(exc) from exc
        finally:
            # a decode given up on ends unread: its error is nobody's answer (asyncio logged each as never retrieved)
            job.result.cancel()


def encode_reserve_s(timings: Timings, expected_encode_s: float = 0.0) -> float:
    """The time kept for the encode: twice the request's image work before the model (its wait for a thread and its
    decode: an encode of PNG or JPEG costs less than the decode), or 1.5x what this replica's recent encodes of its
    format and size took (one of WebP can cost 10-40x its decode), at least MIN_ENCODE_RESERVE_S (the event loop's
    own delays under load)."""
    before_model = timings.stages.get("cpu_wait", 0.0) + timings.stages.get("decode", 0.0)
    return max(2 * before_model, 1.5 * expected_encode_s, MIN_ENCODE_RESERVE_S)


ENCODE_COST_DECAY = 0.9  # each encode lowers the remembered cost per megapixel by at most this factor
MIN_COSTED_MEGAPIXELS = 1.0  # a smaller encode counts as this big: its time is mostly a fixed cost, not per pixel


class EncodeCosts:
    """Seconds per megapixel of this replica's recent encodes, per output kind (format, and WebP lossless or
    not): the slowest recent one, forgotten by ENCODE_COST_DECAY an encode, so one slow outlier passes. An encode
    is timed in its own thread, from its start to its end (not the wait for a thread), and counted even when
    the request it was for has gone (cut at its deadline: the encodes most worth knowing about)."""

    def __init__(self):
        self._per_megapixel: dict[str, float] = {}
        self._lock = threading.Lock()

    def timed(self, kind: str, megapixels: float, encode: Callable[..., bytes], *args) -> bytes:
        started = time.perf_counter()
        try:
            return encode(*args)
        finally:
            self.observe(kind, megapixels, time.perf_counter() - started)

    def observe(self, kind: str, megapixels: float, seconds: float) -> None:
        with self._lock:
            remembered = ENCODE_COST_DECAY * self._per_megapixel.get(kind, 0.0)
            self._per_megapixel[kind] = max(seconds / max(megapixels, MIN_COSTED_MEGAPIXELS), remembered)

    def expected_s(self, kind: str, megapixels: float) -> float:
        return self._per_megapixel.get(kind, 0.0) * max(megapixels, MIN_COSTED_MEGAPIXELS)


def _encode_kind(fmt: str, webp_lossless: bool) -> str:
    """What engines.imaging.encode_image encodes alike: the format, and for WebP lossless or not."""
    fmt = fmt.lower()
    return f"{fmt}-lossless" if fmt == "webp" and webp_lossless else fmt


def request_deadline_s(options: RemoveOptions | ScoreOptions, settings: IngressArgs) -> float:
    """The deadline a removal or a score runs under: its timeout_s, at most request_timeout_s (the default)."""
    return min(options.timeout_s or settings.request_timeout_s, settings.request_timeout_s)
