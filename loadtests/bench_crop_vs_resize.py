"""Crop-around-mask vs resizing the whole image, for a 12 MP photo with a small mask (in process).

    python loadtests/bench_crop_vs_resize.py [--runs 5] [--threads 2] [--mask-side 240]

crop:   what the service does, by its own class (engines.pipeline.RemovalPipeline, in process): dilate, a
        square crop per mask region at the smallest bucket, the model on the crops, paste back inside the mask.
resize: what a naive server does: the whole photo resized to 1024 x 1024 (the engine takes squares), the
        model on all of it, the output resized back to 12 MP.
Prints latency (p50) of both, their ratio, and how many pixels outside the mask changed (crop: must be 0).
Writes JSON (default out/bench_crop_vs_resize.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from benchlib import photo, positive_int, summarize
from PIL import Image

from engines import imaging
from engines.gate import GatePolicy
from engines.jobs import RemovalJob
from engines.pipeline import CropSettings, LocalModels, RemovalPipeline
from serve.config import ImagingSettings

if TYPE_CHECKING:
    from engines.remover import RemovalEngine

WIDTH, HEIGHT = 4000, 3000


def photo_12mp() -> np.ndarray:
    return np.asarray(Image.fromarray(photo(1024)).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def small_mask(side: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    top, left = HEIGHT // 2, WIDTH // 3
    mask[top : top + side, left : left + side] = True
    return mask


def remove_by_crop(engine: RemovalEngine, image: np.ndarray, mask: np.ndarray, dilate: int) -> np.ndarray:
    settings = ImagingSettings(dilate=dilate)
    pipeline = RemovalPipeline(LocalModels(engine), CropSettings.from_imaging(settings), settings.decode_limits())
    prepared = pipeline.prepare_pixels(imaging.DecodedImage(image, None, "png"), mask)
    return asyncio.run(pipeline(prepared, 0, GatePolicy("off", 0.0, 1, True))).result.edited


def remove_by_resize(engine: RemovalEngine, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The engine takes square inputs: the naive server stretches the photo to 1024 x 1024 and back."""
    size = (1024, 1024)
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    small_mask_ = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    out = engine.remove([RemovalJob(small, small_mask_, seed=0)])[0]
    return np.asarray(Image.fromarray(out).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle-cache", default="~/.cache/rorem")
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mask-side", type=int, default=120, help="side of the square mask, in 12 MP pixels")
    parser.add_argument(
        "--dilate", type=int, default=ImagingSettings().dilate, help="mask dilation (the service default)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench_crop_vs_resize.json"))
    args = parser.parse_args()
    import torch  # the model libraries load after the arguments are checked: a bad flag is refused at once

    from engines.remover import RemovalEngine
    from engines.sources import open_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = RemovalEngine.from_bundle(open_bundle(path=None, authors=None, cache_dir=args.bundle_cache))
    image, mask = photo_12mp(), small_mask(args.mask_side)
    outside = ~imaging.dilate_mask(mask, args.dilate)
    result = {"image": f"{WIDTH}x{HEIGHT}", "mask": f"{args.mask_side}x{args.mask_side}", "torch_threads": torch.get_num_threads()}
    for name, run in (
        ("crop", lambda: remove_by_crop(engine, image, mask, args.dilate)),
        ("resize", lambda: remove_by_resize(engine, image, mask)),
    ):
        output = run()
        samples = []
        for _ in range(args.runs):
            started = time.perf_counter()
            output = run()
            samples.append((time.perf_counter() - started) * 1000)
        changed = np.any(output[outside] != image[outside], axis=-1)
        result[name] = {**summarize(samples), "outside_mask_pixels_changed": int(changed.sum()),
                        "outside_mask_max_abs_diff": int(np.abs(output[outside].astype(int) - image[outside]).max())}  # fmt: skip
    result["resize_over_crop_p50"] = round(result["resize"]["p50_ms"] / result["crop"]["p50_ms"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'path':<8} {'p50 ms':>8} {'p90 ms':>8} {'outside px changed':>19} {'max diff':>9}")
    for name in ("crop", "resize"):
        r = result[name]
        print(f"{name:<8} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['outside_mask_pixels_changed']:>19} {r['outside_mask_max_abs_diff']:>9}")
    print(f"resize / crop p50: {result['resize_over_crop_p50']}x; saved {args.out}")


if __name__ == "__main__":
    main()
