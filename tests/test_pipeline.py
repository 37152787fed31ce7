"""engines.pipeline and the service's logic with fake model calls: no Ray, no model weights.

The fakes paint every masked crop pixel one colour and return scores from a script, so each test can say
exactly what the caller must get: which crops ran, together or not, what was pasted where, which attempt the
gate kept and which problem a caller sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import struct
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from ray.exceptions import ActorDiedError

from engines import imaging
from engines.gate import GatePolicy, ScorerUnavailable, attempt_seed
from engines.imaging import DecodeLimits, InvalidImage
from engines.jobs import RemovalJob, ScoreJob
from engines.pipeline import CropSettings, LocalOutcome, RemovalPipeline, all_or_none
from serve import rorem_pb2 as pb
from serve.admission import work_units
from serve.config import AppSettings
from serve.grpc_api import removal_request, score_request
from serve.metrics import STAGES
from serve.problems import Problem
from serve.protocol import RemovalRequest, RemoveOptions, ScoreOptions, ScoreRequest
from serve.service import RemovalService, ServeModels
from tests.helpers import decode_png, png_bytes

CROPS = CropSettings(buckets=(128, 256), crop_margin=16, dilate=4, feather=2)
PAINT = 7


class FakeModels:
    """Paints masked crop pixels PAINT; scores from `scores` (one per call, in call order), or raises."""

    def __init__(self, scores=(), score_error: Exception | None = None):
        self.scores = list(scores)
        self.score_error = score_error
        self.removals: list[RemovalJob] = []
        self.in_flight = self.most_in_flight = 0

    async def remove(self, job: RemovalJob) -> LocalOutcome:
        """batch_size: the calls in flight when this one started (the first of two together sees 1, the second 2)."""
        self.removals.append(job)
        self.in_flight += 1
        seen = self.in_flight
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        image = job.image.copy()
        image[job.mask] = PAINT
        return LocalOutcome(image, batch_size=seen)

    async def score(self, job: ScoreJob) -> float:
        if self.score_error is not None:
            raise self.score_error
        return self.scores.pop(0)


def _photo_and_two_objects(height: int = 600, width: int = 900):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    mask[20:60, 30:70] = True  # top left
    mask[height - 70 : height - 30, width - 80 : width - 40] = True  # bottom right
    return photo, mask


def test_far_apart_objects_run_as_separate_small_crops_together_and_nothing_outside_the_mask_changes():
    photo, mask = _photo_and_two_objects()
    models = FakeModels()
    pipeline = RemovalPipeline(models, CROPS, DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255))
    assert prepared.buckets == [128, 128]

    gated = asyncio.run(pipeline(prepared, seed=5, policy=GatePolicy("off", 0.5, 1, True)))

    assert [job.image.shape[:2] for job in models.removals] == [(128, 128), (128, 128)]
    assert models.most_in_flight == 2, "a request's crops are sent together, to share the engine's batch"
    assert {job.seed for job in models.removals} == {5}
    edited = gated.result.edited
    np.testing.assert_array_equal(edited[~prepared.mask], photo[~prepared.mask])
    assert (edited[mask] == PAINT).all()
    assert gated.verdict == "off" and gated.result.batch_size == 2


def test_the_gate_keeps_the_first_attempt_whose_worst_region_passes():
    photo, mask = _photo_and_two_objects()
    models = FakeModels(scores=[0.9, 0.2, 0.6, 0.7])  # attempt 1: one region fails; attempt 2: both pass
    pipeline = RemovalPipeline(models, CROPS, DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255))

    gated = asyncio.run(pipeline(prepared, seed=11, policy=GatePolicy("retry", 0.5, 3, True)))

    assert (gated.verdict, gated.attempts, gated.score) == ("passed", 2, 0.6)
    assert gated.seed == attempt_seed(11, 1)
    assert [job.seed for job in models.removals] == [11, 11, attempt_seed(11, 1), attempt_seed(11, 1)]


def test_a_failing_scorer_is_the_gates_concern_fail_open_keeps_the_result_unscored():
    photo, mask = _photo_and_two_objects()
    pipeline = RemovalPipeline(FakeModels(score_error=RuntimeError("scorer down")), CROPS, DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255))

    gated = asyncio.run(pipeline(prepared, seed=1, policy=GatePolicy("retry", 0.5, 3, True)))
    assert (gated.verdict, gated.score, gated.attempts) == ("unscored", None, 1)
    with pytest.raises(ScorerUnavailable, match="^RuntimeError$"):
        asyncio.run(pipeline(prepared, seed=1, policy=GatePolicy("reject", 0.5, 3, False)))


def test_a_non_finite_score_is_a_scorer_failure_not_a_score_that_passes():
    """A discriminator overflow (NaN) passed the gate, and POST /score: min(0.9, nan) is 0.9."""
    photo, mask = _photo_and_two_objects()
    mask_png = png_bytes(mask.astype(np.uint8) * 255)
    pipeline = RemovalPipeline(FakeModels(scores=[0.9, math.nan]), CROPS, DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), mask_png)

    gated = asyncio.run(pipeline(prepared, seed=1, policy=GatePolicy("retry", 0.5, 3, True)))
    assert (gated.verdict, gated.score, gated.attempts) == ("unscored", None, 1)
    pipeline.models.scores = [math.nan, 0.9]
    with pytest.raises(ScorerUnavailable, match="non-finite"):
        asyncio.run(pipeline(prepared, seed=1, policy=GatePolicy("reject", 0.5, 3, False)))
    score_request = ScoreRequest(png_bytes(photo), mask_png, png_bytes(photo), ScoreOptions())
    with pytest.raises(Problem) as caught:
        asyncio.run(_service(FakeModels(scores=[0.9, math.inf])).score(score_request))
    assert caught.value.problem == "scorer-unavailable"


class _FirstCropFails:
    """Crop i carries i in its pixels: crop 0's call fails after 10 ms, the others would take 10 s."""

    def __init__(self, error: Exception):
        self.error = error
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.finished: list[int] = []

    async def _call(self, crop: np.ndarray):
        index = int(crop[0, 0, 0])
        self.started.append(index)
        if index == 0:
            await asyncio.sleep(0.01)
            raise self.error
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        self.finished.append(index)

    async def remove(self, job: RemovalJob) -> LocalOutcome:
        await self._call(job.image)
        return LocalOutcome(job.image)

    async def score(self, job: ScoreJob) -> float:
        await self._call(job.source)
        return 1.0


@pytest.mark.parametrize(
    "step, error",
    [("remove", Problem("overloaded", "Remover queue full")), ("score", ScorerUnavailable("Scorer down"))],
)
def test_one_crops_failure_cancels_its_sibling_crops_calls_before_the_error_comes_back(step, error):
    models = _FirstCropFails(error)
    pipeline = RemovalPipeline(models, CROPS, DecodeLimits())
    crops = [(np.full((64, 64, 3), i, np.uint8), np.ones((64, 64), bool)) for i in range(4)]

    async def run_step():
        if step == "remove":
            prepared = SimpleNamespace(crops=crops, fills=[mask for _, mask in crops])
            await pipeline.attempt(prepared, seed=1)
        else:
            await pipeline.worst_score([ScoreJob(image, mask, image) for image, mask in crops])

    async def request_then_watch():
        with pytest.raises(type(error)) as caught:
            await run_step()
        answered = sorted(models.cancelled)
        await asyncio.sleep(0.05)
        return caught.value, answered

    raised, cancelled_when_answered = asyncio.run(request_then_watch())
    assert raised is error
    assert sorted(models.started) == [0, 1, 2, 3]
    assert cancelled_when_answered == [1, 2, 3] and models.finished == []


