"""UNet export: ONNX (CPU, ONNX Runtime) and TensorRT (marked gpu: skipped without CUDA + tensorrt).

Tolerances: fp32 ONNX Runtime vs torch, max abs < 1e-4 on noise_pred (values of order 1; measured
~3e-6); a whole removal through the ONNX runner vs the torch runner: uint8 max diff <= 2, mean < 0.1
(measured max 1). The dynamo export takes ~30 s here, so the fp32 export runs once, through the CLI,
in a subprocess that overlaps with the in-process fp16 export.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engines.bundle import MANIFEST, UNET_WEIGHTS, Bundle, BundleError
from engines.jobs import RemovalJob
from engines.remover import RemovalEngine
from engines.runners import OnnxUNetRunner, TorchUNetRunner, UNetConditioning, current_export, make_unet_runner
from export.onnx_export import example_inputs, export_unet_onnx, read_onnx_metadata
from export.tensorrt_build import load_serve_settings, profiles_from_serve_config

REPO = Path(__file__).resolve().parent.parent
FP32_MAX_ABS = 1e-4


@pytest.fixture(scope="module")
def cli_process(tmp_path_factory):
    """`python -m export all --tiny` (no GPU: the buckets only add a 1024 px parity case), started first so
    it overlaps with the fp16 export below."""
    cache = tmp_path_factory.mktemp("export-cache")
    child = subprocess.Popen(
        [sys.executable, "-m", "export", "all", "--tiny", "--cache-dir", str(cache), "--buckets", "512,1024"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield SimpleNamespace(child=child, cache=cache)
    if child.poll() is None:
        child.kill()
        child.communicate()


@pytest.fixture(scope="module")
def fp16_onnx(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "unet.fp16.onnx"
    return export_unet_onnx(tiny_bundle, path, dtype="float16")


@pytest.fixture(scope="module")
def exported(cli_process, fp16_onnx):
    stdout, stderr = cli_process.child.communicate(timeout=900)
    assert cli_process.child.returncode == 0, stderr[-3000:]
    bundle = Bundle.load(cli_process.cache / "tiny-0", verify=True)
    return SimpleNamespace(bundle=bundle, stdout=stdout, onnx=bundle.path / "exports" / "unet.fp32.onnx")


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_cli_exports_verifies_records_and_prints_progress(exported):
    out = exported.stdout
    stages = ("tiny bundle", "torch.export + ONNX translation", "graph cleanup", "parity batch 3, latent 64x64",
              "parity batch 1, latent 128x128")  # fmt: skip
    for stage in stages:
        assert f"] {stage}" in out, out
    assert "recorded exports/unet.fp32.onnx" in out
    if not torch.cuda.is_available():
        assert "tensorrt: skipped (no CUDA GPU)" in out
    result = json.loads(out.split("result ", 1)[1].splitlines()[0])
    assert result["verify"]["passed"] and result["verify"]["max_abs"] < FP32_MAX_ABS


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_manifest_records_the_export_and_the_bundle_still_verifies(exported, tmp_path):
    manifest = exported.bundle.manifest
    entry = manifest.files["exports/unet.fp32.onnx"]
    assert entry.bytes == exported.onnx.stat().st_size
    record = manifest.provenance["exports"]["onnx.float32"]
    assert record["path"] == "exports/unet.fp32.onnx" and record["files"] == ["exports/unet.fp32.onnx"]
    assert record["unet_sha256"] == manifest.files[UNET_WEIGHTS].sha256
    assert record["verify"]["passed"] and record["verify"]["max_abs"] < FP32_MAX_ABS
    meta = record["metadata"]
    assert meta == read_onnx_metadata(exported.onnx)
    assert (meta["dtype"], meta["opset"], meta["exporter"], meta["bundle"]) == ("float32", 18, "dynamo", "tiny-0")
    assert meta["inputs"]["timestep"] == {"dtype": "float32", "shape": ["batch"]}
    assert meta["inputs"]["encoder_hidden_states"]["shape"] == ["batch", 77, 64]
    assert current_export(exported.bundle, "onnx", "float32").path == exported.onnx

    copy = tmp_path / "tampered"
    shutil.copytree(exported.bundle.path, copy)
    with open(copy / "exports" / "unet.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="unet.fp32.onnx: sha256 differs.*run `python -m export onnx --bundle"):
        RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_the_graph_keeps_latent_sides_multiples_of_4_and_the_runner_refuses_others(exported):
    sample_dims = read_onnx_metadata(exported.onnx)["inputs"]["sample"]["shape"]
    assert sample_dims[0] == "batch" and sample_dims[1] == 9
    assert all(str(d).startswith("4*") for d in sample_dims[2:]), sample_dims
    runner = OnnxUNetRunner(exported.onnx)
    inputs = example_inputs(exported.bundle.manifest.architecture.unet, 1, 30, 30)
    with pytest.raises(ValueError, match="multiples of 4"):
        runner(inputs[0], inputs[1], UNetConditioning(*inputs[2:]))


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
@pytest.mark.parametrize("batch, latent", [(1, 32), (3, 32), (1, 64), (3, 64)])
def test_onnx_runtime_matches_torch(exported, batch, latent):
    unet = exported.bundle.load_unet()
    torch_runner = TorchUNetRunner(unet, torch.device("cpu"))
    onnx_runner = make_unet_runner("onnx", path=exported.onnx, device="cpu")
    assert onnx_runner.dtype == torch.float32 and onnx_runner.providers == ["CPUExecutionProvider"]
    sample, timestep, states, pooled, time_ids = example_inputs(unet.config, batch, latent, latent, seed=batch)
    cond = UNetConditioning(states, pooled, time_ids)
    # per-sample timesteps (distinct for batch 3), and a scalar broadcast to the batch
    for t in (timestep, torch.tensor(759)):
        expected = torch_runner(sample, t, cond)
        got = onnx_runner(sample, t, cond)
        assert got.shape == expected.shape == (batch, 4, latent, latent)
        assert (got - expected).abs().max().item() < FP32_MAX_ABS


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_a_removal_through_the_onnx_runner_equals_the_torch_runner(exported):
    torch_engine = RemovalEngine.from_bundle(exported.bundle)
    onnx_engine = RemovalEngine.from_bundle(exported.bundle, runner="onnx")
    assert isinstance(onnx_engine.runner, OnnxUNetRunner) and onnx_engine.dtype == torch.float32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    masks = np.zeros((2, 256, 256), bool)
    masks[:, 64:160, 80:200] = True
    jobs = [RemovalJob(images[i], masks[i], seed=7 + i) for i in range(2)]
    expected = np.stack(torch_engine.remove(jobs)).astype(int)
    got = np.stack(onnx_engine.remove(jobs)).astype(int)
    diff = np.abs(got - expected)
    assert diff.max() <= 2 and diff.mean() < 0.1
    assert np.abs(got - images).max() > 10, "the removal changed the masked pixels"


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_exported_runners_refuse_wrong_dtypes_devices_and_stale_exports(exported, tmp_path):
    with pytest.raises(ValueError, match="float32 graph, float16 was requested"):
        OnnxUNetRunner(exported.onnx, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or float16"):
        RemovalEngine.from_bundle(exported.bundle, runner="onnx", dtype=torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            RemovalEngine.from_bundle(exported.bundle, runner="tensorrt")
    with pytest.raises(BundleError, match="no onnx.float16 export recorded.*python -m export onnx"):
        RemovalEngine.from_bundle(exported.bundle, runner="onnx", dtype=torch.float16)  # never exported in fp16

    stale = tmp_path / "stale"
    shutil.copytree(exported.bundle.path, stale)
    manifest = json.loads((stale / MANIFEST).read_text())
    manifest["provenance"]["exports"]["onnx.float32"]["unet_sha256"] = "0" * 64
    (stale / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="other UNet weights"):
        RemovalEngine.from_bundle(Bundle.load(stale), runner="onnx")


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_ensure_unet_onnx_reuses_a_current_export(exported, monkeypatch):
    import export.manifest as export_manifest

    monkeypatch.setattr(export_manifest, "export_and_record_onnx", lambda *a, **k: pytest.fail("exported again"))
    assert export_manifest.ensure_unet_onnx(exported.bundle, "float32") == exported.onnx


@pytest.mark.slow  # the fp16 export: most of a minute of CPU
def test_fp16_graph_is_type_consistent_and_close_to_torch(tiny_bundle, fp16_onnx):
    """The fp16 graph is what TensorRT builds from; ONNX Runtime's CPU checks its types strictly."""
    from export.verify import verify_onnx

    report = verify_onnx(fp16_onnx, tiny_bundle.load_unet(), cases=((2, 32, 32),))
    assert report["dtype"] == "float16" and report["cases"][0]["finite"]
    assert report["max_abs"] < 5e-3 and report["mean_abs"] < 5e-4, report  # measured ~1e-3 / ~1.4e-4
    runner = OnnxUNetRunner(fp16_onnx)
    assert runner.dtype == torch.float16 and runner.input_dtypes["timestep"] == torch.float32


def test_the_torchscript_fallback_exporter_also_gives_a_matching_graph(tiny_bundle, tmp_path):
    from export.verify import verify_onnx

    path = export_unet_onnx(tiny_bundle, tmp_path / "ts.onnx", exporter="torchscript")
    assert read_onnx_metadata(path)["exporter"] == "torchscript"
    report = verify_onnx(path, tiny_bundle.load_unet(), cases=((2, 32, 32),))
    assert report["passed"] and report["max_abs"] < FP32_MAX_ABS


def test_profiles_from_serve_config_one_per_bucket():
    profiles = profiles_from_serve_config({1024: 8, 512: 8})
    assert [p.name for p in profiles] == ["512px_b1-8", "1024px_b1-8"]
    small, large = (p.shapes for p in profiles)
    assert small["sample"] == ((1, 9, 64, 64), (8, 9, 64, 64), (8, 9, 64, 64))
    assert large["sample"] == ((1, 9, 128, 128), (8, 9, 128, 128), (8, 9, 128, 128))
    assert large["timestep"] == ((1,), (8,), (8,))
    assert large["encoder_hidden_states"] == ((1, 77, 2048), (8, 77, 2048), (8, 77, 2048))
    assert large["text_embeds"] == ((1, 1280), (8, 1280), (8, 1280))
    assert large["time_ids"] == ((1, 6), (8, 6), (8, 6))

    (spanning,) = profiles_from_serve_config({512: 4, 1024: 2}, spanning=True)
    assert spanning.shapes["sample"] == ((1, 9, 64, 64), (4, 9, 128, 128), (4, 9, 128, 128))
    with pytest.raises(ValueError, match="multiples of 32"):
        profiles_from_serve_config({500: 8})


