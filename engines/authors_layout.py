"""Import the layout the RORem authors publish into a project bundle.

Published pieces: an SDXL-inpainting base pipeline folder (VAE, scheduler, the two CLIP text
encoders), a RORem UNet folder, for RORem-4S an LCM LoRA `pytorch_lora_weights.safetensors`, and
optionally the discriminator folder (`pytorch_lora_weights.safetensors` + `cls_pred_branch.pt`,
applied to the base pipeline's own UNet). Each piece is a local path or `hf:REPO_ID[/SUBPATH]` on
the Hugging Face hub. The import fuses the LoRAs, computes the constant prompt embeddings once, and
writes a bundle; serving then never loads a text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

from engines.bundle import Bundle, BundleError, DTypeName, SamplingDefaults
from engines.lora import fuse_lora_file

if TYPE_CHECKING:
    from engines.scorer import Discriminator

HUB_PREFIX = "hf:"
LORA_FILENAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class AuthorsLayout:
    base: str
    unet: str
    lcm_lora: str | None = None
    discriminator: str | None = None  # folder with pytorch_lora_weights.safetensors + cls_pred_branch.pt

    def describe(self) -> dict[str, str | None]:
        """The layout as recorded in provenance and hashed into import cache keys. `discriminator`
        appears only when set, so layouts without one keep the cache keys they had before it existed."""
        described = {"base": self.base, "unet": self.unet, "lcm_lora": self.lcm_lora}
        if self.discriminator is not None:
            described["discriminator"] = self.discriminator
        return described


def fetch(ref: str) -> Path:
    """A local path as is; `hf:repo/subpath` from the hub (or its local cache), with a clear error offline."""
    if not ref.startswith(HUB_PREFIX):
        path = Path(ref).expanduser()
        if not path.exists():
            raise BundleError(f"{ref} does not exist")
        return path
    parts = ref[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2:
        raise BundleError(f"{ref}: expected hf:OWNER/NAME[/SUBPATH]")
    repo_id, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = None
    if subpath:
        patterns = [subpath] if subpath.endswith(".safetensors") else [f"{subpath}/*"]
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many types for "offline" and "not found"
        raise BundleError(
            f"cannot fetch {repo_id} from the Hugging Face hub and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Download it on a connected machine "
            f"(`huggingface-cli download {repo_id}`) or point the bundle at a local folder."
        ) from exc
    path = root / subpath if subpath else root
    if not path.exists():
        raise BundleError(f"{ref}: {subpath} not found in {repo_id}")
    return path


@torch.no_grad()
def encode_constant_prompt(base: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding as diffusers does it: penultimate hidden states of both CLIP
    encoders concatenated, pooled output of the second."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    encoders = [
        (CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTextModel.from_pretrained(base / "text_encoder")),
        (
            CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
            CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
        ),
    ]
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder.eval()(ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise BundleError(f"{base}: text_encoder_2 gave no pooled output")
    return torch.cat(hidden, dim=-1), pooled


def import_authors_layout(
    layout: AuthorsLayout,
    out_dir: str | Path,
    *,
    prompt: str = "",
    dtype: DTypeName = "float16",
    name: str = "rorem-4s",
    sampling: SamplingDefaults | None = None,
    provenance: dict | None = None,
) -> Bundle:
    base = fetch(layout.base)
    unet_dir = fetch(layout.unet)
    for needed in ("vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (base / needed).is_dir():
            raise BundleError(f"{base} is not an SDXL-inpainting pipeline folder: {needed}/ is missing")
    discriminator, discriminator_info, discriminator_embeds = None, None, None
    if layout.discriminator:
        # first, so the fp32 base UNet is freed before the RORem UNet is loaded
        discriminator, discriminator_info = _import_discriminator(base, fetch(layout.discriminator))
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    if unet.config.in_channels != 9:
        raise BundleError(f"{unet_dir}: UNet has {unet.config.in_channels} input channels, an inpainting UNet has 9")
    lora_info = None
    if layout.lcm_lora:
        lora_path = fetch(layout.lcm_lora)
        if lora_path.is_dir():
            lora_path = lora_path / LORA_FILENAME
        lora_info = fuse_lora_file(unet, lora_path).as_dict()
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
    scheduler = LCMScheduler.from_pretrained(base / "scheduler")
    prompt_embeds, pooled = encode_constant_prompt(base, prompt)
    if discriminator is not None:
        discriminator_embeds = (prompt_embeds, pooled) if prompt == "" else encode_constant_prompt(base, "")
    return Bundle.write(
        out_dir,
        name=name,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        dtype=dtype,
        sampling=sampling,
        provenance={
            "source": layout.describe(),
            "lcm_lora": lora_info,
            **({"discriminator": discriminator_info} if discriminator is not None else {}),
            **(provenance or {}),
        },
        discriminator=discriminator,
        discriminator_prompt_embeds=discriminator_embeds,
    )


def _import_discriminator(base: Path, folder: Path) -> tuple[Discriminator, dict]:
    """The published discriminator folder on the base pipeline's UNet (fp32, LoRA fused)."""
    from engines.scorer import HEAD_FILENAME, load_published_discriminator

    if not (base / "unet").is_dir():
        raise BundleError(f"{base} has no unet/ folder: the discriminator is built on the base inpainting UNet")
    lora_path, head_path = folder / LORA_FILENAME, folder / HEAD_FILENAME
    for needed in (lora_path, head_path):
        if not needed.is_file():
            raise BundleError(f"{folder} is not the authors' discriminator folder: {needed.name} is missing")
    base_unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    discriminator, info = load_published_discriminator(base_unet, lora_path, head_path)
    del base_unet
    return discriminator, info
