"""The removal engine as the service starts it: built from the engine settings and warmed at every shape it will
run. The Remover deployment (serve/remover_deployment.py) serves it and the release gate (training.evaluate)
measures it; neither builds one its own way, so a release is gated on the engine the service runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from engines.bundle import Bundle
from engines.remover import RemovalEngine, SamplingSettings
from engines.runners import RunnerKind, default_export_dtype


class EngineChoice(Protocol):
    """The engine settings both callers hold, under the names of serve.config.EngineSettings."""

    compile: bool
    steps: int | None
    strength: float | None
    runner: RunnerKind
    runner_path: str | Path | None
    cuda_graph: bool
    export_missing: bool


@dataclass
class StartedEngine:
    engine: RemovalEngine
    bundle: Bundle  # as opened, or read again after an export at start (export_missing)
    cuda_graphs: bool  # whether graphs were asked of the engine: only on CUDA, never with the ONNX runner
    warm_up: dict  # RemovalEngine.warm_up's report


def start_removal_engine(
    bundle: Bundle,
    choice: EngineChoice,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_sizes: dict[int, int],
) -> StartedEngine:
    """`batch_sizes`: each bucket side -> the largest batch it runs; every shape a call can take is run (and with
    CUDA graphs captured) here, never in a timed or served call. `cuda_graph` has no effect on the CPU or with the
    ONNX runner (EngineSettings.cuda_graph says so), rather than refusing a setting the service accepts."""
    buckets = list(batch_sizes)
    if choice.runner == "onnx" and choice.export_missing and not choice.runner_path:
        from export.manifest import ensure_unet_onnx

        export_dtype = dtype or default_export_dtype(device)
        ensure_unet_onnx(bundle, str(export_dtype).removeprefix("torch."), buckets=buckets)
        bundle = type(bundle).load(bundle.path, verify=False)
    cuda_graphs = choice.cuda_graph and device.type == "cuda" and choice.runner != "onnx"
    defaults = bundle.manifest.sampling
    engine = RemovalEngine.from_bundle(
        bundle,
        device=device,
        dtype=dtype,
        compile=choice.compile,
        sampling=SamplingSettings(steps=choice.steps or defaults.steps, strength=choice.strength or defaults.strength),
        runner=choice.runner,
        runner_path=choice.runner_path,
        cuda_graph=cuda_graphs,
        buckets=buckets,
    )
    return StartedEngine(engine, bundle, cuda_graphs, engine.warm_up(batch_sizes))