def test_profiles_follow_the_shipped_serve_config():
    settings = load_serve_settings(REPO / "serve" / "configs" / "local.yaml")
    profiles = profiles_from_serve_config(settings.batch_sizes())
    assert {p.shapes["sample"][2][2] * 8: p.shapes["sample"][2][0] for p in profiles} == settings.batch_sizes()


def test_each_bucket_profile_spans_its_own_batch_size_from_the_serve_config(tmp_path):
    """A bucket allowed a larger batch than batching.max_batch_size gets a profile up to it (it used to span
    1..max_batch_size, and a full batch of that bucket found no profile at run time)."""
    import yaml

    from export.cli import _plan_shape

    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["batching"] = {"max_batch_size": 4, "per_bucket": {512: {"max_batch_size": 16}}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    args = SimpleNamespace(command="tensorrt", config=str(path), app=None, buckets=None, max_batch_size=None)
    assert _plan_shape(args) == {512: 16, 1024: 4} == load_serve_settings(path).batch_sizes()
    assert [p.name for p in profiles_from_serve_config(_plan_shape(args))] == ["512px_b1-16", "1024px_b1-4"]
    assert _plan_shape(SimpleNamespace(**{**vars(args), "max_batch_size": 2})) == {512: 2, 1024: 2}, "one for all"


def test_the_full_size_config_matches_the_reference_parameters_and_flops():
    """SDXL-inpainting UNet on the meta device: 2.57 B parameters, 1.59 TFLOP at 512 (REFERENCE.md)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from export.sdxl_config import SDXL_INPAINT_UNET, SDXL_UNET_PARAMETERS, UNET_TFLOP

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_INPAINT_UNET)
    inputs = example_inputs(unet.config, 1, 64, 64, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], added_cond_kwargs={"text_embeds": inputs[3], "time_ids": inputs[4]})
    assert counter.get_total_flops() / 1e12 == pytest.approx(UNET_TFLOP[512], rel=0.01)


def test_tensorrt_is_refused_clearly_without_it():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu tests cover TensorRT")
    from engines.runners import TensorRTUNetRunner

    with pytest.raises(RuntimeError, match="TensorRT is not installed|needs a CUDA device"):
        TensorRTUNetRunner("missing.plan", "cuda")


def test_a_plan_asked_for_without_an_onnx_on_a_machine_without_a_gpu_says_both(tiny_bundle, capsys):
    """Without a GPU, `export tensorrt` advised only to export an fp16 ONNX first, which would not have helped."""
    import export.cli

    if torch.cuda.is_available():
        pytest.skip("a GPU here: the plan could be built")
    args = ["tensorrt", "--bundle", str(tiny_bundle.path), "--buckets", "512", "--max-batch-size", "2", "--quiet"]
    assert export.cli.main(args) == 1
    err = capsys.readouterr().err
    assert "python -m export onnx" in err and "built on the GPU that runs it: no CUDA GPU here" in err, err


def test_the_tensorrt_runner_refuses_a_plan_whose_bytes_are_not_the_recorded_ones(tmp_path, monkeypatch):
    """The plan is hashed as it is read: one replaced after the bundle was verified never reaches TensorRT."""
    import hashlib

    from engines import runners

    monkeypatch.setattr(runners, "import_tensorrt", lambda: SimpleNamespace(__version__="not used"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"a plan copied in after verification")
    with pytest.raises(RuntimeError, match="sha256 differs from the bundle manifest"):
        runners.TensorRTUNetRunner(plan, "cuda:0", sha256=hashlib.sha256(b"the recorded plan").hexdigest())


# -------------------------------------------------------------------------------------------
# GPU: TensorRT (and ONNX Runtime's CUDA provider). Skipped without CUDA and tensorrt.


@pytest.fixture(scope="module")
def tensorrt_gpu():
    """Skip (before any export) without tensorrt (its tests are marked gpu: skipped without CUDA before this)."""
    return pytest.importorskip("tensorrt")


@pytest.fixture(scope="module")
def tiny_plan(tensorrt_gpu, fp16_onnx, tmp_path_factory):
    from export.tensorrt_build import build_plan, onnx_static_dims

    folder = tmp_path_factory.mktemp("plan")
    profiles = profiles_from_serve_config({256: 4, 512: 4}, **onnx_static_dims(fp16_onnx))
    info = build_plan(fp16_onnx, folder / "unet.plan", profiles, timing_cache_path=folder / "timing.cache")
    return SimpleNamespace(path=folder / "unet.plan", info=info, cache=folder / "timing.cache")


@pytest.mark.gpu
def test_tensorrt_plan_records_what_it_is(tensorrt_gpu, tiny_plan):
    info = tiny_plan.info
    assert info.tensorrt_version == tensorrt_gpu.__version__ and info.strongly_typed
    assert info.compute_capability == "%d.%d" % torch.cuda.get_device_capability()
    assert [p["name"] for p in info.profiles] == ["256px_b1-4", "512px_b1-4"]
    assert tiny_plan.cache.is_file() and tiny_plan.cache.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_runner_matches_torch_fp16(tiny_bundle, tiny_plan, cuda_graph):
    from engines.runners import TensorRTUNetRunner

    device = torch.device("cuda")
    unet = tiny_bundle.load_unet().to(device, torch.float16)
    reference = TorchUNetRunner(unet, device)
    runner = TensorRTUNetRunner(tiny_plan.path, device, cuda_graph=cuda_graph)
    assert runner.dtype == torch.float16 and len(runner.profiles) == 2
    for batch, latent in [(1, 32), (3, 64), (1, 32)]:  # two profiles, back to the first shape
        sample, t, states, pooled, time_ids = example_inputs(unet.config, batch, latent, latent, torch.float16, device, seed=batch)
        cond = UNetConditioning(states, pooled, time_ids)
        got, expected = runner(sample, t, cond).float(), reference(sample, t, cond).float()
        assert got.shape == (batch, 4, latent, latent)
        assert (got - expected).abs().max().item() < 2e-2 and (got - expected).abs().mean().item() < 2e-3
    sample, t, states, pooled, time_ids = example_inputs(unet.config, 8, 32, 32, torch.float16, device)
    with pytest.raises(ValueError, match="no optimization profile"):  # the plan's profiles stop at batch 4
        runner(sample, t, UNetConditioning(states, pooled, time_ids))


@pytest.mark.gpu
def test_removal_engine_serves_through_the_tensorrt_runner(tiny_bundle, tiny_plan):
    torch_engine = RemovalEngine.from_bundle(tiny_bundle, device="cuda", dtype=torch.float16)
    trt_engine = RemovalEngine.from_bundle(tiny_bundle, device="cuda", runner="tensorrt", runner_path=tiny_plan.path)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[64:192, 64:192] = True
    job = RemovalJob(image, mask, seed=3)
    diff = np.abs(trt_engine.remove([job])[0].astype(int) - torch_engine.remove([job])[0])
    assert diff.max() <= 3 and diff.mean() < 0.2


def test_an_onnx_runner_meant_for_a_gpu_never_runs_on_the_cpu():
    """The image's onnxruntime is the CPU wheel unless onnxruntime-gpu replaces it: an ONNX UNet asked for cuda
    used to fall back to the CPU without a word (an SDXL batch in minutes, the replica restarted as hung)."""
    from engines.runners import default_ort_providers, require_ort_gpu_provider

    cuda, cpu_only = torch.device("cuda", 0), ["AzureExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="install onnxruntime-gpu in place of onnxruntime"):
        default_ort_providers(cuda, cpu_only)
    with pytest.raises(RuntimeError, match="would run on the CPU"):  # listed, but its libraries failed to load
        require_ort_gpu_provider(cuda, ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):  # TensorRT's provider is not in the default list
        default_ort_providers(cuda, ["TensorrtExecutionProvider", *cpu_only])
    assert default_ort_providers(cuda, ["CUDAExecutionProvider", *cpu_only])[0] == "CUDAExecutionProvider"
    assert default_ort_providers(torch.device("cpu"), cpu_only) == ["CPUExecutionProvider"]
    require_ort_gpu_provider(torch.device("cpu"), ["CPUExecutionProvider"], cpu_only)


@pytest.fixture(scope="module")
def ort_cuda():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (onnxruntime-gpu)")


@pytest.mark.gpu
def test_onnx_runner_on_cuda_binds_torch_tensors(ort_cuda, fp16_onnx, tiny_bundle):
    device = torch.device("cuda")
    runner = OnnxUNetRunner(fp16_onnx, device)
    assert runner.iobinding and runner.providers[0] == "CUDAExecutionProvider"
    unet = tiny_bundle.load_unet().to(device, torch.float16)
    sample, t, states, pooled, time_ids = example_inputs(unet.config, 2, 32, 32, torch.float16, device)
    cond = UNetConditioning(states, pooled, time_ids)
    got, expected = runner(sample, t, cond), TorchUNetRunner(unet, device)(sample, t, cond)
    assert got.device.type == "cuda" and (got.float() - expected.float()).abs().max().item() < 2e-2


# -------------------------------------------------------------------------------------------
# Export records: what serving may open. The exported files are dummy bytes: the ONNX runner is
# replaced by one that only notes the file it was asked to open.


@pytest.fixture
def onnx_opened(monkeypatch) -> list[Path]:
    import engines.runners

    opened = []

    def runner(path, device="cpu", **_):
        opened.append(Path(path).resolve())
        return SimpleNamespace(device=torch.device(device), dtype=torch.float32)

    monkeypatch.setattr(engines.runners, "OnnxUNetRunner", runner)
    return opened


PASSED_REPORT = {"passed": True, "dtype": "float32", "max_abs": 3e-6, "mean_abs": 1e-7,
                 "tolerance": {"max_abs": 1e-4, "mean_abs": 1e-5},
                 "cases": [{"batch": 1, "latent": [32, 32]}, {"batch": 3, "latent": [64, 64]}]}  # fmt: skip


def _unet_sha256(bundle_path: Path) -> str:
    return Bundle.load(bundle_path, verify=False).manifest.files[UNET_WEIGHTS].sha256


def _record_dummy_onnx(bundle_path: Path, dtype: str = "float32", verify: dict | None = PASSED_REPORT) -> Path:
    """Record an ONNX export of `dtype` in the bundle as the exporter does (new bytes each call; `verify`:
    its parity report, None for a record without one)."""
    import time

    from engines.runners import export_filename
    from export.manifest import record_export

    path = bundle_path / export_filename("onnx", dtype)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(f"{dtype} graph exported at {time.perf_counter_ns()}".encode())
    record = {"kind": "onnx", "dtype": dtype, "path": path.relative_to(bundle_path).as_posix()}
    if verify is not None:
        record["verify"] = verify
    record_export(bundle_path, f"onnx.{dtype}", [path], record, made_from=_unet_sha256(bundle_path))
    return path


def _bundle_with_onnx(tiny_bundle, tmp_path: Path, dtype: str = "float32") -> tuple[Path, Path]:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    return copy, _record_dummy_onnx(copy, dtype)


def _edit_manifest(bundle_path: Path, edit) -> None:
    manifest = json.loads((bundle_path / MANIFEST).read_text())
    edit(manifest)
    (bundle_path / MANIFEST).write_text(json.dumps(manifest))


TAMPERED_RECORDS = {  # changes to the onnx.float32 record, given the path of a file outside the bundle
    "path outside the bundle": lambda outside: {"path": "../evil.onnx"},
    "path and files outside": lambda outside: {"path": "../evil.onnx", "files": ["../evil.onnx"]},
    "absolute path": lambda outside: {"path": str(outside), "files": [str(outside)]},
    "file not in manifest.files": lambda outside: {"path": "exports/other.onnx", "files": ["exports/other.onnx"]},
    "no unet_sha256": lambda outside: {"unet_sha256": None},
    "made from other weights": lambda outside: {"unet_sha256": "0" * 64},
}


def test_a_tampered_export_stops_only_the_replica_that_loads_it(tiny_bundle, tmp_path):
    """Every replica hashed every export at open: the Scorer and a torch Remover too, which never load one (~20 GB
    on SDXL), and a corrupt unused export stopped them all. The runner that loads it still refuses it."""
    from engines.scorer import ScoringEngine
    from engines.sources import open_bundle

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    onnx.write_bytes(bytes(b ^ 1 for b in onnx.read_bytes()))  # same size, other bytes

    def opened():
        return open_bundle(path=str(copy), authors=None, cache_dir=tmp_path / "cache", verify=True)

    ScoringEngine.from_bundle(opened())
    RemovalEngine.from_bundle(opened(), runner="torch")
    with pytest.raises(BundleError, match="unet.fp32.onnx: sha256 differs from the bundle manifest"):
        RemovalEngine.from_bundle(opened(), runner="onnx")


BROKEN_EXPORTS = {
    "other bytes": lambda graph: graph.write_bytes(bytes(b ^ 1 for b in graph.read_bytes())),
    "truncated": lambda graph: graph.write_bytes(graph.read_bytes()[:5]),
    "deleted": Path.unlink,
}


@pytest.mark.parametrize("breaks", BROKEN_EXPORTS.values(), ids=BROKEN_EXPORTS.keys())
def test_a_broken_export_stops_only_the_onnx_runner_and_the_command_it_names_replaces_it(
    tiny_bundle, tmp_path, stub_export, breaks
):
    """The bundle's own verify covered the exports: one deleted or truncated export stopped every replica (the
    Scorer and a torch Remover too, which never read it) and every `python -m export --bundle` command, the one
    that remakes it included."""
    import re
    import shlex

    import export.cli
    from engines.scorer import ScoringEngine
    from engines.sources import open_bundle

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    breaks(onnx)

    def opened():
        return open_bundle(path=str(copy), authors=None, cache_dir=tmp_path / "cache", verify=True)

    ScoringEngine.from_bundle(opened())
    RemovalEngine.from_bundle(opened(), runner="torch")
    with pytest.raises(BundleError) as refused:
        RemovalEngine.from_bundle(opened(), runner="onnx", buckets=[512])
    (command,) = re.findall(r"`(python -m export [^`]*)`", str(refused.value))
    assert shlex.split(command)[3] == "onnx" and "--bundle" in command
    assert export.cli.main([*shlex.split(command)[3:], "--quiet"]) == 0
    bundle = Bundle.load(copy, verify=True)
    assert current_export(bundle, "onnx", "float32", buckets=[512]).path == onnx
    bundle.check_files(["exports/unet.fp32.onnx"])


def test_a_plan_s_build_record_is_hashed_as_the_runner_reads_it(plan_build):
    """The plan's sidecar (its build record) was hashed only at open; now its reader hashes it."""
    from engines import runners

    bundle = Bundle.load(plan_build.bundle, verify=True)
    export = runners.current_export(bundle, "tensorrt", "float16", compute_capability="9.0")
    sidecar = runners.plan_sidecar(plan_build.plan)
    assert export.sidecar_sha256 == bundle.manifest.files[f"exports/{sidecar.name}"].sha256
    assert export.data_sha256 is None
    sidecar.write_text("[]")  # same size, other bytes
    runner = object.__new__(runners.TensorRTUNetRunner)
    runner.path, runner.rebuild = plan_build.plan, "python -m export tensorrt --bundle B"
    with pytest.raises(BundleError, match=f"{sidecar.name}: sha256 differs.*`python -m export tensorrt --bundle B`"):
        runner._check_sidecar(export.sidecar_sha256)


