"""RORem-4S removal: the whole sampling loop in one readable place.

The loop follows diffusers' `StableDiffusionXLInpaintPipeline` with `LCMScheduler`, guidance 1
(no classifier-free guidance, so the UNet batch is not doubled) and constant prompt embeddings,
and draws its random numbers in the same order from one generator per job. That makes a job's
result independent of the batch it ran in, and lets tests check parity with diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, LCMScheduler

from engines.bundle import Bundle
from engines.runners import (
    EXPORT_DTYPES,
    RunnerKind,
    TorchUNetRunner,
    UNetConditioning,
    UNetRunner,
    check_export_is_current,
    default_export_dtype,
    default_export_path,
    make_unet_runner,
)
from engines.timing import StageClock


@dataclass
class RemovalJob:
    """One square crop to fill: white (True) mask pixels are removed."""

    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) bool
    seed: int


@dataclass(frozen=True)
class SamplingSettings:
    """steps=4 at strength 1.0 runs t = 999, 759, 499, 259. The authors' reference passes
    strength 0.99, which drops the first step and runs only 3 UNet passes (759, 499, 259)."""

    steps: int = 4
    strength: float = 1.0


class RemovalEngine:
    def __init__(
        self,
        vae: AutoencoderKL,
        unet_runner: UNetRunner,
        scheduler: LCMScheduler,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        sampling: SamplingSettings = SamplingSettings(),
    ):
        self.runner = unet_runner
        self.device = unet_runner.device
        self.dtype = unet_runner.dtype
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and vae.config.force_upcast) else self.dtype
        self.vae = vae.to(self.device, self.vae_dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scheduler_config = scheduler.config
        self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        self.pooled_prompt_embeds = pooled_prompt_embeds.to(self.device, self.dtype)
        self.sampling = sampling

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
    ) -> "RemovalEngine":
        """runner "torch" loads the bundle's UNet weights; "onnx" / "tensorrt" run an exported UNet
        (`runner_path`, else the bundle's recorded export, see engines.runners.default_export_path)
        and do not load the UNet weights into torch. Exported graphs are float32 or float16:
        dtype None picks float32 on CPU, float16 on CUDA (or the file's own with a runner_path)."""
        device = torch.device(device)
        if runner == "torch":
            dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
            unet_runner = TorchUNetRunner(bundle.load_unet().to(dtype), device, compile=compile)
        else:
            if runner == "tensorrt" and device.type != "cuda":
                raise ValueError(f"the TensorRT runner needs a CUDA device, got {device}")
            if dtype is not None and dtype not in EXPORT_DTYPES.values():
                raise ValueError(f"the {runner} runner runs float32 or float16 exports, not {dtype}")
            if runner_path is None:
                dtype = dtype or default_export_dtype(device)
                check_export_is_current(bundle, runner, dtype)
                runner_path = default_export_path(bundle, runner, dtype)
            unet_runner = make_unet_runner(
                runner, path=runner_path, device=device, dtype=dtype, compile=compile, cuda_graph=cuda_graph
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
        )

    def remove(self, jobs: list[RemovalJob], timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """Fill the masked region of each same-size crop; returns (S, S, 3) uint8 crops.

        `timings`, when given, receives the seconds spent in vae_encode, unet and vae_decode.
        """
        sizes = {job.image.shape for job in jobs}
        if len(sizes) != 1:
            raise ValueError(f"a batch must hold one crop size, got {sorted(sizes)}")
        images = torch.from_numpy(np.stack([job.image for job in jobs])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = torch.from_numpy(np.stack([job.mask for job in jobs])).unsqueeze(1).float()
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        decoded = self.generate(images, masks, generators, timings)
        pixels = (decoded * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(pixels)

    @torch.inference_mode()
    def generate(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        generators: list[torch.Generator],
        timings: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """images [B,3,H,W] in [-1, 1], masks [B,1,H,W] in {0, 1} -> images [B,3,H,W] in [0, 1]."""
        batch, _, height, width = images.shape
        if height % (4 * self.vae_scale_factor) or width % (4 * self.vae_scale_factor):
            raise ValueError(f"crop sides must be multiples of {4 * self.vae_scale_factor}, got {height}x{width}")
        latent_shape = (4, height // self.vae_scale_factor, width // self.vae_scale_factor)

        scheduler = LCMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.sampling.steps, device=self.device)
        skipped = self.sampling.steps - min(int(self.sampling.steps * self.sampling.strength), self.sampling.steps)
        timesteps = scheduler.timesteps[skipped:]
        scheduler.set_begin_index(skipped)
        if len(timesteps) == 0:
            raise ValueError(f"strength {self.sampling.strength} leaves no step of {self.sampling.steps}")

        clock = StageClock(self.device, timings)
        images = images.to(self.device)
        masks = masks.to(self.device)
        masked_images = images * (masks < 0.5)

        image_latents = None
        if self.sampling.strength < 1.0:
            image_latents = self._encode(images, generators)
        noise = _randn(latent_shape, generators, self.device, self.dtype)
        if image_latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        masked_latents = self._encode(masked_images, generators)
        latent_masks = torch.nn.functional.interpolate(masks, size=latent_shape[1:]).to(self.dtype)
        clock.lap("vae_encode")

        cond = UNetConditioning(
            encoder_hidden_states=self.prompt_embeds.expand(batch, -1, -1),
            text_embeds=self.pooled_prompt_embeds.expand(batch, -1),
            time_ids=torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype).expand(
                batch, -1
            ),
        )
        for t in timesteps:
            unet_input = torch.cat([scheduler.scale_model_input(latents, t), latent_masks, masked_latents], dim=1)
            noise_pred = self.runner(unet_input, t, cond)
            latents = scheduler.step(noise_pred, t, latents, generator=generators, return_dict=False)[0]
        clock.lap("unet")

        decoded = self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        decoded = (decoded.float() / 2 + 0.5).clamp(0, 1)
        clock.lap("vae_decode")
        return decoded

    def _encode(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """VAE posterior sample, each job's noise drawn from that job's generator, as diffusers does."""
        posterior = self.vae.encode(images.to(self.vae_dtype)).latent_dist
        noise = _randn(posterior.mean.shape[1:], generators, self.device, posterior.mean.dtype)
        return ((posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor).to(self.dtype)

def _randn(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """One draw per job from its own CPU generator: the same numbers on every device and batch."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(device)