def test_crop_results_come_back_in_crop_order_whichever_finishes_first():
    async def after(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        return value

    assert asyncio.run(all_or_none(after(0.04 - 0.01 * i, i) for i in range(4))) == [0, 1, 2, 3]


def test_score_request_crops_are_the_removals_crops():
    photo, mask = _photo_and_two_objects()
    pipeline = RemovalPipeline(FakeModels(), CROPS, DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255))
    edited = photo.copy()
    edited[prepared.mask] = PAINT

    jobs = pipeline.prepare_score(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255), png_bytes(edited))

    assert len(jobs) == len(prepared.crops) == 2
    for job, (crop, crop_mask) in zip(jobs, prepared.crops):
        np.testing.assert_array_equal(job.source, crop)
        np.testing.assert_array_equal(job.mask, crop_mask)
        assert (job.edited[job.mask] == PAINT).all()


# ---------------------------------------------------------------- the service's logic, without Ray


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, *args, **kwargs):
        self.calls.append((args, kwargs))

    observe = inc


def _service(models: FakeModels, **gate) -> RemovalService:
    settings = AppSettings.model_validate(
        {"imaging": {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate},
         "gate": {"mode": "retry", "threshold": 0.5, **gate}}
    )  # fmt: skip
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    return RemovalService(settings, remover=None, scorer=object(), metrics=metrics, models=models)


def _upload(**options) -> RemovalRequest:
    photo, mask = _photo_and_two_objects()
    return RemovalRequest(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255), RemoveOptions(**options))


def test_service_reply_lists_every_crop_and_the_kept_attempts_seed():
    service = _service(FakeModels(scores=[0.3, 0.3, 0.8, 0.9]))
    reply = asyncio.run(service.remove(_upload(seed=3, output_format="png")))
    assert (reply.buckets, reply.bucket, reply.attempts, reply.gate) == ([128, 128], 128, 2, "passed")
    assert reply.seed == attempt_seed(3, 1) and reply.score == 0.8
    out = np.asarray(Image.open(io.BytesIO(reply.body)))
    photo, _ = _photo_and_two_objects()
    assert out.shape == photo.shape
    assert set(reply.timings.stages) >= {"decode", "paste", "score", "encode"}
    assert list(reply.timings.stages) == sorted(reply.timings.stages, key=STAGES.index), "Server-Timing's order"


@pytest.mark.timing
def test_server_timing_tells_the_wait_for_an_image_thread_from_the_decode_and_its_total_counts_the_read():
    """`decode` held the wait for a busy image-work thread too, and the total left out the upload's read."""
    import time

    from serve.uploads import Offload

    service = _service(FakeModels(), mode="off")
    service.cpu = Offload(1, 8, 0, "test-cpu")  # one image-work thread, busy for 0.5 s when the request comes

    upload = _upload(seed=1, output_format="png")

    async def removal_behind_busy_thread():
        busy = asyncio.ensure_future(service.cpu.run(time.sleep, 0.5))
        await asyncio.sleep(0.05)
        reply = await service.remove(upload)
        await busy
        return reply

    reply = asyncio.run(removal_behind_busy_thread())
    assert reply.timings.stages["cpu_wait"] >= 0.3 and reply.timings.stages["decode"] < 0.3, reply.timings.stages
    reply.timings.took_before("read", 2.0)
    items = [item.split(";dur=") for item in reply.timings.server_timing().split(", ")]
    assert [name for name, _ in items][:2] == ["read", "cpu_wait"] and items[-1][0] == "total"
    assert float(items[-1][1]) >= 2000 + 300, "the total counts the read and the wait"


def test_the_seeds_the_service_chooses_are_json_safe_integers():
    """A random seed and a retry's derived seed reach JSON clients exactly (JavaScript: at most 2**53 - 1)."""
    unseeded = [asyncio.run(_service(FakeModels()).remove(_upload(gate="off"))).seed for _ in range(3)]
    retried = asyncio.run(_service(FakeModels(scores=[0.1, 0.1, 0.9, 0.9])).remove(_upload(seed=2**63 - 1)))
    assert retried.attempts == 2 and retried.seed == attempt_seed(2**63 - 1, 1)
    assert all(0 <= seed < 2**53 for seed in [*unseeded, retried.seed]), [*unseeded, retried.seed]


def test_a_grpc_message_without_an_image_is_refused_as_rest_refuses_an_empty_image():
    """proto3 cannot tell an empty bytes field from an absent one: gRPC answers what REST answers for an empty
    image part, invalid-image."""
    mask = png_bytes(_photo_and_two_objects()[1].astype(np.uint8) * 255)
    for upload in (RemovalRequest(b"", mask, RemoveOptions()), removal_request(pb.RemoveRequest(mask=mask), 1 << 30)):
        with pytest.raises(Problem) as caught:
            asyncio.run(_service(FakeModels()).remove(upload))
        assert (caught.value.problem, caught.value.detail) == ("invalid-image", "the image is empty")


@pytest.mark.parametrize(
    "missing, expected",
    [("source", ("invalid-image", "the source image is empty")), ("mask", ("invalid-mask", "the mask is empty")),
     ("edited", ("invalid-image", "the edited image is empty"))],
)  # fmt: skip
def test_a_grpc_score_without_a_part_is_refused_as_rest_refuses_that_empty_part(missing, expected):
    photo, mask = _photo_and_two_objects()
    parts = {"source": png_bytes(photo), "mask": png_bytes(mask.astype(np.uint8) * 255), "edited": png_bytes(photo)}
    rest = ScoreRequest(**{**parts, missing: b""}, options=ScoreOptions())
    grpc_message = pb.ScoreRequest(**{name: value for name, value in parts.items() if name != missing})
    for upload in (rest, score_request(grpc_message, 1 << 30)):
        with pytest.raises(Problem) as caught:
            asyncio.run(_service(FakeModels()).score(upload))
        assert (caught.value.problem, caught.value.detail) == expected


def test_service_reject_gate_answers_removal_failed_with_the_best_attempt():
    service = _service(FakeModels(scores=[0.1, 0.4, 0.2, 0.3]))
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(seed=3, gate="reject", max_attempts=2)))
    problem = caught.value
    assert problem.problem == "removal-failed"
    assert problem.extra["attempts"] == 2 and problem.extra["score"] == 0.2


def test_a_rejected_removals_detail_never_shows_the_threshold_it_missed():
    """The detail rounded to 3 places: "scored below 0.5; the best scored 0.500" for 0.49996."""
    service = _service(FakeModels(scores=[0.49996] * 4))
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(seed=3, gate="reject", max_attempts=1)))
    assert caught.value.detail.endswith("below 0.5; the best scored 0.49996")


