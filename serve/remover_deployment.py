"""The Remover deployment: holds the removal engine on its device and batches crops dynamically."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from ray import serve
from ray.serve.exceptions import RayServeException

from engines.jobs import RemovalJob
from serve.batcher import Batcher, rerunning
from serve.config import RemoverArgs, RemoverLive
from serve.health import EngineWatch
from serve.live import LiveSettings
from serve.local_ray import keep_replica_grpc_on_loopback
from serve.metrics import BatchMetrics


@dataclass
class RemovalOutcome:
    image: np.ndarray  # (S, S, 3) uint8
    batch_size: int
    model_ms: float
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (serve.metrics.STAGES)


@serve.deployment(name="Remover")
class Remover(LiveSettings):
    live_name = "Remover"

    def __init__(self, settings: dict):
        """`settings`: serve.config.RemoverArgs; the batch waits come live through `reconfigure`.
        The model libraries are imported here, in the replica: the Ingress imports this module only to bind it."""
        keep_replica_grpc_on_loopback()
        import torch

        from engines.remover_start import start_removal_engine
        from serve.placement import pick_device, pick_dtype

        self.settings = RemoverArgs.model_validate(settings)
        engine_cfg, bundle_cfg = self.settings.engine, self.settings.bundle
        if engine_cfg.torch_threads:
            torch.set_num_threads(engine_cfg.torch_threads)
        device = pick_device(engine_cfg.device)
        started = start_removal_engine(
            bundle_cfg.open(), engine_cfg, device, pick_dtype(engine_cfg.dtype), self.settings.batch_sizes()
        )
        self.engine = started.engine
        self.engine_turn = asyncio.Lock()  # the engine runs one batch at a time, whatever its bucket
        self.queues = {side: self._bucket_queue(side) for side in self.settings.imaging.buckets}
        self.description = {
            "bundle": started.bundle.summary(locations=False),  # /readyz is public: no folder names
            "tiny": bundle_cfg.is_tiny(),
            "device": str(device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "runner": engine_cfg.runner,
            "steps": self.engine.sampling.steps,
            "strength": self.engine.sampling.strength,
            "buckets": self.settings.imaging.buckets,
            "max_batch_size": self.settings.batch_sizes(),
            "cuda_graphs": started.cuda_graphs,
            "warm_up": started.warm_up,  # every shape a request can take was run (with CUDA graphs captured)
        }
        self.metrics = BatchMetrics("remover")
        self.watch = EngineWatch(engine_cfg.hung_after_s)

    def parse_live(self, user_config: dict) -> dict[int, float]:
        """serve.config.RemoverLive: each bucket's batch wait, without a restart."""
        return RemoverLive.model_validate(user_config).waits_for(self.settings.imaging.buckets)

    def apply_live(self, waits: dict[int, float]) -> None:
        for side, wait in waits.items():
            self.queues[side].set_batch_wait_timeout_s(wait)

    def describe(self) -> dict:
        return self.description

    def live(self) -> dict:
        """This replica's Serve id, the batch waits it uses now (describe() is read once, at readiness) and the
        live settings it refused (serve.live)."""
        waits = {side: self.queues[side].wait_s for side in self.settings.imaging.buckets}
        return {"replica": replica_id(), "batch_wait_timeout_s": waits, "refused_live": self.refused_live}

    def check_health(self) -> None:
        """Serve's periodic health check: an engine call that never returns, or engine calls that keep failing
        (serve.health.EngineWatch), make this replica be replaced."""
        self.watch.check()

    def _bucket_queue(self, side: int) -> Batcher:
        """The batch queue of one crop side, with that bucket's batch size and wait (serve/batcher.py says why
        not `@serve.batch`)."""
        max_batch_size, wait_s = self.settings.batching.for_bucket(side)
        return Batcher(self._run_batch, max_batch_size, wait_s, turn=self.engine_turn)

    async def remove(self, job: RemovalJob, submitted_at: float) -> RemovalOutcome:
        """Queue one crop in its bucket's batch. `submitted_at` is the caller's time.time() at dispatch."""
        side = job.image.shape[0]
        if side not in self.queues:  # a crop size outside the buckets (in-process callers): its own queue
            self.queues[side] = self._bucket_queue(side)
        return await self.queues[side](job, submitted_at)

    async def _run_batch(self, jobs: list[RemovalJob], submitted_at: list[float]) -> list[RemovalOutcome]:
        """One engine call for one bucket's batch, run by its queue once it holds `engine_turn`; its results are
        answered as soon as it is done. Only the call itself counts as running (hung_after_s, model_ms): a batch
        of one bucket waiting for another's is queued (queue_wait), not hung."""
        stages: dict[str, float] = {}
        queue_waits = [max(time.time() - t, 0.0) for t in submitted_at]
        started = time.perf_counter()
        with self.watch.running(counted=not rerunning()):
            images = await asyncio.to_thread(self.engine.remove, jobs, stages)
        model_ms = (time.perf_counter() - started) * 1000
        self.metrics.batch(len(jobs))
        self.metrics.stages.observe(stages)
        outcomes = []
        for image, wait in zip(images, queue_waits):
            outcomes.append(
                RemovalOutcome(
                    image=image, batch_size=len(jobs), model_ms=model_ms, stages={"queue_wait": wait, **stages}
                )
            )
            self.metrics.stages.observe({"queue_wait": wait})
        return outcomes


def replica_id() -> str | None:
    """This replica's Serve id (stable while the replica lives, new when Serve restarts it)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a Serve replica (in-process tests)
        return None
