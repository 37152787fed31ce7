"""The in-process removal engine on a GPU, end to end: eager vs CUDA graphs, in one command.

    python loadtests/bench_engine_gpu.py                    # on a CUDA machine; writes under $OUT
    python loadtests/bench_engine_gpu.py --smoke            # tiny model on the CPU: checks the script

Builds the full-size SDXL-inpainting UNet and VAE from their real configs (export.sdxl_config)
with seeded random weights (timing does not depend on them), then measures
`RemovalEngine.remove` (upload, VAE encode, 4 UNet steps, VAE decode, download) per side x batch
(512: 1/4/8/16, 1024: 1/4/8), eager and with the stages replayed as CUDA graphs (engines.graphs),
with per-stage times (CUDA events), achieved TFLOP/s, peak memory and first-call (capture) cost.
Also: bf16 vs fp32 pixel agreement on a small crop. `--modes compile` (inductor kernels inside the
same graphs; minutes of compilation per shape) and `--vae-layout contiguous` are there for A/B runs. Writes bench_engine_gpu.json and bench_engine_gpu.md into --out-dir and prints the table.
Exits 1, naming them, when a part failed (parity, a capture, a case: the others still run) or no case was
measured.

Runs on a bare GPU machine with torch but no diffusers or pydantic: carry the wheels that
loadtests/gpu_wheels.sh downloads (see docs/benchmarks.md for the one command). TensorRT is not
measured here (loadtests/bench_unet_gpu.py needs a TensorRT install).

FLOPs per image from REFERENCE.md (torch FlopCounterMode): UNet 1.59 / 6.76 TFLOP per step at
512 / 1024, VAE encode 1.12 / 4.88, decode 2.51 / 10.47; an image = 4 UNet steps + one encode (the
masked image; at strength 1 the unmasked one is not encoded) + one decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOALS = {"512x1_ms": 40.0, "1024x1_ms": 120.0, "512_images_per_s": 50.0}  # issue 15, H200, in-process


def parse_args(argv=None) -> argparse.Namespace:
    from benchlib import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.environ.get("OUT") or "out/bench_engine_gpu")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, eager only: a check of this script")
    p.add_argument("--cases", default="512:1,4,8,16;1024:1,4,8", help="side:batch,batch;side:...")
    p.add_argument(
        "--modes", default="eager,graph", help="eager, graph (CUDA graphs), compile (torch.compile'd UNet inside the graphs)"
    )
    p.add_argument("--iters", type=positive_int, default=6, help="timed runs per case (after 2 warm-up runs)")
    p.add_argument("--budget-s", type=float, default=420, help="start no new case after this many seconds")
    p.add_argument("--parity-side", type=int, default=256, help="crop side of the bf16 vs fp32 agreement check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-layout", choices=["channels_last", "contiguous"], default="channels_last")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    started = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the tiny model on the CPU", file=sys.stderr)
        return 2
    cases = _parse_cases("64:1,2" if args.smoke else args.cases)
    modes = ["eager"] if args.smoke else [m for m in args.modes.split(",") if m]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "args": vars(args), "results": [], "notes": [], "failed": []}
    print(json.dumps(report["environment"]), flush=True)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    unet, vae, scheduler, embeds = build_models(args.smoke, device, args.seed)

    report["parity"] = None if not args.parity_side else _attempt(
        report, "parity", lambda: _parity_bf16_vs_fp32(unet, vae, scheduler, embeds, device, 64 if args.smoke else args.parity_side)
    )
    unet.to(torch.bfloat16)  # (the parity check leaves them so too, unless it failed)
    vae.to(torch.bfloat16)
    print(f"parity bf16 vs fp32: {report['parity']}", flush=True)
    _save(out_dir, report)

    for mode in modes:
        engine = build_engine(unet, vae, scheduler, embeds, device, graphs=(mode in ("graph", "compile")))
        if mode == "compile":  # inductor's kernels, captured by the same stage graphs
            engine.runner.forward = torch.compile(unet.forward, mode="default", dynamic=False)
        if args.vae_layout == "contiguous":
            engine.channels_last = False
            engine.vae.to(memory_format=torch.contiguous_format)
        mode = mode if args.vae_layout == "channels_last" else f"{mode}+vae_nchw"
        for side, batches in cases.items():
            if _over(started, args):
                report["notes"].append(f"budget reached before {mode} {side}")
                continue
            if engine.graphs is not None:
                t0 = time.perf_counter()
                capture = _attempt(report, f"capture {side}", lambda: engine.graphs.capture([side], batches))
                if capture is None:
                    continue
                report.setdefault("capture", {})[f"{mode} {side}"] = {
                    **capture, "seconds": round(time.perf_counter() - t0, 2)
                }
                print(f"captured {side}: {capture}", flush=True)
            for batch in batches:
                if _over(started, args):
                    report["notes"].append(f"budget reached before {mode} {side}x{batch}")
                    continue
                row = _attempt(
                    report, f"{mode} {side}x{batch}",
                    lambda: _bench_case(engine, mode, side, batch, args.iters, device, args.smoke),
                )  # fmt: skip
                if row:
                    report["results"].append(row)
                    _print_row(row)
                _save(out_dir, report)
        del engine
        _free(device)

    report["goals"] = _goals(report["results"])
    report["seconds"] = round(time.monotonic() - started, 1)
    _save(out_dir, report)
    print(_table(report))
    if report["failed"] or not report["results"]:
        reason = f"failed: {', '.join(report['failed'])}" if report["failed"] else "no case was measured"
        print(f"bench_engine_gpu: {reason} (notes in {out_dir / 'bench_engine_gpu.json'})", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# models and engines


def build_models(smoke: bool, device, seed: int):
    """fp32 UNet and VAE with seeded random weights (the real SDXL configs unless smoke), the
    scheduler, and random prompt embeddings of the real shapes."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

    from engines.tiny import SDXL_SCHEDULER

    if smoke:
        from engines.tiny import TINY_UNET as unet_config
        from engines.tiny import TINY_VAE as vae_config
    else:
        from export.sdxl_config import SDXL_INPAINT_UNET as unet_config
        from export.sdxl_config import SDXL_VAE as vae_config
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).eval().requires_grad_(False)
        vae = AutoencoderKL(**vae_config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    embeds = (
        torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
        torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim, generator=g),
    )
    params = sum(p.numel() for p in unet.parameters())
    print(f"models: UNet {params / 1e9:.3f} B params, built in {time.perf_counter() - t0:.1f} s", flush=True)
    return unet, vae, LCMScheduler(**SDXL_SCHEDULER), embeds


