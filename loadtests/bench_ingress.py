"""Per-request cost of the ingress (everything that is not model work) against the codec floor.

    python loadtests/bench_ingress.py [--runs 5] [--out out/bench_ingress.json] [--before docs/bench_ingress_before.json]
    python loadtests/bench_ingress.py --smoke        # tiny sizes, one run: checks that the script works

For each photo size (512x512, 1024x1024, 4000x3000 = 12 MP) and format (png, jpeg) a request is replayed by
the service's own steps (engines.pipeline.RemovalPipeline, as serve/service.py drives it: `prepare`, then an
attempt, then the reply's encode): decode the photo (decode); decode the mask (mask); dilate it, plan a crop per
region, cut them and grow their masks to latent cells (plan+crop: `prepare_pixels`); paste the stand-in model
outputs back with the pipeline's feather (paste: the attempt's paste stage); encode the result in the photo's
format (encode). The model itself is not run: its output is the inverted crop (`InvertingModels`).

The floor is what no ingress can avoid: one decode of the photo, one of the mask and one encode of the output,
each with the fastest codec library importable here (Pillow always; imagecodecs, OpenCV, simplejpeg, pyspng when
installed), at the service's settings (PNG: lossless, zlib level 1; JPEG: quality 95). ratio = total / floor,
both measured in the same process, interleaved run by run: the machine may be shared, so compare ratios, not
milliseconds across runs. Everything runs on one thread (BLAS/OpenMP/OpenCV limited to 1); numbers are medians.

Writes JSON (--out) and a markdown table next to it (same name, .md). With --before, the table also shows the
total and ratio of an earlier run (e.g. one made on the previous code).
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from benchlib import positive_int  # noqa: E402
from PIL import Image  # noqa: E402

from engines import imaging  # noqa: E402
from engines.jobs import RemovalJob, ScoreJob  # noqa: E402
from engines.pipeline import CropSettings, LocalOutcome, Prepared, RemovalPipeline, Timings  # noqa: E402
from serve.config import ImagingSettings  # noqa: E402

SETTINGS = ImagingSettings().model_dump(include={"buckets", "crop_margin", "dilate", "feather", "jpeg_quality"})
LIMITS = ImagingSettings().decode_limits()  # the service's defaults

SIZES = [(512, 512), (1024, 1024), (4000, 3000)]
SMOKE_SIZES = [(64, 64), (96, 128)]
FORMATS = ["png", "jpeg"]
STAGES = ["decode", "mask", "plan+crop", "paste", "encode"]


# --- inputs ---------------------------------------------------------------------------------------


def photo(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut (a real photograph), resized to width x height."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    with Image.open(path) as source:
        return np.asarray(source.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def blob_mask(width: int, height: int) -> np.ndarray:
    """Two round blobs (an object and its shadow, say), the larger one at most 150 px in radius."""
    radius = min(0.12 * min(width, height), 150.0)
    rows, cols = np.ogrid[:height, :width]
    mask = np.zeros((height, width), bool)
    centre_y, centre_x = 0.45 * height, 0.45 * width
    for dy, dx, r in ((0.0, 0.0, radius), (1.6 * radius, 1.6 * radius, 0.7 * radius)):
        mask |= (rows - centre_y - dy) ** 2 + (cols - centre_x - dx) ** 2 < r**2
    return mask


def encode_input(array: np.ndarray, fmt: str) -> bytes:
    """How a client would send it: PNG at Pillow's default level, JPEG at quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buffer.getvalue()


# --- the codec floor ------------------------------------------------------------------------------


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)


def _pil_encode(fmt: str, quality: int) -> Callable[[np.ndarray], bytes]:
    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        if fmt == "png":
            Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        else:
            Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    return encode


