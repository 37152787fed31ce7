"""UNet runners: one call, `runner(sample, timestep, cond) -> noise_pred`.

The sampling loop depends only on this call, so the UNet can be eager PyTorch, torch.compile'd,
or (later) an exported ONNX / TensorRT engine without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import UNet2DConditionModel


@dataclass
class UNetConditioning:
    """Everything the SDXL UNet takes besides the sample and timestep, already batched."""

    encoder_hidden_states: torch.Tensor  # [B, 77, D]
    text_embeds: torch.Tensor  # [B, P] pooled prompt embedding
    time_ids: torch.Tensor  # [B, 6] SDXL micro-conditioning


class UNetRunner(Protocol):
    device: torch.device
    dtype: torch.dtype

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor: ...


class TorchUNetRunner:
    """Eager or compiled PyTorch; channels_last on CUDA, where it speeds up the convolutions."""

    def __init__(self, unet: UNet2DConditionModel, device: torch.device, compile: bool = False):
        self.device = device
        self.dtype = unet.dtype
        self.unet = unet.to(device)
        if device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.forward = self.unet.forward
        if compile:
            self.forward = torch.compile(self.unet.forward, mode="max-autotune-no-cudagraphs", dynamic=False)

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
        return self.forward(
            sample,
            timestep,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids},
            return_dict=False,
        )[0]