class _TimedRemovals(FakeModels):
    """FakeModels whose removal calls go by a script, one step a call: seconds it takes, or the problem it raises."""

    def __init__(self, steps, scores=()):
        super().__init__(scores)
        self.steps = list(steps)
        self.started = 0

    async def remove(self, job: RemovalJob) -> LocalOutcome:
        self.started += 1
        step = self.steps.pop(0)
        if isinstance(step, Problem):
            raise step
        await asyncio.sleep(step)
        return await super().remove(job)


def _one_object(**options) -> RemovalRequest:
    """One crop an attempt, so three attempts fit gate.max_model_calls (8); a small photo, so that the time the
    service keeps for its encode (twice its decode, at least 0.1 s) stays near 0.1 s on a busy machine."""
    photo, mask = (array[:256, :256] for array in _photo_and_objects(1))
    return RemovalRequest(png_bytes(photo), png_bytes(mask), RemoveOptions(seed=5, output_format="png", **options))


def _timed_removal(models: FakeModels, upload: RemovalRequest):
    """The reply or the problem, and the seconds the service took to answer."""
    service = _service(models)

    async def main():
        started = time.perf_counter()
        try:
            answer = await service.remove(upload)
        except Problem as problem:
            answer = problem
        return answer, time.perf_counter() - started

    return asyncio.run(main())


_FULL_QUEUE = Problem("overloaded", "Remover queue full", headers={"Retry-After": "2"})


@pytest.mark.parametrize("gate", ["retry", "reject"])
@pytest.mark.parametrize(
    "steps, kept",
    [
        ([0.1, 0.1, 10.0], 2),  # the deadline cuts the third attempt
        ([0.1, _FULL_QUEUE], 1),  # the second attempt finds the Remover's queue full
    ],
    ids=["deadline", "overloaded"],
)
@pytest.mark.timing
def test_a_later_attempt_lost_to_the_deadline_or_a_full_queue_leaves_the_answer_to_the_attempts_before_it(
    gate, steps, kept
):
    """A retry client spent two or three removals' GPU time on a 504 or 503: the scored attempts were thrown away.
    The answer is now theirs, as if attempts had run out: retry keeps the best (X-Gate failed), reject refuses
    it (removal-failed), within the deadline."""
    models = _TimedRemovals(steps, scores=[0.3, 0.4, 0.2])
    answer, took = _timed_removal(models, _one_object(gate=gate, max_attempts=3, timeout_s=2))
    assert (models.started, took < 2) == (kept + 1, True), (took, answer)
    best = {"attempts": kept, "score": [0.3, 0.4][kept - 1], "seed": attempt_seed(5, kept - 1)}
    if gate == "retry":
        assert not isinstance(answer, Problem), answer.detail
        assert (answer.gate, answer.attempts, answer.score, answer.seed) == ("failed", *best.values())
        assert decode_png(answer.body).shape == (256, 256, 3)
    else:
        assert isinstance(answer, Problem) and answer.problem == "removal-failed", answer
        assert {key: answer.extra[key] for key in best} == best


@pytest.mark.timing
def test_retry_starts_no_attempt_that_cannot_end_before_the_deadline():
    """Two attempts of 1 s leave under 0.6 s of a 2.6 s deadline: a third would be cut (its GPU time spent for
    nothing), so it never starts and the best of two comes back at once."""
    models = _TimedRemovals([1.0, 1.0, 1.0], scores=[0.3, 0.4, 0.2])
    answer, took = _timed_removal(models, _one_object(gate="retry", max_attempts=3, timeout_s=2.6))
    assert not isinstance(answer, Problem), answer.detail
    assert (answer.gate, answer.attempts, answer.score) == ("failed", 2, 0.4)
    assert models.started == 2 and took < 2.5, took


@pytest.mark.timing
@pytest.mark.parametrize("step, problem", [(10.0, "timeout"), (_FULL_QUEUE, "overloaded")])
def test_a_first_attempt_lost_to_the_deadline_or_a_full_queue_is_still_a_504_or_503(step, problem):
    models = _TimedRemovals([step], scores=[0.9])
    answer, took = _timed_removal(models, _one_object(gate="retry", max_attempts=3, timeout_s=0.5))
    assert isinstance(answer, Problem) and answer.problem == problem and took < 1.0, (answer, took)


def test_service_fail_closed_scorer_outage_is_a_503_problem_not_a_500(caplog):
    """The client learns the failure's type; its text (a replica's traceback, pid and address) stays in the log."""
    internals = "Traceback ...\n  File \"/srv/engines/scorer.py\" (pid=4242, ip=10.1.2.3): CUDA out of memory"
    service = _service(FakeModels(score_error=RuntimeError(internals)), on_scorer_error="fail_closed")
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(gate="reject")))
    assert caught.value.problem == "scorer-unavailable" and "RuntimeError" in caught.value.detail
    assert "10.1.2.3" not in caught.value.detail and "Traceback" not in caught.value.detail
    assert "10.1.2.3" in caplog.text
    photo, mask = _photo_and_two_objects()
    score_request = ScoreRequest(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255), png_bytes(photo), ScoreOptions())
    with pytest.raises(Problem) as caught:
        asyncio.run(_service(FakeModels(score_error=RuntimeError(internals))).score(score_request))
    assert caught.value.detail == "RuntimeError", "POST /score: the type alone too"


def test_without_a_scorer_a_gate_asked_for_is_refused_per_request_and_the_default_runs_ungated():
    """A deployment without a Scorer (scorer.enabled false): a request that asks for a gate gets 422
    gate-unavailable before any model work; one that asks for none is removed, unscored."""
    settings = AppSettings.model_validate(
        {"imaging": {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate},
         "gate": {"mode": "annotate"}}
    )  # fmt: skip
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    models = FakeModels()
    service = RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=models)
    for gate in ("retry", "reject", "annotate"):
        with pytest.raises(Problem) as caught:
            asyncio.run(service.remove(_upload(gate=gate)))
        assert (caught.value.problem, caught.value.status) == ("gate-unavailable", 422)
    photo, mask = _photo_and_two_objects()
    score_request = ScoreRequest(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255), png_bytes(photo), ScoreOptions())
    with pytest.raises(Problem) as caught:
        asyncio.run(service.score(score_request))
    assert (caught.value.problem, caught.value.status) == ("gate-unavailable", 422)
    assert models.removals == [], "refused before any model call"
    reply = asyncio.run(service.remove(_upload()))
    assert (reply.gate, reply.score) == ("off", None) and models.removals


def test_service_empty_mask_returns_the_upload_untouched_without_a_model_call():
    models = FakeModels()
    service = _service(models)
    photo, _ = _photo_and_two_objects()
    upload = RemovalRequest(png_bytes(photo), png_bytes(np.zeros(photo.shape[:2], np.uint8)), RemoveOptions())
    reply = asyncio.run(service.remove(upload))
    assert (reply.body, reply.buckets, reply.bucket, reply.gate) == (upload.image, [], None, "nothing-to-remove")
    assert models.removals == []
    from serve.rest_api import remove_reply_json

    said = remove_reply_json(reply)  # docs/api.md: no X-Seed, X-Batch-Size, X-Removal-Score; JSON null
    assert (said["seed"], said["batch_size"], said["score"]) == (None, None, None), "batch_size was 0: no model ran"


