"""The baseline for loadtests/bench_vs_naive.py: what an app team would write without this service.

A FastAPI app that loads diffusers' SDXL inpainting pipeline from the authors' published layout
(base pipeline + RORem UNet + LCM LoRA, the same weights the service imports) and, per request,
resizes the whole image to the model's side, runs the 4-step LCM pipeline (guidance 1, strength
0.99 as in the authors' reference), resizes the result back and answers PNG. One request at a time
(the pipeline is not thread-safe), no batching, no crop, no paste-back. The LoRA is fused with
engines.lora, as the service's import does: diffusers' load_lora_weights + fuse_lora leaves the
attention half of the authors' file out without a word. On a GPU the pipeline runs there in bf16,
VAE included (the service's engine.dtype auto); on the CPU in fp32.

    ROREM_NAIVE_BASE=/layout/base ROREM_NAIVE_UNET=/layout/rorem_unet \\
    ROREM_NAIVE_LCM_LORA=/layout/lcm_lora/pytorch_lora_weights.safetensors ROREM_NAIVE_SIDE=512 \\
        python -m uvicorn naive_app:app --app-dir loadtests --port 8100
"""

from __future__ import annotations

import io
import os
import threading

import torch
from diffusers import LCMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import Response
from PIL import Image

from engines.lora import fuse_lora_file

SIDE = int(os.environ.get("ROREM_NAIVE_SIDE", "1024"))


def placement() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


app = FastAPI()
pipe_lock = threading.Lock()
unet = UNet2DConditionModel.from_pretrained(os.environ["ROREM_NAIVE_UNET"], torch_dtype=torch.float32)
fuse_lora_file(unet, os.environ["ROREM_NAIVE_LCM_LORA"])
pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
    os.environ["ROREM_NAIVE_BASE"], unet=unet, torch_dtype=torch.float32
).to(*placement())
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)


@app.post("/remove")
def remove(
    image: UploadFile = File(...), mask: UploadFile = File(...), seed: int = Form(0), output_format: str = Form("png")
) -> Response:
    source = Image.open(io.BytesIO(image.file.read())).convert("RGB")
    mask_image = Image.open(io.BytesIO(mask.file.read())).convert("L")
    with pipe_lock:
        result = pipe(
            prompt="",
            image=source.resize((SIDE, SIDE)),
            mask_image=mask_image.resize((SIDE, SIDE)),
            num_inference_steps=4,
            guidance_scale=1.0,
            strength=0.99,
            height=SIDE,
            width=SIDE,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    buffer = io.BytesIO()
    result.resize(source.size).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")
