"""The service's settings: one pydantic model, read from the Serve config's application `args`.

Every default lives here. Deployment-level knobs Ray Serve owns itself (replicas, num_gpus,
max_ongoing_requests, max_queued_requests, backpressure) live in the same YAML's `deployments`.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from engines.cache_layout import tiny_bundle_folder
from engines.errors import BundleError, validation_line
from engines.gate import GateMode
from engines.hub_refs import (
    HUB_PREFIX,
    ROREM_PIPELINE,
    SDXL_INPAINTING_PIPELINE,
    HubRef,
    discriminator_trunk_problem,
    is_sdxl_inpainting_pipeline,
)
from engines.imaging import DecodeLimits
from engines.sampling import DEFAULT_STEPS, DEFAULT_STRENGTH, steps_run

_DECODE = DecodeLimits()

if TYPE_CHECKING:
    from engines.authors_layout import AuthorsLayout
    from engines.bundle import Bundle

BUNDLE_ENV = "ROREM_BUNDLE"
INSTANCE_ENV = "ROREM_INSTANCE_ID"  # set by `python -m serve run` on its Ray processes; /healthz returns it
_HOST_NAME = re.compile(r"\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")  # a DNS name or IPv4, or [IPv6]
DATABASE_URL_ENV = "ROREM_RETENTION_DATABASE_URL"
MAX_AGE_DAYS = 36_500  # 100 years: retention.max_age_days's bound, far within a datetime's range
MAX_RETRY_AFTER_S = 600  # the longest Retry-After the service sends, configured or measured


def _not_a_bool(value):
    """pydantic reads true as 1 (lax mode, which multipart fields, all text, need): `"quality": true` is a mistake."""
    if isinstance(value, bool):
        raise ValueError("a number, not true / false")
    return value


NotABool = BeforeValidator(_not_a_bool)


def _a_number(annotation) -> bool:
    """Whether a field's type is a number (int or float, optional or in a union); a bool is not one."""
    import types
    import typing

    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return any(_a_number(arg) for arg in typing.get_args(annotation))
    return False


class NumbersNotBools(BaseModel):
    """Every number field of a subclass refuses true / false, which pydantic's lax mode reads as 1 / 0 (YAML's
    `imaging.max_exif_bytes: false` was 0: every photo with EXIF got 413): one rule for every settings model and
    the keys file, so a field added later cannot forget it."""

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_not_bools(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and info.field_name and _a_number(cls.model_fields[info.field_name].annotation):
            return _not_a_bool(value)
        return value


# Bounds shared by the settings (the defaults) and the per-request options (serve/protocol.py), declared once.
Dilation = Annotated[int, Field(ge=0, le=256), NotABool]
GATE_THRESHOLDS = (0.0, 10.0)  # a gate threshold's range (also the annotation queue's `threshold`)
GateThreshold = Annotated[
    float, Field(ge=GATE_THRESHOLDS[0], le=GATE_THRESHOLDS[1], allow_inf_nan=False), NotABool
]
Attempts = Annotated[int, Field(ge=1, le=8), NotABool]
Quality = Annotated[int, Field(ge=1, le=100), NotABool]
BatchSize = Annotated[int, Field(ge=1, le=64)]
BatchWait = Annotated[float, Field(ge=0.0, le=1.0), NotABool]


def _bucket_sides(buckets: list[int]) -> list[int]:
    if any(b <= 0 or b % 64 for b in buckets):
        raise ValueError(f"bucket sides must be positive multiples of 64, got {buckets}")
    return sorted(set(buckets))


# the model input sides (the service's imaging.buckets, the release gate's --buckets): sorted, no repeats
Buckets = Annotated[list[int], Field(min_length=1), AfterValidator(_bucket_sides)]


def invalid_because(exc: Exception, root: str = "") -> str:
    """One line for an invalid file or value, never quoting its text (a keys file holds secrets, and YAML's and
    pydantic's own messages quote what they saw): each pydantic error as `field: message` (one about the whole:
    `root: message`, or the message alone without a root; its message names the keys), a YAML error by its place
    in the file."""
    if isinstance(exc, ValidationError):
        return validation_line(exc.errors(include_url=False, include_input=False), root)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc.context}"
    if isinstance(exc, yaml.YAMLError):
        return f"invalid YAML ({type(exc).__name__})"
    return str(exc)


