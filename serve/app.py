"""The HTTP ingress: thin adapter from REST to the imaging functions and the Remover deployment.

`build_app(args)` is the import path the Serve config names (`serve.app:build_app`).
"""

import asyncio
import logging
import random
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines import imaging
from engines.errors import InputError
from engines.remover import RemovalJob
from serve.config import AppSettings
from serve.problems import Problem
from serve.remover import Remover
from serve.requests import RemovalRequest, RemoveOptions, read_removal_request

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="RORem object removal",
    description="POST an image and a mask (white = remove); get the image back with the object removed.",
    version="0.1.0",
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_RETRY_AFTER_S = "2"


def _request_id(request: Request) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id if it sent one; Serve echoes it back."""
    try:
        return _get_serve_request_context().request_id
    except Exception:
        given = request.headers.get("x-request-id", "")
        return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


@api.exception_handler(Problem)
async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return exc.response(getattr(request.state, "request_id", None) or _request_id(request))


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return Problem("invalid-request", str(exc.errors())).response(_request_id(request))


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    problem = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "invalid-request")
    return Problem(problem, str(exc.detail)).response(_request_id(request))


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return Problem("internal-error", f"{type(exc).__name__}; see the server log").response(_request_id(request))


class Timings:
    """Stage durations, reported in a standard Server-Timing header."""

    def __init__(self):
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - since) * 1000
        return now

    def header(self) -> str:
        total = (time.perf_counter() - self.started) * 1000
        return ", ".join(f"{k};dur={v:.1f}" for k, v in [*self.stages.items(), ("total", total)])


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, remover: DeploymentHandle, settings: dict):
        self.remover = remover
        self.settings = AppSettings.model_validate(settings)
        imaging_cfg = self.settings.imaging
        self.limits = imaging.DecodeLimits(
            max_bytes=imaging_cfg.max_upload_bytes, max_megapixels=imaging_cfg.max_megapixels
        )

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """The ingress process is alive (says nothing about the model)."""
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready when a Remover replica has loaded and warmed its bundle."""
        try:
            model = await asyncio.wait_for(self.remover.describe.remote(), timeout=5.0)
        except Exception as exc:  # not deployed yet, starting, or unreachable: all mean "not ready"
            raise Problem("not-ready", f"no Remover replica answered: {type(exc).__name__}",
                          headers={"Retry-After": _RETRY_AFTER_S}) from exc
        return JSONResponse({"status": "ready", "model": model})

    @api.post(
        "/remove",
        responses={200: {"content": {t: {} for t in imaging.MEDIA_TYPES.values()}, "description": "the edited image"}},
    )
    async def remove(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        timings = Timings()
        payload = await read_removal_request(request, self.settings.imaging.max_upload_bytes)
        mark = timings.add("read", timings.started)
        try:
            prepared = await asyncio.to_thread(self._prepare, payload)
        except InputError as exc:
            raise Problem.from_input_error(exc) from exc
        mark = timings.add("decode", mark)
        image, mask, plan, crop = prepared
        fmt = self._output_format(payload.options, request, image.format)
        quality = payload.options.quality or self.settings.imaging.jpeg_quality
        headers: dict[str, str] = {}

        if plan is None:
            headers["X-Bucket"] = "none"
            if image.format == fmt:
                body = payload.image
            else:
                body = await asyncio.to_thread(imaging.encode_image, image.rgb, image.alpha, fmt, quality)
                timings.add("encode", mark)
            headers["Server-Timing"] = timings.header()
            return Response(body, media_type=imaging.MEDIA_TYPES[fmt], headers=headers)

        seed = payload.options.seed if payload.options.seed is not None else random.getrandbits(63)
        outcome = await self._run_remover(RemovalJob(image=crop[0], mask=crop[1], seed=seed))
        roundtrip_ms = (time.perf_counter() - mark) * 1000
        timings.stages["queue"] = max(roundtrip_ms - outcome.model_ms, 0.0)
        timings.stages["model"] = outcome.model_ms
        mark = time.perf_counter()
        edited = await asyncio.to_thread(
            imaging.paste_back, image.rgb, mask, outcome.image, plan, self.settings.imaging.feather
        )
        mark = timings.add("paste", mark)
        body = await asyncio.to_thread(imaging.encode_image, edited, image.alpha, fmt, quality)
        timings.add("encode", mark)
        headers.update(
            {
                "X-Seed": str(seed),
                "X-Bucket": str(plan.bucket),
                "X-Batch-Size": str(outcome.batch_size),
                "Server-Timing": timings.header(),
            }
        )
        return Response(body, media_type=imaging.MEDIA_TYPES[fmt], headers=headers)

    def _prepare(self, payload: RemovalRequest):
        """Decode, pick the mask, dilate, plan and cut the crop: CPU work kept off the event loop."""
        image = imaging.decode_image(payload.image, self.limits)
        if payload.mask is None:
            mask = imaging.mask_from_alpha(image)
            image.alpha = None
        else:
            mask = imaging.decode_mask(payload.mask, image.rgb.shape[:2], self.limits)
        dilation = payload.options.dilate if payload.options.dilate is not None else self.settings.imaging.dilate
        mask = imaging.dilate_mask(mask, dilation)
        plan = imaging.plan_crop(mask, self.settings.imaging.buckets, self.settings.imaging.crop_margin)
        crop = imaging.crop_for_model(image.rgb, mask, plan) if plan else None
        return image, mask, plan, crop

    async def _run_remover(self, job: RemovalJob):
        try:
            return await asyncio.wait_for(self.remover.remove.remote(job), timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError as exc:
            raise Problem("timeout", f"no result within {self.settings.request_timeout_s:.0f} s") from exc
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise Problem("overloaded", str(exc).splitlines()[0], headers={"Retry-After": _RETRY_AFTER_S}) from exc

    @staticmethod
    def _output_format(options: RemoveOptions, request: Request, source_format: str | None) -> str:
        if options.output_format:
            return options.output_format
        accept = request.headers.get("accept", "")
        for fmt, media_type in imaging.MEDIA_TYPES.items():
            if media_type in accept:
                return fmt
        return source_format if source_format in imaging.OUTPUT_FORMATS else "png"


def build_app(args: dict) -> serve.Application:
    """Application builder named by the Serve config: validates args strictly, then binds."""
    settings = AppSettings.model_validate(args or {})
    plain = settings.model_dump()
    return Ingress.bind(Remover.bind(plain), plain)
