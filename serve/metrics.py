"""The service's Prometheus metrics, through `ray.serve.metrics` (Ray aggregates every replica's
values and exports them with a `ray_` prefix on each node's metrics port).

Metric objects are created inside the process that records them (a deployment's constructor, or on first use:
`ingress_metrics()`, `proxy_metrics()` in Ray's HTTP proxy); the names here are the one list docs/api.md
"Metrics" and the dashboard use.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

from serve.problems import KIND_BY_SLUG

# fine enough between 1 and 10 s to read a p99 goal like "within 2x of the p99 at saturation", up to Serve's
# request_timeout_s (180 s in the shipped config)
LATENCY_BUCKETS_S = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
    120.0, 180.0,
]  # fmt: skip
# a stage can take well under 5 ms (a small crop's paste or decode, a queue wait with an idle Remover)
STAGE_BUCKETS_S = [0.0005, 0.001, 0.0025, *LATENCY_BUCKETS_S]
# what an answer was, for the latency histogram: instant refusals must not hide how long removals take, and a
# failing replica's 503 must not read as load shedding (serve.problems.Kind.refusal decides which a 503 is), nor a
# key past its quota (`over_quota`)
OUTCOMES = ("ok", "client_error", "refused", "over_quota", "timeout", "server_error", "client_gone")
CLIENT_CLOSED = 499  # the status of a request whose client hung up before its answer (nginx's code)
# the ingress event loop's worst lateness in a second: a few ms is idle, 100 ms is docs/reliability.md's goal
LOOP_LAG_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
# Counts are whole numbers: bounds half-way between them, so Prometheus's histogram_quantile (which spreads a bucket's
# counts over its width, the first bucket from 0) reads a batch of 1 as 1, not 0.5, and Ray's export at the bucket's
# midpoint is the count itself where the buckets are one wide (every attempt count; batches up to 4)
BATCH_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5]
ATTEMPT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]

REQUESTS = "rorem_requests_total"
REQUEST_LATENCY = "rorem_request_latency_seconds"
STAGE_LATENCY = "rorem_stage_latency_seconds"
BATCH_SIZE = "rorem_batch_size"
GATE_OUTCOMES = "rorem_gate_outcomes_total"
GATE_ATTEMPTS = "rorem_gate_attempts"
SCORES = "rorem_removal_score"
RETAINED = "rorem_retained_total"
FEEDBACK = "rorem_feedback_total"
KEYS_FILE_ERRORS = "rorem_auth_keys_file_errors_total"
QUOTA_LEDGER_ERRORS = "rorem_quota_ledger_errors_total"
LIVE_REFUSALS = "rorem_live_settings_refused_total"
LOOP_LAG = "rorem_loop_lag_seconds"
PROXY_REFUSALS = "rorem_proxy_refusals_total"
PROXY_ANSWERS_FOR_RAY = "rorem_proxy_answers_for_ray_total"
NO_PROBLEM = "none"  # the `problem` label of an answer that is no problem

STAGES = (
    "read", "cpu_wait", "decode", "queue_wait", "upload", "vae_encode", "unet", "vae_decode", "download", "paste",
    "score", "encode",
)  # fmt: skip
"""In the order a request goes through them (a Server-Timing header lists them so): the gate scores the pasted
image."""
# the model deployments record the others
INGRESS_STAGES = frozenset({"read", "cpu_wait", "decode", "score", "paste", "encode"})


class IngressMetrics:
    """Recorded by the entry points (REST and gRPC)."""

    def __init__(self):
        self.requests = Counter(
            REQUESTS,
            description=f"Requests answered, by route, protocol, status and problem (its slug, or {NO_PROBLEM}).",
            tag_keys=("route", "protocol", "status", "problem"),
        )
        self.latency = Histogram(
            REQUEST_LATENCY,
            description=f"End-to-end latency of a request inside the service, in seconds; outcome is one of "
            f"{', '.join(OUTCOMES)}.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route", "protocol", "outcome"),
        )
        self.stages = StageMetrics()
        self.gate_outcomes = Counter(
            GATE_OUTCOMES, description="Removals by gate mode and verdict.", tag_keys=("mode", "verdict")
        )
        self.gate_attempts = Histogram(
            GATE_ATTEMPTS, description="Removal attempts per request.", boundaries=ATTEMPT_BUCKETS, tag_keys=("mode",)
        )
        self.scores = Histogram(
            SCORES,
            description="Discriminator score of the kept result.",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5],
            tag_keys=("route",),
        )
        self.retained = Counter(
            RETAINED,
            description="Removal results to retain, by outcome: stored, or failed (answered without X-Result-Id).",
            tag_keys=("outcome",),
        )
        self.feedback = Counter(FEEDBACK, description="Verdicts received on retained results.", tag_keys=("verdict",))
        self.loop_lag = Histogram(
            LOOP_LAG,
            description="The worst lateness of the Ingress replica's event loop in each second, in seconds "
            "(serve.loop_lag): the longest any request on that replica waited for the loop in that second.",
            boundaries=LOOP_LAG_BUCKETS_S,
        )
        self.keys_file_errors = _keys_file_errors()
        self.quota_ledger_errors = Counter(
            QUOTA_LEDGER_ERRORS,
            description="Quota ledger calls that failed: a grant (the request was admitted unmetered) or a release.",
        )

    def answered(
        self,
        route: str,
        protocol: str,
        status: str,
        seconds: float,
        http_status: int,
        problem: str | None = None,
        over_quota: bool = False,
    ) -> None:
        """`status`: the protocol's own (an HTTP code or a gRPC code name); `http_status`: the HTTP status the
        answer has or would have over REST (a problem's); `problem`: the answer's problem slug, if any;
        `over_quota`: the answer is a key's quota's refusal. The last three decide its outcome."""
        tags = {"route": route, "protocol": protocol}
        self.requests.inc(tags={**tags, "status": status, "problem": problem or NO_PROBLEM})
        self.latency.observe(seconds, tags={**tags, "outcome": outcome_of(http_status, problem, over_quota)})


def outcome_of(http_status: int, problem: str | None = None, over_quota: bool = False) -> str:
    """One of OUTCOMES for an answer's HTTP status and problem slug (CLIENT_CLOSED: the client hung up first). A
    503 is `refused` only for a refusal kind (overloaded, stopping, not-ready): replica-failed and the unavailable
    scorer or store are server errors, which a dying replica must show as. A 429 of a key's quota is `over_quota`:
    the client's own limit, where `refused` is the service shedding load."""
    if http_status < 400:
        return "ok"
    if http_status == CLIENT_CLOSED:
        return "client_gone"
    if over_quota:
        return "over_quota"
    if KIND_BY_SLUG[problem].refusal if problem in KIND_BY_SLUG else http_status == 429:
        return "refused"
    if http_status == 504:
        return "timeout"
    return "server_error" if http_status >= 500 else "client_error"


class StageMetrics:
    def __init__(self):
        self.histogram = Histogram(
            STAGE_LATENCY,
            description=f"Time per pipeline stage, in seconds; stage is one of {', '.join(STAGES)}.",
            boundaries=STAGE_BUCKETS_S,
            tag_keys=("stage",),
        )

    def observe(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.histogram.observe(seconds, tags={"stage": stage})


class BatchMetrics:
    """Recorded by a model deployment for each engine call."""

    def __init__(self, model: str):
        self.model = model
        self.batch_size = Histogram(
            BATCH_SIZE,
            description="Jobs per engine call (dynamic batching), by model.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model",),
        )
        self.stages = StageMetrics()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size, tags={"model": self.model})


