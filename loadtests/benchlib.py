"""Shared by the benchmark scripts (run as `python loadtests/<script>.py`, so this imports as `benchlib`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from PIL import Image


def photo(side: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut) resized to side x side."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB").resize((side, side)))


def center_mask(side: int) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    mask[side // 3 : 2 * side // 3, side // 3 : 2 * side // 3] = True
    return mask


def summarize(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {
        "runs": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }
