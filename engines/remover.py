"""RORem-4S removal: the whole sampling loop in one readable place.

The loop follows diffusers' `StableDiffusionXLInpaintPipeline` with `LCMScheduler`, guidance 1
(no classifier-free guidance, so the UNet batch is not doubled) and constant prompt embeddings,
and draws its random numbers in the same order from one generator per job. That makes a job's
noise independent of the batch it ran in, and lets tests check parity with diffusers. The arithmetic is
not: batched convolutions sum in another order, so a job rerun at another batch size may differ by 1 in a
few pixels (on CPU fp32, 1,615 of 262,144 pixels at 512 px; bit-identical at the same batch size there; on
CUDA, cuDNN's benchmark mode may pick other algorithms in another process).

On a GPU nothing inside encode -> 4 UNet steps -> decode waits for the host: the crops go up once
as uint8 (pinned memory, non-blocking) and are normalised on the device; every random number of
a batch is drawn before the loop (`SamplingNoise`); the scheduler's arithmetic uses host numbers
(`engines.lcm.LCMSchedule`); stage timings are CUDA events. That is what lets `engines.graphs`
capture the three stages as CUDA graphs and replay them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, LCMScheduler

from engines.bundle import Bundle
from engines.jobs import RemovalJob
from engines.lcm import LCMSchedule
from engines.runners import (
    EXPORT_DTYPES,
    UNET_INPUTS,
    RunnerKind,
    TorchUNetRunner,
    UNetConditioning,
    UNetRunner,
    current_export,
    default_export_dtype,
    export_command,
    flat_inputs,
    make_unet_runner,
)
from engines.sampling import DEFAULT_STEPS, DEFAULT_STRENGTH
from engines.timing import StageClock


@dataclass(frozen=True)
class SamplingSettings:
    """steps=4 at strength 1.0 runs t = 999, 759, 499, 259. The authors' reference passes
    strength 0.99, which drops the first step and runs only 3 UNet passes (759, 499, 259)."""

    steps: int = DEFAULT_STEPS
    strength: float = DEFAULT_STRENGTH


@dataclass
class SamplingNoise:
    """Every random number one batch consumes, float32, drawn before any model work.

    Each job draws from its own generator in diffusers' order: the unmasked image's VAE sample
    (strength < 1 only), the initial latents, the masked image's VAE sample, then one latent-sized
    draw per re-noising scheduler step. So a result does not depend on its batch or device.
    """

    latents: torch.Tensor  # [B, 4, h, w]
    masked: torch.Tensor  # [B, 4, h, w]
    steps: torch.Tensor  # [n, B, 4, h, w], n = schedule.noise_draws
    image: torch.Tensor | None = None  # [B, 4, h, w] when strength < 1

    @classmethod
    def draw(cls, generators: list[torch.Generator], latent_shape: tuple[int, int, int], schedule: LCMSchedule):
        per_job = []
        for g in generators:
            image = torch.randn((1, *latent_shape), generator=g) if schedule.strength < 1.0 else None
            latents = torch.randn((1, *latent_shape), generator=g)
            masked = torch.randn((1, *latent_shape), generator=g)
            steps = [torch.randn((1, *latent_shape), generator=g) for _ in range(schedule.noise_draws)]
            per_job.append((image, latents, masked, steps))
        n = schedule.noise_draws
        return cls(
            latents=torch.cat([j[1] for j in per_job]),
            masked=torch.cat([j[2] for j in per_job]),
            steps=torch.stack([torch.cat([j[3][i] for j in per_job]) for i in range(n)])
            if n
            else torch.zeros((0, len(per_job), *latent_shape)),
            image=torch.cat([j[0] for j in per_job]) if schedule.strength < 1.0 else None,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"latents": self.latents, "masked": self.masked, "steps": self.steps}
        if self.image is not None:
            named["image"] = self.image
        return named

    def to(self, device: torch.device) -> "SamplingNoise":
        return SamplingNoise(**{name: to_device(t, device) for name, t in self.tensors().items()})


@dataclass
class CropBatch:
    """One batch of same-size crops on the engine's device, as uint8, plus its noise."""

    pixels: torch.Tensor  # [B, S, S, 3] uint8
    masks: torch.Tensor  # [B, S, S] uint8, 1 = remove
    noise: SamplingNoise

    @property
    def size(self) -> int:
        return self.pixels.shape[0]