def build_engine(unet, vae, scheduler, embeds, device, graphs: bool):
    from engines.remover import RemovalEngine, SamplingSettings
    from engines.runners import TorchUNetRunner

    return RemovalEngine(
        vae=vae,
        unet_runner=TorchUNetRunner(unet, device),
        scheduler=scheduler,
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        sampling=SamplingSettings(steps=4, strength=1.0),
        cuda_graph=graphs,
    )


def _jobs(side: int, batch: int):

    from benchlib import center_mask, photo

    from engines.jobs import RemovalJob

    return [RemovalJob(photo(side), center_mask(side), seed=i) for i in range(batch)]


# ---------------------------------------------------------------------------------------------
# measurements


def _bench_case(engine, mode: str, side: int, batch: int, iters: int, device, smoke: bool) -> dict:
    import torch
    from benchlib import summarize, timed_runs

    jobs = _jobs(side, batch)
    _reset_memory(device)
    t0 = time.perf_counter()
    engine.remove(jobs)
    first_s = time.perf_counter() - t0
    engine.remove(jobs)
    samples, stages = timed_runs(lambda timings: engine.remove(jobs, timings), iters)
    summary = summarize(samples)
    stage_ms = {k: round(v, 2) for k, v in stages.items()}
    row = {
        "mode": mode,
        "side": side,
        "batch": batch,
        "p50_ms": summary["p50_ms"],
        "p90_ms": summary["p90_ms"],
        "images_per_s": round(batch / (summary["p50_ms"] / 1000), 2),
        "stages_ms": stage_ms,
        "first_call_s": round(first_s, 2),
    }
    row.update(_flops(side, batch, summary["p50_ms"], stage_ms.get("unet"), smoke))
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def _parity_bf16_vs_fp32(unet, vae, scheduler, embeds, device, side: int) -> dict:
    """The same crop and seed through fp32 and bf16 engines: how far apart the uint8 results are."""
    import numpy as np
    import torch

    jobs = _jobs(side, 1)
    fp32 = build_engine(unet, vae, scheduler, embeds, device, graphs=False).remove(jobs)[0].astype(np.int32)
    unet.to(torch.bfloat16)  # in place: the benchmark runs bf16 from here on
    vae.to(torch.bfloat16)
    bf16 = build_engine(unet, vae, scheduler, embeds, device, graphs=False).remove(jobs)[0].astype(np.int32)
    diff = np.abs(fp32 - bf16)
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {
        "side": side,
        "mean_abs": round(float(diff.mean()), 3),
        "p99_abs": int(np.percentile(diff, 99)),
        "max_abs": int(diff.max()),
        "psnr_db": round(float(10 * np.log10(255**2 / mse)), 2) if mse else None,
        "note": "random weights: agreement of the arithmetic, not of a trained model's output",
    }


