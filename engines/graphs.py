"""CUDA graphs of the removal stages, one set per (crop side, padded batch size), captured at start.

Eager SDXL at small batches is launch-bound: thousands of kernel launches per UNet forward, each
costing host time. A CUDA graph replays a whole stage's kernels with one launch. The engine's
stages take device tensors and never wait for the host (engines.remover), so each of encode
(normalise + two VAE encodes), denoise (every UNet step and scheduler update) and decode (VAE
decode + quantise to uint8) is captured as it is, over static input buffers.

All graphs share one memory pool, captured largest first: they run one at a time on one stream,
and each keeps its outputs referenced, so their scratch memory can overlap (vLLM does the same).
A batch runs in the smallest captured batch size that holds it; the padding rows are zeros and
their results are dropped. Capture happens in `capture`, at start-up only; a shape that was not
captured runs eagerly (`holds` says which).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engines.remover import CropBatch, EncodedBatch, RemovalEngine
    from engines.timing import StageClock

WARMUP_RUNS = 2  # eager runs before capture: cuDNN's algorithm search, lazy inits, compilation


@dataclass
class _Captured:
    inputs: "CropBatch"
    encoded: "EncodedBatch"
    latents: torch.Tensor
    pixels: torch.Tensor  # [P, S, S, 3] uint8, the output
    encode: torch.cuda.CUDAGraph
    denoise: torch.cuda.CUDAGraph
    decode: torch.cuda.CUDAGraph

    def load(self, batch: "CropBatch") -> None:
        """Copy a batch into the static inputs; the padding rows become zeros."""
        n = batch.size
        pairs = [(self.inputs.pixels, batch.pixels), (self.inputs.masks, batch.masks)]
        mine, theirs = self.inputs.noise.tensors(), batch.noise.tensors()
        pairs += [(mine[k], theirs[k]) for k in ("latents", "masked", "image") if k in mine]
        for static, given in pairs:
            static[:n].copy_(given)
            static[n:].zero_()
        self.inputs.noise.steps[:, :n].copy_(batch.noise.steps)
        self.inputs.noise.steps[:, n:].zero_()


class StageGraphs:
    def __init__(self, engine: "RemovalEngine"):
        self.engine = engine
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int], _Captured] = {}

    def capture(self, sides: list[int], batch_sizes: list[int]) -> dict:
        """Capture every (side, batch) shape, largest first; returns seconds per shape."""
        seconds = {}
        for side, batch in sorted(((s, b) for s in sides for b in batch_sizes), key=lambda sb: -sb[0] ** 2 * sb[1]):
            if (side, batch) in self.captured:
                continue
            started = time.perf_counter()
            self.captured[(side, batch)] = self._capture(side, batch)
            seconds[f"{side}x{batch}"] = round(time.perf_counter() - started, 2)
        return {"shapes": sorted([list(k) for k in self.captured]), "capture_s": seconds}

    def slot_for(self, side: int, size: int) -> _Captured | None:
        fits = [b for (s, b) in self.captured if s == side and b >= size]
        return self.captured[(side, min(fits))] if fits else None

    def holds(self, batch: "CropBatch") -> bool:
        return self.slot_for(batch.pixels.shape[1], batch.size) is not None

    @torch.inference_mode()  # the static buffers were made in inference mode
    def run(self, batch: "CropBatch", clock: "StageClock") -> torch.Tensor:
        slot = self.slot_for(batch.pixels.shape[1], batch.size)
        slot.load(batch)
        slot.encode.replay()
        clock.lap("vae_encode")
        slot.denoise.replay()
        clock.lap("unet")
        slot.decode.replay()
        clock.lap("vae_decode")
        return slot.pixels[: batch.size]

    @torch.inference_mode()
    def _capture(self, side: int, batch: int) -> _Captured:
        from engines.remover import CropBatch, SamplingNoise

        engine = self.engine
        device = engine.device
        latent = engine.latent_shape(side, side)
        masks = torch.zeros((batch, side, side), dtype=torch.uint8, device=device)
        masks[:, side // 4 : side // 2, side // 4 : side // 2] = 1
        inputs = CropBatch(
            pixels=torch.zeros((batch, side, side, 3), dtype=torch.uint8, device=device),
            masks=masks,
            noise=SamplingNoise(
                latents=torch.randn((batch, *latent), device=device),
                masked=torch.randn((batch, *latent), device=device),
                steps=torch.randn((engine.schedule.noise_draws, batch, *latent), device=device),
                image=torch.randn((batch, *latent), device=device) if engine.schedule.strength < 1.0 else None,
            ),
        )

        def encode():
            images, masks = engine.normalize(inputs)
            return engine.encode(images, masks, inputs.noise)

        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_RUNS):
                engine.decode_pixels(engine.denoise(encode(), inputs.noise.steps))
        torch.cuda.current_stream(device).wait_stream(side_stream)
        torch.cuda.synchronize(device)

        graphs = [torch.cuda.CUDAGraph() for _ in range(3)]
        with torch.cuda.graph(graphs[0], pool=self.pool):
            encoded = encode()
        with torch.cuda.graph(graphs[1], pool=self.pool):
            latents = engine.denoise(encoded, inputs.noise.steps)
        with torch.cuda.graph(graphs[2], pool=self.pool):
            pixels = engine.decode_pixels(latents)
        return _Captured(inputs, encoded, latents, pixels, *graphs)
