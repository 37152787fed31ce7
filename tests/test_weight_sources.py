"""Where the published pieces are looked for (engines.authors_layout.locate), on the tiny layout:
the RORem pipeline as base, Drive pieces as local folders, the head as .pt or .safetensors, and one
clear error naming every missing file and where it was looked for, before anything is downloaded."""

import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from engines import authors_layout
from engines.authors_layout import (
    DRIVE_FOLDERS,
    LORA_FILENAME,
    SDXL_INPAINTING_UNET,
    AuthorsLayout,
    import_authors_layout,
    locate,
)
from engines.bundle import DISCRIMINATOR_WEIGHTS, UNET_WEIGHTS, BundleError
from engines.scorer import HEAD_FILENAME, DiscriminatorError, find_head_file, read_head_file
from serve.config import AuthorsSource


@pytest.fixture(scope="module")
def rorem_pipeline(tiny_layout, tmp_path_factory):
    """The tiny pieces as LetsThink/RORem and a mirror publish them: a pipeline whose unet/ is RORem's,
    the LoRA as a folder, and a discriminator folder whose head is converted to safetensors."""
    root = tmp_path_factory.mktemp("published")
    shutil.copytree(tiny_layout.base, root / "RORem", ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(tiny_layout.unet, root / "RORem" / "unet")
    shutil.copytree(Path(tiny_layout.lcm_lora).parent, root / "RORem-LCM")
    disc = root / "RORem-Discriminator"
    disc.mkdir()
    shutil.copy(Path(tiny_layout.discriminator) / LORA_FILENAME, disc)
    head = torch.load(Path(tiny_layout.discriminator) / HEAD_FILENAME, weights_only=True)
    save_file(head, disc / "cls_pred_branch.safetensors")
    return root


def test_the_head_reads_the_same_from_pt_and_safetensors(tiny_layout, rorem_pipeline):
    pt = read_head_file(Path(tiny_layout.discriminator) / HEAD_FILENAME, channels=64)
    converted = find_head_file(rorem_pipeline / "RORem-Discriminator")
    assert converted.name == "cls_pred_branch.safetensors"
    st = read_head_file(converted, channels=64)
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    assert find_head_file(tiny_layout.discriminator).name == HEAD_FILENAME


def test_a_broken_safetensors_head_is_refused_clearly(tmp_path):
    bad = tmp_path / "cls_pred_branch.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DiscriminatorError, match="not a plain tensor dict that safetensors accepts"):
        read_head_file(bad, channels=64)


def test_the_rorem_pipeline_as_base_imports_the_same_bundle(tiny_layout, tiny_bundle, rorem_pipeline, tmp_path):
    layout = AuthorsLayout(
        base=str(rorem_pipeline / "RORem"),  # no `unet`: base's unet/ is RORem's
        lcm_lora=str(rorem_pipeline / "RORem-LCM"),
        discriminator=str(rorem_pipeline / "RORem-Discriminator"),
        discriminator_unet=tiny_layout.base,  # a pipeline folder: its unet/ is the SDXL-inpainting UNet
    )
    found = locate(layout)
    assert found.unet == rorem_pipeline / "RORem" / "unet"
    assert found.discriminator_unet == Path(tiny_layout.base) / "unet"
    bundle = import_authors_layout(layout, tmp_path / "bundle", dtype="float32", name="tiny")
    for name in (UNET_WEIGHTS, DISCRIMINATOR_WEIGHTS):
        ours, reference = load_file(bundle.path / name), load_file(tiny_bundle.path / name)
        assert ours.keys() == reference.keys(), name
        assert all(torch.equal(ours[k], reference[k]) for k in ours), f"{name} differs from the authors' layout"
    assert bundle.manifest.provenance["discriminator"]["head"] == "cls_pred_branch.safetensors"
    assert bundle.manifest.provenance["source"]["unet"] is None


def test_the_discriminator_is_not_built_on_rorem_s_unet(tiny_layout, rorem_pipeline, monkeypatch):
    monkeypatch.setattr(authors_layout, "fetch", _no_download)
    layout = AuthorsLayout(
        base=str(rorem_pipeline / "RORem"), discriminator=str(rorem_pipeline / "RORem-Discriminator")
    )
    with pytest.raises(BundleError, match=f"discriminator_unet is not set.*{SDXL_INPAINTING_UNET}"):
        locate(layout)


def _no_download(ref):
    raise AssertionError(f"fetched {ref} although a local piece is missing")


def test_missing_local_pieces_are_all_named_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_layout, "fetch", _no_download)
    (tmp_path / "RORem-Discriminator").mkdir()
    layout = AuthorsLayout(
        base="hf:LetsThink/RORem",
        lcm_lora=str(tmp_path / "RORem-LCM"),  # not copied at all
        discriminator=str(tmp_path / "RORem-Discriminator"),  # an empty folder
        discriminator_unet=SDXL_INPAINTING_UNET,
    )
    with pytest.raises(BundleError) as raised:
        locate(layout)
    message = str(raised.value)
    assert "nothing was downloaded" in message
    for expected in (
        tmp_path / "RORem-LCM" / LORA_FILENAME,
        tmp_path / "RORem-Discriminator" / LORA_FILENAME,
        tmp_path / "RORem-Discriminator" / "cls_pred_branch.safetensors",
        tmp_path / "RORem-Discriminator" / "cls_pred_branch.pt",
    ):
        assert str(expected) in message, f"{expected} is not named in:\n{message}"
    for field in ("lcm_lora", "discriminator"):
        assert DRIVE_FOLDERS[field][1] in message, f"where to download {field} is not said"
    assert len(message.splitlines()) == 1 + 3, "one line per missing file"