def _flops(side: int, batch: int, p50_ms: float, unet_ms: float | None, smoke: bool) -> dict:
    from export.sdxl_config import UNET_TFLOP, image_tflop

    if smoke or side not in UNET_TFLOP:
        return {"image_tflops": None, "unet_tflops": None}
    return {
        "image_tflops": round(image_tflop(side) * batch / (p50_ms / 1000), 1),
        "unet_tflops": round(4 * UNET_TFLOP[side] * batch / (unet_ms / 1000), 1) if unet_ms else None,
    }


def _goals(rows: list[dict]) -> dict:
    def best(side, batch=None, key="p50_ms"):
        picked = [r for r in rows if r["side"] == side and (batch is None or r["batch"] == batch)]
        if not picked:
            return None
        return min(r[key] for r in picked) if key == "p50_ms" else max(r[key] for r in picked)

    measured = {"512x1_ms": best(512, 1), "1024x1_ms": best(1024, 1), "512_images_per_s": best(512, key="images_per_s")}
    met = {
        k: (None if v is None else (v >= GOALS[k] if k.endswith("per_s") else v <= GOALS[k]))
        for k, v in measured.items()
    }
    return {"goal": GOALS, "measured": measured, "met": met}


# ---------------------------------------------------------------------------------------------
# plumbing


def _attempt(report: dict, what: str, fn):
    """Run one part; a failure is recorded in the report's notes and `failed` (the other parts still run, and
    main exits 1 at the end)."""
    import traceback

    import torch

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one lease, as many figures as can be had
        report["notes"].append(f"{what} failed: {exc!r}"[:2000])
        report["failed"].append(what)
        print(f"{what} FAILED:\n{traceback.format_exc()}", flush=True)
        _free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return None


def _parse_cases(text: str) -> dict[int, list[int]]:
    cases = {}
    for part in filter(None, text.split(";")):
        side, batches = part.split(":")
        cases[int(side)] = sorted(int(b) for b in batches.split(","))
    return cases


def _over(started: float, args, reserve_s: float = 0.0) -> bool:
    return time.monotonic() - started + reserve_s > args.budget_s


def _reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for name in ("diffusers", "pydantic", "transformers"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        env.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            capability="%d.%d" % torch.cuda.get_device_capability(device),
            memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
        )
    return env


def _save(out_dir: Path, report: dict) -> None:
    (out_dir / "bench_engine_gpu.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_engine_gpu.md").write_text(_table(report) + "\n")


COLUMNS = ("mode", "side", "batch", "p50_ms", "p90_ms", "images_per_s", "image_tflops", "unet_tflops", "peak_memory_gib", "first_call_s")
STAGES = ("upload", "vae_encode", "unet", "vae_decode", "download")


def _print_row(row: dict) -> None:
    print("  " + "  ".join(f"{c}={row.get(c)}" for c in COLUMNS) + f"  stages={row['stages_ms']}", flush=True)


def _table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"{env.get('gpu') or env['device']}, torch {env['torch']}, CUDA {env.get('cuda')}",
        "",
        "| " + " | ".join(COLUMNS + tuple(f"{s} ms" for s in STAGES)) + " |",
        "|" + "---|" * (len(COLUMNS) + len(STAGES)),
    ]
    for row in report["results"]:
        cells = [row.get(c) for c in COLUMNS] + [row["stages_ms"].get(s) for s in STAGES]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in cells) + " |")
    if report.get("parity"):
        lines += ["", f"bf16 vs fp32 on one {report['parity']['side']}px crop: {report['parity']}"]
    if report.get("goals"):
        lines += ["", f"goals: {report['goals']}"]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
