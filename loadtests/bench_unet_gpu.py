"""GPU benchmark of the full-size SDXL-inpainting UNet: torch eager vs torch.compile vs TensorRT.

    python loadtests/bench_unet_gpu.py --out docs/bench_unet_gpu.json

Needs TensorRT (NVIDIA's container); it cannot run on this workplace's bare GPU machine, where
loadtests/bench_engine_gpu.py measures the engine eager vs CUDA graphs instead.
Random weights (seeded; timing does not depend on them): the UNet in fp16 and the SDXL VAE
(bf16 next to an fp16 UNet, as serving runs it: engines.remover.vae_dtype_for). Steps, each cached in --work:
  1. fp16 ONNX export of the UNet (export.onnx_export, external data)
  2. per side, a TensorRT plan with one profile: that side, batch 1..max(--batches)
     (export.tensorrt_build, shared timing cache)
  3. parity at batch 1: torch.compile and TensorRT against torch eager fp16, same inputs
  4. timings per runner x side x batch: one UNet step (CUDA events) and one whole image batch
     (RemovalEngine.generate: VAE encode, 4 UNet steps, VAE decode; wall clock, synchronized)
Prints a table (ms, images/s, MFU) and writes JSON; results merge into an existing --out by
(runner, side, batch), so the work can be split across commands, e.g. under a 10-minute limit:
    python loadtests/bench_unet_gpu.py --prepare                         # export (+ no timing)
    python loadtests/bench_unet_gpu.py --only 512 --runners tensorrt,eager
    python loadtests/bench_unet_gpu.py --only 1024 --runners tensorrt,eager
    python loadtests/bench_unet_gpu.py --only 512 --runners compile       # compile per batch: slow
    ... or repeat one command with --budget-s 540 --resume until it reports nothing left.

MFU = model FLOPs / time / peak. FLOPs per batch-1 forward from REFERENCE.md (FlopCounterMode):
UNet 1.59 TFLOP (512) / 6.76 (1024); image = 4 UNet + VAE encode + decode = 9.99 / 42.39 TFLOP.
Peak: dense fp16/bf16 tensor-core TFLOP/s by GPU name (H100 SXM and H200: 989.4), or --peak-tflops.
The image MFU counts the VAE (bf16 on CUDA: the engine runs SDXL's fp16-overflowing VAE so,
engines.remover.vae_dtype_for) against the fp16 peak.
"""

from __future__ import annotations

import argparse
import os
import gc
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNNERS = ("eager", "compile", "tensorrt", "tensorrt_graph")