def test_serving_opens_the_recorded_onnx_export(tiny_bundle, tmp_path, onnx_opened):
    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == [onnx.resolve()]


@pytest.mark.parametrize("tamper", TAMPERED_RECORDS.values(), ids=TAMPERED_RECORDS.keys())
def test_serving_refuses_an_export_record_it_cannot_trust(tiny_bundle, tmp_path, onnx_opened, tamper):
    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path)
    outside = tmp_path / "evil.onnx"  # ../evil.onnx from the bundle folder
    outside.write_bytes(b"a file nobody hashed")
    (copy / "exports" / "other.onnx").write_bytes(b"a file nobody hashed")
    _edit_manifest(copy, lambda m: m["provenance"]["exports"]["onnx.float32"].update(tamper(outside)))
    with pytest.raises(BundleError, match="python -m export onnx"):
        RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == []


def test_serving_refuses_an_onnx_file_without_a_record(tiny_bundle, tmp_path, onnx_opened):
    """A graph left in exports/ (copied by hand, or from an export whose record was dropped) is not served."""
    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    _edit_manifest(copy, lambda m: (m["provenance"].pop("exports"), m["files"].pop("exports/unet.fp32.onnx")))
    assert onnx.is_file()
    with pytest.raises(BundleError, match="no onnx.float32 export recorded.*python -m export onnx"):
        RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == []


@pytest.mark.parametrize(
    "extra_args, passed, served",
    [([], False, False), ([], True, True), (["--max-abs", "1"], True, False),
     (["--cases", "1x8x8", "--buckets", "1024"], True, False)],
    ids=["parity fails", "parity passes", "parity passes a loosened tolerance", "parity passes fewer cases"],
)
def test_verify_records_a_stale_export_as_current_only_when_parity_passes(
    tiny_bundle, tmp_path, monkeypatch, onnx_opened, capsys, extra_args, passed, served
):
    """A failed check says what failed, --quiet too (it exited 1 without a word: an export trial)."""
    import export.cli
    import export.verify

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m["provenance"]["exports"]["onnx.float32"].update(unet_sha256="0" * 64))
    report = {"passed": passed, "dtype": "float32", "max_abs": 3e-5 if passed else 3.2, "mean_abs": 1e-6,
              "tolerance": {"max_abs": 1e-4, "mean_abs": 1e-5}}  # fmt: skip
    monkeypatch.setattr(export.verify, "verify_onnx", lambda *args, **kwargs: report)
    assert export.cli.main(["verify", "--bundle", str(copy), "--quiet", *extra_args]) == (0 if passed else 1)
    err = capsys.readouterr().err
    assert ("failed its parity check (max_abs 3.2, mean_abs 1e-06; tolerance" in err) == (not passed), err
    bundle = Bundle.load(copy, verify=True)
    if served:
        RemovalEngine.from_bundle(bundle, runner="onnx")
        assert onnx_opened == [onnx.resolve()]
    else:
        with pytest.raises(BundleError, match="other UNet weights"):
            RemovalEngine.from_bundle(bundle, runner="onnx")
        assert onnx_opened == []


def test_a_plan_is_recorded_and_served_only_with_the_onnx_it_was_built_from(tiny_bundle, tmp_path):
    from engines import runners
    from engines.bundle import sha256_of
    from export.manifest import record_plan

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path, "float16")
    plan = copy / runners.export_filename("tensorrt", "float16", "9.0")
    plan.write_bytes(b"plan")
    runners.plan_sidecar(plan).write_text("{}")
    info = {"compute_capability": "9.0", "onnx": "an-older-export.onnx", "onnx_sha256": "f" * 64}
    with pytest.raises(BundleError, match="python -m export tensorrt"):
        record_plan(Bundle.load(copy), plan, info)

    info.update(onnx=onnx.name, onnx_sha256=sha256_of(onnx))
    bundle = record_plan(Bundle.load(copy), plan, info)
    assert runners.current_export(bundle, "tensorrt", "float16", compute_capability="9.0").path == plan

    _record_dummy_onnx(copy, "float16")  # exported again after the plan was built
    with pytest.raises(BundleError, match="built from another ONNX.*python -m export tensorrt"):
        runners.current_export(Bundle.load(copy, verify=True), "tensorrt", "float16", compute_capability="9.0")


# -------------------------------------------------------------------------------------------
# Replacing an export: staged, verified, then renamed and recorded (the export and the build stubbed)