class _Strict(NumbersNotBools):
    """Unknown keys refused; no float setting is infinite or NaN (an infinite timeout or size overflowed where it
    was turned into an int or a deadline, outside any check); no number is true / false (NumbersNotBools)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AuthorsSource(_Strict):
    """The published layout; each entry a local path or hf:OWNER/NAME[@COMMIT][/SUBPATH] (without a commit: the
    commit the default branch is at, with a warning)."""

    base: str = Field(
        SDXL_INPAINTING_PIPELINE,
        description="the SDXL-inpainting pipeline (VAE, text encoders, scheduler); or the RORem pipeline itself",
    )
    unet: str | None = Field(None, description="RORem UNet; omitted: base's unet/ (base then names the RORem pipeline)")
    lcm_lora: str = Field(
        description="the LCM LoRA fused at import: the service samples 4 LCM steps, right only with it"
    )
    discriminator: str | None = Field(
        None, description="folder: pytorch_lora_weights.safetensors + cls_pred_branch.safetensors or .pt"
    )
    discriminator_unet: str | None = Field(
        None,
        description="the SDXL-inpainting UNet the discriminator applies to; required with discriminator unless base "
        "is that pipeline on the hub (hf:diffusers/stable-diffusion-xl-1.0-inpainting-0.1)",
    )

    @model_validator(mode="after")
    def _rorem_and_its_discriminator(self) -> "AuthorsSource":
        """Refused before Ray starts: the SDXL-inpainting UNet served as RORem, or a discriminator built on RORem's
        UNet, would load and answer without a word."""
        for name in ("base", "unet", "lcm_lora", "discriminator", "discriminator_unet"):
            ref = getattr(self, name)
            if ref and ref.startswith(HUB_PREFIX):
                try:
                    HubRef.parse(ref)
                except BundleError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if self.unet is None and is_sdxl_inpainting_pipeline(self.base):
            raise ValueError(
                f"set unet, or set base to the RORem pipeline itself ({ROREM_PIPELINE}): the SDXL-inpainting "
                "pipeline's unet/ is not RORem's"
            )
        problem = discriminator_trunk_problem(self.base, self.discriminator, self.discriminator_unet)
        if problem:
            raise ValueError(problem)
        return self

    def layout(self) -> AuthorsLayout:
        from engines.authors_layout import AuthorsLayout

        fields = ("base", "unet", "lcm_lora", "discriminator", "discriminator_unet")
        return AuthorsLayout(**{name: getattr(self, name) for name in fields})


class BundleSettings(_Strict):
    path: str | None = Field(None, description=f"project bundle folder (the CLI also reads {BUNDLE_ENV})")
    authors: AuthorsSource | None = Field(
        None,
        description="the authors' published layout, imported once into cache_dir; None with path None: tiny bundle",
    )
    prompt: str | None = Field(
        None,
        description="prompt whose embeddings are baked in at import (none: '', as training used); with path: "
        "the bundle's own, or an error",
    )
    import_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="weights' dtype at import (none: float16); with path: the bundle's own, or an error"
    )
    cache_dir: str = Field("~/.cache/rorem", description="where imported (and tiny) bundles are kept")
    tiny_seed: int = Field(0, description="seed of the tiny bundle's random weights")
    verify: bool = Field(
        True,
        description="check every bundle file at start: inside the folder, its size; the sha256 of the weights and "
        "exports is checked as a replica reads them either way (only the files it loads)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "BundleSettings":
        """Refused before Ray starts, not by the replica's open_bundle (the deployment then fails to start)."""
        if self.path and self.authors is not None:
            raise ValueError(
                "set either bundle.path or bundle.authors, not both (--bundle and ROREM_BUNDLE set bundle.path)"
            )
        return self

    def is_tiny(self) -> bool:
        return not self.path and self.authors is None

    def folder(self) -> Path | None:
        """The bundle folder these settings name, where it is known without torch: the path, or the tiny bundle's
        (made at the first start); None for the authors' layout (its import's name hashes its inputs)."""
        if self.path:
            return Path(self.path).expanduser()
        return tiny_bundle_folder(self.cache_dir, self.tiny_seed, self.prompt) if self.is_tiny() else None

    def open(self) -> "Bundle":
        """Load (importing or generating first where needed) the bundle these settings name."""
        from engines.sources import open_bundle

        return open_bundle(
            path=self.path,
            authors=self.authors.layout() if self.authors else None,
            cache_dir=self.cache_dir,
            prompt=self.prompt,
            import_dtype=self.import_dtype,
            tiny_seed=self.tiny_seed,
            verify=self.verify,
        )


def runner_path_refused(runner: str, runner_path) -> str | None:
    """Why this runner_path cannot go with this runner: the torch runner loads the bundle's UNet and would
    serve it while the file named was meant to be served (the service's and the release gate's rule)."""
    if runner_path and runner == "torch":
        return (
            f"runner_path {runner_path} is an exported UNet, which only the onnx and tensorrt runners run, and the "
            "runner is torch: set the runner to the file's (onnx or tensorrt) or leave runner_path out"
        )
    return None


class EngineSettings(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bf16 on cuda, fp32 on cpu"
    )
    compile: bool = Field(False, description="torch.compile the UNet")
    steps: int | None = Field(None, ge=1, le=50, description=f"None: the bundle's default ({DEFAULT_STEPS})")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description=f"None: the bundle's default ({DEFAULT_STRENGTH:g})"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch's intra-op threads; None: torch's default")
    runner: Literal["torch", "onnx", "tensorrt"] = Field(
        "torch", description="how the UNet runs: PyTorch, an exported ONNX graph (ONNX Runtime), a TensorRT plan"
    )
    runner_path: str | None = Field(
        None,
        description="an exported file for the onnx or tensorrt runner, used unchecked; None: the bundle's current "
        "recorded export (checked)",
    )
    cuda_graph: bool = Field(
        True,
        description="on CUDA: capture every (bucket, padded batch size) at start and replay it (torch runner: "
        "encode, denoise and decode stages; tensorrt: each UNet shape); no effect on the CPU or with the onnx runner. "
        "Either way, on CUDA every runner runs each of those shapes at start and pads a batch to one of them",
    )
    export_missing: bool = Field(
        False,
        description="onnx runner: export (and verify) the UNet into the bundle folder at start when the bundle has no "
        "current export (none recorded, unverified, or made from other weights); checked at 256 and 512 px and "
        "each of imaging.buckets",
    )
    hung_after_s: float | None = Field(
        300.0,
        gt=0,
        description="an engine call running longer than this fails the replica's health check, so Serve restarts "
        "it (None: never); above the slowest batch the device can take",
    )

    @model_validator(mode="after")
    def _runner_path_for_an_exported_runner(self) -> "EngineSettings":
        refused = runner_path_refused(self.runner, self.runner_path)
        if refused:
            raise ValueError(f"engine.{refused}")
        return self

    @model_validator(mode="after")
    def _tensorrt_on_cuda(self) -> "EngineSettings":
        """Refused before Ray starts: every Remover replica would fail on it (engines.remover) after loading."""
        if self.runner == "tensorrt" and self.device == "cpu":
            raise ValueError("engine.runner tensorrt runs on a CUDA GPU only: set engine.device to cuda or auto")
        return self

    @model_validator(mode="after")
    def _a_step_to_run(self) -> "EngineSettings":
        """Refused before Ray starts: every Remover replica would fail on it (engines.lcm) after loading the bundle.
        Only where both are set: either left to the bundle is the bundle's (any of 1-50 steps), unknown here."""
        if self.steps is not None and self.strength is not None and steps_run(self.steps, self.strength) < 1:
            raise ValueError(
                f"engine.strength {self.strength:g} leaves no step of engine.steps {self.steps} (steps x strength must "
                "reach 1): raise engine.strength or engine.steps"
            )
        return self


class BucketBatching(_Strict):
    max_batch_size: BatchSize | None = Field(None, description="None: batching.max_batch_size")
    batch_wait_timeout_s: BatchWait | None = Field(
        None, description="None: batching.batch_wait_timeout_s (live: the Remover's user_config)"
    )


class BatchingSettings(_Strict):
    """One batching queue per bucket in the Remover: a 1024 crop costs ~4x a 512 one, so each bucket
    has its own batch size and wait, and a batch answers as soon as it is done."""

    max_batch_size: BatchSize = Field(8, description="every bucket's, unless per_bucket says otherwise")
    batch_wait_timeout_s: BatchWait = Field(
        0.01, description="how long a bucket's queue waits to fill a batch (live: the Remover's user_config)"
    )
    per_bucket: dict[int, BucketBatching] = Field(
        {}, description="by bucket side, e.g. {1024: {max_batch_size: 4}}; sides must be imaging.buckets"
    )

    def for_bucket(self, side: int) -> tuple[int, float]:
        """(max_batch_size, batch_wait_timeout_s) of one bucket's queue."""
        own = self.per_bucket.get(side) or BucketBatching()
        wait = self.batch_wait_timeout_s if own.batch_wait_timeout_s is None else own.batch_wait_timeout_s
        return own.max_batch_size or self.max_batch_size, wait


