"""The tiny bundle: RORem's architecture family at toy sizes, with seeded random weights.

It is written first in the authors' published layout (an SDXL-inpainting pipeline folder, a
RORem UNet folder, an LCM LoRA in their mixed key format, the discriminator's LoRA and head) and
then imported with the real import code, so tests and offline runs exercise the same loading path
as the real weights. Removal and score quality are meaningless; shapes, dtypes, data flow and
timing are real.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from engines.authors_layout import LORA_FILENAME, AuthorsLayout, import_authors_layout
from engines.bundle import MANIFEST, Bundle

TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED = 8
TINY_UNET = dict(
    sample_size=32,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    cross_attention_dim=2 * TEXT_HIDDEN,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=TEXT_PROJECTION + 6 * TIME_EMBED,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=256,
    # ~1 / std of this random VAE's posterior mean on a real photo (what a scaling factor is for), so
    # the tiny UNets see latents at SDXL's scale; SDXL's 0.13025 left them at std 0.02, and the tiny
    # discriminator then saw almost only the mask channel.
    scaling_factor=5.5,
    force_upcast=True,
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
TINY_LORA_RANK = 8
DISCRIMINATOR_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DISCRIMINATOR_LORA_RANK = 4
TINY_HEAD_BIAS = 0.1  # with the final conv at twice the default scale, tiny scores spread over ~0.2-0.9


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with single characters only (no merges): enough to tokenize any text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77).save_pretrained(
        folder
    )


def write_tiny_authors_layout(root: str | Path, seed: int = 0) -> AuthorsLayout:
    """Write a tiny base pipeline, a 'fine-tuned' RORem UNet, an LCM LoRA and a discriminator trained on the base's
    UNet, as the authors publish them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(root)
    generator = torch.manual_seed(seed)
    _write_tokenizer(root / "base" / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(root / "base" / "tokenizer_2", pad_token="!")
    text_config = dict(
        vocab_size=len(_byte_level_vocab()),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=len(_byte_level_vocab()) - 2,
        eos_token_id=len(_byte_level_vocab()) - 1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    base_unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=None,
        unet=base_unet,
        scheduler=scheduler,
        requires_aesthetics_score=False,
    )
    pipe.save_pretrained(root / "base")
    _patch_model_index(root / "base")

    rorem_unet = UNet2DConditionModel(**TINY_UNET)
    rorem_unet.load_state_dict(base_unet.state_dict())
    with torch.no_grad():
        for p in rorem_unet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    rorem_unet.save_pretrained(root / "rorem_unet")

    lora_config = LoraConfig(
        r=TINY_LORA_RANK, lora_alpha=TINY_LORA_RANK, target_modules=LCM_LORA_TARGETS, init_lora_weights=False
    )
    rorem_unet.add_adapter(lora_config)
    with torch.no_grad():
        for name, p in rorem_unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(rorem_unet))
    StableDiffusionXLInpaintPipeline.save_lora_weights(root / "lcm_lora", unet_lora_layers=lora_layers)
    _write_tiny_discriminator(root / "discriminator", base_unet, generator)
    return AuthorsLayout(
        base=str(root / "base"),
        unet=str(root / "rorem_unet"),
        lcm_lora=str(root / "lcm_lora" / LORA_FILENAME),
        discriminator=str(root / "discriminator"),
        discriminator_unet=str(root / "base"),  # its unet/: the UNet the discriminator was trained on
    )


@torch.no_grad()
def _write_tiny_discriminator(folder: Path, base_unet, generator: torch.Generator) -> None:
    """The discriminator as the authors save it: a peft LoRA on the base UNet's trunk, converted
    with convert_state_dict_to_diffusers (attention keys only), and the head via torch.save."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from engines.scorer import HEAD_FILENAME, Discriminator

    trunk = Discriminator.from_unet(base_unet)
    lora_config = LoraConfig(
        r=DISCRIMINATOR_LORA_RANK,
        lora_alpha=DISCRIMINATOR_LORA_RANK,
        target_modules=DISCRIMINATOR_LORA_TARGETS,
        init_lora_weights=False,
    )
    trunk = inject_adapter_in_model(lora_config, trunk)
    for name, p in trunk.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trunk))
    StableDiffusionXLInpaintPipeline.save_lora_weights(folder, unet_lora_layers=lora_layers)

    head = {}
    for key, value in trunk.cls_pred_branch.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("weight") and value.ndim == 1:  # GroupNorm scale
            value = 1.0 + 0.1 * noise
        elif value.ndim == 1:  # biases
            value = 0.1 * noise
        else:  # conv kernels: default init's scale, doubled for the final 1x1 conv
            value = noise * value.std() * (2.0 if key.startswith("9.") else 1.0)
        head[f"cls_pred_branch.{key}"] = value.contiguous()
    head["cls_pred_branch.9.bias"] = torch.tensor([TINY_HEAD_BIAS])
    torch.save(head, folder / HEAD_FILENAME)


def _patch_model_index(base: Path) -> None:
    """Record the tokenizers in model_index.json, as a published pipeline folder has them."""
    index_path = base / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index_path.write_text(json.dumps(index, indent=2))


def tiny_bundle(path: str | Path, seed: int = 0, prompt: str = "") -> Bundle:
    """Load the tiny bundle at `path`, generating it there first if it is not there yet."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        bundle = Bundle.load(path)
        if bundle.has_discriminator and bundle.manifest.architecture.prompt.text == prompt:
            return bundle
        # a cache written before the tiny bundle had a discriminator, or with another prompt: regenerate it below
    with tempfile.TemporaryDirectory(prefix="rorem-tiny-") as tmp:
        layout = write_tiny_authors_layout(tmp, seed=seed)
        bundle = import_authors_layout(
            layout,
            path,
            prompt=prompt,
            dtype="float32",
            name=f"tiny-{seed}",
            provenance={"source": "tiny", "seed": seed, "note": "random weights: removal quality is meaningless"},
        )
    return bundle
