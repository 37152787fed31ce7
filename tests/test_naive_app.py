"""loadtests/naive_app.py, the baseline of loadtests/bench_vs_naive.py: the weights the service imports, on the
device the service would use."""

import sys

import pytest
import torch

from tests.helpers import load_script


@pytest.fixture
def load_naive_app(tiny_layout, monkeypatch):
    """Imports the app afresh (it loads its pipeline at import) on the tiny authors' layout."""
    for name, value in (("BASE", tiny_layout.base), ("UNET", tiny_layout.unet), ("LCM_LORA", tiny_layout.lcm_lora)):
        monkeypatch.setenv(f"ROREM_NAIVE_{name}", value)

    def load():
        monkeypatch.delitem(sys.modules, "naive_app", raising=False)
        return load_script("loadtests/naive_app.py")

    return load


def test_the_baseline_serves_the_unet_the_service_imports(load_naive_app, tiny_bundle):
    """diffusers' load_lora_weights + fuse_lora left the attention half of the authors' LCM LoRA out (56 weights
    of the tiny UNet unchanged): the baseline served another model than the service."""
    naive = load_naive_app()
    served = naive.pipe.unet.state_dict()
    imported = tiny_bundle.load_unet().state_dict()
    assert served.keys() == imported.keys()
    differing = [key for key in served if not torch.equal(served[key], imported[key])]
    assert differing == [], f"{len(differing)} of {len(served)} UNet weights differ from the imported bundle's"


def test_on_a_gpu_the_baseline_runs_there_in_bf16(load_naive_app, monkeypatch):
    """It never left the CPU: a GPU benchmark compared the service with an fp32 CPU baseline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "to", lambda pipe, *args: moved.append(args) or pipe)
    load_naive_app()
    assert moved == [("cuda", torch.bfloat16)]