class ImagingSettings(_Strict):
    buckets: Buckets = Field([512, 1024], description="model input sides, multiples of 64")
    crop_margin: int = Field(
        128,
        ge=1,
        le=1024,
        description="context pixels around the mask's bounding box (at least 1: the feathered edge needs an "
        "unmasked pixel inside the crop)",
    )
    dilate: Dilation = Field(20, description="default mask dilation in pixels (the reference intends 20)")
    feather: int = Field(
        6,
        ge=0,
        le=64,
        description="blend ramp inside the dilated mask, in pixels (at most dilate + 1: every pixel of the mask as "
        "given is the model's)",
    )
    max_upload_bytes: int = Field(_DECODE.max_bytes, ge=1024, description="the files of one request together")
    max_megapixels: float = Field(_DECODE.max_megapixels, gt=0, description="decoded size of one image")
    # cost bounds checked from a file's structure before its pixels are decoded (engines.imaging.DecodeLimits)
    max_side: int = Field(_DECODE.max_side, ge=1, description="pixels on the longer side")
    max_chunks: int = Field(
        _DECODE.max_chunks,
        ge=64,
        description="PNG chunks, JPEG header segments, GIF blocks, TIFF tag values; the WebP chunks read to tell a "
        "lossless one (past them it is taken for lossy)",
    )
    max_jpeg_scans: int = Field(_DECODE.max_jpeg_scans, ge=1, description="progressive scans in a JPEG")
    max_exif_bytes: int = Field(_DECODE.max_exif_bytes, ge=0, description="size of an image's EXIF block")
    max_rle_bytes: int = Field(_DECODE.max_rle_bytes, ge=0, description="size of an RLE-compressed BMP")
    decode_timeout_s: float = Field(20.0, gt=0, description="CPU seconds decoding an upload may take: past them, 413")
    jpeg_quality: Quality = Field(95, description="JPEG / WebP quality of replies, unless a request asks")

    def decode_limits(self) -> DecodeLimits:
        """What an upload may cost to decode, in the service and in the release gate (training.evaluate) alike."""
        return DecodeLimits(
            max_bytes=self.max_upload_bytes, max_megapixels=self.max_megapixels, max_side=self.max_side,
            max_chunks=self.max_chunks, max_jpeg_scans=self.max_jpeg_scans, max_exif_bytes=self.max_exif_bytes,
            max_rle_bytes=self.max_rle_bytes,
        )  # fmt: skip


class ScorerSettings(_Strict):
    """The discriminator deployment: its own device, precision and batching."""

    enabled: bool = Field(
        True, description="deploy the Scorer (the bundle must hold a discriminator); false needs gate.mode: off"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bf16 on cuda, fp32 on cpu"
    )
    max_batch_size: BatchSize = Field(8, description="largest scoring batch")
    batch_wait_timeout_s: BatchWait = Field(
        0.01, description="how long the queue waits to fill a batch (live: the Scorer's user_config)"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch's intra-op threads; None: torch's default")
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="a gate scoring not answered in time counts as scorer unavailable (gate.on_scorer_error)",
    )
    hung_after_s: float | None = Field(
        120.0, gt=0, description="a scoring call running longer than this fails the health check (None: never)"
    )


class GateSettings(_Strict):
    """Quality gating with the discriminator's score (the paper judges success at 0.5)."""

    mode: GateMode = Field(
        "annotate",
        description="off: no scoring; annotate: report the score; retry: new seeds while below the threshold, "
        "keep the best; reject: like retry, then 422 removal-failed if no attempt passes",
    )
    threshold: GateThreshold = Field(0.5, description="the passing score")
    max_attempts: Attempts = Field(3, description="attempts for retry / reject (the first one included)")
    allow_request_override: bool = Field(True, description="clients may choose gate, gate_threshold, max_attempts")
    max_model_calls: int = Field(
        8,
        ge=2,
        le=16,
        description="model calls (removals + scorings) one request may cause: an attempt is a removal per crop, plus"
        " a scoring per crop when the gate scores; a mask that needs more crops (after merging) than"
        " max_model_calls // 2 (without a Scorer: max_model_calls) has its regions share windows, the pair losing the"
        " least resolution first, until it fits; attempts are capped to fit",
    )
    on_scorer_error: Literal["fail_open", "fail_closed"] = Field(
        "fail_open",
        description="scorer unavailable: fail_open answers with the unscored result (X-Gate: unscored); "
        "fail_closed answers 503 for retry / reject requests",
    )

    @model_validator(mode="after")
    def _default_attempts_within_the_cap(self) -> "GateSettings":
        if 2 * self.max_attempts > self.max_model_calls:
            raise ValueError(
                f"max_attempts {self.max_attempts} needs max_model_calls >= {2 * self.max_attempts} (an attempt may"
                " cost a removal and a scoring)"
            )
        return self


class AuthSettings(_Strict):
    """Optional API keys (serve/auth.py); off by default, for a local service on loopback."""

    enabled: bool = Field(False, description="require an API key (needs keys_file)")
    keys_file: str | None = Field(
        None, description="YAML of hashed keys (`python -m serve new-key`); in Kubernetes a mounted Secret"
    )
    reload_interval_s: float = Field(10.0, ge=0.0, description="how often a changed keys file is re-read")
    quota_window_s: int = Field(
        60,
        ge=1,
        le=3600,
        description="the window a key's requests_per_minute counts over, in whole seconds (serve/quotas.py; other "
        'than 60: the RateLimit fields name the rate after it, e.g. "3600s")',
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="the Host names the keyed routes answer (DNS rebinding); null: loopback names while auth is "
        "off, any with auth on; \"*\": any",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str] | None) -> list[str] | None:
        """Names as a Host header carries them without its port: a port, an unbracketed IPv6 address or an empty
        list would refuse every request."""
        if hosts is None:
            return None
        if not hosts:
            raise ValueError('auth.allowed_hosts is empty: every request would be refused (null: the default; "*": any)')
        names = [host.strip().lower().rstrip(".") for host in hosts]
        wrong = [h for h, name in zip(hosts, names) if name != "*" and not _HOST_NAME.fullmatch(name)]
        if wrong:
            raise ValueError(
                f"auth.allowed_hosts {wrong}: host names without a port (rorem.internal, 10.0.0.5, [::1])"
            )
        return names

    @model_validator(mode="after")
    def _enabled_needs_keys(self) -> "AuthSettings":
        if self.enabled and not self.keys_file:
            raise ValueError("auth.enabled needs auth.keys_file")
        return self


class OverloadSettings(_Strict):
    """Shedding load: an ingress replica answers 429 when a request would wait longer than
    `max_queue_wait_s` (from the rate it measures), or beyond `max_in_flight` requests of model work;
    a full model queue (the deployments' max_queued_requests) answers 503. All carry Retry-After."""

    max_queue_wait_s: float | None = Field(
        5.0, gt=0, description="refuse (429) a request expected to wait longer than this; null: by count only"
    )
    max_in_flight: int = Field(48, ge=1, description="removals + scorings in progress per ingress replica")
    # Body parsing and JSON reply encoding run in worker threads, in short steps (serve.uploads). That work
    # holds the GIL, so a second thread is not faster, only one more rival of the event loop for the GIL
    # (measured: the loop's worst stall grows with each thread: 5-10 ms with 1, 63-73 with 2, 150-270 with 4).
    offload_threads: int = Field(1, ge=1, le=8, description="ingress worker threads for body parsing / JSON replies")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="how many nice steps the ingress's worker threads (parse, decode, encode) run below its event "
        "loop: on busy cores the loop and the proxy get a core first (serve.worker_threads); 0: same priority",
    )
    switch_interval_s: float = Field(
        0.001,
        gt=0,
        le=0.005,
        description="the ingress's GIL switch interval (CPython's: 5 ms): the loop answers sooner",
    )
    retry_after_s: int = Field(
        2,
        ge=1,
        le=MAX_RETRY_AFTER_S,
        description="the Retry-After of a 429 past max_in_flight and of a 503 from a full queue, the Ingress's (Ray's "
        "backpressure_config, set from it) or a model's (a 429 past max_queue_wait_s says when the wait is back "
        "under it; a quota's, when its window resets), and of the 503s not-ready, scorer-unavailable and "
        "replica-failed and the HTTP and gRPC proxies' stopping (the proxies say the longest of their applications'; "
        "retention-unavailable says when the store is tried again)",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="a request body must arrive within this many seconds of the request, else 408 body-timeout; "
        "the Serve proxy reads it whole first, so no replica holds a request while its body arrives",
    )
    proxy_buffer_bytes: int = Field(
        1024**3,
        ge=1,
        description="bytes of request bodies one Serve proxy holds at once while they arrive; a request whose "
        "body would take it past this is answered 503 (at least the largest body: imaging.max_upload_bytes x 4/3 "
        "+ 64 KiB)",
    )


class S3Settings(_Strict):
    """An S3-compatible bucket; credentials come from boto3's usual chain, never from this file."""

    bucket: str = Field(description="bucket name")
    prefix: str = Field("rorem/results", description="key prefix inside the bucket")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2); None: AWS")
    region: str | None = Field(None, description="the bucket's region; None: boto3's default")


class ObjectStoreSettings(_Strict):
    path: str = Field(
        "~/.cache/rorem/results", description="local folder of the retained images (and of the default SQLite file)"
    )
    s3: S3Settings | None = Field(None, description="keep the images in an S3-compatible bucket instead (needs boto3)")


class RetentionSettings(_Strict):
    """Opt-in keeping of removal results for human feedback (serve/retention); off by default."""

    enabled: bool = Field(False, description="keep results, offer /feedback, /results and the /annotate page")
    default_retain: bool = Field(
        False,
        description="false: only requests with retain=true are kept; true: every successful removal unless retain=false",
    )
    object_store: ObjectStoreSettings = Field(ObjectStoreSettings(), description="where the images go")
    database_url: str | None = Field(
        None,
        description=f"SQLAlchemy URL of the metadata (sqlite:///..., postgresql+psycopg://...); None: "
        f"${DATABASE_URL_ENV} if set, else results.db in object_store.path",
    )
    max_results: int | None = Field(
        10_000, ge=1, description="keep at most this many results; the oldest unlabelled go first"
    )
    max_age_days: float | None = Field(
        30.0,
        gt=0,
        le=MAX_AGE_DAYS,
        description=f"delete results older than this many days (at most {MAX_AGE_DAYS}: a date further back is "
        "out of range; null: kept until max_results pushes them out)",
    )
    max_results_per_owner: int | None = Field(
        None,
        ge=1,
        description="with API keys, keep at most this many results per owner (a key's team, else its name), its "
        "own oldest going first, so one owner cannot push out another's; null: only max_results",
    )
    save_timeout_s: float = Field(
        5.0,
        gt=0,
        description="a retained removal waits at most this long for its result to be stored, and never past its "
        "own deadline; then it is answered without X-Result-Id (counted failed) and the save is given up",
    )

    def objects_folder(self) -> Path:
        return Path(self.object_store.path).expanduser() / "objects"

    def resolved_database_url(self) -> str:
        """The URL in the config, else the environment's (keeps a password out of the config), else SQLite."""
        if self.database_url:
            return self.database_url
        if os.environ.get(DATABASE_URL_ENV):
            return os.environ[DATABASE_URL_ENV]
        return f"sqlite:///{Path(self.object_store.path).expanduser() / 'results.db'}"

    def database_url_refused(self, driver: bool = True) -> str | None:
        """Why the store's database URL cannot work (database_url_problem), as `<where it is set>: <why>`; None where
        it can, or retention is off and the config names no URL. Checked before Ray starts: the service started, said
        ready and answered every retained removal without X-Result-Id and the result routes 503 for ever."""
        if not (self.enabled or self.database_url):
            return None
        problem = database_url_problem(self.resolved_database_url(), driver)
        if problem is None:
            return None
        where = "retention.database_url" if self.database_url else f"${DATABASE_URL_ENV} (retention.database_url unset)"
        return f"{where}: {problem}"


def database_url_problem(url: str, driver: bool = True) -> str | None:
    """Why SQLAlchemy cannot open this URL, found without connecting: it cannot be read, names a database SQLAlchemy
    has no dialect for, or (`driver`) one whose driver this Python cannot import. The URL is never quoted: it may
    hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:///results.db or postgresql+psycopg://user@host/database"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return f"not a URL SQLAlchemy can read: give dialect[+driver]://user:password@host[:port]/database, {example}"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return f"SQLAlchemy has no database {parsed.drivername!r}: {example}"
    if driver:
        try:
            dialect.import_dbapi()
        except ImportError as exc:
            return (
                f"{parsed.drivername}'s driver, the Python module {exc.name or 'it imports'}, is not installed here: "
                f"install it or give a URL whose driver is ({example})"
            )
    return None


class _BundleArgs(_Strict):
    bundle: BundleSettings = Field(BundleSettings(), description="which model weights every model deployment loads")


class RemoverArgs(_BundleArgs):
    """The Remover's constructor arguments: a change restarts its (GPU) replicas."""

    engine: EngineSettings = EngineSettings()
    batching: BatchingSettings = BatchingSettings()
    imaging: ImagingSettings = ImagingSettings()

    @model_validator(mode="after")
    def _batching_buckets_exist(self) -> "RemoverArgs":
        unknown = sorted(set(self.batching.per_bucket) - set(self.imaging.buckets))
        if unknown:
            raise ValueError(
                f"batching.per_bucket names sides {unknown} that are not imaging.buckets {self.imaging.buckets}"
            )
        return self

    def batch_sizes(self) -> dict[int, int]:
        """Each bucket's largest batch: what the Remover warms (and captures) and queues."""
        return {side: self.batching.for_bucket(side)[0] for side in self.imaging.buckets}

    def batch_waits(self) -> dict[int, float]:
        """Each bucket's batch wait: the Remover's live knob (RemoverLive)."""
        return {side: self.batching.for_bucket(side)[1] for side in self.imaging.buckets}


class ScorerArgs(_BundleArgs):
    """The Scorer's constructor arguments: a change restarts its (GPU) replicas."""

    scorer: ScorerSettings = ScorerSettings()


class IngressArgs(ScorerArgs):
    """The Ingress's constructor arguments (RemovalService reads them all): every section but the Remover's
    engine and batching; the gate comes live too (IngressLive)."""

    imaging: ImagingSettings = ImagingSettings()
    gate: GateSettings = GateSettings()
    auth: AuthSettings = AuthSettings()
    overload: OverloadSettings = OverloadSettings()
    retention: RetentionSettings = RetentionSettings()
    request_timeout_s: float = Field(
        120.0, gt=0, description="a request still unanswered after this answers 504 (clients may ask for less)"
    )

    @model_validator(mode="after")
    def _gate_needs_scorer(self) -> "IngressArgs":
        """Checked where the gate is given: the deployed args hold no gate (it is the Ingress's user_config,
        checked when it is applied: serve.config.with_live)."""
        if "gate" in self.model_fields_set and not self.scorer.enabled and self.gate.mode != "off":
            raise ValueError(
                f"gate.mode {self.gate.mode!r} needs the Scorer: set scorer.enabled: true or gate.mode: off"
            )
        return self


class AppSettings(IngressArgs, RemoverArgs):
    """The application's `args`: every section; each deployment gets its slice (args_for)."""

    def model_devices(self) -> dict[str, tuple[str, str]]:
        """Each model deployment built: (the key of its device, that device), by deployment name."""
        devices = {"Remover": ("engine.device", self.engine.device)}
        if self.scorer.enabled:
            devices["Scorer"] = ("scorer.device", self.scorer.device)
        return devices

    def with_hub_pinned(self) -> "AppSettings":
        """These settings with each hub piece of bundle.authors at the commit it is at now (a warning names each):
        resolved once where the application is built (serve.app.build_app), so every replica, one restarted
        later too, imports the same weights; each resolving a branch at its own start served other weights once
        the branch moved."""
        if self.bundle.authors is None:
            return self
        from dataclasses import asdict

        from engines.authors_layout import pin_hub_pieces

        authors = AuthorsSource.model_validate(asdict(pin_hub_pieces(self.bundle.authors.layout())))
        return self.model_copy(update={"bundle": self.bundle.model_copy(update={"authors": authors})})

    def args_for(self, model: type[BaseModel]) -> dict:
        """A deployment's slice of these settings (RemoverArgs, ScorerArgs, IngressArgs), as its constructor
        argument."""
        return self.model_dump(mode="json", include=set(model.model_fields))


# ---------------------------------------------------------------------------------------------------
# Live knobs: each model deployment's Serve `user_config`. A change of the application's `args` gives
# every deployment of the application a new code version (Ray restarts all replicas); a change of a
# deployment's `user_config` only calls its replicas' `reconfigure`. So the knobs below are moved out of
# `args` into `deployments[].user_config` wherever a Serve config is rendered (live_serve_app).


class IngressLive(_Strict):
    """The Ingress's user_config: the gate (RemovalService reads it on every request)."""

    gate: GateSettings = GateSettings()


class RemoverLive(_Strict):
    """The Remover's user_config: each bucket's batch wait, by bucket side."""

    batch_wait_timeout_s: dict[int, BatchWait]

    def waits_for(self, buckets: list[int]) -> dict[int, float]:
        """The waits of exactly these buckets: a user_config replaces the live settings whole (as the Ingress's and
        the Scorer's do), so a side left out would keep a wait the config no longer says."""
        sides = set(self.batch_wait_timeout_s)
        wrong = {"no wait for": sorted(set(buckets) - sides), "waits for": sorted(sides - set(buckets))}
        if any(wrong.values()):
            said = ", ".join(f"{what} sides {found}" for what, found in wrong.items() if found)
            raise ValueError(
                f"batch_wait_timeout_s: {said}: give a wait for each of imaging.buckets {buckets} and no other"
            )
        return self.batch_wait_timeout_s


class ScorerLive(_Strict):
    """The Scorer's user_config: its batch wait."""

    batch_wait_timeout_s: BatchWait


# the args each deployment's user_config carries (* : every key of that mapping)
LIVE_KNOBS: dict[str, tuple[str, ...]] = {
    "Ingress": ("gate",),
    "Remover": ("batching.batch_wait_timeout_s", "batching.per_bucket.*.batch_wait_timeout_s"),
    "Scorer": ("scorer.batch_wait_timeout_s",),
}


def live_configs(settings: AppSettings) -> dict[str, dict]:
    """Each deployment's user_config for these settings (the Scorer's only where it is deployed)."""
    configs = {
        "Ingress": IngressLive(gate=settings.gate),
        "Remover": RemoverLive(batch_wait_timeout_s=settings.batch_waits()),
    }
    if settings.scorer.enabled:
        configs["Scorer"] = ScorerLive(batch_wait_timeout_s=settings.scorer.batch_wait_timeout_s)
    return {name: live.model_dump(mode="json") for name, live in configs.items()}


