"""Train every stage a few steps on synthetic data, assemble a bundle, and serve it with the local Serve, the UNet
run as an ONNX graph the Remover exports at start (ONNX Runtime): the chain a release goes through, in one Serve."""


import asyncio

import numpy as np

from tests.helpers import photo, png_bytes
from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import post_remove as _remove


# `trained_onnx_service` and `trained_bundle`: the session's trained application and its bundle (tests/conftest.py,
# helpers.Trained)


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
