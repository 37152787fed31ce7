"""The Ingress deployment and the application builder (`serve.app:build_app`, named by the Serve config).

The Ingress is entry points only, over one serve.service.RemovalService: its REST routes are here (the
FastAPI app, error handlers and helpers in serve.rest_api), its gRPC methods in serve.grpc_api.GrpcMethods.
"""

import asyncio
import os
import sys
import time

from fastapi import Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from engines import imaging
from serve import auth, quotas
from serve.admission import route_admissions
from serve.config import GATE_THRESHOLDS, INSTANCE_ENV, AppSettings, IngressArgs, RemoverArgs, ScorerArgs, with_live
from serve.grpc_api import SHARED_ROUTE_SCOPES, GrpcMethods
from serve.live import LiveSettings
from serve.local_ray import keep_replica_grpc_on_loopback
from serve.loop_lag import loop_lag
from serve.metrics import INGRESS_STAGES, ingress_metrics
from serve.negotiation import wants_json
from serve.page_headers import PRIVATE_HEADERS, marked_for_its_opener
from serve.playground import playground_headers, playground_page
from serve.problems import invalid_request
from serve.protocol import JSONRemoveBody, JSONScoreBody, RemoveOptions, ScoreOptions, openapi_request_body
from serve.remover_deployment import Remover
from serve.rest_api import (
    api,
    docs_page,
    get_route,
    json_reply_body,
    public_get,
    remove_reply_json,
    request_id_of,
    root_path,
    score_reply_json,
)
from serve.retention.keeper import QUEUE_LIMITS, FeedbackBody, annotation_page, result_document
from serve.retention_deployment import ResultStore
from serve.scorer_deployment import Scorer
from serve.service import RemovalResult, RemovalService, request_deadline_s
from serve.uploads import Offload, read_json, read_removal_request, read_score_request
from serve.worker_threads import default_workers, worker_pool


