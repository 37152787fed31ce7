"""The GPU fast path: no host sync in the sampling loop, the LCM table, padded shapes, CUDA graphs.

The CPU tests run everywhere; the `gpu` ones need CUDA (they run on the benchmark machine).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engines.jobs import RemovalJob
from engines.lcm import LCMSchedule
from engines.remover import RemovalEngine, SamplingNoise, padded_batch_sizes
from engines.runners import UNET_INPUTS, UNET_OUTPUT, TensorRTUNetRunner, _Slot

# ops that make the host wait for the device (or draw random numbers on the host): none may run
# between the upload of a batch and the copy of its result back
HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal"}
RANDOM_OPS = {"aten.normal_", "aten.randn", "aten.randn_like", "aten.uniform_", "aten.random_", "aten.bernoulli_"}
NEW_FROM_HOST_OPS = {"aten.lift_fresh", "aten.scalar_tensor"}  # torch.tensor(python values) inside the loop


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket._qualified_op_name).replace("::", "."))
        return func(*args, **(kwargs or {}))


def _jobs(batch: int, side: int = 64, seed0: int = 0) -> list[RemovalJob]:
    rng = np.random.default_rng(seed0)
    jobs = []
    for i in range(batch):
        mask = np.zeros((side, side), bool)
        mask[side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = True
        jobs.append(RemovalJob(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mask, seed=seed0 + i))
    return jobs


def _stubbed_tensorrt_engine(plan_batch_sizes: dict[int, int], monkeypatch) -> RemovalEngine:
    """An engine on the tiny VAE over the TensorRT runner's own code (__call__, profile choice, start-up check),
    its profiles built by export.tensorrt_build for `plan_batch_sizes`; TensorRT and CUDA stubbed, on the CPU.
    `engine.runner.made` lists the batch of each execution context (and CUDA graph) it sets up."""
    from diffusers import AutoencoderKL, LCMScheduler

    from engines.tiny import SDXL_SCHEDULER, TINY_UNET, TINY_VAE
    from export.onnx_export import unet_input_dims
    from export.tensorrt_build import profiles_from_serve_config

    dims = unet_input_dims(TINY_UNET)
    profiles = profiles_from_serve_config(
        plan_batch_sizes, in_channels=dims["in_channels"], embed_dim=dims["embed_dim"], pooled_dim=dims["pooled_dim"]
    )
    runner = object.__new__(TensorRTUNetRunner)
    runner.device, runner.dtype, runner.cuda_graph = torch.device("cpu"), torch.float32, True
    runner.dtypes = dict.fromkeys((*UNET_INPUTS, UNET_OUTPUT), torch.float32)
    runner.path, runner.rebuild = Path("unet.fp16.sm90.plan"), "python -m export tensorrt --config SERVE_CONFIG"
    runner.profiles = [profile.shapes for profile in profiles]
    runner._slots, runner.made = {}, []

    def make_slot(feeds):  # stands for a new execution context, its bindings and its CUDA graph capture
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        profile = runner.profile_for(shapes)
        runner.made.append(shapes["sample"][0])
        batch, _, h, w = shapes["sample"]
        context = SimpleNamespace(execute_async_v3=lambda stream: True)
        bindings = {name: torch.empty(shape) for name, shape in shapes.items()}
        runner._slots[tuple(shapes.values())] = _Slot(context, bindings, torch.zeros(batch, 4, h, w), profile)
        return runner._slots[tuple(shapes.values())]

    runner._make_slot = make_slot
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return RemovalEngine(
        vae=AutoencoderKL(**TINY_VAE).eval(),
        unet_runner=runner,
        scheduler=LCMScheduler(**SDXL_SCHEDULER),
        prompt_embeds=torch.zeros(1, 77, dims["embed_dim"]),
        pooled_prompt_embeds=torch.zeros(1, dims["pooled_dim"]),
    )


@pytest.mark.parametrize("strength", [1.0, 0.99, 0.5])
def test_the_lcm_table_steps_exactly_as_diffusers_lcm_scheduler(tiny_bundle, strength):
    """Same timesteps, same prev_sample for the same model output and noise."""
    steps = 4
    schedule = LCMSchedule.from_scheduler(tiny_bundle.make_scheduler(), steps, strength)
    scheduler = tiny_bundle.make_scheduler()
    scheduler.set_timesteps(steps)
    skipped = steps - min(int(steps * strength), steps)
    scheduler.set_begin_index(skipped)
    assert schedule.timesteps == scheduler.timesteps[skipped:].tolist()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    for step in schedule.steps:
        model_output = torch.randn(2, 4, 8, 8, generator=g)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=g))
        expected = scheduler.step(
            model_output, torch.tensor(step.timestep), sample,
            generator=torch.Generator().manual_seed(noise_seed), return_dict=False,
        )[0]  # fmt: skip
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(noise_seed)) if step.adds_noise else None
        got = LCMSchedule.step(step, model_output, sample, noise)
        assert torch.allclose(got, expected, atol=1e-6), step
        sample = expected
    assert schedule.noise_draws == sum(s.adds_noise for s in schedule.steps) == len(schedule.steps) - 1


def test_the_sampling_loop_never_waits_for_the_host_or_draws_random_numbers(tiny_bundle):
    """Every op between upload and download is recorded: none reads a value back to the host, draws
    random numbers, or builds a tensor from Python values (each is a host sync on a GPU)."""
    engine = RemovalEngine.from_bundle(tiny_bundle)
    jobs = _jobs(2)
    engine.remove(jobs)  # first call: caches the crop size's time_ids, as warm-up does
    noise = SamplingNoise.draw([torch.Generator().manual_seed(j.seed) for j in jobs], engine.latent_shape(64, 64), engine.schedule)
    from engines.remover import CropBatch

    batch = CropBatch(
        pixels=torch.from_numpy(np.stack([j.image for j in jobs])),
        masks=torch.from_numpy(np.stack([j.mask for j in jobs]).astype(np.uint8)),
        noise=noise,
    )
    from engines.timing import StageClock

    with _OpRecorder() as recorder:
        pixels = engine._run(batch, StageClock("cpu", None))
    ops = set(recorder.ops)
    assert len(recorder.ops) > 100, "the recorder saw the model run"
    assert {"aten.conv2d", "aten.scaled_dot_product_attention"} <= ops, "the VAE and the UNet ran under the recorder"
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS
    assert not ops & RANDOM_OPS, ops & RANDOM_OPS
    assert not ops & NEW_FROM_HOST_OPS, ops & NEW_FROM_HOST_OPS
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 64, 64, 3)


def test_the_old_path_is_what_the_recorder_catches(tiny_bundle):
    """The recorder is not blind: diffusers' own LCMScheduler.step draws noise and indexes on the host."""
    scheduler = tiny_bundle.make_scheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 8, 8)
    with _OpRecorder() as recorder:
        scheduler.step(torch.randn(1, 4, 8, 8), scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(0))
    ops = set(recorder.ops)
    assert ops & (HOST_SYNC_OPS | RANDOM_OPS | NEW_FROM_HOST_OPS)


