"""The whole service on CPU with the UNet running as an exported ONNX graph (ONNX Runtime)."""

import numpy as np
import pytest

from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import photo, png_bytes, running_service, serve_test_config
from tests.helpers import post_remove as _remove

pytest.importorskip("onnxruntime", reason="the export extra installs onnxruntime")


@pytest.fixture(scope="module")
def onnx_service(starts_serve, tmp_path_factory):
    """Remover only (gate off, no Scorer), engine.runner onnx, exported into the bundle at start."""
    work = tmp_path_factory.mktemp("serve-onnx")
    config = serve_test_config(work)
    app = config["applications"][0]
    app["args"].setdefault("engine", {}).update({"runner": "onnx", "export_missing": True})
    app["args"]["scorer"] = {"enabled": False}
    app["args"]["gate"] = {"mode": "off"}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Scorer"]
    with running_service(work, config) as running:
        yield running


def test_onnx_runner_serves_remove_end_to_end(onnx_service, service):
    ready = onnx_service.client.get("/readyz").json()
    assert ready["model"]["runner"] == "onnx" and ready["scorer"] is None

    source, mask = photo(), _mask()
    response = _remove(onnx_service, png_bytes(source), png_bytes(mask), dilate=0, seed=4)
    assert response.status_code == 200, response.text
    result = _decode(response.content)
    outside = mask == 0
    assert np.array_equal(result[outside], source[outside])
    assert np.abs(result[~outside].astype(int) - source[~outside]).mean() > 5, "the masked region was regenerated"

    torch_result = _decode(_remove(service, png_bytes(source), png_bytes(mask), dilate=0, seed=4, gate="off").content)
    diff = np.abs(result.astype(int) - torch_result.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.1, "ONNX Runtime and PyTorch give the same removal"


def test_a_gate_without_a_scorer_is_refused_per_request(onnx_service):
    response = _remove(onnx_service, png_bytes(photo()), png_bytes(_mask()), gate="retry")
    assert response.status_code == 422 and response.json()["type"].endswith("/gate-unavailable")