def _bounds(low_high: tuple[float, float]) -> dict:
    """A query parameter's range, documented in the OpenAPI but checked by the route: a retention that is off
    answers its 404 first (FastAPI's own check would answer 422 before it)."""
    return {"minimum": low_high[0], "maximum": low_high[1]}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(GrpcMethods, LiveSettings):
    """Entry points only: REST routes (FastAPI) and the gRPC methods `Remove` / `Score` (the names are
    the RPC names in serve/rorem.proto); the work is in serve.service.RemovalService."""

    live_name = "Ingress"

    def __init__(
        self,
        remover: DeploymentHandle,
        scorer: DeploymentHandle | None,
        settings: dict,
        result_store: DeploymentHandle | None = None,
    ):
        """`settings`: serve.config.IngressArgs (RemovalService reads them all); the gate comes live
        (`reconfigure`). `result_store`: the ResultStore deployment, where retention is enabled."""
        keep_replica_grpc_on_loopback()
        self.settings = IngressArgs.model_validate(settings)
        self.metrics = ingress_metrics()
        self.service = RemovalService(self.settings, remover, scorer, self.metrics, result_store=result_store)
        overload = self.settings.overload
        self.admissions = route_admissions(overload)
        self.access = auth.install(self.settings.auth, self.metrics.keys_file_errors.inc)
        app_name = serve.get_replica_context().app_name
        self.quotas = quotas.install(
            quotas.Quotas.from_settings(self.settings, app_name, self.metrics.quota_ledger_errors.inc).start()
        )
        # parsing and reply encoding off the event loop; as many jobs at once as requests are admitted
        self.offload = Offload(overload.offload_threads, overload.max_in_flight, overload.worker_nice)
        # the rest of asyncio.to_thread (keys-file re-reads, readiness counts) below the loop's priority too, as the
        # image work (self.service.cpu) is; Serve runs this constructor on the replica's event loop
        asyncio.get_running_loop().set_default_executor(
            worker_pool(default_workers(), "rorem-default", overload.worker_nice)
        )
        sys.setswitchinterval(min(sys.getswitchinterval(), overload.switch_interval_s))
        loop_lag().report = self.metrics.loop_lag.observe  # ticking from the start, not from the first /healthz

    def parse_live(self, user_config: dict) -> IngressArgs:
        """serve.config.IngressLive: the gate."""
        return with_live(self.settings, "Ingress", user_config)

    def apply_live(self, settings: IngressArgs) -> None:
        """RemovalService reads the gate on every request."""
        self.settings = settings
        self.service.settings = settings

    @public_get("/healthz")
    async def healthz(self) -> dict:
        """The ingress process is alive (says nothing about the models); instance and application: which start of
        `python -m serve run` and which of its Serve applications answer; loop_lag_ms: the longest its event
        loop ran late since the previous /healthz it answered, whoever asked (serve.loop_lag)."""
        return {
            "status": "alive",
            "instance": os.environ.get(INSTANCE_ENV),
            "application": serve.get_replica_context().app_name,
            "loop_lag_ms": loop_lag().take_worst_ms(),
        }

    @public_get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready when a Remover replica (and a Scorer replica, where deployed) has loaded and warmed up.
        refused_live: live settings this replica refused as invalid, serving with its previous ones (serve.live)."""
        refused = [self.refused_live] if self.refused_live else []
        return JSONResponse({**await self.service.ready(), "refused_live": refused})

    @api.post(
        "/remove",
        dependencies=[auth.requires(SHARED_ROUTE_SCOPES["/remove"]), quotas.METERED],
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
        request.state.request_id = request_id_of(request)
        admission = self.admissions["/remove"]
        admission.check()
        started = time.perf_counter()
        upload = await read_removal_request(
            request, self.settings.imaging.max_upload_bytes, self.offload.run, self.settings.overload.body_timeout_s
        )
        read_s = time.perf_counter() - started
        accept = ", ".join(request.headers.getlist("accept"))  # repeated lines are one list (RFC 9110 5.3)
        # taken once the body is in (a slow upload holds no slot), held until the reply is encoded: a large
        # JSON reply is counted in flight while it is built
        with admission.slot() as place:
            place.check_deadline(request_deadline_s(upload.options, self.settings))
            result = await self.service.remove(upload, accept, auth.result_owner(request.state.principal), place)
            place.counted = result.bucket is not None
            return await self._removal_response(result, read_s, accept)

    async def _removal_response(self, result: RemovalResult, read_s: float, accept: str) -> Response:
        result.timings.took_before("read", read_s)
        self.metrics.stages.observe({k: v for k, v in result.timings.stages.items() if k in INGRESS_STAGES})
        headers = {
            **PRIVATE_HEADERS,  # the user's photo, edited: as a stored result's
            "X-Bucket": "none" if result.bucket is None else ", ".join(map(str, result.buckets)),
            "X-Attempts": str(result.attempts),
            "X-Gate": result.gate,
            "Server-Timing": result.timings.server_timing(),
            "Vary": "Accept",  # the image type or the JSON reply: a cache must not give one client's to another
        }
        if result.bucket is not None:
            headers.update({"X-Seed": str(result.seed), "X-Batch-Size": str(result.batch_size)})
        if result.score is not None:
            headers["X-Removal-Score"] = repr(result.score)  # as JSON `score`: 0.49996 was 0.5000 with X-Gate: failed
        if result.result_id is not None:
            headers["X-Result-Id"] = result.result_id
        # as JSONResponse({"image": base64, ...}) would answer, encoded off the loop
        if wants_json(accept, result.media_type):
            body = await self.offload.run(json_reply_body, remove_reply_json(result))
            return Response(body, media_type="application/json", headers=headers)
        return Response(result.body, media_type=result.media_type, headers=headers)

    @api.post(
        "/score",
        dependencies=[auth.requires(SHARED_ROUTE_SCOPES["/score"]), quotas.METERED],
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
        request.state.request_id = request_id_of(request)
        admission = self.admissions["/score"]
        admission.check()
        upload = await read_score_request(
            request, self.settings.imaging.max_upload_bytes, self.offload.run, self.settings.overload.body_timeout_s
        )
        with admission.slot() as place:
            place.check_deadline(request_deadline_s(upload.options, self.settings))
            result = await self.service.score(upload, place)
        return JSONResponse(score_reply_json(result))

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
        request.state.request_id = request_id_of(request)
        self.service.retention.require_enabled()  # the documented 404 before the body's 422
        body = await read_json(request, FeedbackBody, body_timeout_s=self.settings.overload.body_timeout_s)
        principal = request.state.principal
        stored = await self.service.retention.feedback(
            body, auth.visible_owner(principal), auth.verdict_principal(principal)
        )
        return JSONResponse(result_document(stored, root_path(request)), status_code=201, headers=PRIVATE_HEADERS)

    @get_route("/results/{id}", auth.requires("feedback"))
    async def result(self, request: Request, result_id: str = Path(alias="id")) -> JSONResponse:
        """A retained result: score, gate, parameters, verdicts, and links to its images."""
        stored = await self.service.retention.get(result_id, auth.visible_owner(request.state.principal))
        return JSONResponse(result_document(stored, root_path(request)), headers=PRIVATE_HEADERS)

    @get_route(
        "/results/{id}/{kind}",
        auth.requires("feedback"),
        responses={200: {"content": {"image/*": {}}, "description": "kind: source, mask (white = removed) or result"}},
    )
    async def result_image(self, request: Request, kind: str, result_id: str = Path(alias="id")) -> Response:
        data, media_type = await self.service.retention.image(result_id, kind, auth.visible_owner(request.state.principal))
        return Response(data, media_type=media_type, headers=PRIVATE_HEADERS)

    @api.delete("/results/{id}", status_code=204, dependencies=[auth.requires("admin")])
    async def delete_result(self, result_id: str = Path(alias="id")) -> Response:
        """Forget a result: its metadata, its verdicts, and its images unless another result shares them."""
        await self.service.retention.delete(result_id)
        return Response(status_code=204)

    @public_get("/", include_in_schema=False)
    async def home(self, request: Request) -> Response:
        """The service's front page is the playground."""
        return Response(status_code=307, headers={"Location": f"{root_path(request)}/playground"})

    @public_get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI over the OpenAPI, its scripts pinned with Subresource Integrity (serve.rest_api.docs_page)."""
        return docs_page(request)

    @public_get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request) -> HTMLResponse:
        """Try a removal by hand: drop a photo, paint the mask, compare before / after (serve/playground.py)."""
        html = playground_page(self.settings.retention, self.settings.imaging, tiny=self.settings.bundle.is_tiny())
        html = marked_for_its_opener(html, request.headers.get("sec-fetch-site"))
        return HTMLResponse(html, headers=playground_headers())

    @public_get("/annotate", response_class=HTMLResponse)
    async def annotate(self, request: Request) -> HTMLResponse:
        """The annotation page: label retained results yes / no, least certain first."""
        self.service.retention.require_enabled()
        html, headers = annotation_page()
        html = marked_for_its_opener(html, request.headers.get("sec-fetch-site"))
        return HTMLResponse(html, headers=dict(headers))

    @get_route("/annotation/queue", auth.requires("feedback"))
    async def annotation_queue(
        self,
        request: Request,
        limit: int = Query(20, description="how many results", json_schema_extra=_bounds(QUEUE_LIMITS)),
        threshold: float | None = Query(
            None, description="rank by |score - this| (default: each result's own)",
            json_schema_extra=_bounds(GATE_THRESHOLDS),
        ),  # fmt: skip
    ) -> JSONResponse:
        """Results neither the caller's key nor a verdict without a key has judged (auth off: no verdict at all),
        the discriminator's least certain first (|score - threshold| ascending): another key's verdict never
        hides one from a reviewer. Query parameters as /remove's fields: an unknown or repeated one is refused
        (`offset=5` was ignored, a repeated `limit` read as its last)."""
        self.service.retention.require_enabled()
        query = request.query_params
        unknown = [f"query.{name}" for name in dict.fromkeys(query) if name not in ("limit", "threshold")]
        repeated = [{"loc": ("query", name), "msg": "given more than once"} for name in ("limit", "threshold")
                    if len(query.getlist(name)) > 1]  # fmt: skip
        if unknown or repeated:
            raise invalid_request(repeated, unknown)
        principal = request.state.principal
        items, unlabelled = await self.service.retention.queue(
            limit, threshold, auth.visible_owner(principal), auth.verdict_principal(principal)
        )
        base = root_path(request)
        return JSONResponse(
            {
                "unlabelled": unlabelled,
                "threshold": threshold,
                "items": [result_document(stored, base, threshold) for stored in items],
            },
            headers=PRIVATE_HEADERS,
        )


def build_app(args: dict) -> serve.Application:
    """Application builder named by the Serve config: validates args strictly, then binds each deployment
    with its own slice of them (the live knobs come through each deployment's user_config)."""
    settings = AppSettings.model_validate(args or {}).with_hub_pinned()  # one commit for every replica
    auth.check_routes(api)
    scorer = Scorer.bind(settings.args_for(ScorerArgs)) if settings.scorer.enabled else None
    retention = settings.retention
    result_store = ResultStore.bind(retention.model_dump(mode="json")) if retention.enabled else None
    ingress_args = settings.args_for(IngressArgs)
    if "gate" not in settings.model_fields_set:
        del ingress_args["gate"]  # deployed by the CLI or k8s, the gate is the Ingress's user_config
    return Ingress.bind(Remover.bind(settings.args_for(RemoverArgs)), scorer, ingress_args, result_store)