def parse_args(argv=None) -> argparse.Namespace:
    from benchlib import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "docs"), "bench_unet_gpu.json"),
                   help="default: $OUT/bench_unet_gpu.json where $OUT is set (the GPU machine), else docs/")
    p.add_argument("--work", default="out/bench_unet_gpu", help="cache: ONNX, plans, timing cache")
    p.add_argument("--sides", "--only", dest="sides", default="512,1024", help="image sides (512 and/or 1024)")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--runners", default="eager,compile,tensorrt", help=f"comma-separated of {', '.join(RUNNERS)}")
    p.add_argument("--iters", type=positive_int, default=20, help="timed UNet steps per case")
    p.add_argument("--image-iters", type=positive_int, default=5, help="timed whole-image batches per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-mode", help="default: engines.runners.COMPILE_MODE, the service's; 'default' is faster")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level")
    p.add_argument("--workspace-gb", type=float, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense fp16 peak; default from the GPU name")
    p.add_argument("--prepare", action="store_true", help="only export the ONNX (and build plans for --sides)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--resume", action="store_true", help="skip cases already in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smoke test of this script with the tiny UNet (CPU allowed)")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    runners = [r for r in args.runners.split(",") if r]
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        return _fail(f"unknown runners {sorted(unknown)}: choose from {', '.join(RUNNERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False); "
                     "`--tiny --device cpu --runners eager --sides 64 --batches 1,2` only smoke-tests the script")
    if args.device == "cpu" and not (args.tiny and set(runners) <= {"eager"}):
        return _fail("--device cpu is a smoke test: it needs --tiny and --runners eager")
    wants_trt = any(r.startswith("tensorrt") for r in runners)
    if wants_trt:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return _fail("TensorRT runners need `tensorrt` (NVIDIA's container, or pip install tensorrt); "
                         "or leave them out: --runners eager,compile")

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    sides = [int(s) for s in args.sides.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    work = Path(args.work) / ("tiny" if args.tiny else "sdxl")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report["device"] = _describe_device(device, args)
    report.setdefault("flops", _flops_note())
    report.setdefault("parity", {})
    report.setdefault("plans", {})
    report.setdefault("results", [])
    started = time.monotonic()

    unet, vae, fingerprint = _models(args, device)
    onnx_path = None
    if wants_trt or args.prepare:
        onnx_path = _ensure_onnx(unet, work, fingerprint, report, device)
    plans = {}
    if wants_trt:
        for side in sides:
            plans[side] = _ensure_plan(onnx_path, side, max(batches), work, args, report)
    _save(out, report)
    if args.prepare:
        print(f"prepared in {time.monotonic() - started:.0f} s: {work}")
        return 0

    from engines.runners import TorchUNetRunner

    eager = TorchUNetRunner(unet, device)  # channels_last on CUDA; after the export, which traces the plain layout
    left = []
    for side in sides:
        reference = _step_inputs(_engine(eager, vae, unet), side, 1)
        expected = eager(*reference).float()
        for name in runners:
            cases = [b for b in batches if not (args.resume and _has(report, name, side, b))]
            if not cases:
                continue
            runner = _runner(name, unet, eager, plans.get(side), device, args)
            if name != "eager":  # also its first call: compilation / context creation / graph capture
                t0 = time.perf_counter()
                got = runner(*reference).float()
                _sync(device)
                parity = _parity(got, expected)
                parity["first_call_s"] = round(time.perf_counter() - t0, 2)
                report["parity"].setdefault(str(side), {})[name] = parity
            for batch in cases:
                if args.budget_s and time.monotonic() - started > args.budget_s:
                    left.append(f"{name}/{side}/b{batch}")
                    continue
                row = _bench_case(name, runner, unet, vae, side, batch, device, args, report["device"]["peak_tflops"])
                report["results"] = [r for r in report["results"] if (r["runner"], r["side"], r["batch"]) != (name, side, batch)]
                report["results"].append(row)
                _save(out, report)
                _print_row(row)
            del runner
            _free(device)
    _save(out, report)
    _print_table(report)
    print(f"wrote {out}")
    if left:
        print(f"budget reached; not run: {', '.join(left)} (rerun with --resume)")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# models, export, plans


def _models(args, device):
    """Seeded random UNet (fp16) and VAE (built fp32; the engine runs it in vae_dtype_for's dtype) on the device,
    and a fingerprint of the UNet weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if args.tiny:
        from engines.tiny import TINY_UNET as unet_config
        from engines.tiny import TINY_VAE as vae_config
    else:
        from export.sdxl_config import SDXL_INPAINT_UNET as unet_config
        from export.sdxl_config import SDXL_VAE as vae_config
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(torch.float16).eval().requires_grad_(False)
        vae = AutoencoderKL(**vae_config).eval().requires_grad_(False)
    sums = torch.stack([p.detach().double().sum() for p in unet.parameters()]).cpu().numpy().tobytes()
    fingerprint = hashlib.sha256(sums).hexdigest()[:16]
    params = sum(p.numel() for p in unet.parameters())
    print(f"models: UNet {params / 1e9:.2f} B params fp16, VAE as the engine runs it, seed {args.seed} "
          f"({time.perf_counter() - t0:.1f} s; fingerprint {fingerprint})", flush=True)
    return unet, vae, fingerprint


def _ensure_onnx(unet, work: Path, fingerprint: str, report: dict, device) -> Path:
    from export.onnx_export import export_unet_onnx, read_onnx_metadata
    from export.progress import Progress

    path = work / "unet.fp16.onnx"
    stamp = work / "unet.fp16.onnx.fingerprint"
    if path.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        print(f"onnx: cached {path}")
        return path
    t0 = time.perf_counter()
    export_unet_onnx(unet, path, dtype="float16", progress=Progress())
    stamp.write_text(fingerprint)
    report["export"] = {"seconds": round(time.perf_counter() - t0, 1), "metadata": read_onnx_metadata(path)}
    for plan in work.glob("*.plan"):  # plans of other weights
        plan.unlink()
    return path


def _ensure_plan(onnx_path: Path, side: int, max_batch: int, work: Path, args, report: dict) -> Path:
    import tensorrt as trt
    import torch

    from engines.runners import plan_sidecar
    from export.progress import Progress
    from export.tensorrt_build import build_plan, onnx_static_dims, profiles_from_serve_config

    sm = "%d%d" % torch.cuda.get_device_capability()
    plan = work / f"unet.fp16.{side}px.b{max_batch}.sm{sm}.plan"
    sidecar = plan_sidecar(plan)
    if plan.is_file() and sidecar.is_file() and json.loads(sidecar.read_text())["tensorrt_version"] == trt.__version__:
        print(f"plan: cached {plan}")
        report["plans"][str(side)] = json.loads(sidecar.read_text())
        return plan
    profiles = profiles_from_serve_config({side: max_batch}, **onnx_static_dims(onnx_path))
    info = build_plan(
        onnx_path, plan, profiles, timing_cache_path=work / f"timing.sm{sm}.cache",
        workspace_gb=args.workspace_gb, optimization_level=args.opt_level, progress=Progress(),
    )  # fmt: skip
    report["plans"][str(side)] = info.to_json()
    return plan


def _runner(name: str, unet, eager, plan, device, args):
    """The service's runners; "compile" as TorchUNetRunner(compile=True) builds it, its recompile limit raised
    for every (side, batch) case (past dynamo's default limit a case would run eager, unreported)."""
    from engines.runners import COMPILE_MODE, TensorRTUNetRunner, TorchUNetRunner

    if name == "eager":
        return eager
    if name == "compile":
        return TorchUNetRunner(unet, device, compile=True, compile_mode=args.compile_mode or COMPILE_MODE)
    return TensorRTUNetRunner(plan, device, cuda_graph=(name == "tensorrt_graph"))


# ---------------------------------------------------------------------------------------------
# measurements


def _engine(runner, vae, unet):
    """A RemovalEngine over `runner` (seeded random prompt embeddings): the serving loop _time_images times,
    and the timestep and conditioning _step_inputs takes."""
    import torch
    from diffusers import LCMScheduler

    from engines.remover import RemovalEngine, SamplingSettings
    from engines.tiny import SDXL_SCHEDULER
    from export.onnx_export import unet_input_dims

    dims = unet_input_dims(unet.config)
    g = torch.Generator("cpu").manual_seed(0)
    return RemovalEngine(
        vae=vae,
        unet_runner=runner,
        scheduler=LCMScheduler(**SDXL_SCHEDULER),
        prompt_embeds=torch.randn(1, 77, dims["embed_dim"], generator=g),
        pooled_prompt_embeds=torch.randn(1, dims["pooled_dim"], generator=g),
        sampling=SamplingSettings(steps=4, strength=1.0),
    )


def _step_inputs(engine, side: int, batch: int):
    """(sample, timestep, cond) for one UNet step exactly as RemovalEngine.denoise passes them: its timestep and
    conditioning, taken under inference_mode, and an inference-tensor sample like its latents. A compiled UNet
    guards on each input's kind (inference tensor or not): other tensors would compile every case twice."""
    import torch

    _, h, w = engine.latent_shape(side, side)
    g = torch.Generator("cpu").manual_seed(batch)
    with torch.inference_mode():
        sample = torch.randn(engine.unet_input_shapes(side, batch)["sample"], generator=g)
        return sample.to(engine.device, engine.dtype), engine.timesteps[0], engine.conditioning(batch, h, w)


def _parity(got, expected) -> dict:
    from export.verify import TOLERANCES

    diff = (got - expected).abs()
    tolerance = TOLERANCES["float16"]
    row = {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "reference_mean_abs": float(expected.abs().mean()),
        "finite": bool(got.isfinite().all()),
        "tolerance": tolerance,
    }
    row["passed"] = row["finite"] and row["max_abs"] <= tolerance["max_abs"] and row["mean_abs"] <= tolerance["mean_abs"]
    return row


def _bench_case(name, runner, unet, vae, side, batch, device, args, peak) -> dict:
    import torch

    from export.sdxl_config import UNET_TFLOP, image_tflop

    engine = _engine(runner, vae, unet)
    inputs = _step_inputs(engine, side, batch)
    t0 = time.perf_counter()
    runner(*inputs)  # first call at this batch: recompile (dynamic=False) / new context / graph capture
    _sync(device)
    first_s = time.perf_counter() - t0
    step = _time_steps(lambda: runner(*inputs), args.warmup, args.iters, device)
    image = _time_images(engine, side, batch, device, args)
    flops_known = not args.tiny and side in UNET_TFLOP and peak
    row = {
        "runner": name,
        "side": side,
        "batch": batch,
        "first_call_s": round(first_s, 2),
        "unet_step_ms": step["median_ms"],
        "unet_step_p90_ms": step["p90_ms"],
        "unet_mfu": round(UNET_TFLOP[side] * batch / (step["median_ms"] / 1e3) / peak, 4) if flops_known else None,
        "image_batch_ms": image["median_ms"],
        "images_per_s": round(batch / (image["median_ms"] / 1e3), 2),
        "image_mfu": round(image_tflop(side) * batch / (image["median_ms"] / 1e3) / peak, 4) if flops_known else None,
        "image_stages_ms": image["stages_ms"],
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _time_steps(fn, warmup: int, iters: int, device) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
    return _summary(samples)


def _time_images(engine, side, batch, device, args) -> dict:
    """RemovalEngine.generate on random images with a centered square mask: the serving loop."""
    import torch

    g = torch.Generator("cpu").manual_seed(0)
    images = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    masks = torch.zeros(batch, 1, side, side)
    masks[:, :, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1

    def once(timings=None):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        engine.generate(images, masks, generators, timings)
        _sync(device)

    for _ in range(max(1, args.warmup // 2)):
        once()
    samples, stages = [], []
    for _ in range(args.image_iters):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        once(timings)
        samples.append((time.perf_counter() - t0) * 1000)
        stages.append(timings)
    summary = _summary(samples)
    summary["stages_ms"] = {k: round(statistics.median(s[k] for s in stages) * 1000, 1) for k in stages[0]}
    return summary


def _summary(samples_ms: list[float]) -> dict:
    """p90 interpolated like the median (the rank below put it under the median with few samples)."""
    p90 = statistics.quantiles(samples_ms, n=10, method="inclusive")[8] if len(samples_ms) > 1 else samples_ms[0]
    return {"median_ms": round(statistics.median(samples_ms), 2), "p90_ms": round(p90, 2)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# report


def _describe_device(device, args) -> dict:
    import torch

    from export.sdxl_config import peak_tflops

    info = {"device": str(device), "torch": torch.__version__, "tiny": args.tiny}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or peak_tflops(name)
        info.update(
            gpu=name,
            compute_capability="%d.%d" % torch.cuda.get_device_capability(device),
            cuda=torch.version.cuda,
            peak_tflops=peak,
            peak_source="--peak-tflops" if args.peak_tflops else ("dense fp16/bf16 by GPU name" if peak else "unknown GPU: pass --peak-tflops"),
        )
        try:
            import tensorrt

            info["tensorrt"] = tensorrt.__version__
        except ImportError:
            info["tensorrt"] = None
    else:
        info.update(gpu=None, peak_tflops=None, peak_source="cpu smoke test")
    return info


def _flops_note() -> dict:
    from export.sdxl_config import UNET_TFLOP, image_tflop

    return {
        "unet_tflop_per_image_step": UNET_TFLOP,
        "image_tflop": {side: round(image_tflop(side), 2) for side in UNET_TFLOP},
        "source": "REFERENCE.md, torch FlopCounterMode on the real SDXL shapes (batch 1)",
    }


def _has(report: dict, runner: str, side: int, batch: int) -> bool:
    return any((r["runner"], r["side"], r["batch"]) == (runner, side, batch) for r in report.get("results", []))


def _save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


COLUMNS = ("runner", "side", "batch", "unet_step_ms", "unet_mfu", "image_batch_ms", "images_per_s", "image_mfu")


def _print_row(row: dict) -> None:
    print("  " + "  ".join(f"{c}={row[c]}" for c in COLUMNS), flush=True)


def _print_table(report: dict) -> None:
    device = report["device"]
    print(f"\n{device.get('gpu') or device['device']}  peak {device.get('peak_tflops')} TFLOP/s ({device.get('peak_source')})")
    print("  ".join(f"{c:>14}" for c in COLUMNS))
    for row in sorted(report["results"], key=lambda r: (r["side"], r["batch"], RUNNERS.index(r["runner"]))):
        print("  ".join(f"{'-' if row[c] is None else row[c]!s:>14}" for c in COLUMNS))
    for side, by_runner in report.get("parity", {}).items():
        for name, p in by_runner.items():
            print(f"parity {side}px {name} vs eager fp16: max abs {p['max_abs']:.2e}, mean abs {p['mean_abs']:.2e} "
                  f"({'ok' if p['passed'] else 'OUT OF TOLERANCE'})")


if __name__ == "__main__":
    raise SystemExit(main())
