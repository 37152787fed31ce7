"""One box vs one crop per region, for a 12 MP photo with two small objects in opposite corners (CPU, no model).

    python loadtests/bench_region_crops.py [--runs 7] [--object 120] [--dilate 20]
    python loadtests/bench_region_crops.py --smoke      # a 1600x1200 photo, one run: checks that the script works

one-box:    imaging.plan_crop: one window around both objects, downscaled into the largest bucket (before).
per-region: the service's planning (engines.pipeline.RemovalPipeline.plan and .cut, then the pipeline's paste,
            regions.paste_back_regions with its feather): a window per object, each at the smallest bucket
            that holds it.
For each: the crop side(s), bucket(s), the scale the objects are processed at (bucket / side), their side at that
scale, the pixels the model would process, and the wall time on the CPU of plan (the mask's dilation included,
the same for both) + crop + paste. The model call is excluded: each crop comes back inverted (`stand_in`), so
every pixel the paste writes shows, and "outside_mask_pixels_changed" checks that none lies outside the mask.
Buckets, margin, feather and the default dilation are the service's (serve.config.ImagingSettings). Also times
labelling the whole 12 MP mask with scipy.ndimage.label and, when cv2 can be imported,
cv2.connectedComponentsWithStats (plan_region_crops labels only the blocks around the objects). Prints a table,
writes out/bench_region_crops.json (docs/ holds the committed figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from benchlib import photo, positive_int
from PIL import Image
from scipy import ndimage

from engines import imaging, regions
from engines.pipeline import CropSettings, RemovalPipeline
from serve.config import ImagingSettings

SIZE = (4000, 3000)
SMOKE_SIZE = (1600, 1200)  # still wider than the largest bucket: one box must downscale
INSET = 200  # distance of each object from its corner


def photo_of(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(photo(1024)).resize((width, height), Image.Resampling.BICUBIC))


def two_corner_objects(width: int, height: int, side: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[INSET : INSET + side, INSET : INSET + side] = True
    mask[height - INSET - side : height - INSET, width - INSET - side : width - INSET] = True
    return mask


def stand_in(crop: np.ndarray) -> np.ndarray:
    """The model's stand-in (untimed): the crop inverted."""
    return 255 - crop


def _timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - started, value


def one_box(pipeline: RemovalPipeline, image: np.ndarray, objects: np.ndarray) -> tuple[list, np.ndarray, dict]:
    settings = pipeline.crops
    laps = {}

    def dilate_and_plan():
        mask = imaging.dilate_mask(objects, settings.dilate)
        return mask, imaging.plan_crop(mask, settings.buckets, settings.crop_margin)

    laps["plan"], (mask, plan) = _timed(dilate_and_plan)
    laps["crop"], (crop, _) = _timed(imaging.crop_for_model, image, mask, plan)
    result = stand_in(crop)
    feather = settings.feather_for(settings.dilate)
    laps["paste"], output = _timed(imaging.paste_back, image, mask, result, plan, feather)
    return [plan], output, laps


def per_region(pipeline: RemovalPipeline, image: np.ndarray, objects: np.ndarray) -> tuple[list, np.ndarray, dict]:
    """The pipeline's own planning and cutting (RemovalPipeline.plan / .cut) and the paste its .attempt calls
    (regions.paste_back_regions, feather_for), each timed apart, with the stand-in for the model; a test keeps
    the output equal to the pipeline's (tests/test_bench_ingress.py)."""
    settings = pipeline.crops
    laps = {}
    laps["plan"], (mask, plans) = _timed(pipeline.plan, objects)
    laps["crop"], cut = _timed(pipeline.cut, image, mask, plans)
    results = [stand_in(crop) for crop, _ in cut]
    feather = settings.feather_for(settings.dilate)
    laps["paste"], output = _timed(regions.paste_back_regions, image, mask, results, plans, feather)
    return plans, output, laps


def timed(run, pipeline: RemovalPipeline, image: np.ndarray, objects: np.ndarray, runs: int) -> dict:
    samples = [run(pipeline, image, objects)[2] for _ in range(runs)]
    return {stage: round(statistics.median(s[stage] for s in samples) * 1000, 1) for stage in samples[0]}


