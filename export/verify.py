"""ONNX Runtime against torch on the same inputs, with stated tolerances.

The reference is the torch UNet with the graph's weights (rounded to the graph's dtype) run in
float32, so an fp16 graph's error is its own rounding of activations, not a weight difference.
Tolerances, on noise_pred (values of order 1):
    float32: max abs <= 1e-4, mean abs <= 1e-5 (measured ~2e-6 max on the tiny UNet, CPU)
    float16: max abs <= 5e-2, mean abs <= 5e-3 (fp16 activations through a deep network; on GPU,
             TensorRT against torch fp16 is checked by loadtests/bench_unet_gpu.py)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from engines.runners import UNET_INPUTS, UNET_OUTPUT, VAE_FACTOR
from export.onnx_export import FlatUNet, example_inputs, read_onnx_metadata, read_unet_graph
from export.progress import QUIET, Progress

TOLERANCES = {
    "float32": {"max_abs": 1e-4, "mean_abs": 1e-5},
    "float16": {"max_abs": 5e-2, "mean_abs": 5e-3},
}
DEFAULT_CASES = ((1, 32, 32), (3, 64, 64))  # (batch, latent h, latent w): 256 px and 512 px images


def cases_for_buckets(buckets: Sequence[int] = ()) -> tuple[tuple[int, int, int], ...]:
    """The default cases plus one image at each bucket side (the sizes the service runs) not already
    among them: the graph takes another path at each resolution, and 1024 px is the one served."""
    covered = {(h, w) for _, h, w in DEFAULT_CASES}
    extra = sorted({side // VAE_FACTOR for side in buckets} - {h for h, w in covered if h == w})
    return DEFAULT_CASES + tuple((1, latent, latent) for latent in extra)


def cases_for_graph(onnx_path: str | Path, buckets: Sequence[int] = ()) -> tuple[tuple[int, int, int], ...]:
    """`cases_for_buckets`, or for a static graph (`--static`: one batch and latent size) that one shape, which
    it cannot be run at another: a bucket side other than its own is refused, not checked."""
    try:
        metadata = read_onnx_metadata(onnx_path)
    except (OSError, ValueError):
        metadata = {}  # not readable as ONNX: the check itself says so
    if (metadata.get("dynamic") or {}).get("batch") is not None:
        return cases_for_buckets(buckets)
    shape = (metadata.get("inputs") or {}).get("sample", {}).get("shape", [])
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return cases_for_buckets(buckets)  # no metadata (a graph made elsewhere): ONNX Runtime says what misfits
    return static_cases(onnx_path, (shape[0], shape[2], shape[3]), buckets)


def static_cases(
    onnx_path: str | Path, shape: tuple[int, int, int], buckets: Sequence[int] = ()
) -> tuple[tuple[int, int, int], ...]:
    """The one case of a static graph of `shape` (batch, latent h, latent w); refused (ValueError) when a bucket
    side is not its own: the check cannot run there, and serving would refuse the graph there."""
    batch, h, w = shape
    refused_sides = sorted(side for side in buckets if side != VAE_FACTOR * h or h != w)
    if refused_sides:
        raise ValueError(
            f"{onnx_path} is a static graph (batch {batch}, latent {h}x{w}: {VAE_FACTOR * h} px images only): it "
            f"cannot be checked, or served, at image sides {refused_sides}; export it without --static"
        )
    return (shape,)


def verify_onnx(
    onnx_path: str | Path,
    unet: UNet2DConditionModel,
    *,
    cases: tuple[tuple[int, int, int], ...] = DEFAULT_CASES,
    max_abs: float | None = None,
    mean_abs: float | None = None,
    providers: list[str] | None = None,
    sequence_length: int = 77,
    seed: int = 0,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Run each (batch, latent_h, latent_w) case through ONNX Runtime and torch; report the errors.

    Returns {"passed", "dtype", "tolerance", "providers", "max_abs", "mean_abs", "cases": [...]}.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    dtype_name = read_onnx_metadata(onnx_path).get("dtype") or _graph_dtype(onnx_path)
    tolerance = dict(TOLERANCES[dtype_name])
    tolerance.update({k: v for k, v in {"max_abs": max_abs, "mean_abs": mean_abs}.items() if v is not None})
    graph_dtype = torch.float16 if dtype_name == "float16" else torch.float32

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    with progress.stage(f"ONNX Runtime session for {onnx_path.name}"):
        session = ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
    reference = FlatUNet(_reference_unet(unet, graph_dtype)).eval()

    results = []
    for batch, h, w in cases:
        with progress.stage(f"parity batch {batch}, latent {h}x{w}") as stage:
            inputs = example_inputs(unet.config, batch, h, w, torch.float32, "cpu", seed=seed, sequence_length=sequence_length)
            inputs = tuple(t.to(graph_dtype).float() if t.is_floating_point() and i != 1 else t for i, t in enumerate(inputs))
            started = time.perf_counter()
            with torch.inference_mode():
                expected = reference(*inputs).float()
            torch_ms = (time.perf_counter() - started) * 1000
            feeds = {
                name: t.numpy().astype(np.float32 if name == "timestep" else _np(graph_dtype))
                for name, t in zip(UNET_INPUTS, inputs)
            }
            started = time.perf_counter()
            (got,) = session.run([UNET_OUTPUT], feeds)
            ort_ms = (time.perf_counter() - started) * 1000
            diff = (torch.from_numpy(got.astype(np.float32)) - expected).abs()
            case = {
                "batch": batch,
                "latent": [h, w],
                "max_abs": float(diff.max()),
                "mean_abs": float(diff.mean()),
                "reference_max_abs": float(expected.abs().max()),
                "finite": bool(np.isfinite(got).all()),
                "torch_ms": round(torch_ms, 1),
                "onnxruntime_ms": round(ort_ms, 1),
            }
            results.append(case)
            stage.note = f"max abs {case['max_abs']:.2e}, mean abs {case['mean_abs']:.2e}"
    worst_max = max(c["max_abs"] for c in results)
    worst_mean = max(c["mean_abs"] for c in results)
    return {
        "passed": all(c["finite"] for c in results)
        and worst_max <= tolerance["max_abs"]
        and worst_mean <= tolerance["mean_abs"],
        "onnx": onnx_path.name,
        "dtype": dtype_name,
        "reference": "torch float32 with the graph's weights",
        "tolerance": tolerance,
        "providers": session.get_providers(),
        "max_abs": worst_max,
        "mean_abs": worst_mean,
        "cases": results,
    }


def _reference_unet(unet: UNet2DConditionModel, graph_dtype: torch.dtype) -> UNet2DConditionModel:
    """A float32 CPU copy of the UNet whose weights are rounded to the graph's dtype."""
    import copy

    if graph_dtype == torch.float32 and unet.dtype == torch.float32 and unet.device.type == "cpu":
        return unet.eval()  # already the reference: no copy of the weights
    ref = copy.deepcopy(unet).to("cpu")
    if graph_dtype != torch.float32:
        ref = ref.to(graph_dtype)
    return ref.to(torch.float32).eval().requires_grad_(False)


def _graph_dtype(path: Path) -> str:
    proto = read_unet_graph(path)
    sample = next(i for i in proto.graph.input if i.name == "sample")
    return "float16" if sample.type.tensor_type.elem_type == 10 else "float32"


def _np(dtype: torch.dtype):
    return np.float16 if dtype == torch.float16 else np.float32