def test_without_a_mask_a_fully_opaque_alpha_channel_is_nothing_to_remove():
    """An RGBA image with nothing erased was refused as having no alpha channel (its opaque alpha plane is dropped
    at decoding), while one pixel at alpha 200 made it nothing-to-remove (a review)."""
    models = FakeModels()
    photo, _ = _photo_and_two_objects()
    for alpha in (255, 200):
        rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
        rgba[0, 0, 3] = alpha
        upload = RemovalRequest(png_bytes(rgba), None, RemoveOptions())
        reply = asyncio.run(_service(models).remove(upload))
        assert (reply.body, reply.buckets, reply.gate) == (upload.image, [], "nothing-to-remove"), alpha
    assert models.removals == []
    with pytest.raises(Problem) as caught:
        asyncio.run(_service(models).remove(RemovalRequest(png_bytes(photo), None, RemoveOptions())))
    assert caught.value.problem == "invalid-mask" and "no alpha channel" in caught.value.detail



def test_a_removal_tells_its_admission_place_its_work_once_planned_and_a_refusal_then_costs_no_model_call():
    class Place:
        def planned(self, units, deadline_s):
            self.planned_with = (units, deadline_s)
            raise Problem("too-many-requests", "the work ahead no longer fits")

    models, place = FakeModels(), Place()
    with pytest.raises(Problem) as refused:
        asyncio.run(_service(models).remove(_upload(timeout_s=7), admitted=place))
    assert refused.value.problem == "too-many-requests" and models.removals == []
    units, deadline_s = place.planned_with
    assert units == work_units([128, 128], 128) == 2 and 0 < deadline_s <= 7


def test_service_gives_the_photos_colour_profile_back_with_the_result():
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo, mask = _photo_and_two_objects()
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95, icc_profile=profile)
    empty = png_bytes(np.zeros(photo.shape[:2], np.uint8))
    for mask_bytes, output in ((png_bytes(mask.astype(np.uint8) * 255), "jpeg"), (empty, "png")):
        upload = RemovalRequest(buffer.getvalue(), mask_bytes, RemoveOptions(output_format=output))
        reply = asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(upload))
        with Image.open(io.BytesIO(reply.body)) as result:
            assert (result.format.lower(), result.info.get("icc_profile")) == (output, profile)

def test_a_cancelled_request_holds_its_image_work_slot_until_its_thread_ends():
    """A client that leaves mid-decode is cancelled: its admission slot and key lease are free again, but its
    decode thread runs on. The next requests wait for it rather than add to it (before, a hang-up loop ran four
    12 MP decodes at once for a key limited to one request: 6.3 GB)."""
    settings = AppSettings.model_validate(
        {"imaging": {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate},
         "overload": {"max_in_flight": 2}}
    )  # fmt: skip
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    service = RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=FakeModels())
    release, started = threading.Event(), []
    prepare = service.pipeline.prepare

    def slow_prepare(*args):
        started.append(args)
        release.wait(10)
        return prepare(*args)

    service.pipeline.prepare = slow_prepare

    async def main():
        for _ in range(2):  # two clients that hang up while their uploads decode
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(service.remove(_upload(output_format="png")), 0.2)
        third = asyncio.create_task(service.remove(_upload(output_format="png")))
        await asyncio.sleep(0.3)
        decoding = len(started)
        release.set()
        return decoding, await third

    decoding, reply = asyncio.run(main())
    assert decoding == 2, "the third decode waited for a slot of the two abandoned ones"
    assert len(started) == 3 and reply.gate == "off" and reply.buckets == [128, 128]



@pytest.mark.timing
@pytest.mark.parametrize("slow_step", ["decode", "encode", "model"])
@pytest.mark.parametrize("deadline", ["timeout_s", "request_timeout_s"])
def test_the_request_deadline_counts_from_the_upload_and_cuts_model_work_and_encode(monkeypatch, slow_step, deadline):
    """A client that asked for an answer within timeout_s (or the service's request_timeout_s) gets its 504 then
    when model work or encode is slow. A slow decode is not cut (its own limits bound it, and a bad upload must be
    told as such) but counts: past the deadline, no model work starts."""
    overrides = {"request_timeout_s": 0.3} if deadline == "request_timeout_s" else {}
    settings = AppSettings.model_validate({"imaging": {"buckets": list(CROPS.buckets)}, **overrides})
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    models = FakeModels()
    service = RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=models)
    slow = threading.Event()
    if slow_step == "decode":
        prepare = service.pipeline.prepare
        service.pipeline.prepare = lambda *args: slow.wait(0.6) or prepare(*args)
    elif slow_step == "encode":
        encode = imaging.encode_image
        monkeypatch.setattr(imaging, "encode_image", lambda *args: slow.wait(1.5) or encode(*args))
    else:
        remove = models.remove

        async def slow_remove(job):
            await asyncio.sleep(1.5)
            return await remove(job)

        models.remove = slow_remove
    upload = _upload(output_format="png", **({"timeout_s": 0.3} if deadline == "timeout_s" else {}))

    async def main():
        started = asyncio.get_running_loop().time()
        with pytest.raises(Problem) as caught:
            await service.remove(upload)
        return caught.value, asyncio.get_running_loop().time() - started

    try:
        problem, took = asyncio.run(main())
    finally:
        slow.set()
    assert problem.problem == "timeout" and "0.3 s" in problem.detail
    if slow_step == "decode":
        # the bound leaves a busy runner 0.8 s for the small decode itself and the answer (1.06 s seen beside xdist)
        assert 0.6 <= took < 1.4 and models.removals == [], "answered once the decode ended, without model work"
    else:
        assert took < 1.0


@pytest.mark.parametrize("ends", ["caller cancelled", "deadline"])
def test_a_call_given_up_on_leaves_no_never_retrieved_error_in_the_log(ends):
    """A Serve call whose caller left ends in RequestCancelledError, not CancelledError: each client timeout put
    "Task exception was never retrieved" and a traceback in the service's log."""
    import gc

    from serve.handles import answer_or_cancel

    class Response:  # a Serve handle call's response: cancelled, its awaiting raises an error of its own
        def __init__(self):
            self.cancelled = asyncio.Event()

        def cancel(self):
            self.cancelled.set()

        def __await__(self):
            return self._answer().__await__()

        async def _answer(self):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise RuntimeError("RequestCancelledError") from None

    reported = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context["message"]))
        response = Response()
        waiting = asyncio.ensure_future(answer_or_cancel(response, 0.05 if ends == "deadline" else 10))
        await asyncio.sleep(0.01)
        if ends == "caller cancelled":
            waiting.cancel()
        with pytest.raises((asyncio.CancelledError, asyncio.TimeoutError)):
            await waiting
        await asyncio.sleep(0.01)
        gc.collect()
        assert response.cancelled.is_set()

    asyncio.run(main())
    gc.collect()
    assert reported == []


def test_a_deadline_that_cuts_work_as_it_ends_is_never_lost():
    """asyncio.wait_for (Python < 3.12) hands back the inner result when it is done as the caller is cancelled:
    the cancellation is lost, and a request cut at its deadline ran on through the model and answered 200 late
    (tests/test_cancellation.py caught it). serve.handles.within lets the cancellation through."""
    from serve.handles import within

    async def main(wait):
        work = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(wait(work, 10))
        await asyncio.sleep(0)
        work.set_result("the next step would start now")
        waiting.cancel()  # in the same turn of the loop: the request's own deadline
        try:
            return await waiting
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main(within)) == "cancelled"
    if sys.version_info < (3, 12):
        assert asyncio.run(main(asyncio.wait_for)) != "cancelled", "the stdlib's behaviour this guards against"