def floor_candidates(fmt: str, quality: int) -> tuple[dict[str, Callable], dict[str, Callable], dict[str, Callable]]:
    """(decode photo, decode mask, encode output) implementations by library, for those importable here.

    The mask is always a PNG. Decoders return the stored pixels (no conversion); encoders take RGB uint8.
    """
    photo_decoders: dict[str, Callable] = {"pillow": _pil_decode}
    png_decoders: dict[str, Callable] = {"pillow": _pil_decode}
    encoders: dict[str, Callable] = {"pillow": _pil_encode(fmt, quality)}
    try:
        import imagecodecs

        png_decoders["imagecodecs"] = imagecodecs.png_decode
        if fmt == "png":
            photo_decoders["imagecodecs"] = imagecodecs.png_decode
            encoders["imagecodecs"] = lambda a: imagecodecs.png_encode(a, level=1)
            encoders["imagecodecs up-filter"] = lambda a: imagecodecs.png_encode(a, level=1, filter=32)
        else:
            photo_decoders["imagecodecs"] = imagecodecs.jpeg8_decode
            encoders["imagecodecs"] = lambda a: imagecodecs.jpeg8_encode(a, level=quality)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv2_decode(data: bytes) -> np.ndarray:
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

        png_decoders["opencv"] = cv2_decode
        photo_decoders["opencv"] = cv2_decode
        if fmt == "png":
            params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
            encoders["opencv"] = lambda a: cv2.imencode(".png", a, params)[1]  # channel order: no matter for cost
            up = params + [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
            encoders["opencv up-filter"] = lambda a: cv2.imencode(".png", a, up)[1]
        else:
            encoders["opencv"] = lambda a: cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    except ImportError:
        pass
    if fmt == "jpeg":
        try:
            import simplejpeg

            photo_decoders["simplejpeg"] = simplejpeg.decode_jpeg
            encoders["simplejpeg"] = lambda a: simplejpeg.encode_jpeg(a, quality=quality, colorsubsampling="420")
        except ImportError:
            pass
    try:
        import pyspng

        png_decoders["pyspng"] = pyspng.load
        if fmt == "png":
            photo_decoders["pyspng"] = pyspng.load
    except ImportError:
        pass
    return photo_decoders, png_decoders, encoders


def _timed(fn: Callable, *args) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn(*args)
    return (time.perf_counter() - started) * 1000, value


# --- the request, by the pipeline's steps ---------------------------------------------------------


class InvertingModels:
    """The model's stand-in: each crop comes back inverted (a changed crop of the bucket's size), at once."""

    async def remove(self, job: RemovalJob) -> LocalOutcome:
        return LocalOutcome(255 - job.image)

    async def score(self, job: ScoreJob) -> float:
        raise NotImplementedError("the ingress bench does not score")


async def _inline(fn: Callable, *args):
    """The pipeline's CPU steps on this thread: the bench times one thread."""
    return fn(*args)


def ingress_pipeline(settings: dict) -> RemovalPipeline:
    return RemovalPipeline(InvertingModels(), CropSettings.from_imaging(ImagingSettings(**settings)), LIMITS, _inline)


def one_request(
    pipeline: RemovalPipeline, photo_bytes: bytes, mask_bytes: bytes, fmt: str, quality: int
) -> tuple[dict[str, float], Prepared, np.ndarray, bytes]:
    """ms per stage, the prepared request, the edited image and the reply's body."""
    laps = {}
    laps["decode"], image = _timed(imaging.decode_image, photo_bytes, pipeline.limits)
    laps["mask"], mask = _timed(imaging.decode_mask, mask_bytes, image.rgb.shape[:2], pipeline.limits)
    laps["plan+crop"], prepared = _timed(pipeline.prepare_pixels, image, mask)
    timings = Timings()
    edited = asyncio.run(pipeline.attempt(prepared, 0, timings)).edited
    laps["paste"] = timings.stages["paste"] * 1000
    laps["encode"], body = _timed(
        imaging.encode_image, edited, image.alpha, fmt, quality, image.icc_profile, image.webp_lossless,
        image.has_alpha,
    )
    return laps, prepared, edited, body


# --- one case -------------------------------------------------------------------------------------


def bench_case(width: int, height: int, fmt: str, runs: int, settings: dict) -> dict:
    rgb = photo(width, height)
    photo_bytes = encode_input(rgb, fmt)
    mask_bytes = encode_input(blob_mask(width, height).astype(np.uint8) * 255, "png")
    quality = settings["jpeg_quality"]
    photo_decoders, mask_decoders, encoders = floor_candidates(fmt, quality)

    stage_samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    candidate_samples: dict[str, list[float]] = {}
    pipeline = ingress_pipeline(settings)
    for run in range(runs + 1):  # run 0 warms up (imports, allocator) and is not counted
        laps, prepared, edited, body = one_request(pipeline, photo_bytes, mask_bytes, fmt, quality)
        output_bytes = len(body)

        floor_laps = {}
        for op, candidates, data in (
            ("decode photo", photo_decoders, photo_bytes),
            ("decode mask", mask_decoders, mask_bytes),
            ("encode", encoders, edited),
        ):
            for library, fn in candidates.items():
                floor_laps[f"{op}: {library}"] = _timed(fn, data)[0]
        if run:
            for stage, ms in laps.items():
                stage_samples[stage].append(ms)
            for name, ms in floor_laps.items():
                candidate_samples.setdefault(name, []).append(ms)

    stages = {stage: round(statistics.median(samples), 2) for stage, samples in stage_samples.items()}
    totals = [sum(values) for values in zip(*stage_samples.values())]
    stages["total"] = round(statistics.median(totals), 2)
    candidates = {name: round(statistics.median(samples), 2) for name, samples in candidate_samples.items()}
    floor, floor_libraries = {}, {}
    for op in ("decode photo", "decode mask", "encode"):
        library, ms = min(((n.split(": ", 1)[1], ms) for n, ms in candidates.items() if n.startswith(op + ":")),
                          key=lambda item: item[1])  # fmt: skip
        floor[op], floor_libraries[op] = ms, library
    floor["total"] = round(sum(floor.values()), 2)
    # the same ratio run by run (each run's total over that run's floor): less swayed by a busy neighbour
    ops = ("decode photo", "decode mask", "encode")
    run_floors = [
        sum(min(ms for name, ms in run.items() if name.startswith(op + ":")) for op in ops)
        for run in (dict(zip(candidate_samples, values)) for values in zip(*candidate_samples.values()))
    ]
    run_ratios = [total / run_floor for total, run_floor in zip(totals, run_floors)]
    return {
        "image": f"{width}x{height}",
        "megapixels": round(width * height / 1e6, 2),
        "format": fmt,
        "photo_bytes": len(photo_bytes),
        "mask_bytes": len(mask_bytes),
        "output_bytes": output_bytes,
        "plan": {"side": prepared.plans[0].side, "bucket": prepared.plans[0].bucket},
        "crops": len(prepared.plans),
        "stages_ms": stages,
        "floor_ms": floor,
        "floor_libraries": floor_libraries,
        "candidates_ms": candidates,
        "ratio": round(stages["total"] / floor["total"], 2),
        "ratio_median_of_runs": round(statistics.median(run_ratios), 2),
    }


# --- report ---------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    import PIL

    versions = {"python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__}
    for module in ("imagecodecs", "cv2", "simplejpeg", "pyspng", "scipy"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    return versions


def markdown(report: dict, before: dict | None) -> str:
    earlier = {(c["image"], c["format"]): c for c in (before or {}).get("cases", [])}
    header = ["image", "format", *STAGES, "total", "floor", "floor libraries (photo / mask / encode)", "ratio"]
    if before:
        header += ["before: total", "before: ratio"]
    lines = [
        f"Ingress cost per request (ms, median of {report['runs']} runs, one thread) vs the codec floor; "
        "ratio = total / floor, both from the same run.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for case in report["cases"]:
        stages, floor, libs = case["stages_ms"], case["floor_ms"], case["floor_libraries"]
        row = [case["image"], case["format"], *(f"{stages[s]:.1f}" for s in STAGES), f"{stages['total']:.1f}",
               f"{floor['total']:.1f}", " / ".join(libs[op] for op in ("decode photo", "decode mask", "encode")),
               f"{case['ratio']:.2f}"]  # fmt: skip
        if before:
            old = earlier.get((case["image"], case["format"]))
            row += [f"{old['stages_ms']['total']:.1f}", f"{old['ratio']:.2f}"] if old else ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out/bench_ingress.json"))
    parser.add_argument("--before", type=Path, help="an earlier JSON report, shown beside this one")
    parser.add_argument("--smoke", action="store_true", help="tiny images, one run")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=FORMATS)
    args = parser.parse_args()
    before = json.loads(args.before.read_text()) if args.before else None  # before minutes of measuring
    sizes, runs = (SMOKE_SIZES, 1) if args.smoke else (SIZES, args.runs)
    settings = SETTINGS
    cases = []
    for width, height in sizes:
        for fmt in args.formats:
            case = bench_case(width, height, fmt, runs, settings)
            cases.append(case)
            print(f"{case['image']:>9} {fmt:4}  total {case['stages_ms']['total']:8.1f} ms  "
                  f"floor {case['floor_ms']['total']:8.1f} ms  ratio {case['ratio']:.2f}", flush=True)  # fmt: skip
    report = {
        "runs": runs,
        "threads": 1,
        "settings": settings,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": library_versions(),
        "cases": cases,
    }
    if before:
        report["before"] = str(args.before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, before)
    args.out.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
