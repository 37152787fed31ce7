"""RORem's discriminator D_phi as a batched scoring engine: "did this removal succeed?" in [0, inf).

Why it exists: the RORem authors trained D_phi on human 0/1 labels to judge removals (threshold 0.5
for success, 0.9 to admit training data). Serving it next to the remover lets a caller score a
result, or the service report a quality signal, without a person looking at it.

What it is (RORem paper and reference code): the *base* SDXL-inpainting UNet cut after its mid
block (conv_in, time and added embeddings, down blocks, mid block; no up blocks), LoRA rank 4 on
the attention projections, and a small conv head `cls_pred_branch` on the mid output:
3 x [Conv2d C->C k4 (s2 p1, s2 p1, s4 p0) + GroupNorm(32, C) + SiLU], Conv2d C->1 k1, softplus.
Its input is cat(latent of the edited image, mask at latent size, latent of the *unmasked* source)
at timestep 0 with the embeddings of the prompt "" and time_ids (512, 512, 0, 0, 512, 512).

Decisions:
- The trunk's modules carry the UNet's own attribute names, so its state-dict keys equal the
  UNet's (`down_blocks.1.attentions.0...`) and the authors' LoRA file and the head file
  (`cls_pred_branch.*`) load without renaming. The LoRA is fused once at import (`engines.lora`);
  a bundle stores trunk + head with the LoRA already in the weights.
- Every crop is scored on a `score_size` x `score_size` view (512): the discriminator was trained
  at 512 only and its head maps a 16x16 mid output to 1x1. A 1024 crop is downscaled (antialiased
  bilinear), a 256 crop upscaled, a non-square crop squashed, as the reference squashes its inputs.
  Were a larger view used, the head's output map would be larger than 1x1; its logits are then
  averaged before the softplus (not what the authors trained; the engine never does it).
- Latents are the VAE posterior MEAN times the scaling factor, and no noise is added: the
  reference noises the edited latent "at t=0", i.e. with std sqrt(1 - alphas_cumprod[0]) ~ 0.03,
  which only makes its score jitter. Left out, the same pair always gets the same score.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from engines.jobs import SCORE_SIZE, ScoreJob
from engines.lora import LoRAError, fuse_lora_file, open_lora, read_lora_file
from engines.timing import StageClock

if TYPE_CHECKING:
    from engines.bundle import Bundle

TRUNK_MODULES = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "add_time_proj",
    "add_embedding",
    "down_blocks",
    "mid_block",
)
HEAD_KEYS = tuple(f"cls_pred_branch.{i}.{p}" for i in (0, 1, 3, 4, 6, 7, 9) for p in ("weight", "bias"))
LORA_FILENAME = "pytorch_lora_weights.safetensors"
HEAD_FILENAME = "cls_pred_branch.pt"  # what the authors' training (and ours) writes with torch.save
# Where a discriminator folder's head is looked for, in order: the same tensors converted to
# safetensors (loads without unpickling), then the authors' own file.
HEAD_FILENAMES = ("cls_pred_branch.safetensors", HEAD_FILENAME)
HEAD_MIN_SIDE = 16  # mid-block side the head needs to reach 1x1 (16 -> 8 -> 4 -> 1)

_ATTENTION_TARGET = re.compile(r"^(down_blocks\.\d+|mid_block)\.attentions\.\d+\..*\.(to_q|to_k|to_v|to_out\.0)$")
_ADAPTER_NAMED_KEY = re.compile(r"\.lora_[AB]\.([^.]+)\.weight$|\.lora_(?:up|down)\.([^.]+)\.weight$")


class DiscriminatorError(ValueError):
    """Published discriminator files, or a configuration, that do not make the RORem discriminator."""


def _head_groups(channels: int) -> int:
    """GroupNorm(32) as the authors use it; for toy widths not divisible by 32, the largest divisor."""
    return 32 if channels % 32 == 0 else math.gcd(32, channels)


def head_scores(cls_pred_branch: nn.Sequential, mid: torch.Tensor) -> torch.Tensor:
    """mid [B, C, h, w] -> scores [B]: the head's logit map, averaged if larger than 1x1, softplus."""
    if min(mid.shape[-2:]) < HEAD_MIN_SIDE:
        raise ValueError(
            f"the discriminator head needs a mid-block output of at least {HEAD_MIN_SIDE}x{HEAD_MIN_SIDE} "
            f"(a {SCORE_SIZE}x{SCORE_SIZE} image for SDXL), got {tuple(mid.shape[-2:])}"
        )
    logits = cls_pred_branch(mid)  # [B, 1, 1, 1] at 512; larger maps only for larger inputs
    return F.softplus(logits.flatten(1).mean(dim=1))


