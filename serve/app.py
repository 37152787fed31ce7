"""The Ingress deployment: REST and gRPC entry points over serve.service.RemovalService.

`build_app(args)` is the import path the Serve config names (`serve.app:build_app`). Serve ships the
ingress class to its replicas by value, so every module-level name it uses is defined above it.
"""

import logging
import os
import re
import sys
import time
import uuid

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines import imaging
from serve import auth, grpc_api, quotas
from serve import rorem_pb2 as pb
from serve.admission import Admission
from serve.config import AppSettings, RemoverArgs, ScorerArgs, with_live
from serve.loop_lag import loop_lag
from serve.metrics import ingress_metrics
from serve.openapi import install as install_openapi
from serve.playground import playground_headers, playground_page
from serve.problems import MAX_LISTED, Problem
from serve.protocol import JSONRemoveBody, JSONScoreBody, RemoveOptions, ScoreOptions, openapi_request_body
from serve.proxy_middleware import REQUEST_ID_PATTERN
from serve.remover_deployment import Remover
from serve.retention.keeper import PAGE_HEADERS, FeedbackBody, annotation_page, result_document
from serve.retention_deployment import ResultStore
from serve.scorer_deployment import Scorer
from serve.service import RemovalService
from serve.uploads import Offload, b64encode_pieces, read_json, read_removal_request, read_score_request

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="RORem object removal",
    description="POST an image and a mask (white = remove); get the image back with the object removed.",
    version="0.1.0",
)
install_openapi(api)  # serve/openapi.py: problem responses, headers, media types
api.add_middleware(quotas.QuotaFields)  # a metered request's RateLimit fields on its answer; its lease given back
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_INGRESS_STAGES = {"read", "decode", "score", "paste", "encode"}  # the model deployments record the others


def _route_label(scope: dict) -> str:
    """The metrics label of a request: the template of the route that answered it (never a raw id, whatever
    the route_prefix), or "other" where no route matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


def _request_id(request: Request) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id if it is a valid one (the proxy drops any
    other, serve.proxy_middleware.RequestIdGuard), else one Serve made; Serve echoes it back."""
    return _serve_request_id() or _valid_request_id(request.headers.get("x-request-id", ""))


@api.exception_handler(Problem)
async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return exc.response(getattr(request.state, "request_id", None) or _request_id(request))


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:MAX_LISTED])
    more = f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    return Problem("invalid-request", detail + more).response(_request_id(request))


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    problem = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "invalid-request")
    return Problem(problem, str(exc.detail)).response(_request_id(request))


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return Problem("internal-error", f"{type(exc).__name__}; see the server log").response(_request_id(request))


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    """Requests by route and status, and end-to-end latency, for every REST answer (errors included)."""
    started = time.perf_counter()
    status = "500"
    try:
        response = await call_next(request)
        status = str(response.status_code)
        return response
    finally:
        route = _route_label(request.scope)
        ingress_metrics().answered(route, "http", status, time.perf_counter() - started)


def _wants_json(accept: str) -> bool:
    return "application/json" in accept and not any(t in accept for t in imaging.MEDIA_TYPES.values())


def _valid_request_id(given: str | None) -> str:
    return given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _serve_request_id() -> str | None:
    """Serve's id for the request in progress, when it is one we may echo and log; None outside a request."""
    try:
        given = _get_serve_request_context().request_id
    except Exception:
        return None
    return _valid_request_id(given) if given else None


def _root(request: Request) -> str:
    """The app's mount point (Serve's route_prefix), for links in answers."""
    return request.scope.get("root_path", "").rstrip("/")


_JSON_IMAGE_HEAD = b'{"image":"'