def labelling(mask: np.ndarray, runs: int) -> dict:
    """Median ms to label the mask's connected regions and get their boxes, by each library at hand."""
    eight = np.ones((3, 3), bool)
    candidates = {"scipy.ndimage.label + find_objects": lambda: ndimage.find_objects(ndimage.label(mask, eight)[0])}
    try:
        import cv2

        cv2.setNumThreads(1)  # one Serve replica's share of the CPU; scipy runs on one thread too
        as_bytes = mask.view(np.uint8)
        candidates[f"cv2 {cv2.__version__} connectedComponentsWithStats"] = lambda: cv2.connectedComponentsWithStats(
            as_bytes, connectivity=8, ltype=cv2.CV_32S
        )
    except ImportError:
        pass
    out = {}
    for name, run in candidates.items():
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            run()
            samples.append(time.perf_counter() - started)
        out[name] = round(statistics.median(samples) * 1000, 1)
    return out


def describe(plans: list[imaging.CropPlan], output: np.ndarray, image: np.ndarray, mask: np.ndarray, side: int) -> dict:
    outside = ~mask
    return {
        "crops": [{"top": p.top, "left": p.left, "side": p.side, "bucket": p.bucket} for p in plans],
        "object_scale": [round(p.bucket / p.side, 3) for p in plans],
        "object_side_at_model_px": [round(side * p.bucket / p.side) for p in plans],
        "model_pixels": sum(p.bucket**2 for p in plans),
        "outside_mask_pixels_changed": int(np.any(output[outside] != image[outside], axis=-1).sum()),
    }


def main() -> None:
    defaults = ImagingSettings()
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=positive_int, default=7)
    parser.add_argument("--object", type=int, default=120, help="side of each square object, in photo pixels")
    parser.add_argument("--dilate", type=int, default=defaults.dilate, help="mask dilation (the service default)")
    parser.add_argument("--smoke", action="store_true", help=f"a {SMOKE_SIZE[0]}x{SMOKE_SIZE[1]} photo, one run")
    parser.add_argument("--out", type=Path, default=Path("out/bench_region_crops.json"))
    args = parser.parse_args()
    (width, height), runs = (SMOKE_SIZE, 1) if args.smoke else (SIZE, args.runs)
    imaging_settings = ImagingSettings(dilate=args.dilate)
    settings = CropSettings.from_imaging(imaging_settings)
    pipeline = RemovalPipeline(None, settings, imaging_settings.decode_limits())  # planning, cutting and pasting only
    image = photo_of(width, height)
    objects = two_corner_objects(width, height, args.object)
    mask = imaging.dilate_mask(objects, args.dilate)
    result = {
        "image": f"{width}x{height}",
        "objects": f"two {args.object}x{args.object}, {INSET} px in from opposite corners, dilated {args.dilate} px",
        "buckets": list(settings.buckets),
        "margin": settings.crop_margin,
        "feather": settings.feather_for(settings.dilate),
        "timed": "wall time on the CPU of plan (dilation included) + crop + paste, median of runs; model call "
        "excluded (each crop comes back inverted)",
        "runs": runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    for name, run in (("one_box", one_box), ("per_region", per_region)):
        plans, output, _ = run(pipeline, image, objects)
        times = timed(run, pipeline, image, objects, runs)
        result[name] = {
            **describe(plans, output, image, mask, args.object),
            "ms": {**times, "total": round(sum(times.values()), 1)},
        }
    result["labelling_ms"] = labelling(mask, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{result['image']} photo, {result['objects']}; buckets {result['buckets']}, margin {result['margin']}; "
        "model call excluded"
    )
    header = f"{'path':<11} {'crop side(s)':>13} {'bucket(s)':>10} {'scale':>12} {'object px':>10} {'model px':>9}"
    print(header + f" {'plan ms':>8} {'crop ms':>8} {'paste ms':>9} {'total ms':>9} {'outside changed':>16}")
    for name in ("one_box", "per_region"):
        r = result[name]
        sides = ",".join(str(c["side"]) for c in r["crops"])
        buckets = ",".join(str(c["bucket"]) for c in r["crops"])
        scales = ",".join(f"{s:g}" for s in r["object_scale"])
        objects = ",".join(str(s) for s in r["object_side_at_model_px"])
        ms = r["ms"]
        print(
            f"{name:<11} {sides:>13} {buckets:>10} {scales:>12} {objects:>10} {r['model_pixels']:>9}"
            f" {ms['plan']:>8} {ms['crop']:>8} {ms['paste']:>9} {ms['total']:>9} {r['outside_mask_pixels_changed']:>16}"
        )
    for name, ms in result["labelling_ms"].items():
        print(f"labelling the {result['image']} mask: {name}: {ms} ms")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