class DiscriminatorHead(nn.Module):
    """The authors' `cls_pred_branch`; its state-dict keys are exactly those of `cls_pred_branch.pt`."""

    def __init__(self, channels: int):
        super().__init__()
        groups = _head_groups(channels)
        self.cls_pred_branch = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),  # 0: 16 -> 8
            nn.GroupNorm(groups, channels),  # 1
            nn.SiLU(),  # 2
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),  # 3: 8 -> 4
            nn.GroupNorm(groups, channels),  # 4
            nn.SiLU(),  # 5
            nn.Conv2d(channels, channels, kernel_size=4, stride=4, padding=0),  # 6: 4 -> 1
            nn.GroupNorm(groups, channels),  # 7
            nn.SiLU(),  # 8
            nn.Conv2d(channels, 1, kernel_size=1),  # 9
        )

    def forward(self, mid: torch.Tensor) -> torch.Tensor:
        return head_scores(self.cls_pred_branch, mid)


def _check_unet_config(cfg: dict[str, Any]) -> None:
    """The forward below is written for SDXL-style UNets; refuse configs it would silently mis-run."""
    expected = {
        "addition_embed_type": "text_time",
        "time_embedding_type": "positional",
        "class_embed_type": None,
        "num_class_embeds": None,
        "encoder_hid_dim_type": None,
        "time_embedding_act_fn": None,
        "time_cond_proj_dim": None,
        "center_input_sample": False,
    }
    wrong = {k: cfg.get(k) for k, v in expected.items() if cfg.get(k, v) != v}
    if wrong:
        raise DiscriminatorError(f"the discriminator needs an SDXL-style UNet config; unsupported settings: {wrong}")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise DiscriminatorError("the discriminator needs a UNet with a mid block")