SettingsSlice = TypeVar("SettingsSlice", bound=_BundleArgs)


def with_live(settings: SettingsSlice, deployment: str, user_config: dict) -> SettingsSlice:
    """`settings` (AppSettings, or the deployment's slice of them) with one deployment's user_config applied
    (validated again as a whole, as the same type)."""
    data = settings.model_dump()
    if deployment == "Ingress":
        data["gate"] = IngressLive.model_validate(user_config).gate.model_dump()
    elif deployment == "Remover":
        for side, wait in RemoverLive.model_validate(user_config).waits_for(settings.imaging.buckets).items():
            data["batching"]["per_bucket"].setdefault(side, {})["batch_wait_timeout_s"] = wait
    elif deployment == "Scorer":
        data["scorer"]["batch_wait_timeout_s"] = ScorerLive.model_validate(user_config).batch_wait_timeout_s
    else:
        raise ValueError(f"{deployment!r} has no live settings (known: {sorted(LIVE_KNOBS)})")
    return type(settings).model_validate(data)


def _drop(data: dict, path: list[str]) -> None:
    head, *rest = path
    keys = list(data) if head == "*" else [head] if head in data else []
    for key in keys:
        if not rest:
            data.pop(key)
        elif isinstance(data[key], dict):
            _drop(data[key], rest)
            if not data[key]:
                data.pop(key)


def static_args(args: dict) -> dict:
    """`args` without the live knobs (LIVE_KNOBS), which the deployments' user_config carries instead."""
    import copy

    static = copy.deepcopy(args or {})
    for paths in LIVE_KNOBS.values():
        for path in paths:
            _drop(static, path.split("."))
    return static


def live_serve_app(app: dict) -> dict:
    """A Serve config's application with its live knobs moved from `args` into its deployments' user_config
    (a deployment the config does not list gets an entry of its own, so no knob set in `args` is lost), and the
    Ingress's backpressure answer (Ray's 503 when its queue is full) given overload.retry_after_s. The args are
    the source: a user_config or backpressure_config already there is an error."""
    args = app.get("args") or {}
    settings = AppSettings.model_validate({**args, "gate": args.get("gate", {})})  # the gate's checks, defaults too
    derived = {name: {"user_config": config} for name, config in live_configs(settings).items()}
    derived["Ingress"]["backpressure_config"] = {"status_code": 503, "retry_after_s": settings.overload.retry_after_s}
    deployments = []
    for deployment in app.get("deployments", []):
        for key, source in (("user_config", "its live settings"), ("backpressure_config", "overload.retry_after_s")):
            if deployment.get(key) is not None:
                raise ValueError(
                    f"{deployment['name']}: set {source} in the application args, not in {key} (the rendered "
                    f"config's {key} is generated from them)"
                )
        deployments.append({**deployment, **derived.get(deployment["name"], {})})
    listed = {d["name"] for d in deployments}
    deployments += [{"name": name, **fields} for name, fields in derived.items() if name not in listed]
    return {**app, "args": static_args(app.get("args") or {}), "deployments": deployments}


def live_serve_config(config: dict) -> dict:
    """A whole Serve config with every application's live knobs in user_config (live_serve_app): what the
    CLI deploys and what k8s/render.py writes."""
    return {**config, "applications": [live_serve_app(app) for app in config["applications"]]}


def built_deployments(settings: AppSettings) -> dict[str, int]:
    """Each deployment serve.app.build_app builds for these settings, by name, with the max_ongoing_requests its
    @serve.deployment decorator gives it: what Ray runs it with where the config's `deployments` does not say
    (Ray's default, 5 requests at once, unless the decorator says otherwise). Read from
    the bound application itself, so a deployment added there, or an option given in a decorator, is checked."""
    from ray.serve.deployment import Application

    from serve.app import build_app

    built = {}
    # as the args build it (live form), but the bundle: naming none, the build asks the hub for no commit
    pending = [build_app(settings.model_dump(mode="json", exclude_unset=True, exclude={"bundle"}))]
    while pending:
        deployment = pending.pop()._bound_deployment
        built[deployment.name] = deployment.max_ongoing_requests
        bound = (*deployment.init_args, *deployment.init_kwargs.values())
        pending += [arg for arg in bound if isinstance(arg, Application)]
    return built


def check_deployments(settings: AppSettings, deployments: list[dict]) -> None:
    """What the app settings need of the Ray-owned deployment knobs, of every deployment the application builds
    (built_deployments), listed under `deployments` or not: no Scorer entry without a Scorer (Ray
    fails the deploy: "Deployment 'Scorer' does not exist"); the Remover must accept every bucket's full
    batch at once, the Scorer one full batch, or their batches never fill (Ray only warns); and the Ingress
    must hold more requests than `overload.max_in_flight`, or removals in progress can take every slot and the
    probes and the requests its admission refuses at once wait in Ray's queue in front of it."""
    if not settings.scorer.enabled and any(d.get("name") == "Scorer" for d in deployments):
        raise ValueError("deployments lists the Scorer, but scorer.enabled is false: remove its entry")
    built = built_deployments(settings)
    names = [d.get("name") for d in deployments]
    unknown = [name for name in names if name not in built]
    if unknown:
        raise ValueError(
            f"deployments names {unknown}, which the application does not build (Ray fails the deploy): use the "
            f"names it builds, {sorted(built)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"deployments lists {repeated} more than once: give each deployment one entry")
    batch_sizes = settings.batch_sizes()
    never_fill = "its batches never fill"
    needs = {  # deployment: (the requests it must hold at once, what says so, what happens below, the knob)
        "Remover": (
            sum(batch_sizes.values()),
            f"the buckets' batch sizes together ({sum(batch_sizes.values())}: {batch_sizes})",
            never_fill,
            "batching.max_batch_size / per_bucket",
        ),
        "Scorer": (
            settings.scorer.max_batch_size,
            f"scorer.max_batch_size ({settings.scorer.max_batch_size})",
            never_fill,
            "scorer.max_batch_size",
        ),
        "Ingress": (
            settings.overload.max_in_flight + 1,
            f"overload.max_in_flight + 1 ({settings.overload.max_in_flight + 1})",
            (
                "removals in progress can hold every slot, and /readyz, /healthz and the requests its admission "
                "would refuse at once then wait in Ray's queue in front of it (a 503 once that is full)"
            ),
            "overload.max_in_flight",
        ),
    }
    listed = {d.get("name"): d for d in deployments}
    for name, decorated in built.items():
        if name not in needs:
            continue
        needed, what, below, knob = needs[name]
        have = listed.get(name, {}).get("max_ongoing_requests", decorated)
        if have < needed:
            fix = (
                "max_ongoing_requests"
                if name in listed
                else f"it: list {name} under the application's deployments with a max_ongoing_requests (unlisted, "
                "it runs with its @serve.deployment decorator's, Ray's default)"
            )
            raise ValueError(
                f"the {name}'s max_ongoing_requests is {have}, below {what}: {below}; raise {fix} or lower {knob}"
            )


def cuda_without_a_gpu(settings: AppSettings, deployments: list[dict], why: str) -> str | None:
    """Why a model deployment set to device cuda gets no GPU from Ray (num_gpus 0 or unlisted), `why` naming the
    cause: it sees none (serve.cli.HIDE_GPUS_FROM_CPU_REPLICAS_ENV) and fails inside Ray once started, where
    `device: auto` runs on the CPU. None where each gets one."""
    listed = {d.get("name"): d for d in deployments}
    for name, (key, device) in settings.model_devices().items():
        if device == "cuda" and not (listed.get(name, {}).get("ray_actor_options") or {}).get("num_gpus"):
            return (
                f"{name} is set to {key}: cuda and gets no GPU ({why}): set {key} to auto (the CPU without a GPU) "
                "or cpu, or give it ray_actor_options.num_gpus on a machine with a GPU"
            )
    if settings.engine.runner == "tensorrt" and not (listed.get("Remover", {}).get("ray_actor_options") or {}).get(
        "num_gpus"
    ):
        return (
            f"the Remover is set to engine.runner: tensorrt, which runs on a CUDA GPU only, and gets no GPU ({why}): "
            "set engine.runner to torch or onnx, or give it ray_actor_options.num_gpus on a machine with a GPU"
        )
    return None


def check_gpus(settings: AppSettings, deployments: list[dict]) -> None:
    """The GPU requests, whatever machine runs them: none for a deployment on cuda fails in its replicas, a
    fraction above one GPU is refused by Ray at the deploy."""
    problem = cuda_without_a_gpu(settings, deployments, "its ray_actor_options.num_gpus is 0 or unset")
    if problem:
        raise ValueError(problem)
    for deployment in deployments:
        gpus = float((deployment.get("ray_actor_options") or {}).get("num_gpus") or 0)  # Ray's schema takes "1.5"
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"{deployment.get('name')}: ray_actor_options.num_gpus {gpus:g}: Ray takes a fraction of one GPU or "
                "whole GPUs; give at most 1 or a whole number"
            )


def check_ports(config: dict) -> None:
    """The config's ports (the command line's are checked as flags): one past 65535 ended in a traceback."""
    http = (config.get("http_options") or {}).get("port")
    if http is not None and not 1 <= int(http) <= 65535:  # Ray's schema takes "8000"
        raise ValueError(f"http_options.port {http} is not a TCP port: give one from 1 to 65535")
    grpc = (config.get("grpc_options") or {}).get("port")
    if grpc is not None and int(grpc) > 65535:
        raise ValueError(f"grpc_options.port {grpc} is not a TCP port: give one up to 65535 (0 or below: no gRPC)")


def check_retention_stores_apart(applications: dict[str, AppSettings]) -> None:
    """Applications that keep results keep them in stores of their own. A result's owner is a key's name, which
    means something only within one application's keys file (or none: without keys every caller sees every
    result), and each application's sweeper applies its own max_results and max_age_days and deletes objects it
    has no row for: in a shared store a keyless application would serve a keyed one's results to anyone, and
    one's sweeps would delete the other's results. Object stores overlap when one's keys lie under the other's
    (an S3 prefix within another's, a folder within another's). `applications`: their settings by name."""
    kept: list[tuple[str, tuple[str, str], tuple]] = []  # (application, database, objects)
    for name, settings in applications.items():
        retention = settings.retention
        if not retention.enabled:
            continue
        database = _database_place(retention.resolved_database_url())
        s3 = retention.object_store.s3
        if s3:
            objects = ("s3", (s3.endpoint_url or "AWS").rstrip("/"), s3.bucket, s3.prefix.strip("/"))
        else:
            objects = ("folder", retention.objects_folder().resolve())
        for other, other_database, other_objects in kept:
            if database[0] == other_database[0]:
                raise _shared_store(other, name, "database", database[1])
            if _within(objects, other_objects) or _within(other_objects, objects):
                shown = f"s3://{objects[2]}/{objects[3]} at {objects[1]}" if s3 else str(objects[1])
                raise _shared_store(other, name, "object store", shown)
        kept.append((name, database, objects))


def _database_place(url: str) -> tuple[str, str]:
    """(the URL to compare, the URL to show: without its password, which $ROREM_RETENTION_DATABASE_URL keeps out
    of the config and so out of an error message)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)  # one that cannot be read is refused before (RetentionSettings.database_url_refused)
    return parsed.render_as_string(hide_password=False), parsed.set(query={}).render_as_string(hide_password=True)


def _within(inner: tuple, outer: tuple) -> bool:
    """Whether the object store `inner` lies in `outer` (both ("s3", endpoint, bucket, prefix) or ("folder", path))."""
    if inner[0] != outer[0]:
        return False
    if inner[0] == "folder":
        return inner[1].is_relative_to(outer[1])
    prefix = outer[3]
    return inner[1:3] == outer[1:3] and (not prefix or inner[3] == prefix or inner[3].startswith(prefix + "/"))


def _shared_store(first: str, second: str, kind: str, place: str) -> ValueError:
    return ValueError(
        f"applications {first} and {second} keep results in one {kind} ({place}): give each its own "
        f"retention.object_store (path or s3.prefix) and retention.database_url (${DATABASE_URL_ENV} applies to "
        "every application)"
    )


RAY_DEFAULT_APP_NAME = "default"  # ray.serve._private.constants.SERVE_DEFAULT_APP_NAME (a test: equal)


def app_name(app: dict) -> str:
    """A Serve config application's name, as Ray names it (an unnamed one is "default")."""
    return app.get("name") or RAY_DEFAULT_APP_NAME


def route_prefix(app: dict) -> str | None:
    """A Serve config application's HTTP route prefix, as Ray takes it ("/" unless given; None: gRPC only)."""
    return app.get("route_prefix", "/")