_ingress_metrics: IngressMetrics | None = None


def ingress_metrics() -> IngressMetrics:
    """The process's one IngressMetrics, created on first use inside the replica (REST middleware and
    the Ingress deployment share it)."""
    global _ingress_metrics
    if _ingress_metrics is None:
        _ingress_metrics = IngressMetrics()
    return _ingress_metrics


_live_refusals: Counter | None = None


def live_refusals() -> Counter:
    """The process's one counter of refused live settings (serve.live), created on first use inside the replica."""
    global _live_refusals
    if _live_refusals is None:
        _live_refusals = Counter(
            LIVE_REFUSALS,
            description="Live settings (a user_config) a replica refused as invalid, keeping its previous ones.",
        )
    return _live_refusals


def _keys_file_errors() -> Counter:
    return Counter(
        KEYS_FILE_ERRORS, description="Times the API keys file became unreadable or invalid (every key refused)."
    )


class ProxyMetrics:
    """Recorded in Ray's HTTP proxy by serve.proxy_middleware and serve.proxy_connections: what they refuse
    themselves is outside Ray's request counts, and neither that nor what they answer in place of Ray's own answers
    reaches the Ingress's."""

    def __init__(self):
        self.refusals = Counter(
            PROXY_REFUSALS,
            description="Requests Ray's HTTP or gRPC proxy refused itself before any replica saw them, by protocol "
            "and problem slug.",
            tag_keys=("protocol", "problem"),
        )
        self.answers_for_ray = Counter(
            PROXY_ANSWERS_FOR_RAY,
            description="Answers Ray's HTTP proxy gave for a routed request that no replica answered (Ray's own "
            "404, 408, 429 or 503, or an Ingress that died mid-request), by problem slug: Ray counts these "
            "requests, by status only.",
            tag_keys=("problem",),
        )
        self.keys_file_errors = _keys_file_errors()

    def refused(self, problem: str, protocol: str = "http") -> None:
        """`protocol`: http, or grpc (serve.grpc_gate); counted apart, as the dashboard's error shares are."""
        self.refusals.inc(tags={"protocol": protocol, "problem": problem})

    def answered_for_ray(self, problem: str) -> None:
        self.answers_for_ray.inc(tags={"problem": problem})


_proxy_metrics: ProxyMetrics | None = None


def proxy_metrics() -> ProxyMetrics:
    """The proxy process's one ProxyMetrics, created on first use (Ray's metrics take no Ray to create or record:
    the middlewares run as they are in unit tests)."""
    global _proxy_metrics
    if _proxy_metrics is None:
        _proxy_metrics = ProxyMetrics()
    return _proxy_metrics