def test_a_download_one_folder_too_deep_is_pointed_at(tiny_layout, tmp_path, monkeypatch):
    monkeypatch.setattr(authors_layout, "fetch", _no_download)
    shutil.copytree(tiny_layout.discriminator, tmp_path / "RORem-Discriminator" / "final_unet")
    layout = AuthorsLayout(
        base=tiny_layout.base, unet=tiny_layout.unet, discriminator=str(tmp_path / "RORem-Discriminator")
    )
    deeper = tmp_path / "RORem-Discriminator" / "final_unet" / LORA_FILENAME
    with pytest.raises(BundleError, match=f"found {deeper}: point discriminator at its folder"):
        locate(layout)


def test_a_base_that_lacks_unet_is_refused_when_its_unet_is_needed(tiny_layout, rorem_pipeline, tmp_path):
    shutil.copytree(rorem_pipeline / "RORem", tmp_path / "base", ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(
        BundleError, match=r"not an SDXL-inpainting pipeline folder: unet/ not found; looked for .*unet"
    ):
        locate(AuthorsLayout(base=str(tmp_path / "base")))
    assert locate(AuthorsLayout(base=str(tmp_path / "base"), unet=tiny_layout.unet)).unet == Path(tiny_layout.unet)


def test_the_serve_config_takes_unet_from_base_only_when_base_is_named():
    lora = "/models/authors/RORem-LCM"
    with pytest.raises(ValidationError, match="set unet, or set base to the RORem pipeline"):
        AuthorsSource(lcm_lora=lora)
    layout = AuthorsSource(base="hf:LetsThink/RORem", lcm_lora=lora, discriminator_unet=SDXL_INPAINTING_UNET).layout()
    assert layout.unet is None and layout.discriminator_unet == SDXL_INPAINTING_UNET
    assert AuthorsSource(unet="/models/RORem/unet", lcm_lora=lora).layout().base.startswith("hf:diffusers/")


def test_the_serve_config_requires_the_lcm_lora():
    with pytest.raises(ValidationError, match=r"lcm_lora\n  Field required"):
        AuthorsSource(base="hf:LetsThink/RORem")


def test_describe_keeps_the_cache_keys_of_older_layouts():
    old = AuthorsLayout(base="b", unet="u", lcm_lora="l", discriminator="d")
    assert old.describe() == {"base": "b", "unet": "u", "lcm_lora": "l", "discriminator": "d"}
    assert AuthorsLayout(base="b", discriminator="d", discriminator_unet="s").describe()["discriminator_unet"] == "s"