class Discriminator(nn.Module):
    """D_phi: the base UNet's trunk (conv_in, embeddings, down blocks, mid block) and the head.

    Built from a UNet config (the bundle manifest's architecture). The trunk's attributes have the
    UNet's names, so `state_dict()` keys are the UNet's keys for those modules plus `cls_pred_branch.*`.
    """

    def __init__(self, unet_config: dict[str, Any], *, init_weights: bool = True):
        super().__init__()
        cfg = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        _check_unet_config(cfg)
        self.unet_config = cfg
        with torch.device("meta"):  # no memory for the up blocks we drop (most of SDXL's 2.6 B)
            unet = UNet2DConditionModel.from_config(cfg)
            for name in TRUNK_MODULES:
                setattr(self, name, getattr(unet, name))
            channels = unet.config.block_out_channels[-1]
            self.cls_pred_branch = DiscriminatorHead(channels).cls_pred_branch
        del unet
        self.to_empty(device="cpu")
        if init_weights:
            self._init_weights()
        downsamplers = sum(getattr(block, "downsamplers", None) is not None for block in self.down_blocks)
        self.latent_multiple = 2**downsamplers
        self.min_latent_side = HEAD_MIN_SIDE * self.latent_multiple

    def _init_weights(self, root: nn.Module | None = None) -> None:
        """PyTorch's default init for every layer under `root` (default: all; weights are usually loaded over it)."""
        for module in (self if root is None else root).modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for p in own:
                    nn.init.zeros_(p)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> Discriminator:
        """A copy of `unet`'s trunk (strict: every trunk key must exist in the UNet) with a fresh head."""
        disc = cls(dict(unet.config), init_weights=False)
        disc._init_weights(disc.cls_pred_branch)  # the trunk's weights are copied below
        unet_state = unet.state_dict()
        trunk = {k: v for k, v in unet_state.items() if k.split(".", 1)[0] in TRUNK_MODULES}
        head = {k: v for k, v in disc.state_dict().items() if k.startswith("cls_pred_branch.")}
        disc.load_state_dict({**trunk, **head}, strict=True)
        return disc.to(unet.dtype)

    @property
    def head_channels(self) -> int:
        return self.cls_pred_branch[0].in_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def features(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The mid-block output, computed as diffusers' UNet2DConditionModel.forward does."""
        batch = sample.shape[0]
        # 1. time embedding + SDXL added embedding (pooled text + micro-conditioning)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        t_emb = self.time_proj(timesteps.expand(batch)).to(sample.dtype)  # Timesteps returns fp32
        emb = self.time_embedding(t_emb)
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        emb = emb + self.add_embedding(add_embeds)
        # 2. conv_in, down blocks (skip connections are not needed: no up blocks), mid block
        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, _ = block(hidden_states=hidden, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = self.mid_block(hidden, emb)
        return hidden

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """sample [B, 9, h, w] -> scores [B] (softplus, >= 0; the authors judge success at 0.5)."""
        mid = self.features(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return head_scores(self.cls_pred_branch, mid)


# ---------------------------------------------------------------- the authors' published files


def check_discriminator_lora(path: str | Path) -> int:
    """Refuse a LoRA file that is not the discriminator's; returns its rank.

    It must hold one adapter (keys without adapter names), one rank, and target only the attention
    projections (to_q, to_k, to_v, to_out.0) of the down and mid blocks.
    """
    try:
        with open_lora(path) as f:
            keys = list(f.keys())
    except LoRAError as exc:
        raise DiscriminatorError(f"discriminator {exc}") from None
    named = sorted({m.group(1) or m.group(2) for k in keys if (m := _ADAPTER_NAMED_KEY.search(k))})
    if named:
        raise DiscriminatorError(
            f"discriminator LoRA {path}: keys carry adapter names {named}; expected one adapter saved "
            "without names (convert_state_dict_to_diffusers(get_peft_model_state_dict(...)))"
        )
    try:
        groups, _ = read_lora_file(path)
    except LoRAError as exc:
        raise DiscriminatorError(f"discriminator LoRA {path}: {exc}") from exc
    if not groups:
        raise DiscriminatorError(f"discriminator LoRA {path} holds no tensors")
    outside = sorted(m for m in groups if not _ATTENTION_TARGET.match(m))
    if outside:
        raise DiscriminatorError(
            f"discriminator LoRA {path}: {len(outside)} targets are not attention projections "
            f"(to_q/to_k/to_v/to_out.0) of the down or mid blocks, e.g. {outside[:3]}"
        )
    ranks = sorted(
        {parts["down"].shape[0] for parts in groups.values()} | {parts["up"].shape[1] for parts in groups.values()}
    )
    if len(ranks) != 1:
        raise DiscriminatorError(f"discriminator LoRA {path}: expected one rank across the file, found ranks {ranks}")
    return ranks[0]


def find_head_file(folder: str | Path) -> Path | None:
    """The head file of a discriminator folder (see HEAD_FILENAMES), or None."""
    return next((Path(folder) / name for name in HEAD_FILENAMES if (Path(folder) / name).is_file()), None)


def read_head_file(path: str | Path, channels: int) -> dict[str, torch.Tensor]:
    """Load the head safely (`.safetensors`, or a `.pt` through torch.load(weights_only=True)) and
    check its keys and shapes exactly: both formats hold the same `cls_pred_branch.*` tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors = Path(path).suffix == ".safetensors"
    try:
        state = (
            load_file(path, device="cpu") if safetensors else torch.load(path, weights_only=True, map_location="cpu")
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reader = "safetensors" if safetensors else "torch.load(weights_only=True)"
        raise DiscriminatorError(
            f"discriminator head {path}: not a plain tensor dict that {reader} accepts ({first})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiscriminatorError(f"discriminator head {path}: expected a dict of tensors, got {type(state).__name__}")
    missing = sorted(set(HEAD_KEYS) - set(state))
    unexpected = sorted(set(state) - set(HEAD_KEYS))
    if missing or unexpected:
        raise DiscriminatorError(
            f"discriminator head {path}: expected the {len(HEAD_KEYS)} keys cls_pred_branch.{{0,1,3,4,6,7,9}}."
            f"{{weight,bias}}; missing {missing}, unexpected {unexpected}"
        )
    expected = DiscriminatorHead(channels).state_dict()
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in HEAD_KEYS
        if state[k].shape != expected[k].shape
    ]
    if wrong:
        raise DiscriminatorError(f"discriminator head {path} does not fit a {channels}-channel mid block: {wrong}")
    return {k: state[k].float() for k in HEAD_KEYS}


@torch.no_grad()
def load_published_discriminator(
    base_unet: UNet2DConditionModel | str | Path, lora_path: str | Path, head_path: str | Path
) -> tuple[Discriminator, dict[str, Any]]:
    """Build D_phi from the base inpainting UNet (object or diffusers folder), the authors' LoRA
    file (fused, every tensor applied) and their head file. Returns it (fp32, eval) with provenance."""
    if not isinstance(base_unet, UNet2DConditionModel):
        base_unet = UNet2DConditionModel.from_pretrained(base_unet, torch_dtype=torch.float32)
    if base_unet.config.in_channels != 9:
        raise DiscriminatorError(
            f"the base UNet has {base_unet.config.in_channels} input channels, an inpainting UNet has 9"
        )
    rank = check_discriminator_lora(lora_path)
    disc = Discriminator.from_unet(base_unet).float()
    try:
        fused = fuse_lora_file(disc, lora_path)
    except LoRAError as exc:
        raise DiscriminatorError(f"discriminator LoRA {lora_path}: {exc}") from exc
    head = read_head_file(head_path, disc.head_channels)
    disc.cls_pred_branch.load_state_dict({k.removeprefix("cls_pred_branch."): v for k, v in head.items()}, strict=True)
    provenance = {"lora": fused.as_dict(), "lora_rank": rank, "head": Path(head_path).name}
    return disc.eval().requires_grad_(False), provenance


# ---------------------------------------------------------------- batched scoring


def score_view(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the discriminator judges: images [B,3,H,W] in [-1,1] at size x size (bilinear, antialiased), masks
    [B,1,H,W] (nearest) as {0,1}. The discriminator stage reads its data through it too (training.data), so it
    learns on the pixels it will score: PIL's bicubic differs by ~1 level on average, 8 at the 99th percentile."""
    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images, score_view_mask(masks, size)


def score_view_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """The masks [B,1,H,W] of score_view: nearest, as {0,1}."""
    if tuple(masks.shape[-2:]) != (size, size):
        masks = F.interpolate(masks.float(), size=(size, size), mode="nearest")
    return (masks > 0.5).float()


class ScoringEngine:
    """Scores batches of (source, mask, edited) with D_phi, each on a `score_size` view."""

    def __init__(
        self,
        vae: AutoencoderKL,
        discriminator: Discriminator,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        score_size: int = SCORE_SIZE,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = torch.float32 if (dtype == torch.float16 and vae.config.force_upcast) else dtype
        self.vae = vae.to(self.device, self.vae_dtype).eval().requires_grad_(False)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.discriminator = discriminator.to(self.device, dtype).eval().requires_grad_(False)
        if self.device.type == "cuda":
            self.discriminator = self.discriminator.to(memory_format=torch.channels_last)
        latent_side, rest = divmod(score_size, self.vae_scale_factor)
        if rest or latent_side % discriminator.latent_multiple or latent_side < discriminator.min_latent_side:
            raise ValueError(
                f"score_size {score_size} does not fit this discriminator: it needs a multiple of "
                f"{self.vae_scale_factor * discriminator.latent_multiple} of at least "
                f"{self.vae_scale_factor * discriminator.min_latent_side}"
            )
        self.score_size = score_size
        self.prompt_embeds = prompt_embeds.to(self.device, dtype)
        self.pooled_prompt_embeds = pooled_prompt_embeds.to(self.device, dtype)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> ScoringEngine:
        """bf16 on CUDA, fp32 on CPU unless `dtype` says otherwise; BundleError if it has no discriminator."""
        device = torch.device(device)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        discriminator = bundle.load_discriminator()
        prompt_embeds, pooled = bundle.load_discriminator_prompt_embeds()
        return cls(
            vae=bundle.load_vae(),
            discriminator=discriminator,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            device=device,
            dtype=dtype,
            score_size=bundle.manifest.discriminator.score_size,
        )

    def score(self, jobs: list[ScoreJob], timings: dict[str, float] | None = None) -> list[float]:
        """One score per job (any sizes; each is resized to the score view), in job order.

        `timings`, when given, receives the seconds spent in prepare (resize, upload), vae_encode and
        discriminator (engines.timing.StageClock, as the remover reports its stages).
        """
        if not jobs:
            return []
        clock = StageClock(self.device, timings)
        edited, masks, sources = self.prepare(jobs)
        clock.lap("prepare")
        scores = self.score_tensors(edited, masks, sources, timings=timings)
        values = [float(s) for s in scores.float().cpu()]
        clock.finish()
        return values

    @torch.inference_mode()
    def prepare(self, jobs: list[ScoreJob]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Jobs -> (edited [B,3,S,S] in [-1,1], masks [B,1,S,S] in {0,1}, sources [B,3,S,S]) on the device."""
        edited, masks, sources = [], [], []
        for job in jobs:
            job.check()
            images = torch.from_numpy(np.stack([job.edited, job.source])).to(self.device)
            images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            mask = torch.from_numpy(np.asarray(job.mask, dtype=bool).astype(np.float32))[None, None].to(self.device)
            images, mask = score_view(images, mask, self.score_size)
            edited.append(images[:1])
            sources.append(images[1:])
            masks.append(mask)
        return torch.cat(edited).contiguous(), torch.cat(masks).contiguous(), torch.cat(sources).contiguous()

    @torch.inference_mode()
    def score_tensors(
        self,
        edited: torch.Tensor,
        masks: torch.Tensor,
        sources: torch.Tensor,
        timings: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """edited, sources [B,3,S,S] in [-1,1], masks [B,1,S,S] in {0,1} -> scores [B] (fp32)."""
        batch, _, height, width = edited.shape
        clock = StageClock(self.device, timings)
        # one VAE pass for both: posterior mean, no t=0 noise (see the module docstring)
        pixels = torch.cat([edited, sources]).to(self.device, self.vae_dtype).contiguous()  # one layout, one result
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        latents = latents.to(self.dtype)
        edited_latents, source_latents = latents[:batch], latents[batch:]
        latent_masks = F.interpolate(masks.to(self.device).float(), size=latents.shape[-2:]).to(self.dtype)
        clock.lap("vae_encode")

        sample = torch.cat([edited_latents, latent_masks, source_latents], dim=1)
        if self.device.type == "cuda":
            sample = sample.contiguous(memory_format=torch.channels_last)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        scores = self.discriminator(
            sample,
            torch.zeros((), dtype=torch.long, device=self.device),
            encoder_hidden_states=self.prompt_embeds.expand(batch, -1, -1),
            text_embeds=self.pooled_prompt_embeds.expand(batch, -1),
            time_ids=time_ids.expand(batch, -1),
        ).float()
        clock.lap("discriminator")
        clock.finish()
        return scores