@pytest.fixture
def stub_export(monkeypatch, tiny_bundle) -> SimpleNamespace:
    """export_unet_onnx writes new bytes where it is told, made from `made_from` (its metadata's unet_sha256:
    the tiny bundle's UNet); verify_onnx returns `report` with the cases it was given (or raises it), noting
    the path and cases."""
    import export.onnx_export
    import export.verify

    seen = SimpleNamespace(report=PASSED_REPORT, verified=[], cases=[], made_from=_unet_sha256(tiny_bundle.path))

    def export_unet_onnx(bundle, out_path, **_):
        Path(out_path).write_bytes(b"a new graph")
        return Path(out_path)

    def verify_onnx(path, unet, *, cases=export.verify.DEFAULT_CASES, **_):
        seen.verified.append(Path(path))
        seen.cases.append(cases)
        if isinstance(seen.report, BaseException):
            raise seen.report
        return {**seen.report, "cases": [{"batch": b, "latent": [h, w]} for b, h, w in cases]}

    monkeypatch.setattr(export.onnx_export, "export_unet_onnx", export_unet_onnx)
    monkeypatch.setattr(
        export.onnx_export, "read_onnx_metadata", lambda path: {"dtype": "float32", "unet_sha256": seen.made_from}
    )
    monkeypatch.setattr(export.verify, "verify_onnx", verify_onnx)
    return seen


_HOLD_STAGING = """
import os, signal, sys, time
from pathlib import Path
from export.staging import staging_folder
with staging_folder(Path(sys.argv[1])) as folder:
    (folder / "unet.fp32.onnx").write_bytes(b"half a graph")
    print(folder, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def test_a_killed_export_s_staging_folder_is_removed_by_the_next_export(tiny_bundle, tmp_path, onnx_opened, stub_export):
    """A SIGKILL (the OOM killer, a crash-looping replica exporting at start) skipped the cleanup, and each retry
    left another staging folder holding a whole graph (~10 GB on SDXL); a live export's folder is kept."""
    from export.manifest import export_and_record_onnx

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    exports = onnx.parent

    def staged_by(how: str) -> tuple[subprocess.Popen, Path]:
        child = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(exports), how], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        return child, Path(child.stdout.readline().strip())

    live, live_folder = staged_by("hold")
    try:
        first, first_folder = staged_by("kill")
        assert first.wait() == -signal.SIGKILL and (first_folder / "unet.fp32.onnx").is_file()
        second, second_folder = staged_by("kill")
        assert second.wait() == -signal.SIGKILL and not first_folder.exists() and second_folder.is_dir()
        (exports / ".staging-abc123").mkdir()  # not ours (no .owner): another tool's, or an older export's
        export_and_record_onnx(Bundle.load(copy), "float32")
        left = sorted(p.name for p in exports.iterdir() if p.name.startswith("."))
        assert left == sorted([live_folder.name, ".staging-abc123"]), "the killed exports' folders are gone"
        assert (live_folder / "unet.fp32.onnx").is_file()
    finally:
        live.kill()
        live.communicate()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_export_stopped_by_ctrl_c_or_sigterm_says_so_in_a_line_and_leaves_no_staging_folder(
    tiny_bundle, tmp_path, stub_export, monkeypatch, capsys, stop
):
    """Ctrl-C printed a 52-line traceback; SIGTERM (Kubernetes, `timeout`, systemd) ended the process at once,
    leaving the staging folder (a whole graph, ~10 GB on SDXL) until the next export (an export trial)."""
    import os

    import export.cli
    import export.verify

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    graph, manifest = onnx.read_bytes(), (copy / MANIFEST).read_text()

    def stopped(path, unet, **_):
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(export.verify, "verify_onnx", stopped)
    ignored = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ignored.append(signum))  # pytest's own process
    try:
        code = export.cli.main(["onnx", "--bundle", str(copy), "--quiet"])
    finally:
        restored = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    assert code == (143 if stop == "sigterm" else 130) and not ignored and restored.__name__ == "<lambda>"
    by = " by SIGTERM" if stop == "sigterm" else ""
    err = capsys.readouterr().err
    assert err.startswith(f"python -m export onnx: interrupted{by}; ") and len(err.splitlines()) == 1, err
    assert onnx.read_bytes() == graph and (copy / MANIFEST).read_text() == manifest
    assert sorted(p.name for p in onnx.parent.iterdir()) == [onnx.name], "staging left behind"


@pytest.mark.parametrize(
    "outcome", [{**PASSED_REPORT, "passed": False, "max_abs": 3.2}, KeyboardInterrupt()], ids=["fails", "interrupted"]
)
def test_an_export_that_fails_its_check_keeps_the_verified_one_and_its_record(
    tiny_bundle, tmp_path, onnx_opened, stub_export, outcome
):
    from export.manifest import export_and_record_onnx

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    graph, manifest = onnx.read_bytes(), (copy / MANIFEST).read_text()
    stub_export.report = outcome
    with pytest.raises(RuntimeError if isinstance(outcome, dict) else KeyboardInterrupt):
        export_and_record_onnx(Bundle.load(copy), "float32")
    assert onnx.read_bytes() == graph and (copy / MANIFEST).read_text() == manifest
    assert stub_export.verified and stub_export.verified[0].parent != onnx.parent, "verified in place"
    assert sorted(p.name for p in onnx.parent.iterdir()) == [onnx.name], "staging left behind"
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == [onnx.resolve()]


def test_an_export_that_passes_replaces_the_current_one_and_its_record(tiny_bundle, tmp_path, onnx_opened, stub_export):
    from export.manifest import export_and_record_onnx

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    export_and_record_onnx(Bundle.load(copy), "float32", buckets=[512, 1024])
    assert onnx.read_bytes() == b"a new graph"
    assert sorted(p.name for p in onnx.parent.iterdir()) == [onnx.name]
    assert (1, 128, 128) in stub_export.cases[0], "the 1024 px bucket was not checked"
    bundle = Bundle.load(copy, verify=True)
    recorded = bundle.manifest.provenance["exports"]["onnx.float32"]["verify"]
    assert recorded["passed"] and {"batch": 1, "latent": [128, 128]} in recorded["cases"]
    RemovalEngine.from_bundle(bundle, runner="onnx", buckets=[512, 1024])
    assert onnx_opened == [onnx.resolve()]


def test_cases_for_buckets_add_each_bucket_side_once():
    from export.verify import DEFAULT_CASES, cases_for_buckets

    assert cases_for_buckets() == cases_for_buckets([256]) == DEFAULT_CASES
    assert cases_for_buckets([1024, 512, 1024]) == (*DEFAULT_CASES, (1, 128, 128))


def test_the_onnx_command_verifies_by_default_and_no_verify_is_served_only_once_verified(
    tiny_bundle, tmp_path, onnx_opened, stub_export
):
    import export.cli

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    config = str(REPO / "serve" / "configs" / "local.yaml")
    assert export.cli.main(["onnx", "--bundle", str(copy), "--config", config, "--quiet"]) == 0
    assert stub_export.verified and (1, 128, 128) in stub_export.cases[-1]

    stub_export.verified.clear()
    assert export.cli.main(["onnx", "--bundle", str(copy), "--no-verify", "--quiet"]) == 0
    assert not stub_export.verified
    bundle = Bundle.load(copy, verify=True)
    assert bundle.manifest.provenance["exports"]["onnx.float32"]["verify"] == {"passed": False, "skipped": True}
    with pytest.raises(BundleError, match="without its parity check.*python -m export verify"):
        RemovalEngine.from_bundle(bundle, runner="onnx")
    assert onnx_opened == []

    assert export.cli.main(["verify", "--bundle", str(copy), "--quiet"]) == 0
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == [onnx.resolve()]


@pytest.mark.parametrize(
    "report, refusal",
    [(None, "without its parity check"), ({**PASSED_REPORT, "passed": False}, "failed its parity check")],
    ids=["no report", "failed"],
)
def test_serving_refuses_an_onnx_export_not_verified(tiny_bundle, tmp_path, onnx_opened, report, refusal):
    """The command said names the bundle so that it pastes as said, a space in its path too (an export trial)."""
    import re
    import shlex

    copy = tmp_path / "my bundle"
    shutil.copytree(tiny_bundle.path, copy)
    _record_dummy_onnx(copy, verify=report)
    said = re.escape(f"python -m export verify --bundle {shlex.quote(str(copy))} --dtype float32")
    with pytest.raises(BundleError, match=f"{refusal}.*{said}"):
        RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx")
    assert onnx_opened == []


def test_serving_refuses_an_onnx_export_not_verified_at_a_served_bucket(tiny_bundle, tmp_path, onnx_opened):
    """A graph checked at the default 256 and 512 px cases only (`python -m export verify` without --buckets) is
    not served at 1024 px; a record that does not list its cases (an older exporter's) is checked at nothing."""
    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    RemovalEngine.from_bundle(Bundle.load(copy), runner="onnx", buckets=[256, 512])
    assert onnx_opened == [onnx.resolve()]
    refusal = r"ran at \[256, 512\] px only, not at the served bucket sides \[1024\]: run `python -m export verify "
    with pytest.raises(BundleError, match=refusal + r"--bundle \S+ --dtype float32 --buckets 512,1024`"):
        RemovalEngine.from_bundle(Bundle.load(copy), runner="onnx", buckets=[512, 1024])
    _record_dummy_onnx(copy, verify={k: v for k, v in PASSED_REPORT.items() if k != "cases"})
    with pytest.raises(BundleError, match="does not say at which sizes it ran.*--buckets 512`"):
        RemovalEngine.from_bundle(Bundle.load(copy), runner="onnx", buckets=[512])
    assert onnx_opened == [onnx.resolve()]


def test_ensure_unet_onnx_exports_again_for_a_bucket_its_graph_was_not_checked_at(
    tiny_bundle, tmp_path, onnx_opened, stub_export
):
    from export.manifest import ensure_unet_onnx

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    assert ensure_unet_onnx(Bundle.load(copy), "float32", buckets=[512]) == onnx and not stub_export.verified
    assert ensure_unet_onnx(Bundle.load(copy), "float32", buckets=[512, 1024]) == onnx
    assert (1, 128, 128) in stub_export.cases[-1] and onnx.read_bytes() == b"a new graph"