def test_padded_batch_sizes_are_powers_of_two_up_to_the_largest():
    assert padded_batch_sizes(1) == [1]
    assert padded_batch_sizes(8) == [1, 2, 4, 8]
    assert padded_batch_sizes(6) == [1, 2, 4, 6]
    assert padded_batch_sizes(16) == [1, 2, 4, 8, 16]


def test_timings_cover_every_stage_without_changing_the_result(tiny_bundle):
    engine = RemovalEngine.from_bundle(tiny_bundle)
    jobs = _jobs(1)
    timings: dict[str, float] = {}
    timed = engine.remove(jobs, timings)[0]
    assert set(timings) == {"upload", "vae_encode", "unet", "vae_decode", "download"}
    assert all(v >= 0 for v in timings.values()) and timings["unet"] > 0
    assert np.array_equal(timed, engine.remove(jobs)[0])


def test_cuda_graphs_are_refused_off_cuda_and_for_the_onnx_runner(tiny_bundle):
    with pytest.raises(ValueError, match="CUDA"):
        RemovalEngine.from_bundle(tiny_bundle, cuda_graph=True)
    with pytest.raises(ValueError, match="ONNX"):
        RemovalEngine.from_bundle(tiny_bundle, runner="onnx", runner_path="unused.onnx", cuda_graph=True)


# ----------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
def test_the_loop_runs_with_cuda_sync_debug_set_to_error(tiny_bundle):
    """torch raises on any synchronising CUDA call inside the stages."""
    engine = RemovalEngine.from_bundle(tiny_bundle, device="cuda")
    jobs = _jobs(2)
    engine.remove(jobs)
    from engines.remover import CropBatch
    from engines.timing import StageClock

    noise = SamplingNoise.draw([torch.Generator().manual_seed(j.seed) for j in jobs], engine.latent_shape(64, 64), engine.schedule)
    batch = CropBatch(
        pixels=torch.from_numpy(np.stack([j.image for j in jobs])).cuda(),
        masks=torch.from_numpy(np.stack([j.mask for j in jobs]).astype(np.uint8)).cuda(),
        noise=noise.to(torch.device("cuda")),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pixels = engine._run(batch, StageClock("cuda", {}))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pixels.shape == (2, 64, 64, 3)


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_result_and_capture_only_at_start(tiny_bundle):
    eager = RemovalEngine.from_bundle(tiny_bundle, device="cuda")
    graphed = RemovalEngine.from_bundle(tiny_bundle, device="cuda", cuda_graph=True)
    report = graphed.warm_up({64: 4, 128: 2})
    assert sorted(map(tuple, report["shapes"])) == [(64, 1), (64, 2), (64, 4), (128, 1), (128, 2)]
    captured = dict(graphed.graphs.captured)
    for size, side in [(1, 64), (3, 64), (4, 64), (2, 128)]:
        jobs = _jobs(size, side, seed0=10 * size)
        # the graph runs the batch padded to a captured size; eager runs the same shape (rows are independent,
        # but in bf16 the kernels chosen for 3 rows and for 4 differ: on the H200 a batch of 3 run eagerly
        # and in the batch-4 graph differed by up to 9 levels, each shape alone was identical; docs/benchmarks.md)
        padded = min(b for (s, b) in captured if s == side and b >= size)
        want = eager.remove(jobs + _jobs(padded - size, side, seed0=999))[:size]
        got = graphed.remove(jobs)
        assert len(got) == size
        for w, g in zip(want, got):
            assert np.abs(w.astype(int) - g).max() <= 2
    assert graphed.graphs.captured == captured, "no capture inside a request"
    # at one shape, a job's result does not depend on the other rows of its batch (companions, padding); across
    # shapes bf16 kernels may differ by a few levels (above), which this does not compare
    with_some = graphed.remove(_jobs(3, 64, seed0=30))[0]
    with_others = graphed.remove(_jobs(1, 64, seed0=30) + _jobs(2, 64, seed0=77))[0]
    assert np.abs(with_some.astype(int) - with_others).max() <= 2


def test_the_vae_runs_bf16_next_to_an_fp16_unet_on_cuda():
    from engines.remover import vae_dtype_for

    assert vae_dtype_for(torch.float16, torch.device("cuda"), force_upcast=True) == torch.bfloat16
    assert vae_dtype_for(torch.float16, torch.device("cuda"), force_upcast=False) == torch.float16
    assert vae_dtype_for(torch.bfloat16, torch.device("cuda"), force_upcast=True) == torch.bfloat16
    assert vae_dtype_for(torch.float32, torch.device("cpu"), force_upcast=True) == torch.float32


@pytest.mark.slow  # a subprocess that loads the model libraries and runs every bucket
def test_the_gpu_benchmark_runs_in_its_smoke_mode(tmp_path):
    """loadtests/bench_engine_gpu.py --smoke: the tiny model on the CPU, so the script cannot rot; run without the
    packages the GPU machine lacks (docs/benchmarks.md: no Ray, FastAPI or uvicorn there), as there: benchlib once
    imported serve.problems, which needs FastAPI, and the device's one run would have died at its start. Its grpcio
    (1.84) is older than the generated gRPC stubs ask for, so serve.grpc_client fails there: benchlib imported it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    as_on_the_device = (
        "import importlib.abc, runpy, sys\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'fastapi', 'starlette', 'ray', 'uvicorn', 'grpc'}:\n"
        "            raise ImportError(f'{name} is not on the GPU machine')\n"
        "sys.meta_path.insert(0, Absent())\n"
        "sys.argv = sys.argv[1:]\n"
        "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])  # as `python loadtests/bench_engine_gpu.py` does\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", as_on_the_device, str(repo / "loadtests" / "bench_engine_gpu.py"), "--smoke",
         "--out-dir", str(tmp_path), "--iters", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_engine_gpu.json").read_text())
    assert [(r["mode"], r["side"], r["batch"]) for r in report["results"]] == [("eager", 64, 1), ("eager", 64, 2)]
    for row in report["results"]:
        assert row["p50_ms"] > 0 and set(row["stages_ms"]) == {"upload", "vae_encode", "unet", "vae_decode", "download"}
    assert report["parity"]["max_abs"] >= 0 and not report["notes"]
    assert "| eager | 64 | 1 |" in (tmp_path / "bench_engine_gpu.md").read_text()


@pytest.mark.slow  # loads the model libraries and builds the tiny model
def test_the_gpu_benchmark_exits_1_naming_the_cases_that_failed(tmp_path, monkeypatch, capsys):
    """Every failed case became a note and main returned 0: a run whose every case failed passed on the device."""
    import json

    from tests.helpers import load_script

    load_script("loadtests/benchlib.py")  # main's parse_args imports it, as a run from loadtests/ finds it
    bench = load_script("loadtests/bench_engine_gpu.py")
    measured = bench._bench_case

    def fails_at_batch_2(engine, mode, side, batch, *rest):
        if batch == 2:
            raise RuntimeError("CUDA out of memory")
        return measured(engine, mode, side, batch, *rest)

    monkeypatch.setattr(bench, "_bench_case", fails_at_batch_2)
    assert bench.main(["--smoke", "--iters", "1", "--out-dir", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "bench_engine_gpu.json").read_text())
    assert [(r["side"], r["batch"]) for r in report["results"]] == [(64, 1)] and report["failed"] == ["eager 64x2"]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bench_engine_gpu: failed: eager 64x2 (notes in")


def test_warm_up_runs_each_bucket_at_its_own_batch_sizes_when_compiled(tiny_bundle):
    """A compiled UNet must see every shape at start: each side at 1, 2, 4 ... its own largest."""
    engine = RemovalEngine.from_bundle(tiny_bundle)
    seen = []
    real = engine._run

    def counting(batch, clock):
        seen.append((batch.pixels.shape[1], batch.size))
        return real(batch, clock)

    engine._run = counting
    assert engine.warm_up({64: 8, 128: 2})["shapes"] == [[64, 1], [128, 1]], "eager: batch 1 per side"
    engine.runner.compiled = True  # as TorchUNetRunner(compile=True) says; the shapes are what matters here
    seen.clear()
    report = engine.warm_up({64: 6, 128: 2})
    assert sorted(seen) == [(64, 1), (64, 2), (64, 4), (64, 6), (128, 1), (128, 2)]
    assert report["shapes"] == [[64, 1], [64, 2], [64, 4], [64, 6], [128, 1], [128, 2]]
    seen.clear()
    engine.remove(_jobs(3, 64))
    assert seen == [(64, 4)], "a batch of 3 runs padded to the warmed 4"


def test_on_cuda_every_runner_warms_every_padded_batch_size_and_requests_run_only_those(monkeypatch):
    """A TensorRT runner sets up an execution context and a CUDA graph per new batch size (the torch VAE and UNet
    a cuDNN algorithm search): on CUDA that all happens at start, whatever the runner, and never in a request.
    The stubbed engine runs on the CPU; `pads_batches` is asked as for a CUDA device."""
    import engines.remover

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    eager, compiled = SimpleNamespace(compiled=False), SimpleNamespace(compiled=True)
    assert engines.remover.pads_batches(cuda, eager) and engines.remover.pads_batches(cuda, object())
    assert not engines.remover.pads_batches(cpu, eager) and not engines.remover.pads_batches(cpu, object())
    assert engines.remover.pads_batches(cpu, compiled), "on the CPU only a compiled UNet pads (a compile per shape)"

    engine = _stubbed_tensorrt_engine({64: 8}, monkeypatch)
    real = engines.remover.pads_batches
    monkeypatch.setattr(engines.remover, "pads_batches", lambda device, runner: real(cuda, runner))
    assert engine.warm_up({64: 8})["shapes"] == [[64, 1], [64, 2], [64, 4], [64, 8]]
    assert engine.runner.made == [1, 2, 4, 8]
    engine.runner.made.clear()
    for size in (3, 5, 8, 2):
        assert len(engine.remove(_jobs(size))) == size
    assert engine.runner.made == [], "no context or graph set up inside a request"


def test_a_tensorrt_plan_whose_profiles_miss_a_bucket_batch_size_refuses_to_start(monkeypatch):
    """A plan built for batch 1..4 while the Serve config lets the 64 px bucket batch 8: the engine refuses at
    start, naming the command that rebuilds the plan, instead of failing full batches with 'no optimization
    profile'; a plan built for the config's own batch sizes starts."""
    import engines.remover

    monkeypatch.setattr(engines.remover, "pads_batches", lambda device, runner: True)  # as on CUDA
    too_small = _stubbed_tensorrt_engine({64: 4, 128: 2}, monkeypatch)
    with pytest.raises(ValueError, match=r"holds sample \[\(8, 9, 8, 8\)\].*python -m export tensorrt"):
        too_small.warm_up({64: 8, 128: 2})
    assert too_small.runner.made == [], "refused before any warm-up"
    fits = _stubbed_tensorrt_engine({64: 8, 128: 2}, monkeypatch)
    assert fits.warm_up({64: 8, 128: 2})["shapes"] == [[64, 1], [64, 2], [64, 4], [64, 8], [128, 1], [128, 2]]


@pytest.mark.slow  # a torch.compile'd case of the tiny UNet
def test_a_unet_benchmark_case_compiles_one_graph_for_its_step_and_image_timings_under_the_services_limit(monkeypatch):
    """loadtests/bench_unet_gpu.py's "compile" runner is the service's (TorchUNetRunner(compile=True), its recompile
    limit raised) and its step inputs are the tensors the engine passes, so each (side, batch) case compiles one
    graph, shared by the step and the image timings. Before, the step's other kind of tensors compiled a second
    graph per case, and under dynamo's default limit of 8 the default cases' last ones ran eager, unreported.
    Backend "eager" stands in for inductor (the same guards, no code generation)."""
    import argparse

    import torch._dynamo
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._dynamo.utils import counters

    from engines.runners import COMPILED_SHAPES_LIMIT
    from engines.tiny import TINY_UNET, TINY_VAE

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "loadtests"))
    import bench_unet_gpu

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, limit, 8)  # dynamo's default, whatever an earlier test raised it to
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode, dynamic: real_compile(fn, backend="eager", dynamic=dynamic))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False).half()
    vae = AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    args = argparse.Namespace(compile_mode=None, warmup=1, iters=1, image_iters=1, tiny=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        runner = bench_unet_gpu._runner("compile", unet, None, None, torch.device("cpu"), args)
        assert getattr(config, limit) >= COMPILED_SHAPES_LIMIT
        bench_unet_gpu._bench_case("compile", runner, unet, vae, 64, 1, torch.device("cpu"), args, None)
        assert counters["stats"]["unique_graphs"] == 1, "one compiled graph for the case's step and image timings"
    finally:
        torch._dynamo.reset()
