"""Where a model deployment runs: device and precision from config names."""

from __future__ import annotations

import torch

from engines.bundle import DTYPES


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str) -> torch.dtype | None:
    """None lets the engine choose (bf16 on CUDA, fp32 on CPU)."""
    return None if name == "auto" else DTYPES[name]