class _ReadOnlyLock:
    """A FileLock on a read-only mount (Kubernetes mounts the models so)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        raise OSError(errno.EROFS, "Read-only file system", self.path)

    def __exit__(self, *exc):
        return False


def test_export_missing_on_a_read_only_bundle_serves_a_current_export_and_says_where_to_make_one(
    tiny_bundle, tmp_path, monkeypatch, stub_export
):
    """Kubernetes mounts the models read-only: the export lock beside the bundle was taken before checking, so a
    start with a current export failed with a bare OSError (Read-only file system: '<bundle>.export-onnx-...lock')."""
    import export.manifest
    from export.manifest import ensure_unet_onnx

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    monkeypatch.setattr(export.manifest, "FileLock", _ReadOnlyLock)
    assert ensure_unet_onnx(Bundle.load(copy), "float32", buckets=[512]) == onnx
    refusal = r"cannot export the UNet into the bundle \(.*Read-only file system.*export_missing: false.*export onnx"
    with pytest.raises(BundleError, match=refusal):
        ensure_unet_onnx(Bundle.load(copy), "float32", buckets=[512, 1024])
    assert not stub_export.verified


@pytest.mark.parametrize("cases", [[], ["--cases", "1x32x32,3x64x64"]], ids=["default cases", "cases without 1024"])
def test_verify_without_buckets_keeps_a_record_checked_at_1024_serving_it(
    tiny_bundle, tmp_path, onnx_opened, stub_export, cases
):
    """`python -m export verify` with no --buckets checks the sides the record it replaces lists too: a record
    checked at 1024 px is not narrowed to 256/512 (the next start refused, or exported again for minutes)."""
    import export.cli

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    report = {**PASSED_REPORT, "cases": [*PASSED_REPORT["cases"], {"batch": 1, "latent": [128, 128]}]}
    onnx = _record_dummy_onnx(copy, verify=report)
    assert export.cli.main(["verify", "--bundle", str(copy), "--quiet", *cases]) == 0
    if not cases:
        assert (1, 128, 128) in stub_export.cases[-1]
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[512, 1024])
    assert onnx_opened == [onnx.resolve()]


def test_export_onnx_without_buckets_keeps_checking_the_sides_the_replaced_record_was_checked_at(
    tiny_bundle, tmp_path, onnx_opened, stub_export
):
    """A new graph replacing one checked at 1024 px was checked at 256/512 only, and the next start refused it."""
    import export.cli

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    at_1024 = {**PASSED_REPORT, "cases": [*PASSED_REPORT["cases"], {"batch": 1, "latent": [128, 128]}]}
    _record_dummy_onnx(copy, verify=at_1024)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 0
    assert (1, 128, 128) in stub_export.cases[-1]
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[512, 1024])


REFUSED_RECORDS = {  # how the onnx.float32 record is spoiled, and the commands its refusal must name
    "exported with --no-verify": (lambda m: m["provenance"]["exports"]["onnx.float32"].update(
        verify={"passed": False, "skipped": True}), ["verify", "onnx"]),
    "checked at 256/512 only": (lambda m: None, ["verify", "onnx"]),
    "made from other weights": (lambda m: m["provenance"]["exports"]["onnx.float32"].update(unet_sha256="0" * 64),
                                ["onnx"]),
    "missing": (lambda m: m["provenance"].pop("exports"), ["onnx"]),
}  # fmt: skip


@pytest.mark.parametrize("spoil, commands", REFUSED_RECORDS.values(), ids=REFUSED_RECORDS.keys())
def test_each_command_a_refusal_names_run_as_printed_makes_a_record_that_serves(
    tiny_bundle, tmp_path, onnx_opened, stub_export, spoil, commands
):
    """The refusal knows the served sides: each command it prints carries them, so following it is enough."""
    import re
    import shlex

    import export.cli

    for n, command in enumerate(commands):
        copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path / str(n))
        _edit_manifest(copy, spoil)
        with pytest.raises(BundleError) as refused:
            RemovalEngine.from_bundle(Bundle.load(copy), runner="onnx", buckets=[512, 1024])
        printed = re.findall(r"`(python -m export [^`]*)`", str(refused.value))
        assert [shlex.split(line)[3] for line in printed] == commands
        assert export.cli.main([*shlex.split(printed[n])[3:], "--quiet"]) == 0
        RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[512, 1024])
        assert onnx_opened[-1] == onnx.resolve()


def test_an_export_made_from_other_weights_than_the_bundles_is_not_recorded(tiny_bundle, tmp_path, stub_export):
    """The bundle's UNet was replaced while the graph was exported (its metadata names the weights it was made
    from): recorded, serving would take it as made from the new ones."""
    from export.manifest import export_and_record_onnx

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    manifest = (copy / MANIFEST).read_text()
    stub_export.made_from = "0" * 64
    with pytest.raises(BundleError, match="made from UNet weights 000000000000, the bundle's are now .*not recorded"):
        export_and_record_onnx(Bundle.load(copy), "float32")
    assert (copy / MANIFEST).read_text() == manifest and not list((copy / "exports").iterdir())


def _stand_in_graph(path: Path, offset: float, external: bool) -> None:
    """A graph with the exported UNet's signature, noise_pred = sample[:, :4] + mean(weights), weights all
    `offset` (`external`: the weights in <graph>.data, as an SDXL export keeps its own)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inputs = [value("sample", ["B", "C", "h", "w"]), value("timestep", ["B"]),
              value("encoder_hidden_states", ["B", "S", "D"]), value("text_embeds", ["B", "P"]),
              value("time_ids", ["B", 6])]  # fmt: skip
    values = {"start": [0], "end": [4], "axis": [1], "weights": np.full(512, offset, np.float32)}
    constants = [numpy_helper.from_array(np.asarray(array), name) for name, array in values.items()]
    nodes = [helper.make_node("Slice", ["sample", "start", "end", "axis"], ["sliced"]),
             helper.make_node("ReduceMean", ["weights"], ["offset"], keepdims=0),
             helper.make_node("Add", ["sliced", "offset"], ["noise_pred"])]  # fmt: skip
    graph = helper.make_graph(nodes, "stand-in", inputs, [value("noise_pred", ["B", 4, "h", "w"])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    external_data = {"save_as_external_data": True, "location": path.name + ".data"}  # the weights: over 1 kB
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # onnx.save appends to an existing one
    onnx.save(model, str(path), **(external_data if external else {}))


@pytest.mark.parametrize("external", [False, True], ids=["graph", "external data"])
def test_the_onnx_runner_runs_only_the_bytes_the_manifest_lists(tiny_bundle, tmp_path, external):
    """A file swapped after the bundle was verified, or in a bundle served with `bundle.verify: false`, is refused
    by name, not served: the session is built from the graph bytes that were hashed (its .data hashed first)."""
    from engines.runners import export_filename
    from export.manifest import record_export
    from export.onnx_export import onnx_files

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    graph = copy / export_filename("onnx", "float32")
    graph.parent.mkdir()
    _stand_in_graph(graph, 0.0, external)
    record = {"kind": "onnx", "dtype": "float32", "path": export_filename("onnx", "float32"), "verify": PASSED_REPORT}
    record_export(copy, "onnx.float32", onnx_files(graph), record, made_from=_unet_sha256(copy))
    assert len(onnx_files(graph)) == (2 if external else 1)
    job = [RemovalJob(np.full((64, 64, 3), 128, np.uint8), np.pad(np.ones((32, 32), bool), 16), seed=0)]
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx").remove(job)

    recorded = graph.read_bytes()
    _stand_in_graph(graph, 5.0, external)
    assert (graph.read_bytes() == recorded) == external, "with external data, only the .data file changes"
    changed = onnx_files(graph)[-1]
    with pytest.raises(BundleError, match=f"{changed.name}: sha256 differs from the bundle manifest"):
        RemovalEngine.from_bundle(Bundle.load(copy, verify=False), runner="onnx")


def test_export_all_with_tensorrt_asks_for_the_serve_buckets_before_any_work(tiny_bundle, monkeypatch, capsys):
    import export.cli
    import export.manifest

    monkeypatch.setattr(export.cli, "_tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(export.manifest, "export_and_record_onnx", lambda *a, **k: pytest.fail("exported first"))
    assert export.cli.main(["all", "--bundle", str(tiny_bundle.path), "--quiet"]) == 1
    assert "--config SERVE_CONFIG" in capsys.readouterr().err

    built = []
    monkeypatch.setattr(export.manifest, "export_and_record_onnx", lambda bundle, dtype, **k: (bundle.path, {}))
    monkeypatch.setattr(export.cli, "_build_and_record", lambda args, *rest: built.append(export.cli._plan_shape(args)))
    config = str(REPO / "serve" / "configs" / "local.yaml")
    assert export.cli.main(["all", "--bundle", str(tiny_bundle.path), "--config", config, "--quiet"]) == 0
    assert built == [load_serve_settings(config).batch_sizes()]


@pytest.fixture
def plan_build(monkeypatch, tiny_bundle, tmp_path) -> SimpleNamespace:
    """A bundle with an fp16 ONNX export and a plan built from it (sm90); TensorRT and the GPU stubbed.
    `during` runs inside the stubbed build."""
    import export.tensorrt_build
    from engines import runners
    from engines.bundle import sha256_of
    from export.manifest import record_plan

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path, "float16")
    plan = copy / runners.export_filename("tensorrt", "float16", "9.0")
    plan.write_bytes(b"the first plan")
    runners.plan_sidecar(plan).write_text("{}")
    record_plan(Bundle.load(copy), plan, {"compute_capability": "9.0", "onnx_sha256": sha256_of(onnx)})
    build = SimpleNamespace(bundle=copy, onnx=onnx, plan=plan, during=lambda: None)

    def build_plan(onnx_path, plan_path, profiles, **_):
        built_from = sha256_of(onnx_path)
        Path(plan_path).write_bytes(b"a new plan")
        runners.plan_sidecar(plan_path).write_text("{}")
        build.during()
        info = {"compute_capability": "9.0", "onnx_sha256": built_from, "plan": Path(plan_path).name,
                "tensorrt_version": "stub", "gpu": "stub", "build_seconds": 0.0, "bytes": 10}  # fmt: skip
        return SimpleNamespace(to_json=lambda: info)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(export.tensorrt_build, "build_plan", build_plan)
    monkeypatch.setattr(export.tensorrt_build, "onnx_static_dims", lambda path: {})
    return build


def _build_args(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"command": "tensorrt", "config": None, "buckets": [512], "max_batch_size": 2,
                              "spanning": False, "plan": None, "timing_cache": None, "workspace_gb": None,
                              "opt_level": 3, **overrides})  # fmt: skip


def test_a_plan_for_a_bundle_it_cannot_write_is_refused_before_building(plan_build, immutable):
    """As for `export onnx`: the plan was built (minutes) before manifest.json.partial could not be written."""
    from export.cli import _build_and_record
    from export.progress import QUIET

    built = []
    plan_build.during = lambda: built.append(True)
    immutable(plan_build.bundle)
    with pytest.raises(PermissionError, match=f"Operation not permitted: '{plan_build.bundle / MANIFEST}.partial'"):
        _build_and_record(_build_args(), Bundle.load(plan_build.bundle), plan_build.onnx, "float16", QUIET)
    assert built == [] and plan_build.plan.read_bytes() == b"the first plan"


def test_a_plan_refused_after_its_build_leaves_the_recorded_plan_in_place(plan_build):
    """The ONNX is exported again while the plan builds: the new plan is refused, the old one stays."""
    from engines import runners
    from export.cli import _build_and_record
    from export.progress import QUIET

    plan_build.during = lambda: _record_dummy_onnx(plan_build.bundle, "float16")
    with pytest.raises(BundleError, match="built from an ONNX"):
        _build_and_record(_build_args(), Bundle.load(plan_build.bundle), plan_build.onnx, "float16", QUIET)
    assert plan_build.plan.read_bytes() == b"the first plan"
    Bundle.load(plan_build.bundle, verify=True)
    assert sorted(p.name for p in plan_build.plan.parent.iterdir()) == sorted(
        [plan_build.onnx.name, plan_build.plan.name, runners.plan_sidecar(plan_build.plan).name]
    )


def test_a_built_plan_replaces_the_recorded_one(plan_build):
    from engines import runners
    from export.cli import _build_and_record
    from export.progress import QUIET

    _build_and_record(_build_args(), Bundle.load(plan_build.bundle), plan_build.onnx, "float16", QUIET)
    bundle = Bundle.load(plan_build.bundle, verify=True)
    assert runners.current_export(bundle, "tensorrt", "float16", compute_capability="9.0").path == plan_build.plan
    assert plan_build.plan.read_bytes() == b"a new plan"
    assert not [p for p in plan_build.plan.parent.iterdir() if p.name.startswith(".staging")]


def test_tensorrt_refuses_before_building_a_plan_from_an_onnx_not_checked_at_its_buckets(plan_build, capsys):
    """The bundle's fp16 graph is verified at 256/512 px: a plan for 1024 built from it would be refused by serving,
    so it is not built (tens of minutes for SDXL), whether the ONNX is the bundle's default or named by --onnx."""
    import export.cli
    from export.progress import QUIET

    plan_build.during = lambda: pytest.fail("the plan was built")
    args = ["tensorrt", "--bundle", str(plan_build.bundle), "--buckets", "512,1024", "--max-batch-size", "2", "--quiet"]
    assert export.cli.main(args) == 1
    assert "not at the served bucket sides [1024]" in capsys.readouterr().err
    with pytest.raises(BundleError, match=r"not at the served bucket sides \[1024\].*--buckets 512,1024"):
        export.cli._build_and_record(
            _build_args(buckets=[512, 1024]), Bundle.load(plan_build.bundle), plan_build.onnx, "float16", QUIET
        )
    assert plan_build.plan.read_bytes() == b"the first plan"


def test_a_plan_whose_onnx_lacks_only_a_bucket_check_serves_once_verified_without_a_rebuild(plan_build, stub_export):
    """`verify` does not change the graph's bytes, so the plan built from them stays valid: the refusal asks for
    the check, not for a new plan (tens of minutes); an ONNX that must be exported again also needs a new plan."""
    import re
    import shlex

    import export.cli
    from engines import runners

    def serve():
        bundle = Bundle.load(plan_build.bundle, verify=True)
        return runners.current_export(bundle, "tensorrt", "float16", compute_capability="9.0", buckets=[512, 1024])

    with pytest.raises(BundleError) as refused:
        serve()
    assert "plan again" not in str(refused.value).split("exported again")[0]
    verify = re.search(r"`(python -m export verify [^`]*)`", str(refused.value)).group(1)
    assert export.cli.main([*shlex.split(verify)[3:], "--quiet"]) == 0
    assert serve().path == plan_build.plan

    _edit_manifest(plan_build.bundle, lambda m: m["provenance"]["exports"]["onnx.float16"].update(unet_sha256="0" * 64))
    with pytest.raises(BundleError, match="other UNet weights.*then build the tensorrt.float16.sm90 plan again"):
        serve()


@pytest.mark.slow  # a real export: ~30 s of CPU
def test_a_static_export_is_checked_at_its_own_shape(tiny_bundle, tmp_path, capsys):
    """`export onnx --static` always crashed: its check ran the default cases, which a static graph cannot run."""
    import export.cli

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--static", "--quiet"]) == 0, capsys.readouterr().err
    record = Bundle.load(copy, verify=True).manifest.provenance["exports"]["onnx.float32"]
    cases = [(case["batch"], case["latent"]) for case in record["verify"]["cases"]]
    assert record["verify"]["passed"] and cases == [(2, [64, 64])]


def test_a_static_export_at_another_bucket_side_is_refused_before_exporting(tiny_bundle, tmp_path, capsys, monkeypatch):
    import export.cli
    import export.onnx_export

    monkeypatch.setattr(export.onnx_export, "export_unet_onnx", lambda *a, **k: pytest.fail("exported"))
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--static", "--buckets", "1024", "--quiet"]) == 1
    assert "is a static graph (batch 2, latent 64x64: 512 px images only)" in capsys.readouterr().err


def test_an_onnx_runtime_error_is_a_message_and_an_exit_code_not_a_traceback(tiny_bundle, tmp_path, capsys, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    import export.cli
    import export.verify

    def verify_onnx(*args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: sample")

    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path)
    monkeypatch.setattr(export.verify, "verify_onnx", verify_onnx)
    assert export.cli.main(["verify", "--bundle", str(copy), "--quiet"]) == 1
    assert "error: ONNX Runtime: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "tensorrt"])
@pytest.mark.parametrize("named_by", ["--config", "--bundle"])
def test_the_export_an_export_command_reads_is_hashed_before_it_reads_it(
    tiny_bundle, tmp_path, capsys, command, named_by
):
    """Serving leaves each export's hash to the runner that loads it; `export verify` and `export tensorrt` read
    the graph and its data by path (the parity check, TensorRT's parser) and record what they read. With the bundle
    named by --config they opened it as a replica does, and so checked and recorded a swapped graph as trusted.
    The bundle's own verify leaves the exports out: each command hashes the one it reads."""
    import yaml

    import export.cli

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # another graph, its recorded size kept: only its sha256 tells
    _edit_manifest(copy, lambda m: m["files"]["exports/unet.fp32.onnx"].update(bytes=onnx.stat().st_size))
    config = tmp_path / "serve.yaml"
    args = {"bundle": {"path": str(copy)}, "imaging": {"buckets": [512]}}
    config.write_text(yaml.safe_dump({"applications": [{"name": "rorem", "import_path": "serve.app:build_app",
                                                        "route_prefix": "/", "args": args}]}))
    bundle_args = ["--config", str(config)] + (["--bundle", str(copy)] if named_by == "--bundle" else [])
    assert export.cli.main([command, *bundle_args, "--dtype", "float32", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "exports/unet.fp32.onnx: sha256 differs from the manifest" in err
    assert "run `python -m export onnx --bundle" in err


@pytest.mark.parametrize("stale", [False, True], ids=["record covers the check", "record to update"])
def test_a_passing_verify_on_a_read_only_bundle_exits_0(tiny_bundle, tmp_path, monkeypatch, capsys, stub_export, stale):
    """`export verify` always rewrote the manifest: on a read-only mount (serving's) a passing check exited 1 with a
    traceback. A record that already says what the check found is left as it is; one to update is reported."""
    import export.cli
    import export.manifest

    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path)
    if stale:
        _edit_manifest(copy, lambda m: m["provenance"]["exports"]["onnx.float32"].update(unet_sha256="0" * 64))
    manifest = (copy / MANIFEST).read_text()
    monkeypatch.setattr(export.manifest, "FileLock", _ReadOnlyLock)
    assert export.cli.main(["verify", "--bundle", str(copy), "--buckets", "512", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("passed; not recorded (bundle not writable: Read-only file system" in err) == stale, err
    assert (copy / MANIFEST).read_text() == manifest and stub_export.verified


def test_a_static_export_is_refused_for_serving_with_the_command_that_makes_a_servable_one(tiny_bundle, tmp_path):
    """`export onnx --static` records a graph of one batch size (2) and one side: served, a batch of 1 failed
    inside ONNX Runtime at the first warm-up, where it is refused by name at start."""
    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path)
    static = {"dynamic": {"batch": None, "latent_side": None, "latent_multiple": 4}}
    _edit_manifest(copy, lambda m: m["provenance"]["exports"]["onnx.float32"].update(metadata=static))
    with pytest.raises(BundleError, match=r"static graph.*python -m export onnx.*without --static"):
        current_export(Bundle.load(copy), "onnx", "float32")
    _edit_manifest(copy, lambda m: m["provenance"]["exports"]["onnx.float32"].update(metadata={}))
    current_export(Bundle.load(copy), "onnx", "float32")


def test_a_graph_replaced_while_it_is_checked_is_not_recorded_as_the_one_that_passed(
    tiny_bundle, tmp_path, stub_export, monkeypatch, capsys
):
    """`export verify` checked the graph by its path, then recorded the sha256 of whatever was there once the
    check (minutes on SDXL) was done: a graph copied in meanwhile was recorded as verified."""
    import export.cli
    import export.verify

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    manifest = (copy / MANIFEST).read_text()
    checking = export.verify.verify_onnx

    def replaced_during_the_check(path, unet, **kwargs):
        report = checking(path, unet, **kwargs)
        onnx.write_bytes(b"another graph, copied in meanwhile")
        return report

    monkeypatch.setattr(export.verify, "verify_onnx", replaced_during_the_check)
    assert export.cli.main(["verify", "--bundle", str(copy), "--quiet"]) == 1
    assert "unet.fp32.onnx changed while it was checked" in capsys.readouterr().err
    assert (copy / MANIFEST).read_text() == manifest


def test_two_builds_writing_one_timing_cache_at_once_both_finish(tmp_path):
    """Plan builds for one architecture share the timing cache's path; each wrote it through the same
    `.partial` name, and the second's rename found the file gone (FileNotFoundError after a finished build)."""
    import threading

    from export.tensorrt_build import _atomic_write

    path, errors = tmp_path / "timing.sm90.cache", []

    def build(n: int) -> None:
        try:
            for _ in range(200):
                _atomic_write(path, bytes([n]) * 4096)
        except Exception as exc:
            errors.append(exc)

    builds = [threading.Thread(target=build, args=(n,)) for n in range(4)]
    for thread in builds:
        thread.start()
    for thread in builds:
        thread.join()
    assert errors == [] and len(set(path.read_bytes())) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left"


@pytest.mark.parametrize("out", [UNET_WEIGHTS, MANIFEST, "exports/unet.fp16.onnx"], ids=["weights", "manifest", "fp16"])
def test_an_onnx_out_over_the_bundles_own_files_is_refused_before_exporting(
    tiny_bundle, tmp_path, capsys, monkeypatch, out
):
    """--out only had to be inside the bundle folder: the graph replaced the UNet weights or manifest.json."""
    import export.cli
    import export.onnx_export

    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path, "float16")
    before = (copy / out).read_bytes()
    monkeypatch.setattr(export.onnx_export, "export_unet_onnx", lambda *a, **k: pytest.fail("exported"))
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(copy / out), "--no-verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy / out}") and len(err.strip().splitlines()) == 1
    assert (copy / out).read_bytes() == before
    Bundle.load(copy, verify=True).load_unet()
    assert current_export(Bundle.load(copy), "onnx", "float16").path == copy / "exports/unet.fp16.onnx"


@pytest.mark.parametrize("flag, out", [("plan", UNET_WEIGHTS), ("plan", MANIFEST), ("timing_cache", MANIFEST)])
def test_a_plan_or_timing_cache_over_the_bundles_own_files_is_refused_before_building(plan_build, flag, out):
    from export.cli import _build_and_record
    from export.progress import QUIET

    plan_build.during = lambda: pytest.fail("the plan was built")
    before = (plan_build.bundle / out).read_bytes()
    args = _build_args(**{flag: str(plan_build.bundle / out)})
    with pytest.raises(ValueError, match="never over the bundle's own files"):
        _build_and_record(args, Bundle.load(plan_build.bundle), plan_build.onnx, "float16", QUIET)
    assert (plan_build.bundle / out).read_bytes() == before
    Bundle.load(plan_build.bundle, verify=True).load_unet()


def test_a_file_of_another_export_is_not_recorded_over_by_record_export(tiny_bundle, tmp_path):
    from export.manifest import record_export

    copy, fp16 = _bundle_with_onnx(tiny_bundle, tmp_path, "float16")
    with pytest.raises(ValueError, match="is a file of the bundle's onnx.float16 export"):
        record_export(copy, "onnx.float32", [fp16], {"kind": "onnx"}, made_from=_unet_sha256(copy))
    assert current_export(Bundle.load(copy, verify=True), "onnx", "float16").path == fp16


@pytest.fixture
def fake_tensorrt(monkeypatch) -> SimpleNamespace:
    """A `tensorrt` module and a GPU stubbed, enough for build_plan: the parser notes the sha256 of the file it
    reads; `during` runs inside the build."""
    import hashlib
    import types

    seen = SimpleNamespace(parsed=None, during=lambda: None)

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            seen.parsed = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return SimpleNamespace(num_layers=1)

        def create_builder_config(self):
            cache = SimpleNamespace(serialize=lambda: b"cache")
            return SimpleNamespace(create_timing_cache=lambda data: cache, set_timing_cache=lambda *a, **k: None,
                                   add_optimization_profile=lambda p: None, get_timing_cache=lambda: cache)  # fmt: skip

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            seen.during()
            return b"a plan"

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "stub"
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, *a: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.NetworkDefinitionCreationFlag = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    return seen


@pytest.mark.parametrize("changed", ["unet.onnx", "unet.onnx.data"])
def test_a_graph_changed_while_its_plan_builds_is_refused_not_recorded_as_the_plans_source(
    fake_tensorrt, tmp_path, changed
):
    """The ONNX was hashed after the build: a graph exported again meanwhile was recorded as the plan's source,
    and serving took the plan built from the old one as built from the new one."""
    from engines.bundle import sha256_of
    from export.tensorrt_build import build_plan

    onnx, plan = tmp_path / "unet.onnx", tmp_path / "unet.plan"
    onnx.write_bytes(b"the graph")
    (tmp_path / "unet.onnx.data").write_bytes(b"its weights")
    info = build_plan(onnx, plan, [])
    assert info.onnx_sha256 == sha256_of(onnx) == fake_tensorrt.parsed
    plan.unlink()

    fake_tensorrt.during = lambda: (tmp_path / changed).write_bytes(b"exported again")
    with pytest.raises(RuntimeError, match="unet.onnx \\(or its external data\\) changed while the plan was built"):
        build_plan(onnx, plan, [])
    assert not plan.exists()


def test_a_file_that_is_not_onnx_is_a_one_line_error_naming_it(tiny_bundle, tmp_path, capsys):
    """protobuf's DecodeError came out as a traceback naming no file."""
    import export.cli

    graph = tmp_path / "notonnx.onnx"
    graph.write_text("not a graph")
    assert export.cli.main(["verify", "--bundle", str(tiny_bundle.path), "--onnx", str(graph), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {graph} is not an ONNX model (") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["verify", "tensorrt"])
@pytest.mark.parametrize("content", [b"", b"\x08\x07"], ids=["empty", "another protobuf"])
def test_an_onnx_that_is_no_exported_unet_is_a_one_line_error_naming_it(
    tiny_bundle, tmp_path, capsys, command, content
):
    """An empty file (or any message protobuf parses) ended in a bare StopIteration or KeyError traceback."""
    import export.cli

    graph = tmp_path / "empty.onnx"
    graph.write_bytes(content)
    plan_args = ["--buckets", "512", "--max-batch-size", "1"]
    bundle_args = ["--bundle", str(tiny_bundle.path)] if command == "verify" else plan_args
    assert export.cli.main([command, *bundle_args, "--onnx", str(graph), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {graph} is not an exported UNet: inputs []") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "code, advice", [(errno.ENOSPC, "free space there"), (errno.EROFS, "where the bundle is writable")],
    ids=["full", "read-only"],
)
def test_an_os_error_is_a_one_line_error_saying_what_to_do(tiny_bundle, tmp_path, capsys, monkeypatch, code, advice):
    """A full disk or a read-only mount ended the export in a traceback."""
    import os

    import export.cli
    import export.onnx_export

    def export_unet_onnx(bundle, out_path, **_):
        raise OSError(code, os.strerror(code), str(out_path))

    monkeypatch.setattr(export.onnx_export, "export_unet_onnx", export_unet_onnx)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {os.strerror(code)}: {copy}/exports/") and advice in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def immutable():
    """chattr +i on folders (a mode bit stops no write as root, this does), undone on the way out."""
    import contextlib

    made = []

    def make(folder: Path) -> Path:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here")
        made.append(folder)
        return folder

    yield make
    for folder in made:
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_export_into_a_bundle_it_cannot_write_is_refused_before_exporting(
    tiny_bundle, tmp_path, capsys, stub_export, immutable
):
    """A bundle folder that could not be written ran the whole export and its parity check (~40 s tiny, minutes on
    SDXL) and failed only at the end, writing manifest.json.partial. An --out elsewhere needs only its own folder."""
    import export.cli

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    graph = onnx.read_bytes()
    immutable(copy)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Operation not permitted: {copy / MANIFEST}.partial (") and len(err.splitlines()) == 1
    assert stub_export.verified == [] and onnx.read_bytes() == graph, "refused before exporting"

    elsewhere = tmp_path / "elsewhere" / "unet.onnx"
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(elsewhere), "--quiet"]) == 0
    assert elsewhere.read_bytes() == b"a new graph" and onnx.read_bytes() == graph  # written, not recorded
    locked = immutable(tmp_path / "elsewhere")
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(locked / "other.onnx"), "--quiet"]) == 1
    assert capsys.readouterr().err.startswith(f"error: Operation not permitted: {locked / 'other.onnx'} (")
    assert len(stub_export.verified) == 1, "the export elsewhere only"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--tiny", "--cases", "1x32"], "argument --cases: '1x32': BATCHxLATENT_HxLATENT_W, comma-separated"),
        (["onnx", "--tiny", "--buckets", "abc"], "argument --buckets: 'abc': image sides in pixels, comma-separated"),
        (["tensorrt", "--tiny", "--buckets", "512,"], "argument --buckets: '512,': image sides in pixels"),
        (["onnx", "--tiny", "--buckets", "500"], "argument --buckets: '500': bucket sides must be positive multiples"),
        (["verify", "--tiny", "--buckets", "512,100"], "argument --buckets: '512,100': bucket sides must be positive"),
        (["tensorrt", "--tiny", "--buckets", "0"], "argument --buckets: '0': bucket sides must be positive multiples"),
        (["bench", "--tiny", "--side", "500"], "argument --side: '500': bucket sides must be positive multiples of 64"),
        (["bench", "--tiny", "--side", "512,1024"], "argument --side: '512,1024': one image side in pixels"),
        (["bench", "--tiny", "--runs", "0"], "argument --runs: '0': an integer from 1 to 1000"),
        (["bench", "--tiny", "--batch", "0"], "argument --batch: '0': an integer from 1 to 63"),
        (["onnx", "--tiny", "--max-batch", "0"], "argument --max-batch: '0': an integer from 1 to 63"),
        (["onnx", "--tiny", "--max-batch", "64"], "argument --max-batch: '64': an integer from 1 to 63"),
        (["onnx", "--tiny", "--opset", "0"], "argument --opset: '0': an integer from 18 to 23"),
        (["tensorrt", "--tiny", "--max-batch-size", "0"], "argument --max-batch-size: '0': an integer from 1 to 63"),
        (["verify", "--tiny", "--cases", "1x30x30"], "'1x30x30': latent sides must be multiples of 4 (image sides"),
        (["bench", "--tiny", "--runners", "torch,trt"], "'torch,trt': comma-separated, of torch, onnx, tensorrt"),
    ],
)
def test_malformed_or_out_of_range_numbers_are_refused_by_the_parser(capsys, argv, message):
    """--max-batch 0 and --opset 0 were replaced by the defaults unsaid; --cases 1x32 said "not enough values to
    unpack" and --buckets abc "invalid literal for int()"; --buckets 500 ran the whole export, then failed inside
    ONNX Runtime, and verify --buckets 100 recorded a check at 96 px (sides: serve.config's bucket rule); --cases
    1x30x30 was ONNX Runtime's Resize error, and --runners torch,trt failed after the torch runner's bench (a
    trial)."""
    import export.cli

    with pytest.raises(SystemExit) as exited:
        export.cli.main([*argv, "--quiet"])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_onnx_command_passes_the_opset_and_max_batch_it_is_given(tiny_bundle, tmp_path, monkeypatch, stub_export):
    import export.cli
    import export.onnx_export

    asked = {}
    exporter = export.onnx_export.export_unet_onnx
    monkeypatch.setattr(
        export.onnx_export, "export_unet_onnx", lambda bundle, out, **kw: asked.update(kw) or exporter(bundle, out)
    )
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--opset", "20", "--max-batch", "63", "--quiet"]) == 0
    assert asked["opset"] == 20 and asked["max_batch"] == 63
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 0
    assert asked["opset"] == 18 and asked["max_batch"] == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_a_cuda_device_the_machine_lacks_says_so_before_opening_the_bundle(tmp_path, capsys):
    """torch's AssertionError "Torch not compiled with CUDA enabled" came out as a traceback at the first runner."""
    import export.cli

    assert export.cli.main(["bench", "--bundle", str(tmp_path / "missing"), "--device", "cuda", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --device cuda: this machine has 0 CUDA device(s); use --device cpu or auto\n"


# -------------------------------------------------------------------------------------------
# Two exports of one bundle at once, an exports/ outside it, a crash after an export (the export stubbed)

AT_768 = {**PASSED_REPORT, "cases": [*PASSED_REPORT["cases"], {"batch": 1, "latent": [96, 96]}]}


def test_an_export_that_would_drop_a_side_recorded_while_it_ran_is_refused(
    tiny_bundle, tmp_path, onnx_opened, stub_export, monkeypatch, capsys
):
    """`export onnx --buckets 768` recorded, then a plain `export onnx` started before it recorded its own record
    checked at 256/512 only over it, and a service with bucket 768 was refused at its next start."""
    import export.cli
    import export.verify

    copy, onnx = _bundle_with_onnx(tiny_bundle, tmp_path)
    checking = export.verify.verify_onnx

    def another_export_records_768_meanwhile(path, unet, **kwargs):
        if not stub_export.verified:
            _record_dummy_onnx(copy, verify=AT_768)
        return checking(path, unet, **kwargs)

    monkeypatch.setattr(export.verify, "verify_onnx", another_export_records_768_meanwhile)
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 1
    assert "run it again with --buckets 256,512,768" in capsys.readouterr().err
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[768])
    assert export.cli.main(["onnx", "--bundle", str(copy), "--quiet"]) == 0
    assert (1, 96, 96) in stub_export.cases[-1] and onnx.read_bytes() == b"a new graph"
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[768])


@pytest.mark.parametrize("command", ["onnx", "verify"])
def test_export_and_verify_wait_for_an_export_of_their_dtype_and_check_what_it_recorded(
    tiny_bundle, tmp_path, onnx_opened, stub_export, command
):
    """The CLI took no export lock: a plain `export onnx` or `verify` started during another export read the record
    before that one replaced it, and checked (and recorded) too few sides."""
    import threading
    import time

    import export.cli
    from filelock import FileLock

    copy, _ = _bundle_with_onnx(tiny_bundle, tmp_path)
    exit_codes = []
    with FileLock(str(copy.with_name(copy.name + ".export-onnx-float32.lock"))):  # an export of float32 running
        waiting = threading.Thread(target=lambda: exit_codes.append(export.cli.main([command, "--bundle", str(copy)])))
        waiting.start()
        time.sleep(1.0)
        assert not stub_export.verified, f"`{command}` ran during the other export"
        _record_dummy_onnx(copy, verify=AT_768)  # what the other export recorded
    waiting.join(timeout=60)
    assert exit_codes == [0] and (1, 96, 96) in stub_export.cases[-1]
    RemovalEngine.from_bundle(Bundle.load(copy, verify=True), runner="onnx", buckets=[512, 768])


def test_an_exports_folder_linked_out_of_the_bundle_is_refused_and_an_out_outside_it_says_not_recorded(
    tiny_bundle, tmp_path, stub_export, capsys
):
    """With exports/ a symlink out of the bundle, `export onnx` printed a passing result, exited 0 and recorded
    nothing (serving then refused the bundle); an --out outside the bundle did not say it was not recorded."""
    import export.cli

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    manifest, elsewhere = (copy / MANIFEST).read_text(), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (copy / "exports").symlink_to(elsewhere)
    assert export.cli.main(["onnx", "--bundle", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"{copy / 'exports'} is a symlink to {elsewhere}, outside the bundle folder" in err, err
    assert (copy / MANIFEST).read_text() == manifest and not stub_export.verified and not any(elsewhere.iterdir())

    (copy / "exports").unlink()
    out = tmp_path / "mine" / "unet.onnx"
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(out)]) == 0
    assert f"{out}: written, not recorded: outside the bundle folder" in capsys.readouterr().out
    assert out.read_bytes() == b"a new graph" and (copy / MANIFEST).read_text() == manifest


def test_an_out_outside_the_bundle_deletes_no_weights_file_but_its_own_graphs_and_a_folder_is_refused_at_once(
    tiny_bundle, tmp_path, stub_export, capsys
):
    """`--out elsewhere/unet.onnx` deleted a `unet.onnx.data` there that no graph of its had written (a trial); one
    beside the graph it replaces is that graph's stale weights and goes. An --out naming a folder ran the whole export
    (minutes on SDXL), then failed naming the staging folder (a trial)."""
    import export.cli

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "unet.onnx.data").write_bytes(b"someone's weights")
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(mine / "unet.onnx"), "--quiet"]) == 0
    assert (mine / "unet.onnx.data").read_bytes() == b"someone's weights"
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(mine / "unet.onnx"), "--quiet"]) == 0
    assert not (mine / "unet.onnx.data").exists(), "the replaced graph's weights, stale beside the new graph"
    capsys.readouterr()
    assert export.cli.main(["onnx", "--bundle", str(copy), "--out", str(mine), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Is a folder, not a file to write (name the file in it): {mine}"), err
    assert len(stub_export.verified) == 2, "refused before exporting"


def test_an_export_is_on_disk_before_the_manifest_that_records_it(tiny_bundle, tmp_path, stub_export, monkeypatch):
    """Nothing was fsynced: on XFS, or ext4 without auto_da_alloc, a node crash soon after an export could leave an
    empty manifest.json (or graph, or plan) under the final name; each is flushed before its rename, and the folder
    after it."""
    import os

    from export.manifest import export_and_record_onnx
    from export.tensorrt_build import _atomic_write

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    events, fsync, replace = [], os.fsync, os.replace

    def noted_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def noted_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", noted_fsync)
    monkeypatch.setattr(os, "replace", noted_replace)

    export_and_record_onnx(Bundle.load(copy), "float32")
    exports, graph = str(copy / "exports"), str(copy / "exports" / "unet.fp32.onnx")
    renamed = {dst: (i, src) for i, (what, *paths) in enumerate(events) if what == "replace" for src, dst in [paths]}
    synced = {path: i for i, (what, *paths) in enumerate(events) if what == "fsync" for path in paths}
    for final in (graph, str(copy / MANIFEST)):
        at, source = renamed[final]
        assert synced.get(source, len(events)) < at, f"{final} renamed into place before its bytes were flushed"
    manifest_renamed = renamed[str(copy / MANIFEST)][0]
    assert renamed[graph][0] < synced.get(exports, -1) < manifest_renamed, "the graph's rename not flushed first"
    assert synced.get(str(copy), -1) > manifest_renamed, "the manifest's rename not flushed"

    events.clear()
    _atomic_write(tmp_path / "unet.sm90.plan", b"plan")
    (_, tmp), (_, src, dst), (_, folder) = events
    assert tmp == src and dst == str(tmp_path / "unet.sm90.plan") and folder == str(tmp_path)


def test_a_bundle_reached_through_a_symlink_takes_the_same_locks_as_its_folder(tmp_path):
    """The locks sat beside the path as given: /models/current (a symlink) and the folder it names were two
    bundles to them, so an export through each could record at once."""
    from filelock import Timeout

    from export.manifest import export_lock, manifest_lock

    folder = tmp_path / "releases" / "b1"
    folder.mkdir(parents=True)
    (tmp_path / "current").symlink_to(folder)
    with manifest_lock(tmp_path / "current"):
        with pytest.raises(Timeout):
            manifest_lock(folder).acquire(timeout=0.1)
    with export_lock(tmp_path / "current", "float32"):
        assert (tmp_path / "releases" / "b1.export-onnx-float32.lock").exists()
        assert not (tmp_path / "current.export-onnx-float32.lock").exists()
