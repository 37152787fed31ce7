"""Synthetic triplets and discriminator negatives, for tests and demos (no download, seeded).

A triplet: a procedural background (gradient, value noise, stripes or checker texture) is the GT;
an object (an ellipse, rectangle or polygon, filled with a patch of *another* background plus a
tint) is pasted onto it to make the source; the mask is the object's silhouette, dilated a little
as RORem's masks are. So the "right" removal is known exactly.

Discriminator data (`make_negatives`): each good result (its GT) is a positive with score 1, and
bad removals are synthesized from it with score 0, as the paper does: `blur`, `noise`,
`downsample` (down then up again: blocky), `mixed` (two or three of those), `no-change` (the
source itself: the object is still there). Degradations are applied inside the mask only, as a
failed removal only changes the masked area. The records use the paper's format: `GT` is the
edited image being judged, `score` its label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import Field
from scipy import ndimage

from training.common import RunSummary, StageSettings, TrainingError
from training.data import Triplet, load_metadata, read_mask, read_rgb, save_image, write_metadata

NEGATIVE_KINDS = ("blur", "noise", "downsample", "mixed", "no-change")


# ---------------------------------------------------------------- backgrounds and objects


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells + 1, cells + 1)).astype(np.float32), mode="F")
    out = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: one of a gradient, smooth noise, stripes or a checker, in random colors."""
    kind = rng.choice(["gradient", "noise", "stripes", "checker"])
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == "noise":
        t = _value_noise(rng, size, int(rng.integers(2, 8)))
    elif kind == "stripes":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    else:
        cells = int(rng.integers(3, 10))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
    image = c0 + t[..., None] * (c1 - c0)
    image += rng.normal(0, 4, image.shape)  # a little grain, as photos have
    return np.clip(image, 0, 255).astype(np.uint8)


def make_object_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool: an ellipse, rectangle or polygon covering roughly 5-25% of the image."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.25, 0.5) * size
    cx, cy = rng.uniform(side / 2, size - side / 2, 2)
    kind = rng.choice(["ellipse", "rectangle", "polygon"])
    if kind == "ellipse":
        rx, ry = side / 2 * rng.uniform(0.6, 1.0, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "rectangle":
        rx, ry = side / 2 * rng.uniform(0.5, 1.0, 2)
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        count = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = side / 2 * rng.uniform(0.5, 1.0, count)
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    return np.asarray(img) > 127


def make_triplet(rng: np.random.Generator, size: int, dilate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, mask, gt): an object cut from one background pasted onto another."""
    gt = make_background(rng, size)
    texture = make_background(rng, size).astype(np.float32)
    texture = np.clip(texture * rng.uniform(0.6, 1.2) + rng.uniform(-40, 40, 3), 0, 255)
    silhouette = make_object_mask(rng, size)
    source = np.where(silhouette[..., None], texture.astype(np.uint8), gt)
    mask = ndimage.binary_dilation(silhouette, iterations=dilate) if dilate > 0 else silhouette
    return source, mask, gt


def make_synthetic_triplets(
    out_dir: str | Path, n: int, size: int = 512, seed: int = 0, dilate: int | None = None
) -> Path:
    """Write `n` triplets under out_dir/{source,mask,gt}/ and out_dir/metadata.json; returns its path.

    `dilate` (pixels; default size // 64) grows the mask beyond the object's silhouette.
    """
    if n <= 0 or size < 16:
        raise TrainingError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out_dir = Path(out_dir)
    dilate = max(1, size // 64) if dilate is None else dilate
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        source, mask, gt = make_triplet(rng, size, dilate)
        name = f"{i:05d}.png"
        records.append(
            Triplet(
                source=save_image(source, out_dir / "source" / name),
                mask=save_image(mask, out_dir / "mask" / name),
                gt=save_image(gt, out_dir / "gt" / name),
            )
        )
    return write_metadata(out_dir / "metadata.json", records)


# ---------------------------------------------------------------- discriminator negatives


def degrade(kind: str, source: np.ndarray, mask: np.ndarray, good: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bad removal made from a good one (`good`), changed inside `mask` only."""
    if kind == "no-change":
        return source.copy()
    if kind == "mixed":
        chosen = rng.choice(["blur", "noise", "downsample"], size=int(rng.integers(2, 4)), replace=False)
        out = good
        for part in chosen:
            out = degrade(str(part), source, mask, out, rng)
        return out
    height, width = good.shape[:2]
    img = Image.fromarray(good)
    if kind == "blur":
        changed = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.02, 0.05) * max(height, width))))
    elif kind == "noise":
        changed = np.clip(good + rng.normal(0, rng.uniform(25, 60), good.shape), 0, 255).astype(np.uint8)
    elif kind == "downsample":
        factor = int(rng.integers(6, 12))
        small = img.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BILINEAR)
        changed = np.asarray(small.resize((width, height), Image.Resampling.NEAREST))
    else:
        raise TrainingError(f"unknown negative kind {kind!r}; kinds are {NEGATIVE_KINDS}")
    return np.where(mask[..., None], changed, good)


