"""TensorRT plans from the fp16 ONNX UNet: strongly typed, profiles from the Serve config.

Profiles: one per bucket (the default). Serve only ever runs a bucket's side (crops are resized
to it), so each profile fixes the latent side to bucket / 8 and spans the batch 1..that bucket's
largest batch (serve.config.RemoverArgs.batch_sizes: batching.per_bucket, else batching.max_batch_size),
optimized for the full batch (opt = max), where throughput matters. Fixed spatial dims let
TensorRT pick tactics per resolution; one spanning profile (spanning=True: min = smallest bucket,
batch 1; opt = max = largest bucket, the largest batch of any bucket) builds faster but runs the small
bucket with kernels chosen for the large one. Weights are shared between profiles; build time grows with them.

`tensorrt` is imported lazily (it is optional, needs a GPU, and its wheel pulls NVIDIA's libraries).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engines.bundle import sha256_of
from engines.runners import LATENT_MULTIPLE, UNET_INPUTS, VAE_FACTOR, import_tensorrt, plan_sidecar
from export.progress import QUIET, Progress
from export.staging import sync_file, sync_folder

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """An optimization profile: for each input, (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _input_shapes(batch: int, latent: int, in_channels: int, sequence_length: int, embed_dim: int, pooled_dim: int):
    return {
        "sample": (batch, in_channels, latent, latent),
        "timestep": (batch,),
        "encoder_hidden_states": (batch, sequence_length, embed_dim),
        "text_embeds": (batch, pooled_dim),
        "time_ids": (batch, 6),
    }


def profiles_from_serve_config(
    batch_sizes: dict[int, int],
    *,
    in_channels: int = 9,
    sequence_length: int = 77,
    embed_dim: int = 2048,
    pooled_dim: int = 1280,
    spanning: bool = False,
) -> list[Profile]:
    """Profiles for Serve's buckets: image side -> that bucket's largest batch; see the module docstring."""
    if not batch_sizes or min(batch_sizes.values()) < 1:
        raise ValueError("need at least one bucket, and batch sizes >= 1")
    sides = sorted(batch_sizes)
    bad = [s for s in sides if s % (VAE_FACTOR * LATENT_MULTIPLE)]
    if bad:
        raise ValueError(f"bucket sides must be multiples of {VAE_FACTOR * LATENT_MULTIPLE} px, got {bad}")
    dims = dict(in_channels=in_channels, sequence_length=sequence_length, embed_dim=embed_dim, pooled_dim=pooled_dim)
    if spanning:
        largest = max(batch_sizes.values())
        lo = _input_shapes(1, sides[0] // VAE_FACTOR, **dims)
        hi = _input_shapes(largest, sides[-1] // VAE_FACTOR, **dims)
        name = f"{sides[0]}-{sides[-1]}px_b1-{largest}"
        return [Profile(name, {n: (lo[n], hi[n], hi[n]) for n in UNET_INPUTS})]
    profiles = []
    for side in sides:
        lo = _input_shapes(1, side // VAE_FACTOR, **dims)
        hi = _input_shapes(batch_sizes[side], side // VAE_FACTOR, **dims)
        profiles.append(Profile(f"{side}px_b1-{batch_sizes[side]}", {n: (lo[n], hi[n], hi[n]) for n in UNET_INPUTS}))
    return profiles


def load_serve_settings(config_path: str | Path, app: str | None = None):
    """The application `args` of a Serve config, validated by serve.config.AppSettings (read-only)."""
    from serve.config import AppSettings, app_name

    config = yaml.safe_load(Path(config_path).read_text())
    apps = config.get("applications", [])
    chosen = [a for a in apps if app is None or app_name(a) == app]  # as serve names it: "default" when unnamed
    if not chosen:
        raise ValueError(f"{config_path}: no application{f' named {app!r}' if app else ''}")
    return AppSettings.model_validate(chosen[0].get("args", {}))


def onnx_static_dims(onnx_path: str | Path) -> dict[str, int]:
    """in_channels, sequence_length, embed_dim, pooled_dim as the exported graph fixes them."""
    from export.onnx_export import read_unet_graph

    proto = read_unet_graph(onnx_path)
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    return {
        "in_channels": shapes["sample"][1],
        "sequence_length": shapes["encoder_hidden_states"][1],
        "embed_dim": shapes["encoder_hidden_states"][2],
        "pooled_dim": shapes["text_embeds"][1],
    }


@dataclass
class PlanInfo:
    """What a plan is and where it runs: recorded next to the plan and in the bundle manifest."""

    plan: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    profiles: list[dict[str, Any]]
    onnx: str
    onnx_sha256: str
    strongly_typed: bool
    builder_optimization_level: int
    workspace_gb: float | None
    timing_cache: str | None
    build_seconds: float
    bytes: int
    sha256: str
    built_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_plan(
    onnx_path: str | Path,
    plan_path: str | Path,
    profiles: list[Profile],
    *,
    timing_cache_path: str | Path | None = None,
    workspace_gb: float | None = None,
    optimization_level: int = 3,
    progress: Progress = QUIET,
) -> PlanInfo:
    """Parse the ONNX (its external data beside it), build a strongly typed plan with these
    profiles, reuse and update the timing cache, write the plan and `<plan>.json` (PlanInfo)."""
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT plan needs a CUDA GPU")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: always strongly typed
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    graph = _graph_sha256(onnx_path)  # before the parser reads it: the plan is recorded as built from these bytes
    with progress.stage(f"parse {onnx_path.name}") as stage:
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))
        stage.note = f"{network.num_layers} layers"

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = optimization_level
    cache_bytes = Path(timing_cache_path).read_bytes() if timing_cache_path and Path(timing_cache_path).is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    monitor = None  # must outlive the build: held by this frame
    if hasattr(trt, "IProgressMonitor") and progress.enabled:
        monitor = _build_monitor(trt, progress)
        config.progress_monitor = monitor

    started = time.perf_counter()
    with progress.stage(f"build plan ({len(profiles)} profile(s), optimization level {optimization_level})"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} (see the log above)")
    build_seconds = time.perf_counter() - started
    if _graph_sha256(onnx_path) != graph:
        raise RuntimeError(
            f"{onnx_path} (or its external data) changed while the plan was built from it (exported again?): "
            "the plan is not written; build it again"
        )
    data = bytes(serialized)
    _atomic_write(plan_path, data)
    if timing_cache_path:
        _atomic_write(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))

    device = torch.cuda.current_device()
    info = PlanInfo(
        plan=plan_path.name,
        tensorrt_version=trt.__version__,
        gpu=torch.cuda.get_device_name(device),
        compute_capability="%d.%d" % torch.cuda.get_device_capability(device),
        profiles=[p.to_json() for p in profiles],
        onnx=onnx_path.name,
        onnx_sha256=graph[onnx_path.name],
        strongly_typed=True,
        builder_optimization_level=optimization_level,
        workspace_gb=workspace_gb,
        timing_cache=str(timing_cache_path) if timing_cache_path else None,
        build_seconds=round(build_seconds, 1),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    _atomic_write(plan_sidecar(plan_path), json.dumps(info.to_json(), indent=2).encode())
    return info


def _graph_sha256(onnx_path: Path) -> dict[str, str]:
    """The sha256 of the graph and of its external data, by file name."""
    from export.onnx_export import onnx_files

    return {file.name: sha256_of(file) for file in onnx_files(onnx_path)}


def _build_monitor(trt, progress: Progress):
    """A trt.IProgressMonitor printing the builder's phases (top-level steps as k/n)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.steps[phase_name] = num_steps
            if self.depth[phase_name] <= 1:
                progress.say(f"    {'  ' * self.depth[phase_name]}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            if self.depth.get(phase_name) == 0:
                progress.say(f"    {phase_name}: {step + 1}/{self.steps[phase_name]}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.depth.pop(phase_name, None)

    return Monitor()


def _atomic_write(path: Path, data: bytes) -> None:
    """Through a temporary file of its own: two builds for one architecture share the timing cache's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # open(): the umask's mode, as before
    try:
        tmp.write_bytes(data)
        sync_file(tmp)
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
