"""Where a model deployment runs: device and precision from config names."""

from __future__ import annotations

import torch

from engines.bundle import DTYPES


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_device(name: str) -> torch.device:
    """`pick_device` for a --device flag, refused (ValueError) when it names no device or a CUDA device this
    machine lacks, before anything is loaded: torch fails on it later, with a bare AssertionError."""
    try:
        device = pick_device(name)
    except RuntimeError as exc:  # torch.device("gpu"): not a device name
        raise ValueError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s); use --device cpu or auto")
    return device


def pick_dtype(name: str) -> torch.dtype | None:
    """None lets the engine choose (bf16 on CUDA, fp32 on CPU)."""
    return None if name == "auto" else DTYPES[name]
