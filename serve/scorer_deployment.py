"""The Scorer deployment: the RORem discriminator on its own replicas and device, batched."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ray import serve

from engines.jobs import ScoreJob
from serve.batcher import Batcher, rerunning
from serve.config import ScorerArgs, ScorerLive
from serve.health import EngineWatch
from serve.live import LiveSettings
from serve.local_ray import keep_replica_grpc_on_loopback
from serve.metrics import BatchMetrics
from serve.remover_deployment import replica_id


@dataclass
class ScoreOutcome:
    score: float
    batch_size: int
    model_ms: float


@serve.deployment(name="Scorer")
class Scorer(LiveSettings):
    live_name = "Scorer"

    def __init__(self, settings: dict):
        """`settings`: serve.config.ScorerArgs; the batch wait comes live through `reconfigure`.
        The model libraries are imported here, in the replica: the Ingress imports this module only to bind it."""
        keep_replica_grpc_on_loopback()
        import torch

        from engines.scorer import ScoringEngine
        from serve.placement import pick_device, pick_dtype

        self.settings = ScorerArgs.model_validate(settings)
        scorer_cfg = self.settings.scorer
        if scorer_cfg.torch_threads:
            torch.set_num_threads(scorer_cfg.torch_threads)
        bundle = self.settings.bundle.open()
        if not bundle.has_discriminator:
            raise RuntimeError(
                f"bundle {bundle.path} has no discriminator: configure one (bundle.authors.discriminator) "
                "or set gate.mode: off and remove the Scorer deployment"
            )
        device = pick_device(scorer_cfg.device)
        self.engine = ScoringEngine.from_bundle(bundle, device=device, dtype=pick_dtype(scorer_cfg.dtype))
        self.queue = Batcher(self._score_batch, scorer_cfg.max_batch_size, scorer_cfg.batch_wait_timeout_s)
        self.description = {
            "device": str(device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "score_size": self.engine.score_size,
            "max_batch_size": scorer_cfg.max_batch_size,
        }
        self.engine.score([_blank_job(self.engine.score_size)])
        self.metrics = BatchMetrics("scorer")
        self.watch = EngineWatch(scorer_cfg.hung_after_s)

    def parse_live(self, user_config: dict) -> float:
        """serve.config.ScorerLive: the batch wait, without a restart."""
        return ScorerLive.model_validate(user_config).batch_wait_timeout_s

    def apply_live(self, wait: float) -> None:
        self.queue.set_batch_wait_timeout_s(wait)

    def describe(self) -> dict:
        return self.description

    def live(self) -> dict:
        """This replica's Serve id, the batch wait it uses now (describe() is read once, at readiness) and the
        live settings it refused (serve.live)."""
        return {"replica": replica_id(), "batch_wait_timeout_s": self.queue.wait_s, "refused_live": self.refused_live}

    def check_health(self) -> None:
        """Serve's periodic health check: a scoring call that never returns, or scoring calls that keep failing
        (serve.health.EngineWatch), make this replica be replaced."""
        self.watch.check()

    async def score(self, job: ScoreJob) -> ScoreOutcome:
        """Queue one (source, mask, edited) crop in the scoring batch (serve/batcher.py)."""
        return await self.queue(job)

    async def _score_batch(self, jobs: list[ScoreJob]) -> list[ScoreOutcome]:
        """Score a batch of crops; each is scored on a score_size view."""
        started = time.perf_counter()
        with self.watch.running(counted=not rerunning()):
            scores = await asyncio.to_thread(self.engine.score, jobs)
        model_ms = (time.perf_counter() - started) * 1000
        self.metrics.batch(len(jobs))
        return [ScoreOutcome(score=float(s), batch_size=len(jobs), model_ms=model_ms) for s in scores]


def _blank_job(side: int) -> ScoreJob:
    import numpy as np

    mask = np.zeros((side, side), bool)
    mask[side // 4 : side // 2, side // 4 : side // 2] = True
    image = np.zeros((side, side, 3), np.uint8)
    return ScoreJob(source=image, mask=mask, edited=image)
