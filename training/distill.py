"""`distill`: LCM-LoRA distillation of a RORem UNet into a 4-step model (RORem-4S).

As in RORem's train_RORem_lcm.py (rank 64, DDIM teacher with 50 steps and skip k = 20, a guided teacher,
L2 loss, student and target with prompt "") and in the structure of diffusers'
examples/consistency_distillation/train_lcm_distill_lora_sdxl.py:

    x0 = VAE(GT); noise; n ~ U{0..49}; s = DDIM timestep n (19, 39, ..., 999); t = max(s - k, 0), k = 1000 / 50
    x_s   = add_noise(x0, noise, s);   cond = (mask at latent size, VAE(source * (1 - mask)))
    w ~ U[w_min, w_max] per sample (the authors': 3, 10)
    student: f(x_s, s)  = c_skip(s) x_s + c_out(s) x0_pred(UNet+LoRA(x_s, s, ""))                  (with grad)
    teacher: x0, eps    = p + w (p - n), p / n: the frozen UNet's x0_pred and eps with the teacher prompt /
                          the teacher negative prompt (the LCM paper's form of classifier-free guidance)
             x_t        = one DDIM step from s to t with that x0 and eps
    target:  f(x_t, t)  = c_skip(t) x_t + c_out(t) x0_pred(UNet+LoRA(x_t, t, ""))                  (no grad)
    loss = MSE(student, target)          ("huber" available, as in the diffusers example)

The teacher prompts default to the authors' quality prompt and its negative. With w_max = 0 the teacher is
one unguided pass with the teacher prompt (no negative pass); `--w-min 0 --w-max 0 --teacher-prompt ""
--teacher-negative-prompt ""` is the unguided teacher with prompt "" this stage had before it followed the authors.
c_skip / c_out are LCM's boundary conditions (sigma_data 0.5, timestep scaling 10, what diffusers'
LCMScheduler uses at inference). The teacher is the student's own UNet with its LoRA switched off: its
base weights are frozen, so this is the frozen teacher without a second copy of the UNet in memory. The
target uses the student without gradient, as the LoRA example does (no EMA target).

Output: out/lora/pytorch_lora_weights.safetensors, saved as the authors do
(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)) + save_lora_weights: attention
keys `.lora.down/.lora.up`, the rest `.lora_A/.lora_B`), with alpha = rank (scale 1; a different
`lora_alpha` is folded into the up matrices) so `engines.lora.fuse_lora_file` applies every tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from engines.bundle import readable_as_any_file
from training.common import (
    WEIGHT_DTYPES,
    RunSummary,
    TrainingError,
    TrainSettings,
    encode_latents,
    frozen_base_parts,
    latent_mask,
    load_frozen_vae,
    make_accelerator,
    resolve_base,
    resolve_unet,
    sdxl_time_ids,
)
from training.data import TripletDataset, load_metadata
from training.loop import train

LORA_FILENAME = "pytorch_lora_weights.safetensors"
AUTHORS_TEACHER_PROMPT = (
    "4K, high quality, masterpiece, Highly detailed, Sharp focus, Professional, photorealistic, realistic"
)
AUTHORS_TEACHER_NEGATIVE_PROMPT = (
    "low quality, worst, bad proportions, blurry, extra finger, Deformed, disfigured, unclear background"
)


class DistillSettings(TrainSettings):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    unet: str | None = Field(None, description="the RORem UNet to distill (teacher); default: the base's unet/")
    lora_rank: int = Field(64, ge=1, description="LoRA rank (64 in RORem-4S)")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default: the rank)")
    num_ddim_timesteps: int = Field(50, ge=2, description="teacher DDIM steps; skip k = 1000 / this (20)")
    timestep_scaling_factor: float = Field(10.0, gt=0, description="LCM boundary-condition scaling")
    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = Field(0.001, gt=0)
    teacher_prompt: str = Field(AUTHORS_TEACHER_PROMPT, description="the guided teacher's prompt (the authors')")
    teacher_negative_prompt: str = Field(
        AUTHORS_TEACHER_NEGATIVE_PROMPT, description="the guided teacher's negative prompt (the authors')"
    )
    w_min: float = Field(
        3.0, ge=0, allow_inf_nan=False, description="teacher guidance w ~ U[w_min, w_max] per sample (the authors': 3)"
    )
    w_max: float = Field(
        10.0, ge=0, allow_inf_nan=False, description="(the authors': 10); 0: an unguided teacher, one pass"
    )

    BEFORE_RECORDED: ClassVar[dict[str, Any]] = {
        "teacher_prompt": "", "teacher_negative_prompt": "", "w_min": 0.0, "w_max": 0.0,
    }  # fmt: skip

    @model_validator(mode="after")
    def _w_range(self) -> DistillSettings:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min {self.w_min} is above w_max {self.w_max}")
        return self


class DDIMSolver:
    """One DDIM step from DDIM timestep index n (timestep (n + 1) k - 1) to the previous one."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int, num_ddim_timesteps: int):
        self.skip = num_train_timesteps // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1  # 19, 39, ..., 999
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def to(self, device) -> DDIMSolver:
        self.timesteps = self.timesteps.to(device)
        self.alphas_cumprod_prev = self.alphas_cumprod_prev.to(device)
        return self

    def step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alphas_cumprod_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise


def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip(t), c_out(t): c_skip(0) = 1, c_out(0) = 0 (the consistency boundary condition)."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_x0_and_noise(output, timesteps, sample, alphas_cumprod, prediction_type):
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        x0 = alpha * sample - sigma * output
        return x0, alpha * output + sigma * sample
    raise TrainingError(f"prediction_type {prediction_type!r} is not supported")


def guided(positive: tuple[torch.Tensor, ...], negative: tuple[torch.Tensor, ...] | None, w: torch.Tensor):
    """The LCM paper's classifier-free guidance, which the authors' teacher uses: p + w (p - n) for each of
    (x0, eps); no negative prediction (w = 0 throughout) is p itself."""
    if negative is None:
        return positive
    return tuple(p + w * (p - n) for p, n in zip(positive, negative))


@contextmanager
def adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def distill(settings: DistillSettings) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from engines.authors_layout import encode_constant_prompt
    from engines.tiny import LCM_LORA_TARGETS

    accelerator = make_accelerator(settings)
    summary = RunSummary("distill", settings, accelerator)
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[settings.mixed_precision]
    torch.manual_seed(settings.seed)

    dataset = TripletDataset(load_metadata(settings.data, require=("source", "mask", "GT")), settings.resolution)
    base = resolve_base(settings.base, settings.cache_dir)
    unet_dir = resolve_unet(settings.unet, base)

    vae = load_frozen_vae(base, device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    prediction_type = noise_scheduler.config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    solver = DDIMSolver(
        noise_scheduler.alphas_cumprod, noise_scheduler.config.num_train_timesteps, settings.num_ddim_timesteps
    )
    solver.to(device)

    def embeds(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(device) for t in encode_constant_prompt(base, prompt))

    student_embeds = embeds("")
    teacher_embeds = embeds(settings.teacher_prompt)
    negative_embeds = embeds(settings.teacher_negative_prompt) if settings.w_max > 0 else None

    # the frozen base in the mixed dtype; the LoRA in fp32
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=weight_dtype)
    if unet.config.in_channels != 9:
        raise TrainingError(f"{unet_dir}: {unet.config.in_channels} input channels; an inpainting UNet has 9")
    unet.requires_grad_(False)
    alpha = settings.lora_alpha or settings.lora_rank
    unet.add_adapter(LoraConfig(r=settings.lora_rank, lora_alpha=alpha, target_modules=LCM_LORA_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device)

    def run_unet(model, sample, cond, timesteps, prompt=student_embeds):
        bsz, (prompt_embeds, pooled) = sample.shape[0], prompt
        return model(
            torch.cat([sample, *cond], dim=1),
            timesteps,
            encoder_hidden_states=prompt_embeds.expand(bsz, -1, -1),
            added_cond_kwargs={
                "text_embeds": pooled.expand(bsz, -1),
                "time_ids": sdxl_time_ids(settings.resolution, bsz, device, prompt_embeds.dtype),
            },
        ).sample.float()

    def teacher(model, noisy, cond, start, prompt):
        return predicted_x0_and_noise(run_unet(model, noisy, cond, start, prompt), start, noisy, alphas_cumprod,
                                      prediction_type)  # fmt: skip

    def compute_loss(model, batch, generator):
        gt, source, mask = batch["gt"], batch["source"], batch["mask"]
        bsz = gt.shape[0]
        latents = encode_latents(vae, gt, generator)
        masked_latents = encode_latents(vae, source * (mask < 0.5), generator)
        cond = (latent_mask(mask, latents), masked_latents)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        index = torch.randint(0, settings.num_ddim_timesteps, (bsz,), generator=generator).to(device)
        w = settings.w_min + (settings.w_max - settings.w_min) * torch.rand((bsz,), generator=generator)
        w = w.view(-1, 1, 1, 1).to(device)
        start = solver.timesteps[index]
        end = (start - solver.skip).clamp(min=0)
        c_skip_start, c_out_start = boundary_scalings(start, timestep_scaling=settings.timestep_scaling_factor)
        c_skip, c_out = boundary_scalings(end, timestep_scaling=settings.timestep_scaling_factor)
        noisy = noise_scheduler.add_noise(latents, noise, start)

        # student: the consistency function at s, with gradient
        output = run_unet(model, noisy, cond, start)
        x0, _ = predicted_x0_and_noise(output, start, noisy, alphas_cumprod, prediction_type)
        student = c_skip_start * noisy + c_out_start * x0

        with torch.no_grad():
            plain = accelerator.unwrap_model(model)
            # teacher: one DDIM step s -> t with the frozen UNet (the LoRA off), guided
            with adapters_disabled(plain):
                positive = teacher(plain, noisy, cond, start, teacher_embeds)
                negative = teacher(plain, noisy, cond, start, negative_embeds) if negative_embeds is not None else None
            teacher_x0, teacher_noise = guided(positive, negative, w)
            x_prev = solver.step(teacher_x0, teacher_noise, index)
            # target: the consistency function at t, the student without gradient
            target_output = run_unet(plain, x_prev, cond, end)
            target_x0, _ = predicted_x0_and_noise(target_output, end, x_prev, alphas_cumprod, prediction_type)
            target = c_skip * x_prev + c_out * target_x0

        if settings.loss_type == "l2":
            return F.mse_loss(student.float(), target.float())
        return torch.mean(torch.sqrt((student.float() - target.float()) ** 2 + settings.huber_c**2) - settings.huber_c)

    trained = train(
        settings,
        accelerator,
        summary,
        unet,
        dataset,
        compute_loss,
        inputs={"teacher UNet": unet_dir, **frozen_base_parts(base)},
    )

    out_dir = Path(settings.out).resolve() / "lora"
    tensors = 0
    if accelerator.is_main_process:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        if alpha != settings.lora_rank:  # fold alpha / rank into the up matrices: the file then has scale 1
            scale = alpha / settings.lora_rank
            layers = {k: v * scale if _is_up(k) else v for k, v in layers.items()}
        StableDiffusionXLInpaintPipeline.save_lora_weights(out_dir, unet_lora_layers=layers)
        readable_as_any_file(out_dir)
        tensors = len(layers)
    accelerator.wait_for_everyone()
    summary.data["outputs"] = {"lora": str(out_dir / LORA_FILENAME)}
    summary.data["metrics"] = {
        "teacher_unet": str(unet_dir),
        "lora_rank": settings.lora_rank,
        "lora_alpha": alpha,
        "lora_tensors": tensors,
        "ddim_timesteps": settings.num_ddim_timesteps,
        "teacher_guidance": [settings.w_min, settings.w_max],
        "skip": solver.skip,
        "prediction_type": prediction_type,
    }
    summary.write("completed")
    return summary.data


def _is_up(key: str) -> bool:
    return key.endswith((".lora.up.weight", ".lora_B.weight"))
