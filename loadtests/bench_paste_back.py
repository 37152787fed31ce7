"""The paste's cost by the mask's shape: a box over half the photo vs masks that are nearly all feather band
(CPU, no model; the adversarial trial of 2026-12-03 sent a 157 KB request whose striped mask made one paste cost
9 s of CPU and 2 GB).

    python loadtests/bench_paste_back.py [--side 6324] [--runs 3]
    python loadtests/bench_paste_back.py --side 610 --width 65535 --feather 64   # a panorama, the widest feather
    python loadtests/bench_paste_back.py --tree /tmp/old    # another checkout's engines/, for a before/after
    python loadtests/bench_paste_back.py --smoke            # a 1024 photo, one run: checks that the script works

Each mask goes through the service's planning (engines.pipeline.RemovalPipeline.prepare_pixels, its dilation
given) and is pasted back with regions.paste_back_regions and the service's feather, each crop's stand-in
result a flat grey. Reports the CPU seconds of the paste (process time: the first run, which maps its arrays'
pages afresh as a request's paste does, and the best of --runs), its peak of memory
traced by tracemalloc (numpy's arrays; Pillow's own buffers are not traced) in MiB and in bytes per photo pixel,
and a hash of the output, equal across trees when the paste is the same. Prints a table, writes
out/bench_paste_back.json (docs/ holds the committed figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MASKS = {  # name: (one row in `every` masked, or None for the box; the request's dilate)
    "box over half": (None, 20),
    "one row in 12, dilate 5": (12, 5),
    "one row in 40, dilate 20": (40, 20),
}


def mask_of(height: int, width: int, every: int | None) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    if every is None:
        mask[:, : width // 2] = True
    else:
        mask[::every] = True
    return mask


def measure(height: int, width: int, runs: int, feather: int | None = None) -> dict:
    """`feather`: the blend ramp, over the service's for the request's dilate (imaging.feather, at most dilate + 1)."""
    from engines import regions
    from engines.imaging import DecodedImage, DecodeLimits
    from engines.pipeline import CropSettings, RemovalPipeline
    from serve.config import ImagingSettings

    settings = ImagingSettings()
    pipeline = RemovalPipeline(None, CropSettings.from_imaging(settings), DecodeLimits())
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rows = {}
    for name, (every, dilate) in MASKS.items():
        prepared = pipeline.prepare_pixels(DecodedImage(rgb, None, "png"), mask_of(height, width, every), dilate, 4)
        results = [np.full((plan.bucket, plan.bucket, 3), 128, np.uint8) for plan in prepared.plans]
        ramp = pipeline.crops.feather_for(dilate) if feather is None else feather
        args = (rgb, prepared.mask, results, prepared.plans, ramp)
        cpu = []
        for _ in range(runs):
            started = time.process_time()
            edited = regions.paste_back_regions(*args)
            cpu.append(time.process_time() - started)
        tracemalloc.start()
        try:
            regions.paste_back_regions(*args)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows[name] = {
            "dilated_share": round(float(prepared.mask.mean()), 3),
            "feather": ramp,
            "first_cpu_s": round(cpu[0], 3),
            "best_cpu_s": round(min(cpu), 3),
            "peak_mib": round(peak / 2**20, 1),
            "peak_bytes_per_pixel": round(peak / (height * width), 1),
            "output_sha256": hashlib.sha256(edited.tobytes()).hexdigest()[:16],
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=positive_int, default=6324, help="photo height in pixels (6324: 40 MP)")
    parser.add_argument("--width", type=positive_int, default=None, help="photo width (default: --side)")
    parser.add_argument("--feather", type=int, default=None, help="blend ramp in pixels (default: the service's)")
    parser.add_argument("--runs", type=positive_int, default=3, help="timed pastes per mask (the best is kept)")
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose engines/ and serve/ are timed")
    parser.add_argument("--smoke", action="store_true", help="a 1024 photo, one run")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_paste_back.json")
    args = parser.parse_args(argv)
    height, runs = (1024, 1) if args.smoke else (args.side, args.runs)
    width = height if args.smoke or args.width is None else args.width
    sys.path.insert(0, str(args.tree.resolve()))
    rows = measure(height, width, runs, args.feather)
    print(f"photo {width}x{height} ({width * height / 1e6:.1f} MP), tree {args.tree.resolve()}, best of {runs}")
    print("| mask | dilated share | paste CPU s, first | best | peak MiB | peak bytes/pixel | output |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['dilated_share']:.0%} | {row['first_cpu_s']:.2f} | {row['best_cpu_s']:.2f} "
            f"| {row['peak_mib']:.0f} | {row['peak_bytes_per_pixel']:.1f} | {row['output_sha256']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"height": height, "width": width, "runs": runs, "tree": str(args.tree.resolve())}
    report |= {"machine": platform.machine(), "masks": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