@pytest.mark.timing
@pytest.mark.parametrize("waits_for, threads, slots", [("a thread", 1, 8), ("a slot", 4, 1)])
def test_a_request_whose_deadline_passes_while_it_waits_for_image_work_gets_its_504_then_and_no_decode(
    waits_for, threads, slots
):
    """The wait for a busy thread, or for a slot (max_in_flight image jobs), was not cut: the 504 came once it was
    free and the decode had run."""
    from serve.uploads import Offload

    service = _service(FakeModels(), mode="off")
    service.cpu = Offload(threads, slots, 0, "test-cpu")  # the one thread or slot is busy for 1.5 s when it comes
    decodes, prepare = [], service.pipeline.prepare
    service.pipeline.prepare = lambda *args: decodes.append(args) or prepare(*args)

    async def main():
        busy = asyncio.ensure_future(service.cpu.run(time.sleep, 1.5))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(Problem) as caught:
            await service.remove(_upload(output_format="png", timeout_s=0.3))
        took = time.perf_counter() - started
        await busy
        await asyncio.sleep(0.1)
        return caught.value, took

    problem, took = asyncio.run(main())
    assert problem.problem == "timeout" and took < 1.2, (problem.problem, took)
    assert decodes == [], "the decode nobody waits for any more never ran"


def test_a_deadline_too_short_to_start_is_told_as_such_not_as_busy_threads():
    """timeout_s=1e-9 with every image thread free was answered "no image-work slot or thread was free"."""
    service = _service(FakeModels(), mode="off")
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(output_format="png", timeout_s=1e-9)))
    assert caught.value.problem == "timeout"
    assert caught.value.detail == "the request's deadline passed before an image-work thread could start on it"
    for value in ("nan", "inf"):
        with pytest.raises(ValidationError, match="finite number"):
            RemoveOptions(timeout_s=value)


def test_a_deadline_spent_in_the_decode_is_a_timeout_not_a_refusal_for_the_replicas_load():
    """Admission was told the work with a negative time left and answered 429 too-many-requests, Retry-After."""

    class Place:
        def planned(self, units, deadline_s):
            raise Problem("too-many-requests", f"the work ahead does not fit in {deadline_s:.1f} s")

    service = _service(FakeModels(), mode="off")
    prepare = service.pipeline.prepare
    service.pipeline.prepare = lambda *args: threading.Event().wait(0.6) or prepare(*args)
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(output_format="png", timeout_s=0.3), admitted=Place()))
    assert (caught.value.problem, caught.value.detail) == ("timeout", "no result within 0.3 s")


def test_the_decode_deadline_counts_the_decode_not_the_wait_for_a_thread():
    """Slots (max_in_flight) outnumber the threads: a decode queued behind another must not spend its deadline
    waiting, or a busy replica answers a valid upload 413 image-too-large. The first two decodes take 0.5 s each,
    0.3 s within their own deadline (0.8 s) on a busy machine; the third waits 1 s for the thread."""
    settings = AppSettings.model_validate(
        {"imaging": {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate,
                     "decode_timeout_s": 0.8}}
    )  # fmt: skip
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    service = RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=FakeModels())
    service.cpu.workers = 1
    prepare = service.pipeline.prepare
    slow = [0.5, 0.5]

    def first_slow_then_fast(*args):
        if slow:
            threading.Event().wait(slow.pop())
        return prepare(*args)

    service.pipeline.prepare = first_slow_then_fast

    async def main():
        return await asyncio.gather(*(service.remove(_upload(output_format="png")) for _ in range(3)))

    replies = asyncio.run(main())
    assert [reply.buckets for reply in replies] == [[128, 128]] * 3, "each waited for the thread, then decoded"


def _decode_timeout_service(decode_timeout_s: float) -> RemovalService:
    settings = AppSettings.model_validate(
        {"imaging": {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate,
                     "decode_timeout_s": decode_timeout_s}}
    )  # fmt: skip
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    return RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=FakeModels())


@pytest.mark.timing
@pytest.mark.skipif(not hasattr(time, "pthread_getcpuclockid"), reason="needs a per-thread CPU clock")
def test_a_decode_slowed_by_a_busy_machine_is_not_answered_image_too_large():
    """imaging.decode_timeout_s counted wall time: six 40 MP 16-bit PNGs at once on 2 cores (each 3.3 s of CPU)
    were answered 413 image-too-large at 20 s, which no client retries. It counts the decode thread's CPU time:
    a decode that waits (here: sleeps, as a thread starved of a core does) passes its wall time and succeeds; one
    that spends its CPU time is refused, as before; one the machine delays past the request's deadline is 504."""
    service = _decode_timeout_service(0.3)
    prepare = service.pipeline.prepare

    def starved(*args):
        threading.Event().wait(0.8)
        return prepare(*args)

    service.pipeline.prepare = starved
    assert asyncio.run(service.remove(_upload(output_format="png"))).buckets == [128, 128]

    spent = threading.Event()

    def costly(*args):
        began = time.thread_time()
        while time.thread_time() - began < 2.0:
            pass
        spent.set()
        return prepare(*args)

    service.pipeline.prepare = costly
    started = time.perf_counter()
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(output_format="png")))
    assert caught.value.problem == "image-too-large" and time.perf_counter() - started < 1.9, caught.value.detail
    assert spent.wait(30), "the refused decode's thread runs on to the end of its work"  # before the next request

    service.pipeline.prepare = lambda *args: threading.Event().wait(2.0) or prepare(*args)
    with pytest.raises(Problem) as caught:
        asyncio.run(service.remove(_upload(output_format="png", timeout_s=0.5)))
    assert (caught.value.problem, caught.value.detail) == ("timeout", "no result within 0.5 s")


def test_a_decode_given_up_on_leaves_no_error_in_the_log_when_it_fails_later(caplog):
    """The decode thread runs on after its 413; when it then failed (an upload past a decode limit), asyncio logged
    "Future exception was never retrieved" with a traceback: one per costly upload, for anyone who sends them."""
    import gc

    service = _decode_timeout_service(0.2)

    def costly_then_refused(*args):
        began = time.thread_time()
        while time.thread_time() - began < 0.6:
            pass
        raise InvalidImage("past a decode limit")

    service.pipeline.prepare = costly_then_refused

    async def main():
        try:
            await service.remove(_upload(output_format="png"))
        except Problem as refused:  # not kept: its traceback holds the decode's future
            answer = refused.problem
        await asyncio.sleep(1.0)  # the replica's loop lives on while the thread ends with its error
        gc.collect()
        await asyncio.sleep(0.1)
        return answer

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert asyncio.run(main()) == "image-too-large"
    assert not [record for record in caplog.records if record.name == "asyncio"], caplog.text


