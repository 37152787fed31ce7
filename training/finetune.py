"""`finetune`: the whole inpainting UNet trained on (source, mask, GT) triplets, as RORem was.

One training example, exactly (RORem paper; diffusers' SDXL training recipe):

    latents        = VAE(GT) posterior sample * scaling_factor
    masked_latents = VAE(source * (1 - mask)) posterior sample * scaling_factor
    noise ~ N(0, I); t ~ U{0, ..., 999}; noisy = DDPM add_noise(latents, noise, t)
    prediction     = UNet(cat(noisy, mask at latent size, masked_latents), t,
                          prompt "" embeddings, pooled "" embeddings, time_ids (R, R, 0, 0, R, R))
    loss           = MSE(prediction, noise)        (the velocity instead for a v-prediction base)

AdamW, gradient accumulation, mixed precision, optional EMA of the weights. The result is written
as a diffusers UNet folder (out/unet, the EMA weights when EMA is on): the authors' `rorem_unet`
layout, which `bundle` (engines.authors_layout) consumes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

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
    null_prompt_embeds,
    resolve_base,
    resolve_unet,
    sdxl_time_ids,
)
from training.data import TripletDataset, load_metadata
from training.loop import train


class FinetuneSettings(TrainSettings):
    unet: str | None = Field(None, description="UNet folder to start from (default: the base's unet/)")
    ema: bool = Field(False, description="keep an EMA of the weights and save it as the result")
    ema_decay: float = Field(0.9999, gt=0, lt=1)


def finetune(settings: FinetuneSettings) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    accelerator = make_accelerator(settings)
    summary = RunSummary("finetune", settings, accelerator)
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[settings.mixed_precision]
    torch.manual_seed(settings.seed)

    records = load_metadata(settings.data, require=("source", "mask", "GT"))
    dataset = TripletDataset(records, settings.resolution)
    base = resolve_base(settings.base, settings.cache_dir)
    unet_dir = resolve_unet(settings.unet, base)

    vae = load_frozen_vae(base, device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    prompt_embeds, pooled = (t.to(device) for t in null_prompt_embeds(base))
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    if unet.config.in_channels != 9:
        raise TrainingError(f"{unet_dir}: {unet.config.in_channels} input channels; an inpainting UNet has 9")
    unet.requires_grad_(True)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if settings.ema:
        ema = EMAModel(
            unet.parameters(), decay=settings.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config
        )
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"{base}/scheduler: prediction_type {prediction_type!r} is not supported")

    def compute_loss(unet, batch, generator):
        gt, source, mask = batch["gt"], batch["source"], batch["mask"]
        bsz = gt.shape[0]
        latents = encode_latents(vae, gt, generator)
        masked_latents = encode_latents(vae, source * (mask < 0.5), generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        unet_input = torch.cat([noisy, latent_mask(mask, latents), masked_latents], dim=1)
        prediction = unet(
            unet_input,
            timesteps,
            encoder_hidden_states=prompt_embeds.expand(bsz, -1, -1),
            added_cond_kwargs={
                "text_embeds": pooled.expand(bsz, -1),
                "time_ids": sdxl_time_ids(settings.resolution, bsz, device, prompt_embeds.dtype),
            },
        ).sample
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())

    trained = train(
        settings, accelerator, summary, unet, dataset, compute_loss, ema=ema, inputs=frozen_base_parts(base)
    )

    out_unet = Path(settings.out).resolve() / "unet"
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(trained.parameters())
            ema.copy_to(trained.parameters())
        trained.save_pretrained(out_unet)
        readable_as_any_file(out_unet)
        if ema is not None:
            ema.restore(trained.parameters())
    accelerator.wait_for_everyone()
    summary.data["outputs"] = {"unet": str(out_unet)}
    summary.data["metrics"] = {
        "samples": len(dataset),
        "ema": settings.ema,
        "base": str(base),
        "start_unet": str(unet_dir),
        "prediction_type": prediction_type,
    }
    summary.write("completed")
    return summary.data
