"""`discriminator`: RORem's D_phi, trained on labelled (source, mask, edited, score) data.

D_phi (see engines.scorer) is the base inpainting UNet's trunk with LoRA rank 4 / alpha 4 on the
attention projections (to_q, to_k, to_v, to_out.0) and the head `cls_pred_branch`; only the LoRA
and the head are trained, with MSE between softplus(head) and the 0/1 label. Its input is exactly
what `engines.scorer.ScoringEngine` feeds it: cat(VAE mean latent of the edited image, mask at
latent size, VAE mean latent of the unmasked source), timestep 0, prompt "", time_ids (R,R,0,0,R,R).

Data: the labelled metadata format (source, mask, GT = the edited image, score), e.g. from
`synthetic` with negatives. Each record is cut as POST /score cuts a removal (training.data.score_view_job:
the mask dilated by `dilate`, one window around it at `buckets` and `crop_margin`, the service's defaults)
and viewed at SCORE_SIZE as the Scorer views it; records with an empty mask are left out and counted. A
held-out split is taken *by source image* (all edits of one source on the same side, so the held-out set
never shares a photo with the training set), deterministically from the seed. After training, precision / recall / F1 / accuracy at thresholds 0.5 (success) and
0.9 (auto-admission) on the held-out split go into the summary.

Output: out/discriminator/ in the authors' published format, `pytorch_lora_weights.safetensors`
(convert_state_dict_to_diffusers(get_peft_model_state_dict(...)) + save_lora_weights) and
`cls_pred_branch.pt` (torch.save of the head's `cls_pred_branch.*` tensors), which
`engines.scorer.load_published_discriminator` and the `bundle` stage load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from engines.bundle import readable_as_any_file
from engines.jobs import SCORE_SIZE
from engines.pipeline import CropSettings
from serve.config import ImagingSettings
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
from training.data import Triplet, TripletDataset, load_metadata, read_mask
from training.loop import train

_IMAGING = ImagingSettings.model_fields
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
THRESHOLDS = (0.5, 0.9)
MAX_LISTED = 1000  # items listed in the summary: held-out scores, records left out


class DiscriminatorSettings(TrainSettings):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    unet: str | None = Field(None, description="base inpainting UNet folder (default: the base's unet/)")
    lora_rank: int = Field(4, ge=1, description="LoRA rank (alpha = rank), 4 in RORem")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="share of source images held out for metrics")
    eval_batch_size: int = Field(8, ge=1)
    # how the service cuts a removal for its Scorer (serve.config.ImagingSettings): each record is trained on that view
    buckets: list[int] = _IMAGING["buckets"]
    crop_margin: int = _IMAGING["crop_margin"]
    dilate: int = _IMAGING["dilate"]

    RESUME_MAY_CHANGE = TrainSettings.RESUME_MAY_CHANGE | {"eval_batch_size"}
    # a checkpoint from before the windows was trained on each image's centre square, not the service's cut
    BEFORE_RECORDED: ClassVar[dict[str, Any]] = {"dilate": "(none: the centre square, before the service's windows)"}

    @field_validator("resolution")
    @classmethod
    def _the_side_the_service_scores(cls, value: int) -> int:
        """A setting, refused with the others (exit 2) before anything is loaded or written."""
        if value != SCORE_SIZE:
            raise ValueError(
                f"resolution {value}: the discriminator trains at {SCORE_SIZE} only, the side of the view the service "
                f"scores every crop on (engines.jobs.SCORE_SIZE); trained at another side it would be served on a "
                "view it never saw"
            )
        return value


def split_by_source(records: Sequence[Triplet], fraction: float, seed: int) -> tuple[list[Triplet], list[Triplet]]:
    """(train, held_out): whole source images (a record's `group`, else its source file) go to one side; at
    least one is held out if fraction > 0."""
    sources = sorted({_photo(r) for r in records})
    count = min(len(sources) - 1, max(1, round(fraction * len(sources)))) if fraction > 0 else 0
    held = set(np.random.default_rng(seed).permutation(sources)[:count].tolist()) if count > 0 else set()
    train_set = [r for r in records if _photo(r) not in held]
    held_out = [r for r in records if _photo(r) in held]
    return train_set, held_out


def without_empty_masks(records: Sequence[Triplet]) -> tuple[list[Triplet], list[Triplet]]:
    """(kept, left out): a record with an empty mask has no removal to judge and no window to cut. The view of any
    other one holds mask pixels (engines.pipeline.score_mask keeps every region in it)."""
    masked = [read_mask(record.mask).any() for record in records]
    return [r for r, m in zip(records, masked) if m], [r for r, m in zip(records, masked) if not m]


def _photo(record: Triplet) -> str:
    return record.group or str(record.source)


def classification_metrics(
    scores: Sequence[float], labels: Sequence[float], threshold: float
) -> dict[str, float | int]:
    """Predicted positive = score >= threshold; actual positive = label >= 0.5. Undefined ratios are 0."""
    predicted = np.asarray(scores) >= threshold
    actual = np.asarray(labels) >= 0.5
    tp, fp = int(np.sum(predicted & actual)), int(np.sum(predicted & ~actual))
    fn, tn = int(np.sum(~predicted & actual)), int(np.sum(~predicted & ~actual))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / max(len(predicted), 1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": accuracy,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def discriminator_input(vae, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """cat(edited latent, mask at latent size, unmasked source latent): 9 channels, posterior means."""
    edited = encode_latents(vae, batch["gt"])
    source = encode_latents(vae, batch["source"])
    return torch.cat([edited, latent_mask(batch["mask"], edited), source], dim=1)


def train_discriminator(settings: DiscriminatorSettings) -> dict:
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from engines.scorer import HEAD_FILENAME, Discriminator

    accelerator = make_accelerator(settings)
    summary = RunSummary("discriminator", settings, accelerator)
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[settings.mixed_precision]
    torch.manual_seed(settings.seed)

    records = load_metadata(settings.data, require=("source", "mask", "GT", "score"))
    records, unmasked = without_empty_masks(records)
    if not records:
        raise TrainingError(f"{settings.data}: every record's mask is empty: there is no removal to judge")
    train_records, held_out = split_by_source(records, settings.holdout_fraction, settings.seed)
    if not train_records:
        raise TrainingError(f"{settings.data}: no training records left after the held-out split")
    base = resolve_base(settings.base, settings.cache_dir)

    vae = load_frozen_vae(base, device, weight_dtype)
    prompt_embeds, pooled = (t.to(device) for t in null_prompt_embeds(base))
    unet_dir = resolve_unet(settings.unet, base)
    base_unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    disc = Discriminator.from_unet(base_unet).float()
    del base_unet
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_side = settings.resolution // vae_factor
    if latent_side < disc.min_latent_side or latent_side % disc.latent_multiple:
        raise TrainingError(
            f"resolution {settings.resolution} is too small for this discriminator: its head needs at least "
            f"{disc.min_latent_side * vae_factor} px (512 for SDXL, the size RORem trained and scores at)"
        )
    disc.requires_grad_(False)
    lora_config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, target_modules=LORA_TARGETS)
    disc = inject_adapter_in_model(lora_config, disc)
    disc.cls_pred_branch.requires_grad_(True)
    if weight_dtype != torch.float32:  # frozen trunk in the mixed dtype; LoRA and head stay fp32
        disc.to(weight_dtype)
        for p in disc.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    disc.to(device)

    def scores_of(model, batch):
        sample = discriminator_input(vae, batch)
        bsz = sample.shape[0]
        return model(
            sample,
            torch.zeros((), dtype=torch.long, device=device),
            encoder_hidden_states=prompt_embeds.expand(bsz, -1, -1),
            text_embeds=pooled.expand(bsz, -1),
            time_ids=sdxl_time_ids(settings.resolution, bsz, device, prompt_embeds.dtype),
        )

    def compute_loss(model, batch, generator):
        return F.mse_loss(scores_of(model, batch).float(), batch["score"].float())

    crops = CropSettings(tuple(settings.buckets), settings.crop_margin, settings.dilate, feather=0)
    train_set = TripletDataset(train_records, settings.resolution, crops)
    trained = train(
        settings,
        accelerator,
        summary,
        disc,
        train_set,
        compute_loss,
        inputs={"base UNet": unet_dir, **frozen_base_parts(base)},
    )

    metrics = {
        "train_records": len(train_records),
        "heldout_records": len(held_out),
        "empty_mask_records": len(unmasked),
        "empty_mask_sources": [str(r.source) for r in unmasked[:MAX_LISTED]],
        "base_unet": str(unet_dir),
    }
    if held_out and accelerator.is_main_process:
        metrics["heldout"] = evaluate(
            scores_of,
            trained,
            TripletDataset(held_out, settings.resolution, crops),
            settings.eval_batch_size,
            device,
        )
    out_dir = Path(settings.out).resolve() / "discriminator"
    if accelerator.is_main_process:
        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
        lora_layers = {k: v.detach().float().cpu().contiguous() for k, v in lora_layers.items()}
        StableDiffusionXLInpaintPipeline.save_lora_weights(out_dir, unet_lora_layers=lora_layers)
        head = {
            f"cls_pred_branch.{k}": v.detach().float().cpu().clone()
            for k, v in trained.cls_pred_branch.state_dict().items()
        }
        torch.save(head, out_dir / HEAD_FILENAME)
        readable_as_any_file(out_dir)
    accelerator.wait_for_everyone()
    summary.data["outputs"] = {"discriminator": str(out_dir)}
    summary.data["metrics"] = metrics
    summary.write("completed")
    return summary.data


@torch.no_grad()
def evaluate(scores_of, model, dataset: TripletDataset, batch_size: int, device) -> dict:
    """Scores of the held-out set, its MSE, and classification metrics at each threshold."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        scores += scores_of(model, batch).float().cpu().tolist()
        labels += batch["score"].float().cpu().tolist()
    return {
        "count": len(labels),
        "positives": int(sum(label >= 0.5 for label in labels)),
        "mse": float(np.mean((np.asarray(scores) - np.asarray(labels)) ** 2)),
        "mean_score_positive": _mean([s for s, label in zip(scores, labels) if label >= 0.5]),
        "mean_score_negative": _mean([s for s, label in zip(scores, labels) if label < 0.5]),
        "thresholds": {str(t): classification_metrics(scores, labels, t) for t in THRESHOLDS},
        "scores": [round(s, 6) for s in scores[:MAX_LISTED]],  # in held-out order, for inspection
        "labels": labels[:MAX_LISTED],
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