def _photo_and_objects(count: int):
    """`count` 30 px objects, 200 px apart on a grid of three columns: each its own 128 crop if allowed (two
    together would need a 270 px window, past the 256 bucket)."""
    ramp = np.linspace(0, 255, 640).astype(np.uint8)
    photo = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128), axis=-1).astype(np.uint8)
    mask = np.zeros(photo.shape[:2], np.uint8)
    for index in range(count):
        top, left = 100 + 200 * (index // 3), 100 + 200 * (index % 3)
        mask[top : top + 30, left : left + 30] = 255
    return photo, mask


@pytest.mark.parametrize(("objects", "gate", "crops", "calls"), [
    (4, "retry", 4, 8),  # 4 crops x (removal + scoring): one attempt fills the cap
    # 6 crops would be 12 calls: the cheapest pairs merge down to 4 windows, and the grown windows' overlaps to 3;
    # 3 crops x 2 calls: one attempt
    (6, "retry", 3, 6),
    (6, "annotate", 3, 6),
    (4, "off", 4, 4),  # the same crops whatever the gate: gate=off with a scored removal's seed gives its image
    (6, "off", 3, 3),
])  # fmt: skip
def test_no_mask_makes_a_request_cause_more_model_calls_than_the_cap(objects, gate, crops, calls):
    """gate.max_model_calls (8 here) bounds every model call one request causes, whatever its regions: a mask
    that needs more crops than the cap allows has regions share windows until it fits."""
    photo, mask = _photo_and_objects(objects)
    models = FakeModels(scores=[0.1] * 64)  # below the threshold: retry uses every attempt it may
    upload = RemovalRequest(png_bytes(photo), png_bytes(mask), RemoveOptions(seed=1, gate=gate, max_attempts=4))
    reply = asyncio.run(_service(models, max_model_calls=8).remove(upload))
    scorings = 64 - len(models.scores)
    assert (len(reply.buckets), len(models.removals) + scorings) == (crops, calls)


@pytest.mark.parametrize(("objects", "crops"), [(6, 6), (9, 6)])  # 9 > 8: pairs merge, then the overlaps
def test_without_a_scorer_a_crop_is_one_call_so_twice_the_crops_fit(objects, crops):
    imaging = {"buckets": list(CROPS.buckets), "crop_margin": CROPS.crop_margin, "dilate": CROPS.dilate}
    settings = AppSettings.model_validate({"imaging": imaging, "gate": {"max_model_calls": 8}})
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    models = FakeModels()
    service = RemovalService(settings, remover=None, scorer=None, metrics=metrics, models=models)
    photo, mask = _photo_and_objects(objects)
    reply = asyncio.run(service.remove(RemovalRequest(png_bytes(photo), png_bytes(mask), RemoveOptions(seed=1))))
    assert (len(reply.buckets), len(models.removals), reply.gate) == (crops, crops, "off")


def test_post_score_cuts_the_crops_a_scored_removal_cut():
    for count, jobs in [(4, 4), (6, 3)]:
        photo, mask = _photo_and_objects(count)
        models = FakeModels(scores=[0.9] * 8)
        upload = ScoreRequest(png_bytes(photo), png_bytes(mask), png_bytes(photo), ScoreOptions())
        asyncio.run(_service(models, max_model_calls=8).score(upload))
        assert 8 - len(models.scores) == jobs


def test_post_score_tells_its_admission_place_when_its_model_work_begins():
    photo, mask = _photo_and_objects(2)
    models = FakeModels(scores=[0.9] * 8)

    class Place:
        def planned(self, units, deadline_s):
            self.planned_with = (units, deadline_s, len(models.scores))

    place = Place()
    service = _service(models)
    asyncio.run(service.score(ScoreRequest(png_bytes(photo), png_bytes(mask), png_bytes(photo), ScoreOptions()), place))
    units, deadline_s, scores_left = place.planned_with
    assert (units, scores_left) == (1.0, 8)  # after the decode, before any scoring
    assert 0 < deadline_s < service.settings.request_timeout_s, "what is left of the deadline, the decode spent"


def _score_service(models: FakeModels) -> RemovalService:
    service = _service(models)
    service.settings = service.settings.model_copy(update={"request_timeout_s": 1})
    return service


def _score_upload(**options) -> ScoreRequest:
    photo, mask = _photo_and_objects(1)
    return ScoreRequest(png_bytes(photo), png_bytes(mask), png_bytes(photo), ScoreOptions(**options))


class _SlowScorer(FakeModels):
    async def score(self, job: ScoreJob) -> float:
        await asyncio.sleep(0.9)
        return await super().score(job)


@pytest.mark.timing
@pytest.mark.parametrize("slow_step", ["decode", "wait for a thread"])
def test_post_score_answers_its_504_at_the_request_deadline_counting_the_time_before_the_scoring(slow_step):
    """/score had no deadline: a 0.6 s decode then a 0.7 s scoring answered 200 after 1.3 s where request_timeout_s
    was 1 s (the scoring got a fresh request_timeout_s of its own), as did a wait for a busy image thread."""
    from serve.uploads import Offload

    service = _score_service(_SlowScorer(scores=[0.9]))
    service.cpu = Offload(1, 8, 0, "test-cpu")  # one image-work thread
    if slow_step == "decode":
        prepare = service.score_pipeline.prepare_score
        service.score_pipeline.prepare_score = lambda *args: threading.Event().wait(0.8) or prepare(*args)

    async def main():
        busy = asyncio.ensure_future(service.cpu.run(time.sleep, 0.8 if slow_step == "wait for a thread" else 0))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Problem) as caught:
            await service.score(_score_upload())
        took = time.perf_counter() - started
        await busy
        return caught.value, took

    problem, took = asyncio.run(main())
    assert (problem.problem, problem.detail) == ("timeout", "no result within 1 s")
    assert 0.9 <= took < 1.4, took


@pytest.mark.timing
def test_post_score_answers_its_504_at_its_own_timeout_s_and_never_past_request_timeout_s():
    """A score request had no timeout_s: a client that wanted its answer within 0.3 s waited request_timeout_s."""
    service = _score_service(_SlowScorer(scores=[0.9]))  # 0.9 s a scoring
    service.settings = service.settings.model_copy(update={"request_timeout_s": 0.6})
    for asked, answered in ((0.3, "0.3"), (60, "0.6")):
        started = time.perf_counter()
        with pytest.raises(Problem) as caught:
            asyncio.run(service.score(_score_upload(timeout_s=asked)))
        took = time.perf_counter() - started
        assert (caught.value.problem, caught.value.detail) == ("timeout", f"no result within {answered} s")
        assert took < float(answered) + 0.4, took


@pytest.mark.timing
def test_post_score_within_its_deadline_answers_200():
    reply = asyncio.run(_score_service(FakeModels(scores=[0.9])).score(_score_upload()))
    assert (reply.score, reply.passed, reply.bucket) == (0.9, True, 128)


class _SlowScorerHandle:
    """A Scorer deployment handle whose score calls answer after 0.2 s."""

    def __init__(self):
        self.score = self

    def remote(self, job: ScoreJob):
        return asyncio.ensure_future(self._answer())

    async def _answer(self):
        await asyncio.sleep(0.2)
        return SimpleNamespace(score=0.9)


