"""One box vs one crop per region, for a 12 MP photo with two small objects in opposite corners (CPU, no model).

    python loadtests/bench_region_crops.py [--runs 7] [--object 120] [--dilate 20]

one-box:    imaging.plan_crop: one window around both objects, downscaled into the largest bucket.
per-region: regions.plan_region_crops: a window per object, each at the smallest bucket that holds it.
For each: the crop side(s), bucket(s), the scale the objects are processed at (bucket / side), their side at that
scale, the pixels the model would process, and the wall time on the CPU of plan + crop + paste. The model call
is excluded: each crop is pasted back as its own "result". The mask is dilated first, as the service does;
dilation is common to both and not timed. Also times labelling the whole 12 MP mask with scipy.ndimage.label
and, when cv2 can be imported, cv2.connectedComponentsWithStats (plan_region_crops labels only the blocks
around the objects). Prints a table, writes out/bench_region_crops.json (docs/ holds the committed figures).
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

WIDTH, HEIGHT = 4000, 3000
BUCKETS = [512, 1024]
MARGIN = 128
FEATHER = 6
INSET = 200  # distance of each object from its corner


def photo_12mp() -> np.ndarray:
    return np.asarray(Image.fromarray(photo(1024)).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def two_corner_objects(side: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[INSET : INSET + side, INSET : INSET + side] = True
    mask[HEIGHT - INSET - side : HEIGHT - INSET, WIDTH - INSET - side : WIDTH - INSET] = True
    return mask


def one_box(image: np.ndarray, mask: np.ndarray) -> tuple[list[imaging.CropPlan], np.ndarray, dict]:
    laps = {}
    started = time.perf_counter()
    plan = imaging.plan_crop(mask, BUCKETS, MARGIN)
    laps["plan"] = time.perf_counter() - started
    crop, _ = imaging.crop_for_model(image, mask, plan)
    laps["crop"] = time.perf_counter() - started - laps["plan"]
    output = imaging.paste_back(image, mask, crop, plan, FEATHER)
    laps["paste"] = time.perf_counter() - started - laps["plan"] - laps["crop"]
    return [plan], output, laps


def per_region(image: np.ndarray, mask: np.ndarray) -> tuple[list[imaging.CropPlan], np.ndarray, dict]:
    laps = {}
    started = time.perf_counter()
    plans = regions.plan_region_crops(mask, BUCKETS, MARGIN)
    laps["plan"] = time.perf_counter() - started
    crops = [imaging.crop_for_model(image, mask, plan)[0] for plan in plans]
    laps["crop"] = time.perf_counter() - started - laps["plan"]
    output = regions.paste_back_regions(image, mask, crops, plans, FEATHER)
    laps["paste"] = time.perf_counter() - started - laps["plan"] - laps["crop"]
    return plans, output, laps


def timed(run, image: np.ndarray, mask: np.ndarray, runs: int) -> dict:
    samples = [run(image, mask)[2] for _ in range(runs)]
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=positive_int, default=7)
    parser.add_argument("--object", type=int, default=120, help="side of each square object, in 12 MP pixels")
    parser.add_argument("--dilate", type=int, default=20, help="mask dilation (the service default)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_region_crops.json"))
    args = parser.parse_args()
    image = photo_12mp()
    mask = imaging.dilate_mask(two_corner_objects(args.object), args.dilate)
    result = {
        "image": f"{WIDTH}x{HEIGHT}",
        "objects": f"two {args.object}x{args.object}, {INSET} px in from opposite corners, dilated {args.dilate} px",
        "buckets": BUCKETS,
        "margin": MARGIN,
        "feather": FEATHER,
        "timed": "wall time on the CPU of plan + crop + paste, median of runs; model call excluded (identity result)",
        "runs": args.runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    for name, run in (("one_box", one_box), ("per_region", per_region)):
        plans, output, _ = run(image, mask)
        times = timed(run, image, mask, args.runs)
        result[name] = {
            **describe(plans, output, image, mask, args.object),
            "ms": {**times, "total": round(sum(times.values()), 1)},
        }
    result["labelling_ms"] = labelling(mask, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['image']} photo, {result['objects']}; buckets {BUCKETS}, margin {MARGIN}; model call excluded")
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
        print(f"labelling the 12 MP mask: {name}: {ms} ms")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
