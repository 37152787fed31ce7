import asyncio

import numpy as np
import pytest
import torch

from engines.jobs import RemovalJob
from engines.remover import RemovalEngine, SamplingSettings

PARITY_ATOL = 1e-4  # float32 CPU; measured ~1.5e-6 max abs difference on [0, 1] pixels


def _inputs(batch=2, side=128):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    masks = np.zeros((batch, side, side), bool)
    masks[:, 32:96, 40:100] = True
    return images, masks


def test_engine_matches_diffusers_sdxl_inpaint_pipeline(tiny_bundle):
    """Same weights, seeds, inputs: our loop equals StableDiffusionXLInpaintPipeline with LCMScheduler."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    engine = RemovalEngine.from_bundle(tiny_bundle)
    images, masks = _inputs()
    seeds = [11, 12]
    pipe = StableDiffusionXLInpaintPipeline(
        vae=tiny_bundle.load_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=tiny_bundle.load_unet(), scheduler=tiny_bundle.make_scheduler(), requires_aesthetics_score=False,
    )
    prompt_embeds, pooled = tiny_bundle.load_prompt_embeds()
    expected = pipe(
        image=[Image.fromarray(i) for i in images],
        mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
        prompt_embeds=prompt_embeds.expand(2, -1, -1), pooled_prompt_embeds=pooled.expand(2, -1),
        num_inference_steps=4, strength=1.0, guidance_scale=1.0, height=128, width=128,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
    ).images
    ours = engine.generate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1,
        torch.from_numpy(masks)[:, None].float(),
        [torch.Generator().manual_seed(s) for s in seeds],
    )
    assert (ours - expected).abs().max().item() < PARITY_ATOL
    uint8 = engine.remove([RemovalJob(images[i], masks[i], seeds[i]) for i in range(2)])
    expected_uint8 = (expected * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert max(np.abs(u.astype(int) - e).max() for u, e in zip(uint8, expected_uint8)) <= 1


def test_a_result_does_not_depend_on_its_batch(tiny_bundle):
    engine = RemovalEngine.from_bundle(tiny_bundle)
    images, masks = _inputs(batch=3)
    batched = engine.remove([RemovalJob(images[i], masks[i], seed=100 + i) for i in range(3)])
    alone = engine.remove([RemovalJob(images[1], masks[1], seed=101)])[0]
    assert np.abs(batched[1].astype(int) - alone).max() <= 1
    other_seed = engine.remove([RemovalJob(images[1], masks[1], seed=999)])[0]
    assert np.abs(other_seed.astype(int) - alone).max() > 10, "the seed matters"


class _CountingRunner:
    def __init__(self, runner):
        self.runner, self.device, self.dtype, self.timesteps = runner, runner.device, runner.dtype, []

    def __call__(self, sample, timestep, cond):
        self.timesteps.append(int(timestep))
        return self.runner(sample, timestep, cond)


@pytest.mark.parametrize("strength, expected", [(1.0, [999, 759, 499, 259]), (0.99, [759, 499, 259])])
def test_strength_one_runs_four_unet_passes_and_the_references_099_runs_three(tiny_bundle, strength, expected):
    engine = RemovalEngine.from_bundle(tiny_bundle, sampling=SamplingSettings(steps=4, strength=strength))
    engine.runner = _CountingRunner(engine.runner)
    images, masks = _inputs(batch=1, side=64)
    out = engine.remove([RemovalJob(images[0], masks[0], seed=0)])[0]
    assert engine.runner.timesteps == expected
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_mixed_crop_sizes_in_one_engine_batch_are_refused(tiny_bundle):
    engine = RemovalEngine.from_bundle(tiny_bundle)
    a, m = _inputs(batch=1, side=64)
    b, n = _inputs(batch=1, side=128)
    with pytest.raises(ValueError, match="one crop size"):
        engine.remove([RemovalJob(a[0], m[0], 0), RemovalJob(b[0], n[0], 0)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_stays_close_to_cpu_fp32(tiny_bundle, dtype):
    images, masks = _inputs(batch=2)
    jobs = [RemovalJob(images[i], masks[i], seed=i) for i in range(2)]
    reference = RemovalEngine.from_bundle(tiny_bundle).remove(jobs)
    on_gpu = RemovalEngine.from_bundle(tiny_bundle, device="cuda", dtype=dtype).remove(jobs)
    for ref, got in zip(reference, on_gpu):
        assert np.abs(ref.astype(int) - got).mean() < 8


def test_a_thin_stroke_off_the_latent_grid_is_filled_not_only_blacked_out(tiny_bundle):
    """The engine blacks out every mask pixel but tells the UNet only the cells whose first pixel is masked
    (nearest, as diffusers): a 3 px stroke at column 9 at dilate 0 was blacked out with no latent cell set: the
    UNet was told to keep the black (a review). The pipeline now gives it the mask in whole latent cells."""
    from engines.imaging import DecodeLimits
    from engines.pipeline import CropSettings, LocalOutcome, RemovalPipeline
    from engines.remover import CropBatch, SamplingNoise
    from tests.helpers import png_bytes

    class Recorder:
        async def remove(self, job):
            jobs.append(job)
            return LocalOutcome(job.image)

    engine, jobs = RemovalEngine.from_bundle(tiny_bundle), []
    photo = np.full((200, 300, 3), 200, np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[50:80, 9:12] = True
    pipeline = RemovalPipeline(Recorder(), CropSettings((128, 256), 16, 20, 6), DecodeLimits())
    prepared = pipeline.prepare(png_bytes(photo), png_bytes(mask.astype(np.uint8) * 255), dilate=0)
    asyncio.run(pipeline.attempt(prepared, seed=0))
    [job], [plan] = jobs, prepared.plans
    assert plan.side == plan.bucket and plan.left == 0, "the stroke is at column 9 of the crop"

    pixels, masks = torch.from_numpy(job.image[None]), torch.from_numpy(job.mask[None])
    images, masks = engine.normalize(CropBatch(pixels, masks, None))
    shape = engine.latent_shape(*job.mask.shape)
    noise = SamplingNoise.draw([torch.Generator().manual_seed(0)], shape, engine.schedule)
    latent = engine.encode(images, masks, noise).latent_masks[0, 0].numpy() > 0
    told = latent.repeat(engine.vae_scale_factor, 0).repeat(engine.vae_scale_factor, 1)
    stroke = mask[plan.top : plan.top + plan.side, : plan.side]
    assert told[stroke].all(), "every pixel of the stroke lies in a cell the UNet fills"
    assert told[job.mask].all(), "every pixel the engine blacks out lies in a cell the UNet fills"
