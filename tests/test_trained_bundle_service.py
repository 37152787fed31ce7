"""Train every stage a few steps on synthetic data, assemble a bundle, and serve it with the local Serve, the UNet
run as an ONNX graph the Remover exports at start (ONNX Runtime): the chain a release goes through, in one Serve."""

import json
import subprocess
import sys

import asyncio

import numpy as np
import pytest

from tests.helpers import REPO, photo, png_bytes, running_service, serve_test_config, without_retention
from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import post_remove as _remove


# The stages run one after another in one Python process, as a script calling `python -m training`'s main
# would: the model libraries are imported once (about 4 s a process here), not five times.
_STAGES_IN_ONE_PROCESS = """
import json, sys
from training.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"training {argv[0]} exited with {code}")
"""


def _training(*stages: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _STAGES_IN_ONE_PROCESS, json.dumps(stages)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    cache, data = str(work / "cache"), work / "data"
    common = ["--base", "tiny", "--cache-dir", cache]
    _training(
        ["synthetic", "--out", str(data), "--n", "4", "--size", "64", "--kinds", "blur,no-change"],
        ["finetune", *common, "--data", str(data / "metadata.json"), "--out", str(work / "ft"),
         "--resolution", "64", "--steps", "2", "--batch-size", "2"],
        ["distill", *common, "--unet", str(work / "ft"), "--data", str(data / "metadata.json"),
         "--out", str(work / "distill"), "--resolution", "64", "--steps", "2", "--batch-size", "2", "--lora-rank", "4"],
        ["discriminator", *common, "--data", str(data / "discriminator" / "metadata.json"),
         "--out", str(work / "disc"), "--resolution", "512", "--steps", "2", "--batch-size", "2"],
        ["bundle", *common, "--unet", str(work / "ft"), "--lcm-lora", str(work / "distill"),
         "--discriminator", str(work / "disc"), "--out", str(work / "bundle"), "--dtype", "float32"],
    )  # fmt: skip
    return work / "bundle"


@pytest.fixture(scope="module")
def trained_onnx_service(starts_serve, tmp_path_factory, trained_bundle):
    """The trained bundle with its Scorer (no result retention); engine.runner onnx, its UNet exported into the bundle at
    start."""
    work = tmp_path_factory.mktemp("serve-trained")
    config = without_retention(serve_test_config(work))
    args = config["applications"][0]["args"]
    args["bundle"]["path"] = str(trained_bundle)
    args.setdefault("engine", {}).update({"runner": "onnx", "export_missing": True})
    with running_service(work, config) as service:
        yield service


def test_the_assembled_bundle_is_served_by_the_onnx_graph_exported_at_start(trained_onnx_service, trained_bundle):
    ready = trained_onnx_service.client.get("/readyz").json()
    assert ready["model"]["tiny"] is False and ready["model"]["bundle"]["name"] == "rorem-4s-trained"
    assert ready["model"]["runner"] == "onnx" and (trained_bundle / "exports" / "unet.fp32.onnx").is_file()
    source, mask = photo(), _mask()
    response = _remove(trained_onnx_service, png_bytes(source), png_bytes(mask), dilate=0, seed=1, gate="annotate")
    assert response.status_code == 200, response.text
    assert float(response.headers["x-removal-score"]) >= 0
    result = _decode(response.content)
    outside = mask == 0
    assert np.array_equal(result[outside], source[outside])
    assert np.abs(result[~outside].astype(int) - source[~outside]).mean() > 5, "the masked region was regenerated"


def test_onnx_runtime_serves_what_pytorch_computes_from_the_same_bundle(trained_onnx_service, trained_bundle):
    """The served ONNX graph against the bundle's PyTorch UNet, through the service's own pipeline in this process."""
    from engines.bundle import Bundle
    from engines.gate import GatePolicy
    from engines.imaging import DecodeLimits
    from engines.pipeline import CropSettings, LocalModels, RemovalPipeline
    from engines.remover import RemovalEngine
    from serve.config import ImagingSettings

    source, mask = photo(), _mask()
    response = _remove(trained_onnx_service, png_bytes(source), png_bytes(mask), dilate=0, seed=4, gate="off")
    assert response.status_code == 200, response.text
    served = _decode(response.content)

    engine = RemovalEngine.from_bundle(Bundle.load(trained_bundle, verify=False), runner="torch")
    imaging = ImagingSettings.model_validate(trained_onnx_service.config["imaging"])
    pipeline = RemovalPipeline(LocalModels(engine), CropSettings.from_imaging(imaging), DecodeLimits())
    prepared = pipeline.prepare(png_bytes(source), png_bytes(mask), dilate=0)
    gated = asyncio.run(pipeline(prepared, 4, GatePolicy("off", 0.5, 1, fail_open=False)))
    in_process = gated.result.edited
    diff = np.abs(served.astype(int) - in_process.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.1, "ONNX Runtime and PyTorch give the same removal"
