"""Full-size SDXL-inpainting shapes in one place: the diffusers configs of
diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (UNet, VAE) and the FLOP counts from REFERENCE.md."""

from __future__ import annotations

SDXL_INPAINT_UNET = dict(
    sample_size=128,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 * 256 time ids
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
SDXL_UNET_PARAMETERS = 2_567_478_084  # UNet2DConditionModel(**SDXL_INPAINT_UNET), counted on the meta device

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # the SDXL VAE overflows in fp16: next to an fp16 UNet it runs in bf16 on CUDA, fp32 elsewhere
)

# REFERENCE.md (torch FlopCounterMode on the real shapes), per image (batch 1), in TFLOP.
UNET_TFLOP = {512: 1.59, 1024: 6.76}
VAE_ENCODE_TFLOP = {512: 1.12, 1024: 4.88}
VAE_DECODE_TFLOP = {512: 2.51, 1024: 10.47}


def image_tflop(side: int, unet_passes: int = 4) -> float:
    """One RORem-4S image: `unet_passes` UNet forwards + one VAE encode + one VAE decode."""
    return unet_passes * UNET_TFLOP[side] + VAE_ENCODE_TFLOP[side] + VAE_DECODE_TFLOP[side]


# Dense fp16 / bf16 tensor-core peaks (TFLOP/s) for MFU, by a substring of the GPU name.
PEAK_TFLOPS = {
    "H200": 989.4,  # same SXM compute as H100
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_tflops(gpu_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # ordered: more specific names first
        if key in gpu_name:
            return value
    return None