def test_post_score_waits_the_request_timeout_while_gate_scoring_waits_the_scorer_timeout():
    settings = AppSettings.model_validate({"scorer": {"timeout_s": 0.05}, "request_timeout_s": 5})
    metrics = SimpleNamespace(gate_outcomes=_Recorder(), gate_attempts=_Recorder(), scores=_Recorder())
    service = RemovalService(settings, remover=None, scorer=_SlowScorerHandle(), metrics=metrics)
    crop = np.zeros((64, 64, 3), np.uint8)
    job = ScoreJob(crop, np.ones((64, 64), bool), crop)

    async def gate_then_request():
        with pytest.raises(Problem) as caught:
            await service.pipeline.models.score(job)
        assert caught.value.problem == "timeout" and "0.05 s" in caught.value.detail
        return await service.score_pipeline.models.score(job)

    assert asyncio.run(gate_then_request()) == 0.9


class _Response:
    """A Serve handle call's response: awaitable, cancellable in Serve."""

    def __init__(self, coroutine):
        self.task = asyncio.ensure_future(coroutine)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.cancelled = True
        self.task.cancel()


class _ReplicaDiesThenHangs:
    """A deployment method: the first call's replica dies after `dies_after_s` (`blocking`: holding the event
    loop, as a slow step would), every later call never answers."""

    def __init__(self, dies_after_s: float, blocking: bool = False):
        self.dies_after_s = dies_after_s
        self.blocking = blocking
        self.responses: list[_Response] = []

    def remote(self, *args):
        self.responses.append(_Response(self._dies() if not self.responses else asyncio.sleep(10)))
        return self.responses[-1]

    async def _dies(self):
        if self.blocking:
            time.sleep(self.dies_after_s)  # noqa: ASYNC251
        else:
            await asyncio.sleep(self.dies_after_s)
        raise ActorDiedError()


def _serve_models() -> ServeModels:
    return ServeModels(None, None, AppSettings(), {"Retry-After": "1"})


@pytest.mark.timing
def test_a_retry_after_a_replica_failure_gets_what_is_left_of_the_timeout_not_a_fresh_one():
    method = _ReplicaDiesThenHangs(dies_after_s=1.0)

    async def timed_call():
        started = time.perf_counter()
        with pytest.raises(Problem) as caught:
            await _serve_models().call(method, None, timeout_s=1.2)
        return caught.value, time.perf_counter() - started

    problem, took = asyncio.run(timed_call())
    assert (problem.problem, problem.detail) == ("timeout", "no result within 1.2 s")
    assert took < 1.7, f"{took:.2f} s: a fresh timeout for the retry takes 2.2 s"
    assert len(method.responses) == 2 and method.responses[1].cancelled


def test_a_replica_failure_with_no_time_left_answers_the_timeout_without_sending_a_retry():
    method = _ReplicaDiesThenHangs(dies_after_s=0.08, blocking=True)

    async def call():
        with pytest.raises(Problem) as caught:
            await _serve_models().call(method, None, timeout_s=0.05)
        return caught.value

    problem = asyncio.run(call())
    assert (problem.problem, problem.detail) == ("timeout", "no result within 0.05 s")
    assert len(method.responses) == 1


class _PublishedStates:
    """serve.health.Readiness as the service asks it: which deployments have no running replica."""

    def __init__(self, missing: list[str]):
        self.missing_now = missing
        self.trouble = "The deployment failed to start 4 times in a row"
        self.descriptions = {"Remover": {"name": "Remover"}, "Scorer": {"name": "Scorer"}}

    async def missing(self) -> dict[str, str]:
        return {name: f"no running replica yet (Serve: {self.trouble})" for name in self.missing_now}


@pytest.mark.parametrize(
    "gate, missing, expected",
    [
        ({}, [], "ready"),
        ({}, ["Scorer"], "degraded"),  # fail_open: results go out unscored
        ({"on_scorer_error": "fail_closed", "mode": "annotate"}, ["Scorer"], "degraded"),  # unscored either way
        ({"on_scorer_error": "fail_closed", "mode": "off"}, ["Scorer"], "degraded"),
        ({"on_scorer_error": "fail_closed", "mode": "retry"}, ["Scorer"], "not-ready"),
        ({"on_scorer_error": "fail_closed", "mode": "reject"}, ["Scorer"], "not-ready"),
        ({}, ["Remover"], "not-ready"),
        ({}, ["Remover", "Scorer"], "not-ready"),
    ],
)
def test_readiness_needs_the_scorer_only_where_the_gate_cannot_answer_without_it(gate, missing, expected):
    """In Kubernetes every worker pod's readiness is /readyz: were a lost Scorer replica to fail it where the
    gate answers unscored (fail_open, the default), every pod would leave the Services at once, a full outage
    where the docs promise `X-Gate: unscored`."""
    service = _service(FakeModels(), **gate)
    service.readiness = _PublishedStates(missing)
    try:
        answer = asyncio.run(service.ready())
    except Problem as problem:
        assert problem.kind.slug == expected, problem.detail
        assert problem.headers["Retry-After"] and f"{missing[0]}: no running replica yet" in problem.detail
        return
    assert (answer["status"], answer["missing"]) == (expected, missing)
    assert all(service.readiness.trouble in answer["why"][name] for name in missing), answer  # not just its name


def _webp(photo: np.ndarray, lossless: bool, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "animated":
        frames = [Image.fromarray(photo[::-1].copy())]
        Image.fromarray(photo).save(buffer, "WEBP", lossless=lossless, quality=90, save_all=True, append_images=frames)
        return buffer.getvalue()
    Image.fromarray(photo).save(buffer, "WEBP", lossless=lossless, quality=90)
    if kind == "still":
        return buffer.getvalue()
    # the extended format, its image chunk after 70 unknown chunks (RIFF lets a reader skip them)
    height, width = photo.shape[:2]
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas
    body = b"WEBP" + vp8x + b"ZZZZ\x02\x00\x00\x00\x00\x00" * 70 + buffer.getvalue()[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("kind", ["still", "animated", "after unknown chunks"])
@pytest.mark.parametrize("lossless", [True, False])
def test_a_lossless_webp_photo_gets_a_lossless_webp_result(lossless, kind):
    """A lossless WebP upload came back re-encoded lossy at quality 95: 99% of the pixels outside the mask
    changed (a review). Its result is now lossless too; a lossy WebP's stays lossy (and small). An animation's
    first frame (the one decoded) was taken for lossy whatever it was, as was an image chunk after 64 others
    (an adversarial trial: gif2webp writes lossless frames by default)."""
    photo, mask = _photo_and_two_objects()
    upload = _webp(photo, lossless, kind)
    request = RemovalRequest(upload, png_bytes(mask.astype(np.uint8) * 255), RemoveOptions())
    reply = asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(request))
    with Image.open(io.BytesIO(reply.body)) as result:
        assert result.format == "WEBP"
        pixels = np.asarray(result.convert("RGB"))
    with Image.open(io.BytesIO(upload)) as source:
        decoded = np.asarray(source.convert("RGB"))
    outside = ~mask_grown(mask)
    changed = (pixels != decoded).any(axis=2) & outside
    if lossless:
        assert not changed.any(), f"{changed.sum()} pixels outside the mask changed"
    else:
        assert changed.mean() > 0.1, "a lossy source's result is re-encoded lossy"


def test_where_the_alpha_channel_is_the_mask_the_alpha_outside_it_comes_back():
    """Without a mask the image's transparent pixels are removed; the result used to drop the alpha channel
    altogether, so a soft (alpha 128-254) edge outside the mask came back opaque (a review)."""
    photo, mask = _photo_and_two_objects()
    alpha = np.full(mask.shape, 200, np.uint8)
    alpha[mask] = 0
    upload = RemovalRequest(png_bytes(np.dstack([photo, alpha])), None, RemoveOptions(output_format="png"))
    reply = asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(upload))
    with Image.open(io.BytesIO(reply.body)) as result:
        assert result.mode == "RGBA"
        returned = np.asarray(result)
    assert (returned[..., 3][~mask] == 200).all() and (returned[..., 3][mask] == 255).all()
    np.testing.assert_array_equal(returned[..., :3][~mask_grown(mask)], photo[~mask_grown(mask)])

    opaque_outside = np.where(mask, 0, 255).astype(np.uint8)
    upload = RemovalRequest(png_bytes(np.dstack([photo, opaque_outside])), None, RemoveOptions(output_format="png"))
    with Image.open(io.BytesIO(asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(upload)).body)) as result:
        assert result.mode == "RGBA", "nothing transparent is left: the alpha channel comes back opaque"
        assert (np.asarray(result)[..., 3] == 255).all()


