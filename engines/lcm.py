"""The LCM sampling schedule as a table of plain numbers, so the sampling loop never asks the GPU.

diffusers' `LCMScheduler.step` indexes a CPU `alphas_cumprod` table with the (CUDA) timestep and
draws its noise from CPU generators inside the loop: each is a host sync, and none can be
captured in a CUDA graph. `LCMSchedule` asks the scheduler once, on the host, for every number
the loop needs (its timesteps, `alphas_cumprod` entries and boundary scalings), and `step`
does the same arithmetic with those numbers and noise drawn beforehand. A test checks it
against `LCMScheduler.step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import LCMScheduler

from engines.sampling import steps_run


@dataclass(frozen=True)
class LCMStep:
    timestep: int
    sqrt_alpha: float  # sqrt(alphas_cumprod[t])
    sqrt_beta: float  # sqrt(1 - alphas_cumprod[t])
    c_skip: float
    c_out: float
    sqrt_alpha_prev: float
    sqrt_beta_prev: float
    adds_noise: bool  # every step but the schedule's last re-noises towards the next timestep


@dataclass(frozen=True)
class LCMSchedule:
    steps: tuple[LCMStep, ...]
    init_noise_sigma: float
    strength: float

    @classmethod
    def from_scheduler(cls, scheduler: LCMScheduler, num_steps: int, strength: float) -> "LCMSchedule":
        """The steps diffusers' SDXL inpaint pipeline runs for `num_steps` at `strength`:
        strength < 1 skips the first steps (the reference's 0.99 drops one of four)."""
        config = scheduler.config
        if config.prediction_type != "epsilon" or config.thresholding or config.clip_sample:
            raise ValueError(
                "RORem-4S samples with an epsilon-predicting LCM scheduler without thresholding or clipping, got "
                f"prediction_type={config.prediction_type!r}, thresholding={config.thresholding}, "
                f"clip_sample={config.clip_sample}"
            )
        scheduler = LCMScheduler.from_config(config)
        scheduler.set_timesteps(num_steps, device="cpu")
        timesteps = scheduler.timesteps
        skipped = num_steps - steps_run(num_steps, strength)
        if skipped >= len(timesteps):
            raise ValueError(f"strength {strength} leaves no step of {num_steps}")
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        steps = []
        for index in range(skipped, len(timesteps)):
            t = timesteps[index]
            prev = timesteps[index + 1] if index + 1 < len(timesteps) else t
            alpha = alphas[t]
            alpha_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            steps.append(
                LCMStep(
                    timestep=int(t),
                    sqrt_alpha=float(alpha.sqrt()),
                    sqrt_beta=float((1 - alpha).sqrt()),
                    c_skip=float(c_skip),
                    c_out=float(c_out),
                    sqrt_alpha_prev=float(torch.as_tensor(alpha_prev).sqrt()),
                    sqrt_beta_prev=float((1 - torch.as_tensor(alpha_prev)).sqrt()),
                    adds_noise=index != num_steps - 1,
                )
            )
        return cls(steps=tuple(steps), init_noise_sigma=float(scheduler.init_noise_sigma), strength=strength)

    @property
    def timesteps(self) -> list[int]:
        return [s.timestep for s in self.steps]

    @property
    def noise_draws(self) -> int:
        """How many latent-shaped noise tensors the loop consumes (one per re-noising step)."""
        return sum(s.adds_noise for s in self.steps)

    def first_step_noise_scale(self) -> tuple[float, float]:
        """(sqrt(alpha_t), sqrt(1 - alpha_t)) of the first step: `add_noise` for strength < 1."""
        first = self.steps[0]
        return first.sqrt_alpha, first.sqrt_beta

    @staticmethod
    def step(step: LCMStep, noise_pred: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """`LCMScheduler.step`'s prev_sample for an epsilon-predicting model, with the noise given."""
        predicted_original = (sample - step.sqrt_beta * noise_pred) / step.sqrt_alpha
        denoised = step.c_out * predicted_original + step.c_skip * sample
        if not step.adds_noise:
            return denoised
        return step.sqrt_alpha_prev * denoised + step.sqrt_beta_prev * noise