def _json_reply_body(content: dict) -> bytes:
    """The body JSONResponse(content) would send, where content["image"] (its first key) holds bytes to send
    as base64. Built in steps (no C call over the whole image): the other keys go through JSONResponse's own
    rendering with an empty image, and the base64 text, which needs no JSON escaping, goes between its quotes."""
    rendered = JSONResponse({**content, "image": ""}).body
    if not rendered.startswith(_JSON_IMAGE_HEAD + b'"'):
        raise ValueError("the JSON reply must start with its image")
    return b"".join([_JSON_IMAGE_HEAD, *b64encode_pieces(content["image"]), rendered[len(_JSON_IMAGE_HEAD) :]])


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Entry points only: REST routes (FastAPI) and the gRPC methods `Remove` / `Score` (the names are
    the RPC names in serve/rorem.proto); the work is in serve.service.RemovalService."""

    def __init__(
        self,
        remover: DeploymentHandle,
        scorer: DeploymentHandle | None,
        settings: dict,
        result_store: DeploymentHandle | None = None,
    ):
        """`settings`: the whole AppSettings (RemovalService reads them all); the gate comes live (`reconfigure`).
        `result_store`: the ResultStore deployment, where retention is enabled."""
        self.settings = AppSettings.model_validate(settings)
        self.metrics = ingress_metrics()
        self.service = RemovalService(self.settings, remover, scorer, self.metrics, result_store=result_store)
        overload = self.settings.overload
        self.admission = Admission(overload.max_in_flight, overload.retry_after_s, overload.max_queue_wait_s)
        self.access = auth.install(self.settings.auth, self.metrics.keys_file_errors.inc)
        app_name = serve.get_replica_context().app_name
        self.quotas = quotas.install(
            quotas.Quotas.from_settings(self.settings, app_name, self.metrics.quota_ledger_errors.inc).start()
        )
        # parsing and reply encoding off the event loop; as many jobs at once as requests are admitted
        self.offload = Offload(overload.offload_threads, overload.max_in_flight)
        sys.setswitchinterval(min(sys.getswitchinterval(), overload.switch_interval_s))

    def reconfigure(self, user_config: dict) -> None:
        """Serve's live update (serve.config.IngressLive): the gate, read by RemovalService on every request."""
        self.settings = with_live(self.settings, "Ingress", user_config)
        self.service.settings = self.settings

    @api.get("/healthz", dependencies=[auth.PUBLIC])
    async def healthz(self) -> dict:
        """The ingress process is alive (says nothing about the models); loop_lag_ms: the longest its event
        loop ran late since the previous /healthz (serve.loop_lag, ticking from the first one)."""
        instance = os.environ.get("ROREM_INSTANCE_ID")  # serve.cli.INSTANCE_ENV
        return {"status": "alive", "instance": instance, "loop_lag_ms": loop_lag().take_worst_ms()}

    @api.get("/readyz", dependencies=[auth.PUBLIC])
    async def readyz(self) -> JSONResponse:
        """Ready when a Remover replica (and a Scorer replica, where deployed) has loaded and warmed up."""
        return JSONResponse(await self.service.ready())

    @api.post(
        "/remove",
        dependencies=[auth.requires("remove"), quotas.METERED],
        openapi_extra={
            "requestBody": openapi_request_body(
                RemoveOptions, JSONRemoveBody, {"image": "the photo", "mask": "white = remove; absent: the image's alpha"}
            )
        },
        responses={
            200: {
                "content": {**{t: {} for t in imaging.MEDIA_TYPES.values()}, "application/json": {}},
                "description": "the edited image; with Accept: application/json a JSON object (image in base64)",
            }
        },
    )
    async def remove(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        self.admission.check()
        started = time.perf_counter()
        upload = await read_removal_request(
            request, self.settings.imaging.max_upload_bytes, self.offload.run, self.settings.overload.body_timeout_s
        )
        read_s = time.perf_counter() - started
        accept = request.headers.get("accept", "")
        with self.admission.slot():  # taken once the body is in: a slow upload holds no slot
            self.admission.check_deadline(upload.options.timeout_s)
            reply = await self.service.remove(upload, accept, auth.result_owner(request.state.principal))
        reply.timings.stages = {"read": read_s, **reply.timings.stages}
        self.metrics.stages.observe({k: v for k, v in reply.timings.stages.items() if k in _INGRESS_STAGES})
        headers = {
            "X-Bucket": "none" if reply.bucket is None else ", ".join(map(str, reply.buckets)),
            "X-Attempts": str(reply.attempts),
            "X-Gate": reply.gate,
            "Server-Timing": reply.timings.server_timing(),
        }
        if reply.bucket is not None:
            headers.update({"X-Seed": str(reply.seed), "X-Batch-Size": str(reply.batch_size)})
        if reply.score is not None:
            headers["X-Removal-Score"] = f"{reply.score:.4f}"
        if reply.result_id is not None:
            headers["X-Result-Id"] = reply.result_id
        if _wants_json(accept):  # as JSONResponse({"image": base64, ...}) would answer, encoded off the loop
            body = await self.offload.run(
                _json_reply_body,
                {
                    "image": reply.body,
                    "media_type": reply.media_type,
                    "seed": reply.seed,
                    "bucket": reply.bucket,
                    "buckets": reply.buckets,
                    "batch_size": reply.batch_size,
                    "score": reply.score,
                    "attempts": reply.attempts,
                    "gate": reply.gate,
                    "result_id": reply.result_id,
                },
            )
            return Response(body, media_type="application/json", headers=headers)
        return Response(reply.body, media_type=reply.media_type, headers=headers)

    @api.post(
        "/score",
        dependencies=[auth.requires("score"), quotas.METERED],
        openapi_extra={
            "requestBody": openapi_request_body(
                ScoreOptions,
                JSONScoreBody,
                {"source": "the image before removal", "mask": "white = removed", "edited": "the image after removal"},
            )
        },
    )
    async def score(self, request: Request) -> JSONResponse:
        """Score an existing (source, mask, edited) triple with the discriminator."""
        request.state.request_id = _request_id(request)
        self.admission.check()
        upload = await read_score_request(
            request, self.settings.imaging.max_upload_bytes, self.offload.run, self.settings.overload.body_timeout_s
        )
        with self.admission.slot():
            reply = await self.service.score(upload)
        return JSONResponse(
            {"score": reply.score, "threshold": reply.threshold, "passed": reply.passed, "bucket": reply.bucket}
        )

    @api.post(
        "/feedback",
        status_code=201,
        dependencies=[auth.requires("feedback")],
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": FeedbackBody.model_json_schema()}}}
        },
    )
    async def feedback(self, request: Request) -> JSONResponse:
        """A human verdict (yes / no) on a retained result. Verdicts are appended: the newest is the
        result's label, the earlier ones stay as its history. Answers the result with its feedback."""
        request.state.request_id = _request_id(request)
        body = await read_json(request, FeedbackBody, body_timeout_s=self.settings.overload.body_timeout_s)
        stored = await self.service.retention.feedback(body, auth.visible_owner(request.state.principal))
        return JSONResponse(result_document(stored, _root(request)), status_code=201)

    @api.get("/results/{id}", dependencies=[auth.requires("feedback")])
    async def result(self, request: Request, result_id: str = Path(alias="id")) -> JSONResponse:
        """A retained result: score, gate, parameters, verdicts, and links to its images."""
        stored = await self.service.retention.get(result_id, auth.visible_owner(request.state.principal))
        return JSONResponse(result_document(stored, _root(request)))

    @api.get(
        "/results/{id}/{kind}",
        dependencies=[auth.requires("feedback")],
        responses={200: {"content": {"image/*": {}}, "description": "kind: source, mask (white = removed) or result"}},
    )
    async def result_image(self, request: Request, kind: str, result_id: str = Path(alias="id")) -> Response:
        data, media_type = await self.service.retention.image(result_id, kind, auth.visible_owner(request.state.principal))
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    @api.delete("/results/{id}", status_code=204, dependencies=[auth.requires("admin")])
    async def delete_result(self, result_id: str = Path(alias="id")) -> Response:
        """Forget a result: its metadata, its verdicts, and its images unless another result shares them."""
        await self.service.retention.delete(result_id)
        return Response(status_code=204)

    @api.get("/", include_in_schema=False, dependencies=[auth.PUBLIC])
    async def home(self, request: Request) -> Response:
        """The service's front page is the playground."""
        return Response(status_code=307, headers={"Location": f"{_root(request)}/playground"})

    @api.get("/playground", response_class=HTMLResponse, include_in_schema=False, dependencies=[auth.PUBLIC])
    async def playground(self) -> HTMLResponse:
        """Try a removal by hand: drop a photo, paint the mask, compare before / after (serve/playground.py)."""
        return HTMLResponse(playground_page(self.settings.retention), headers=playground_headers())

    @api.get("/annotate", response_class=HTMLResponse, dependencies=[auth.PUBLIC])
    async def annotate(self) -> HTMLResponse:
        """The annotation page: label retained results yes / no, least certain first."""
        self.service.retention.require_enabled()
        return HTMLResponse(annotation_page(), headers=PAGE_HEADERS)

    @api.get("/annotation/queue", dependencies=[auth.requires("feedback")])
    async def annotation_queue(self, request: Request, limit: int = 20, threshold: float | None = None) -> JSONResponse:
        """Unlabelled results, the discriminator's least certain first (|score - threshold| ascending)."""
        items, unlabelled = await self.service.retention.queue(limit, threshold, auth.visible_owner(request.state.principal))
        base = _root(request)
        return JSONResponse(
            {
                "unlabelled": unlabelled,
                "threshold": threshold,
                "items": [result_document(stored, base, threshold) for stored in items],
            }
        )

    async def Remove(self, message: pb.RemoveRequest, grpc_context: RayServegRPCContext) -> pb.RemoveReply:
        return await self._grpc("/remove", "remove", grpc_context, pb.RemoveReply, self._grpc_remove, message)

    async def Score(self, message: pb.ScoreRequest, grpc_context: RayServegRPCContext) -> pb.ScoreReply:
        return await self._grpc("/score", "score", grpc_context, pb.ScoreReply, self._grpc_score, message)

    async def _grpc_remove(self, message: pb.RemoveRequest, request_id: str, principal) -> pb.RemoveReply:
        upload = grpc_api.removal_request(message, self.settings.imaging.max_upload_bytes)
        self.admission.check_deadline(upload.options.timeout_s)
        reply = await self.service.remove(upload, owner=auth.result_owner(principal))
        self.metrics.stages.observe({k: v for k, v in reply.timings.stages.items() if k in _INGRESS_STAGES})
        return grpc_api.remove_reply(reply, request_id)

    async def _grpc_score(self, message: pb.ScoreRequest, request_id: str, principal) -> pb.ScoreReply:
        reply = await self.service.score(grpc_api.score_request(message, self.settings.imaging.max_upload_bytes))
        return grpc_api.score_reply(reply, request_id)

    async def _grpc(self, route, scope, context, empty_reply, handler, message):
        """Run a gRPC call needing `scope` (declared with the method, as a REST route declares its own); a Problem
        becomes a status code + problem+json details, counted like REST under the REST route's name."""
        started = time.perf_counter()
        request_id = _serve_request_id() or _valid_request_id(context.request_id())
        quota = None  # the key's quota decision (serve/quotas.py): counted once the key is known
        try:
            principal = self.access.check_grpc(scope, context.invocation_metadata())
            quota = await self.quotas.acquire(principal)
            if quota is not None:
                quota.check()
            with self.admission.slot():
                reply = await handler(message, request_id, principal)
            status = "OK"
        except Problem as problem:
            status_problem = problem
        except Exception as exc:  # never let an unexpected error escape without a status and a log line
            logger.exception("unhandled error in gRPC %s", route)
            status_problem = Problem("internal-error", f"{type(exc).__name__}; see the server log")
        else:
            if quota is not None:
                context.set_trailing_metadata(quota.metadata())
            self.metrics.answered(route, "grpc", status, time.perf_counter() - started)
            return reply
        finally:
            self.quotas.release(quota)
        grpc_api.status_for(status_problem, context, request_id, quota.metadata() if quota is not None else ())
        self.metrics.answered(route, "grpc", grpc_api.status_code(status_problem).name, time.perf_counter() - started)
        return empty_reply()




def build_app(args: dict) -> serve.Application:
    """Application builder named by the Serve config: validates args strictly, then binds each deployment
    with its own slice of them (the live knobs come through each deployment's user_config)."""
    settings = AppSettings.model_validate(args or {})
    auth.check_routes(api)
    scorer = Scorer.bind(settings.args_for(ScorerArgs)) if settings.scorer.enabled else None
    retention = settings.retention
    result_store = ResultStore.bind(retention.model_dump(mode="json")) if retention.enabled else None
    # the gate only where the args give it: deployed by the CLI or k8s it is the Ingress's user_config
    ingress_args = settings.model_dump(mode="json", exclude=None if "gate" in settings.model_fields_set else {"gate"})
    return Ingress.bind(Remover.bind(settings.args_for(RemoverArgs)), scorer, ingress_args, result_store)