@pytest.mark.parametrize("output", ["png", "jpeg"])
def test_a_fully_opaque_rgba_photo_comes_back_rgba_in_a_png(output):
    """A review: an RGBA PNG whose alpha is all 255 came back RGB (its alpha plane is dropped at decoding), while
    the API says an alpha channel is kept. It comes back RGBA, opaque; a JPEG has none to keep."""
    photo, mask = _photo_and_two_objects()
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    mask_png = png_bytes(mask.astype(np.uint8) * 255)
    upload = RemovalRequest(png_bytes(rgba), mask_png, RemoveOptions(output_format=output))
    with Image.open(io.BytesIO(asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(upload)).body)) as result:
        assert result.mode == ("RGBA" if output == "png" else "RGB")
        returned = np.asarray(result)
    if output == "png":
        assert (returned[..., 3] == 255).all()
        outside = ~mask_grown(mask)
        np.testing.assert_array_equal(returned[..., :3][outside], photo[outside])


@pytest.mark.parametrize("dilate", [0, 2])
def test_every_pixel_of_the_mask_given_is_the_models_whatever_the_dilation(dilate):
    """The 6 px blend ramp ran inward from the dilated mask's edge: at dilate 0 a 1 px stroke ("a wire") kept 84%
    of the object, and an alpha-as-mask hole blended in the black hidden under its transparency (a review)."""
    photo = np.full((300, 400, 3), 200, np.uint8)
    stroke = np.zeros(photo.shape[:2], bool)
    stroke[100:200, 150] = True
    hole = np.zeros(photo.shape[:2], bool)
    hole[120:160, 250:290] = True
    hidden = np.where(hole[..., None], np.uint8(0), photo)
    alpha = np.where(hole, 0, 255).astype(np.uint8)
    options = RemoveOptions(dilate=dilate, gate="off", output_format="png")
    uploads = [
        (RemovalRequest(png_bytes(photo), png_bytes(stroke.astype(np.uint8) * 255), options), stroke),
        (RemovalRequest(png_bytes(np.dstack([hidden, alpha])), None, options), hole),
    ]
    for upload, given in uploads:
        out = decode_png(asyncio.run(_service(FakeModels()).remove(upload)).body)
        assert (out[given] == PAINT).all(), np.unique(out[given])
        outside = ~imaging.dilate_mask(given, dilate)
        np.testing.assert_array_equal(out[outside], photo[outside])


def test_an_accept_preferring_jpeg_gets_an_image_with_alpha_in_a_format_that_keeps_it():
    """JPEG was picked from Accept for an RGBA photo: its transparency came back opaque, showing the colours
    stored under it (a review)."""
    photo, mask = _photo_and_two_objects()
    alpha = np.full(mask.shape, 255, np.uint8)
    alpha[:, :100] = 0
    mask_png = png_bytes(mask.astype(np.uint8) * 255)
    upload = RemovalRequest(png_bytes(np.dstack([photo, alpha])), mask_png, RemoveOptions())
    reply = asyncio.run(_service(FakeModels(scores=[0.9, 0.9])).remove(upload, accept="image/jpeg, image/webp;q=0.8"))
    assert reply.format == "webp"
    with Image.open(io.BytesIO(reply.body)) as result:
        assert result.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(result)[..., 3], alpha)


def mask_grown(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=CROPS.dilate + CROPS.feather + 2)


def test_a_later_attempt_keeps_time_for_an_encode_as_slow_as_this_replicas_recent_ones():
    """A WebP encode can take 10-40x its decode (a 6 MP lossless one 2.1 s against a 0.08 s decode): the time a
    later gate attempt leaves for the encode comes from what the replica's recent encodes of that kind took, so
    the best attempt so far is encoded by the deadline, not lost to a 504."""
    from engines.pipeline import Timings
    from serve.service import EncodeCosts, encode_reserve_s

    timings = Timings()
    timings.add("cpu_wait", 0.01)
    timings.add("decode", 0.04)
    encodes = EncodeCosts()
    assert encode_reserve_s(timings, encodes.expected_s("webp-lossless", 6.0)) == pytest.approx(0.1)
    encodes.observe("webp-lossless", 6.0, 2.1)
    encodes.observe("png", 6.0, 0.3)
    assert encode_reserve_s(timings, encodes.expected_s("webp-lossless", 6.0)) == pytest.approx(1.5 * 2.1)
    assert encode_reserve_s(timings, encodes.expected_s("webp-lossless", 12.0)) == pytest.approx(1.5 * 4.2)
    assert encode_reserve_s(timings, encodes.expected_s("webp", 6.0)) == pytest.approx(0.1), "another kind"
    for _ in range(30):  # faster encodes since: the slow one is forgotten, a step at a time
        encodes.observe("webp-lossless", 6.0, 0.6)
    assert encodes.expected_s("webp-lossless", 6.0) == pytest.approx(0.6)
    encodes.observe("png", 64 * 64 / 1e6, 0.01)  # a thumbnail's time is its fixed cost, not 2,400 s per megapixel
    assert encodes.expected_s("png", 12.0) == pytest.approx(12 * 0.9 * 0.3 / 6), "the 6 MP one's, one decay down"

    service = _service(FakeModels(scores=[0.8, 0.8]))
    reply = asyncio.run(service.remove(_upload(seed=3, output_format="webp")))
    megapixels = math.prod(decode_png(_upload().image).shape[:2]) / 1e6
    assert 0 < service.encodes.expected_s("webp", megapixels) <= reply.timings.stages["encode"], "timed in its thread"


def test_a_later_attempt_is_not_started_when_the_encode_it_would_need_does_not_fit():
    """With this replica's PNG encodes at 1.5 s, a 3 s deadline keeps 2.25 s for the encode: after a 0.5 s attempt
    no second one starts (0.25 s left), and the first is encoded in time. Without the reserve three would run."""
    models = _TimedRemovals([0.5, 0.5, 0.5], scores=[0.3, 0.4, 0.2])
    service = _service(models)
    service.encodes.observe("png", 1.0, 1.5)

    async def main():
        return await service.remove(_one_object(gate="retry", max_attempts=3, timeout_s=3.0))

    reply = asyncio.run(main())
    assert (reply.gate, reply.attempts, reply.score, models.started) == ("failed", 1, 0.3, 1)
