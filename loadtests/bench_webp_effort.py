"""What a lossless WebP result's effort buys: CPU time and bytes of one encode per `quality` (lossless WebP reads it
as the effort spent compressing), on a photo and on a photo half filled with noise (what the tiny bundle paints).

    python loadtests/bench_webp_effort.py [--side 2048] [--out out/bench_webp_effort.json]

Why engines.imaging.LOSSLESS_WEBP_MAX_EFFORT exists: the effort is capped there. CPU seconds of this process
(time.process_time), so other load on the machine does not count; ratios between rows of one run are what to read.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from benchlib import photo
from PIL import Image

EFFORTS = (100, 95, 75, 50, 25, 0)


def encode_cost(pixels: np.ndarray, effort: int) -> tuple[float, int]:
    image, buffer = Image.fromarray(pixels), io.BytesIO()
    began = time.process_time()
    image.save(buffer, format="WEBP", lossless=True, exact=True, quality=effort)  # as engines.imaging.encode_image
    return time.process_time() - began, len(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("out/bench_webp_effort.json"))
    options = parser.parse_args()
    clean = photo(options.side)
    noisy = clean.copy()
    noisy[: options.side // 2] = np.random.default_rng(0).integers(0, 256, noisy[: options.side // 2].shape, np.uint8)
    rows = []
    print(f"{'image':>10} {'effort':>6} {'cpu s':>7} {'MB':>7}  cpu / effort 50")
    for name, pixels in (("photo", clean), ("half-noise", noisy)):
        costs = {effort: encode_cost(pixels, effort) for effort in EFFORTS}
        for effort, (seconds, size) in costs.items():
            ratio = seconds / costs[50][0]
            rows.append({"image": name, "effort": effort, "cpu_s": round(seconds, 3), "bytes": size,
                         "cpu_vs_effort_50": round(ratio, 2)})  # fmt: skip
            print(f"{name:>10} {effort:>6} {seconds:7.2f} {size / 1e6:7.2f}  {ratio:.2f}")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"side": options.side, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