def validate_serve_config(config: dict) -> None:
    """A whole Serve config, as strictly as it can be checked before Ray starts (`python -m serve run` and
    k8s/render.py): Ray's Serve schema, unknown keys anywhere in it (Ray's schema silently drops them: a
    typo'd max_queued_requests leaves the queue unbounded), each autoscaling_config, each route_prefix by Ray's rule,
    our AppSettings and the retention database URL each names (the driver is serve.cli's check, on the machine that
    runs it); an error in one application of several names it."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from serve.proxy_limits import proxy_routes

    ServeDeploySchema.model_validate(config)
    if not config.get("applications"):
        raise ValueError("the config has no applications: list at least one under `applications`")
    unknown = unknown_keys(ServeDeploySchema, config)
    if unknown:
        raise ValueError(f"keys Ray's Serve schema does not know (it would silently ignore them): {unknown}")
    applications = config["applications"]
    settings = {}
    for app in applications:
        check_route_prefix(app)
        with naming_the_application(app, len(applications)):
            settings[app_name(app)] = AppSettings.model_validate(app.get("args") or {})
            refused = settings[app_name(app)].retention.database_url_refused(driver=False)  # the driver: serve.cli
            if refused:
                raise ValueError(refused)
    check_ports(config)
    check_retention_stores_apart(settings)
    check_proxy_timeout(config, settings)
    proxy_routes(config)  # what the proxies get (serve.proxy_limits.proxy_env) is checked there
    for app in applications:
        with naming_the_application(app, len(applications)):
            check_deployments(settings[app_name(app)], app.get("deployments", []))
            check_gpus(settings[app_name(app)], app.get("deployments", []))
            for deployment in app.get("deployments", []):
                autoscaling = deployment.get("autoscaling_config")
                if isinstance(autoscaling, dict):
                    AutoscalingConfig.model_validate(autoscaling)
                    unknown = unknown_keys(AutoscalingConfig, autoscaling, f"{deployment['name']}.autoscaling_config")
                    if unknown:
                        raise ValueError(f"unknown autoscaling_config keys: {unknown}")


@contextmanager
def naming_the_application(app: dict, applications: int):
    """An error in one application's part of a config of several, as `application <name>: <the error>` (a
    ValidationError as invalid_because words it): `gate.thresold: Extra inputs are not permitted` said not which."""
    try:
        yield
    except ValueError as exc:
        if applications < 2:
            raise
        raise ValueError(f"application {app_name(app)}: {invalid_because(exc)}") from exc


def check_route_prefix(app: dict) -> None:
    """Ray's rule for an application's route_prefix (ray.serve._private.utils.validate_route_prefix), which its
    schema does not apply: `v2` or `/v2/` passed, then Ray refused the deploy after starting."""
    from ray.serve._private.utils import validate_route_prefix

    prefix = route_prefix(app)
    if not isinstance(prefix, str):  # None (gRPC only) or Ray's DEFAULT: its own check
        return
    try:
        validate_route_prefix(prefix)
    except ValueError as exc:
        rule = str(exc).split(", ", 1)[-1].rstrip(".")
        raise ValueError(
            f"application {app_name(app)}: route_prefix {prefix!r} {rule} (Ray's rule: /, or a path such as /v2)"
        ) from None


def check_proxy_timeout(config: dict, applications: dict[str, AppSettings]) -> None:
    """Ray's proxies give up at their own `request_timeout_s` (HTTP: 408 proxy-timeout) while the model work goes
    on; the app's deadline (`request_timeout_s`, which cuts that work and answers 504) must come first, for every
    application behind them. `applications`: their settings by name."""
    name, longest = max(applications.items(), key=lambda item: item[1].request_timeout_s)
    for section in ("http_options", "grpc_options"):
        proxy_s = (config.get(section) or {}).get("request_timeout_s")
        if proxy_s and proxy_s > 0 and proxy_s <= longest.request_timeout_s:
            raise ValueError(
                f"{section}.request_timeout_s ({proxy_s:g} s) is not above application {name}'s request_timeout_s "
                f"({longest.request_timeout_s:g} s): Ray's proxy would give up on a request while its model work "
                f"goes on; raise {section}.request_timeout_s above {longest.request_timeout_s:g} s or lower "
                "request_timeout_s"
            )


def unknown_keys(model: type[BaseModel], data, path: str = "") -> list[str]:
    """Dotted paths of keys in `data` that the pydantic `model` (recursively) has no field for."""
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    problems = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(where)
            continue
        for sub in _models_in(fields[key].annotation):
            if isinstance(value, dict):
                problems += unknown_keys(sub, value, where)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    problems += unknown_keys(sub, item, f"{where}[{i}]")
            break
    return problems


def _models_in(annotation) -> list[type[BaseModel]]:
    """Pydantic models a field holds directly, through Optional / Union / list (not dict values: a
    Dict field's keys are data, not fields)."""
    import types
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, set, frozenset, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


# ---------------------------------------------------------------------------------------------------
# The reference table in docs/configuration.md, generated from the fields (tests/test_config.py checks it)

TABLE_BEGIN = "<!-- settings table: generated by `python -m serve.config`; do not edit by hand -->"
TABLE_END = "<!-- end of settings table -->"


def _section_model(annotation) -> tuple[type[BaseModel], str] | None:
    """The settings model a field holds (directly, optional, or as a mapping's values) and the key step to it."""
    import types
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [m for m in map(_section_model, args) if m]
        return found[0] if found else None
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return args[1], ".<side>"
    return None


def _leaves(model: type[BaseModel], prefix: str = ""):
    """(key, field) of every row: each leaf; a section only where it is optional or a mapping (then its keys too)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_model(field.annotation)
        if section is None or field.default is None or section[1]:
            yield key, field
        if section is not None:
            yield from _leaves(section[0], f"{key}{section[1]}.")


def _live_in(key: str) -> str:
    parts = key.replace("<side>", "*").split(".")
    for deployment, paths in LIVE_KNOBS.items():
        for path in paths:
            step = path.split(".")
            if parts[: len(step)] == step:
                return deployment
    return ""


def _shown(default) -> str:
    import json

    if default is PydanticUndefined:
        return "required"
    return "none" if default is None else f"`{json.dumps(default)}`"


def settings_table() -> str:
    """Every key of the application args: its default, the deployment whose user_config carries it live, its meaning."""
    rows = [TABLE_BEGIN, "| args key | default | live in | meaning |", "|---|---|---|---|"]
    for key, field in _leaves(AppSettings):
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_shown(field.default)} | {_live_in(key)} | {meaning} |")
    return "\n".join([*rows, TABLE_END]) + "\n"


def fields_without_description() -> list[str]:
    return [key for key, field in _leaves(AppSettings) if not field.description]


if __name__ == "__main__":
    print(settings_table(), end="")