@dataclass
class EncodedBatch:
    latents: torch.Tensor  # [B, 4, h, w], the sampling starting point
    latent_masks: torch.Tensor  # [B, 1, h, w]
    masked_latents: torch.Tensor  # [B, 4, h, w]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device in one copy: through pinned memory and non-blocking on CUDA."""
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def vae_dtype_for(unet_dtype: torch.dtype, device: torch.device, force_upcast: bool) -> torch.dtype:
    """The VAE runs in the UNet's dtype, except fp16 with a VAE that overflows in fp16 (SDXL's says
    force_upcast): then bf16 on CUDA (same range as fp32, 2-2.5x faster), fp32 elsewhere."""
    if unet_dtype == torch.float16 and force_upcast:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return unet_dtype


def configure_cuda_backends() -> None:
    """Made deliberately: cuDNN benchmarks convolution algorithms once per shape (the shapes are the
    buckets x padded batch sizes, all run at start: RemovalEngine.warm_up); fp32 stays true fp32 (TF32
    off): an fp32 run is the accuracy reference, bf16 is the fast path."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class RemovalEngine:
    def __init__(
        self,
        vae: AutoencoderKL,
        unet_runner: UNetRunner,
        scheduler: LCMScheduler,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        sampling: SamplingSettings = SamplingSettings(),
        cuda_graph: bool = False,
    ):
        self.runner = unet_runner
        self.device = unet_runner.device
        self.dtype = unet_runner.dtype
        self.vae_dtype = vae_dtype_for(self.dtype, self.device, vae.config.force_upcast)
        self.vae = vae.to(self.device, self.vae_dtype)
        self.channels_last = self.device.type == "cuda"
        if self.device.type == "cuda":
            configure_cuda_backends()
            self.vae = self.vae.to(memory_format=torch.channels_last)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        self.pooled_prompt_embeds = pooled_prompt_embeds.to(self.device, self.dtype)
        self.sampling = sampling
        self.schedule = LCMSchedule.from_scheduler(scheduler, sampling.steps, sampling.strength)
        self.timesteps = torch.tensor(self.schedule.timesteps, device=self.device)
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs = None
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
            if not isinstance(unet_runner, TorchUNetRunner):
                raise ValueError("whole-stage CUDA graphs run the torch runner; the TensorRT runner keeps its own")
            from engines.graphs import StageGraphs

            self.graphs = StageGraphs(self)
        self.warmed_batch_sizes: dict[int, list[int]] = {}  # side -> the sizes warmed, when batches are padded
        self._lock = threading.Lock()  # the graphs' static buffers serve one batch at a time

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        sampling: SamplingSettings | None = None,
        runner: RunnerKind = "torch",
        runner_path: str | Path | None = None,
        cuda_graph: bool = False,
        buckets: Sequence[int] = (),
    ) -> "RemovalEngine":
        """runner "torch" loads the bundle's UNet weights; "onnx" / "tensorrt" run an exported UNet
        (`runner_path`, unchecked; else the bundle's current export, see engines.runners.current_export)
        and do not load the UNet weights into torch. Exported graphs are float32 or float16:
        dtype None picks float32 on CPU, float16 on CUDA (or the file's own with a runner_path).
        `buckets`: the image sides it will run, at each of which the bundle's ONNX export must have passed its
        parity check.

        cuda_graph: the torch runner captures encode / denoise / decode per warmed shape
        (engines.graphs); the TensorRT runner replays a graph per UNet input shape; the ONNX
        runner has none (ONNX Runtime synchronises on every run)."""
        device = torch.device(device)
        engine_graphs = cuda_graph and runner == "torch"
        if runner == "torch":
            dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
            unet_runner = TorchUNetRunner(bundle.load_unet().to(dtype), device, compile=compile)
        else:
            if runner == "tensorrt" and device.type != "cuda":
                raise ValueError(f"the TensorRT runner needs a CUDA device, got {device}")
            if runner == "onnx" and cuda_graph:
                raise ValueError("the ONNX runner cannot replay CUDA graphs: ONNX Runtime synchronises on every run")
            if dtype is not None and dtype not in EXPORT_DTYPES.values():
                raise ValueError(f"the {runner} runner runs float32 or float16 exports, not {dtype}")
            sha256 = data_sha256 = sidecar_sha256 = rebuild = None
            if runner_path is None:
                dtype = dtype or default_export_dtype(device)
                export = current_export(bundle, runner, dtype, buckets=buckets)
                runner_path, sha256, data_sha256 = export.path, export.sha256, export.data_sha256
                sidecar_sha256 = export.sidecar_sha256
                rebuild = export_command(bundle, runner, dtype, buckets)
            unet_runner = make_unet_runner(
                runner,
                path=runner_path,
                device=device,
                dtype=dtype,
                compile=compile,
                cuda_graph=cuda_graph,
                sha256=sha256,
                data_sha256=data_sha256,
                sidecar_sha256=sidecar_sha256,
                rebuild=rebuild,
            )
        prompt_embeds, pooled = bundle.load_prompt_embeds()
        defaults = bundle.manifest.sampling
        return cls(
            vae=bundle.load_vae(),
            unet_runner=unet_runner,
            scheduler=bundle.make_scheduler(),
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            sampling=sampling or SamplingSettings(steps=defaults.steps, strength=defaults.strength),
            cuda_graph=engine_graphs,
        )

    # ------------------------------------------------------------------------------------------
    # the public calls

    def remove(self, jobs: list[RemovalJob], timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """Fill the masked region of each same-size crop; returns (S, S, 3) uint8 crops.

        `timings`, when given, receives the seconds spent in upload, vae_encode, unet, vae_decode
        and download (CUDA events on a GPU: no extra host sync).
        """
        sizes = {job.image.shape for job in jobs}
        if len(sizes) != 1:
            raise ValueError(f"a batch must hold one crop size, got {sorted(sizes)}")
        side = jobs[0].image.shape[0]
        self.check_side(side, jobs[0].image.shape[1])
        wanted = len(jobs)
        if self.graphs is None and side in self.warmed_batch_sizes:  # runs only warmed shapes (pads_batches)
            fits = [b for b in self.warmed_batch_sizes[side] if b >= wanted]
            jobs = jobs + [_blank_job(side)] * ((min(fits) if fits else wanted) - wanted)
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        noise = SamplingNoise.draw(generators, self.latent_shape(side, side), self.schedule)
        with self._lock:
            clock = StageClock(self.device, timings)
            batch = CropBatch(
                pixels=to_device(np.stack([job.image for job in jobs]), self.device),
                masks=to_device(np.stack([job.mask for job in jobs]).astype(np.uint8), self.device),
                noise=noise.to(self.device),
            )
            clock.lap("upload")
            if self.graphs is not None and self.graphs.holds(batch):
                pixels = self.graphs.run(batch, clock)
            else:
                pixels = self._run(batch, clock)
            result = pixels.cpu().numpy()  # the one wait for the device
            clock.lap("download")
            clock.finish()
        return list(result[:wanted])

    @torch.inference_mode()
    def generate(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        generators: list[torch.Generator],
        timings: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """images [B,3,H,W] in [-1, 1], masks [B,1,H,W] in {0, 1} -> images [B,3,H,W] in [0, 1]:
        the float path diffusers' pipeline takes, for parity checks."""
        _, _, height, width = images.shape
        self.check_side(height, width)
        noise = SamplingNoise.draw(generators, self.latent_shape(height, width), self.schedule).to(self.device)
        clock = StageClock(self.device, timings)
        encoded = self.encode(images.to(self.device), masks.to(self.device), noise)
        clock.lap("vae_encode")
        latents = self.denoise(encoded, noise.steps)
        clock.lap("unet")
        decoded = self.decode(latents)
        clock.lap("vae_decode")
        clock.finish()
        return decoded

    # ------------------------------------------------------------------------------------------
    # the stages: device tensors in, device tensors out, no host sync

    def check_side(self, height: int, width: int) -> None:
        multiple = 4 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"crop sides must be multiples of {multiple}, got {height}x{width}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (4, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @torch.inference_mode()
    def _run(self, batch: CropBatch, clock: StageClock) -> torch.Tensor:
        images, masks = self.normalize(batch)
        encoded = self.encode(images, masks, batch.noise)
        clock.lap("vae_encode")
        latents = self.denoise(encoded, batch.noise.steps)
        clock.lap("unet")
        pixels = self.decode_pixels(latents)
        clock.lap("vae_decode")
        return pixels

    def normalize(self, batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,S,S,3] / [B,S,S] -> images [B,3,S,S] in [-1, 1] and masks [B,1,S,S] in {0, 1}, fp32."""
        images = batch.pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = batch.masks.unsqueeze(1).float()
        return images, masks

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, masks: torch.Tensor, noise: SamplingNoise) -> EncodedBatch:
        masked_images = images * (masks < 0.5)
        if self.schedule.strength < 1.0:
            image_latents = self._vae_sample(images, noise.image)
            sqrt_alpha, sqrt_beta = self.schedule.first_step_noise_scale()
            latents = sqrt_alpha * image_latents + sqrt_beta * noise.latents.to(self.dtype)
        else:
            latents = noise.latents.to(self.dtype) * self.schedule.init_noise_sigma
        masked_latents = self._vae_sample(masked_images, noise.masked)
        latent_masks = F.interpolate(masks, size=latents.shape[-2:]).to(self.dtype)
        return EncodedBatch(latents, latent_masks, masked_latents)

    @torch.inference_mode()
    def denoise(self, encoded: EncodedBatch, step_noise: torch.Tensor) -> torch.Tensor:
        """The LCM steps: UNet, then the scheduler's update with this step's pre-drawn noise."""
        latents = encoded.latents
        cond = self.conditioning(latents.shape[0], *latents.shape[-2:])
        draws = iter(step_noise)
        for index, step in enumerate(self.schedule.steps):
            unet_input = torch.cat([latents, encoded.latent_masks, encoded.masked_latents], dim=1)
            noise_pred = self.runner(unet_input, self.timesteps[index], cond)
            noise = next(draws).to(latents.dtype) if step.adds_noise else None
            latents = LCMSchedule.step(step, noise_pred, latents, noise)
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> images [B,3,H,W] in [0, 1], fp32."""
        decoded = self.vae.decode(latents.to(self.vae_dtype) / self.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> uint8 [B,H,W,3] on the device (a quarter of the bytes to copy back)."""
        return (self.decode(latents) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def conditioning(self, batch: int, latent_h: int, latent_w: int) -> UNetConditioning:
        key = (latent_h, latent_w)
        if key not in self._time_ids:  # one upload per crop size, at warm-up
            h, w = latent_h * self.vae_scale_factor, latent_w * self.vae_scale_factor
            self._time_ids[key] = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype)
        return UNetConditioning(
            encoder_hidden_states=self.prompt_embeds.expand(batch, -1, -1),
            text_embeds=self.pooled_prompt_embeds.expand(batch, -1),
            time_ids=self._time_ids[key].expand(batch, -1),
        )

    def unet_input_shapes(self, side: int, batch: int) -> dict[str, tuple[int, ...]]:
        """What an exported UNet is fed for one batch of one crop side (flat_inputs on meta tensors: shapes only)."""
        channels, h, w = self.latent_shape(side, side)
        sample = torch.empty((batch, 2 * channels + 1, h, w), device="meta")  # latents, mask, masked latents
        dtypes = dict.fromkeys(UNET_INPUTS, self.dtype)
        feeds = flat_inputs(sample, self.timesteps[0], self.conditioning(batch, h, w), dtypes)
        return {name: tuple(tensor.shape) for name, tensor in feeds.items()}

    def _vae_sample(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample with the job's pre-drawn noise, scaled, in the UNet's dtype."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        posterior = self.vae.encode(images.to(self.vae_dtype)).latent_dist
        sample = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return (sample * self.scaling_factor).to(self.dtype)

    # ------------------------------------------------------------------------------------------
    # start-up

    def warm_up(self, max_batch_sizes: dict[int, int]) -> dict:
        """Run (and with graphs, capture) every shape requests can take, so none pays for it later.
        `max_batch_sizes`: crop side -> its largest batch. Where batches are padded (`pads_batches`) each
        side runs at every padded batch size up to its largest, and requests are padded to those; else
        batch 1 per side (the allocator's first blocks)."""
        started = time.perf_counter()
        pads = pads_batches(self.device, self.runner)
        sizes = {side: padded_batch_sizes(largest) if pads else [1] for side, largest in max_batch_sizes.items()}
        check_holds = getattr(self.runner, "check_holds", None)  # a TensorRT plan runs only its profiles' shapes
        if check_holds is not None:
            check_holds([self.unet_input_shapes(side, batch) for side, batches in sizes.items() for batch in batches])
        shapes = []
        report = {"capture_s": {}}
        for side, batches in sorted(sizes.items(), reverse=True):
            if self.graphs is not None:
                report["capture_s"].update(self.graphs.capture([side], batches)["capture_s"])
            else:
                if pads:
                    self.warmed_batch_sizes[side] = batches
                for batch in batches:
                    self.remove([_blank_job(side)] * batch)
            shapes += [[side, b] for b in batches]
        report["shapes"] = sorted(shapes)
        report["seconds"] = round(time.perf_counter() - started, 2)
        return report


def pads_batches(device: torch.device, runner: UNetRunner) -> bool:
    """Whether a side runs only at its padded batch sizes, all warmed at start. On CUDA, whatever the runner:
    each new shape costs a set-up there (cuDNN's algorithm search, as configure_cuda_backends asks; a
    TensorRT context and its CUDA graph; ONNX Runtime's allocations), which must not land in a request.
    On the CPU only for a compiled UNet (a compilation per shape): eager torch and ONNX Runtime have no
    per-shape set-up there, and padding would cost compute (a batch of 5 running as 8)."""
    return device.type == "cuda" or getattr(runner, "compiled", False)


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes warmed (and captured) per side: powers of two up to the largest, and it.
    A batch runs at the smallest that holds it, so the set of shapes stays small and known."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _blank_job(side: int) -> RemovalJob:
    mask = np.zeros((side, side), bool)
    mask[side // 4 : side // 2, side // 4 : side // 2] = True
    return RemovalJob(np.zeros((side, side, 3), np.uint8), mask, seed=0)