def make_negatives(
    records: Sequence[Triplet] | str | Path,
    out_dir: str | Path,
    kinds: Sequence[str] = NEGATIVE_KINDS,
    seed: int = 0,
) -> Path:
    """Labelled discriminator data from good triplets: each GT with score 1, one edit per kind with score 0.

    Writes out_dir/edited/*.png and out_dir/metadata.json (source, mask, GT = the edited image,
    score) and returns the metadata path. `records` may be a triplet metadata path. Pictures and masks are
    read as the service reads them (training.data.read_rgb, read_mask), so each edit is upright and 8-bit.
    """
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown or not kinds:
        raise TrainingError(f"unknown negative kinds {unknown}; kinds are {NEGATIVE_KINDS}")
    if isinstance(records, (str, Path)):
        records = load_metadata(records)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    labelled = []
    for i, record in enumerate(records):
        if record.gt is None:
            raise TrainingError(f"record {i} ({record.source}) has no GT to make negatives from")
        source, good, mask = read_rgb(record.source), read_rgb(record.gt), read_mask(record.mask)
        labelled.append(Triplet(record.source, record.mask, record.gt, score=1.0))
        for kind in kinds:
            edited = degrade(kind, source, mask, good, rng)
            path = save_image(edited, out_dir / "edited" / f"{i:05d}_{kind}.png")
            labelled.append(Triplet(record.source, record.mask, path, score=0.0))
    return write_metadata(out_dir / "metadata.json", labelled)


# ---------------------------------------------------------------- the `synthetic` stage


class SyntheticSettings(StageSettings):
    n: int = Field(16, ge=1, description="triplets to generate")
    size: int = Field(512, ge=16, description="image side in pixels")
    dilate: int | None = Field(None, ge=0, description="mask dilation beyond the silhouette (default size // 64)")
    negatives: bool = Field(True, description="also write the labelled discriminator set (out/discriminator/)")
    kinds: list[str] = Field(list(NEGATIVE_KINDS), description="negative kinds, comma-separated")


def run_synthetic(settings: SyntheticSettings) -> dict:
    """Triplets in out/metadata.json; with negatives, the labelled set in out/discriminator/metadata.json."""
    summary = RunSummary("synthetic", settings)
    started = time.perf_counter()
    triplets = make_synthetic_triplets(settings.out, settings.n, settings.size, settings.seed, settings.dilate)
    outputs = {"triplets": str(triplets)}
    if settings.negatives:
        outputs["discriminator"] = str(
            make_negatives(triplets, Path(settings.out) / "discriminator", settings.kinds, settings.seed)
        )
    summary.data["outputs"] = outputs
    summary.data["metrics"] = {
        "triplets": settings.n,
        "labelled": settings.n * (1 + len(settings.kinds)) if settings.negatives else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    summary.write("completed")
    return summary.data
