"""Where the published pieces are looked for (engines.authors_layout.locate), on the tiny layout:
the RORem pipeline as base, Drive pieces as local folders, the head as .pt or .safetensors, and one
clear error naming every missing file and where it was looked for, before anything is downloaded.
Hub pieces are imported at a commit, on a stand-in for huggingface_hub.snapshot_download."""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engines import authors_layout
from engines.authors_layout import (
    DRIVE_FOLDERS,
    LORA_FILENAME,
    AuthorsLayout,
    fetch,
    import_authors_layout,
    locate,
    refuse_unpinned,
    verify_sha256_lists,
)
from engines.bundle import DISCRIMINATOR_WEIGHTS, UNET_WEIGHTS, BundleError, sha256_of
from engines.hub_refs import SDXL_INPAINTING_UNET, HubRef
from engines.scorer import HEAD_FILENAME, DiscriminatorError, find_head_file, read_head_file
from engines.sources import open_bundle
from serve.config import AuthorsSource

REPO = Path(__file__).resolve().parent.parent
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


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


@pytest.mark.parametrize("unet", [None, "RORem-mixed"], ids=["base-unet", "separate-unet"])
def test_the_discriminator_is_not_built_on_rorem_s_unet(tiny_layout, rorem_pipeline, tmp_path, monkeypatch, unet):
    """LetsThink/RORem as base with a RORem(-mixed) UNet beside it: base's unet/ is RORem's too, and the
    discriminator was built on it without a word (144 of 158 of its tensors wrong)."""
    monkeypatch.setattr(authors_layout, "fetch", _no_download)
    if unet:
        shutil.copytree(tiny_layout.unet, tmp_path / unet)
    layout = AuthorsLayout(
        base=str(rorem_pipeline / "RORem"),
        unet=str(tmp_path / unet) if unet else None,
        lcm_lora=str(rorem_pipeline / "RORem-LCM"),
        discriminator=str(rorem_pipeline / "RORem-Discriminator"),
    )
    with pytest.raises(BundleError, match=f"discriminator_unet is not set.*{SDXL_INPAINTING_UNET}"):
        import_authors_layout(layout, tmp_path / "bundle", dtype="float32")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("trunk", ["the RORem pipeline", "a copy of the RORem UNet", "a copy of the hub's RORem UNet"])
def test_a_discriminator_unet_with_the_rorem_unet_s_weights_is_refused(rorem_pipeline, tmp_path, monkeypatch, trunk):
    base = str(rorem_pipeline / "RORem")
    if trunk == "the RORem pipeline":
        discriminator_unet = rorem_pipeline / "RORem"  # its unet/ is base's, RORem's
    else:
        discriminator_unet = shutil.copytree(rorem_pipeline / "RORem" / "unet", tmp_path / "sdxl-unet")
    if trunk == "a copy of the hub's RORem UNet":
        base = f"hf:LetsThink/RORem@{COMMIT_A}"
        snapshot = _hub_cache_snapshot(rorem_pipeline / "RORem", tmp_path / "hub")
        monkeypatch.setattr(authors_layout, "fetch", lambda ref, *_: snapshot if ref == base else _no_download(ref))
    layout = AuthorsLayout(
        base=base,
        lcm_lora=str(rorem_pipeline / "RORem-LCM"),
        discriminator=str(rorem_pipeline / "RORem-Discriminator"),
        discriminator_unet=str(discriminator_unet),
    )
    with pytest.raises(BundleError, match=r"discriminator_unet \(\S+\) holds the weights of the RORem UNet"):
        import_authors_layout(layout, tmp_path / "bundle", dtype="float32")
    assert not (tmp_path / "bundle").exists()


def _hub_cache_snapshot(pipeline: Path, cache: Path) -> Path:
    """The pipeline as huggingface_hub's cache holds it: snapshots/COMMIT/PATH links to blobs/, each blob named by
    its file's sha256 (as an LFS file's is)."""
    snapshot = cache / "snapshots" / COMMIT_A
    for file in (f for f in pipeline.rglob("*") if f.is_file()):
        blob = cache / "blobs" / sha256_of(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(pipeline)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return snapshot


def test_the_sdxl_inpainting_pipeline_on_the_hub_as_base_gives_the_discriminator_its_unet(tiny_layout, monkeypatch):
    """The authors' scripts' layout: base = the SDXL-inpainting pipeline, whose unet/ the discriminator needs."""
    sdxl = f"hf:{HubRef.parse(SDXL_INPAINTING_UNET).repo_id}@{COMMIT_A}"
    monkeypatch.setattr(
        authors_layout, "fetch", lambda ref, *_: Path(tiny_layout.base) if ref == sdxl else _no_download(ref)
    )
    layout = AuthorsLayout(
        base=sdxl, unet=tiny_layout.unet, lcm_lora=tiny_layout.lcm_lora, discriminator=tiny_layout.discriminator
    )
    assert locate(layout).discriminator_unet == Path(tiny_layout.base) / "unet"


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


def _sha256sum(folder: Path) -> str:
    """What `cd folder && sha256sum *` prints."""
    return "".join(f"{sha256_of(file)}  {file.name}\n" for file in sorted(folder.iterdir()) if file.is_file())


def test_the_copied_pieces_are_checked_against_their_sha256_lists_before_the_import(rorem_pipeline, tmp_path):
    """Google Drive publishes no checksum: a different or damaged copy of the LoRA or the discriminator was imported
    as found. With the sums given (ROREM_*_SHA256 of the weights Job), each file read must be listed and match."""
    lcm, disc = tmp_path / "RORem-LCM", tmp_path / "RORem-Discriminator"
    shutil.copytree(rorem_pipeline / "RORem-LCM", lcm)
    shutil.copytree(rorem_pipeline / "RORem-Discriminator", disc)
    layout = AuthorsLayout(base="hf:LetsThink/RORem@" + COMMIT_A, lcm_lora=str(lcm), discriminator=str(disc))
    sums = {"lcm_lora": _sha256sum(lcm), "discriminator": _sha256sum(disc).replace("  ", " *", 1)}
    verify_sha256_lists(layout, sums)  # as `sha256sum` prints them (text or binary mode): no error, no download
    verify_sha256_lists(layout, {"lcm_lora": "", "discriminator": "  "})  # not given: not checked
    head = disc / "cls_pred_branch.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"x")  # a damaged copy
    with pytest.raises(BundleError) as raised:
        verify_sha256_lists(layout, sums)
    message = str(raised.value)
    assert f"discriminator: {head} has sha256 {sha256_of(head)}" in message and "lcm_lora" not in message
    with pytest.raises(BundleError, match=f"{disc / LORA_FILENAME} has no sha256 in the list"):
        head_line = next(line for line in _sha256sum(disc).splitlines() if line.endswith(head.name))
        verify_sha256_lists(layout, {"discriminator": head_line})  # the LoRA not listed
    with pytest.raises(BundleError, match="cls_pred_branch.pt is listed, but"):
        verify_sha256_lists(layout, {"discriminator": _sha256sum(disc) + f"{'0' * 64}  cls_pred_branch.pt"})
    with pytest.raises(BundleError, match="not `sha256sum` output"):
        verify_sha256_lists(layout, {"lcm_lora": "deadbeef  " + LORA_FILENAME})
    with pytest.raises(BundleError, match="is no local piece"):
        verify_sha256_lists(AuthorsLayout(base="hf:LetsThink/RORem"), {"lcm_lora": _sha256sum(lcm)})


def test_a_download_one_folder_too_deep_is_pointed_at(tiny_layout, tmp_path, monkeypatch):
    monkeypatch.setattr(authors_layout, "fetch", _no_download)
    shutil.copytree(tiny_layout.discriminator, tmp_path / "RORem-Discriminator" / "final_unet")
    layout = AuthorsLayout(
        base=tiny_layout.base,
        unet=tiny_layout.unet,
        discriminator=str(tmp_path / "RORem-Discriminator"),
        discriminator_unet=tiny_layout.base,
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


@pytest.mark.parametrize(
    ("pieces", "said"),
    [
        ({"base": "hf:diffusers/stable-diffusion-xl-1.0-inpainting-0.1@main"}, "set unet, or set base to the RORem"),
        ({"base": "hf:LetsThink/RORem", "discriminator": "/models/d"}, "discriminator_unet is not set"),
        ({"base": "hf:LetsThink", "unet": "/models/u"}, r"base: hf:LetsThink: expected hf:OWNER/NAME"),
    ],
)
def test_the_serve_config_refuses_before_ray_starts_what_the_import_would_get_wrong_or_refuse(pieces, said):
    """Named explicitly, the SDXL-inpainting pipeline with no unet served its own UNet as RORem without a word; a
    discriminator without its trunk and a malformed hub name were found only in the replicas, after Ray started."""
    with pytest.raises(ValidationError, match=said):
        AuthorsSource(lcm_lora="/models/authors/RORem-LCM", **pieces)


def test_the_serve_config_requires_the_lcm_lora():
    with pytest.raises(ValidationError, match=r"lcm_lora\n  Field required"):
        AuthorsSource(base="hf:LetsThink/RORem")


def test_describe_names_the_discriminator_pieces_only_when_set():
    old = AuthorsLayout(base="b", unet="u", lcm_lora="l", discriminator="d")
    assert old.describe() == {"base": "b", "unet": "u", "lcm_lora": "l", "discriminator": "d"}
    assert AuthorsLayout(base="b", discriminator="d", discriminator_unet="s").describe()["discriminator_unet"] == "s"


@pytest.fixture
def fake_hub(rorem_pipeline, tmp_path, monkeypatch):
    """snapshot_download over a hub cache holding LetsThink/RORem at two commits, its main branch at the first;
    as the real cache, it gives the snapshot folder named by the commit."""
    import huggingface_hub

    snapshots = tmp_path / "hub" / "snapshots"
    snapshots.mkdir(parents=True)
    for commit in (COMMIT_A, COMMIT_B):
        (snapshots / commit).symlink_to(rorem_pipeline / "RORem", target_is_directory=True)
    hub = SimpleNamespace(branches={"main": COMMIT_A}, calls=[])

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        hub.calls.append((repo_id, revision, allow_patterns))
        folder = snapshots / hub.branches.get(revision or "main", revision)
        if repo_id != "LetsThink/RORem" or not folder.exists():
            raise FileNotFoundError(f"{repo_id} at {revision} is not on this hub")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub


def test_a_hub_piece_is_fetched_at_the_commit_it_names_and_the_bundle_records_it(fake_hub, rorem_pipeline, tmp_path):
    assert fetch(f"hf:LetsThink/RORem@{COMMIT_B}/unet") == tmp_path / "hub" / "snapshots" / COMMIT_B / "unet"
    assert fake_hub.calls == [("LetsThink/RORem", COMMIT_B, ["unet/*"])]
    layout = AuthorsLayout(base=f"hf:LetsThink/RORem@{COMMIT_B}", lcm_lora=str(rorem_pipeline / "RORem-LCM"))
    bundle = import_authors_layout(layout, tmp_path / "bundle", dtype="float32", require_pinned=True)
    assert {revision for _, revision, _ in fake_hub.calls} == {COMMIT_B}, "main was never asked for"
    assert bundle.manifest.provenance["source"]["base"] == f"hf:LetsThink/RORem@{COMMIT_B}"


def test_an_unpinned_hub_piece_is_named_at_its_commit_with_a_warning_and_imported_again_when_main_moves(
    fake_hub, rorem_pipeline, tmp_path, caplog
):
    layout = AuthorsLayout(base="hf:LetsThink/RORem", lcm_lora=str(rorem_pipeline / "RORem-LCM"))
    first = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert first.manifest.provenance["source"]["base"] == f"hf:LetsThink/RORem@{COMMIT_A}"
    assert "hf:LetsThink/RORem is not pinned to a commit" in caplog.text
    assert f"write hf:LetsThink/RORem@{COMMIT_A}" in caplog.text
    again = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert again.path == first.path, "the same commit is imported once"
    fake_hub.branches["main"] = COMMIT_B
    moved = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert moved.path != first.path, "main moved: the cached import of the old commit is not served"
    assert moved.manifest.provenance["source"]["base"] == f"hf:LetsThink/RORem@{COMMIT_B}"


def test_the_job_refuses_the_shipped_placeholders_until_each_names_a_commit(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    shipped = yaml.safe_load((REPO / "k8s" / "weights" / "sources.yaml").read_text())["data"]

    def layout(sources: dict) -> AuthorsLayout:  # as the Job builds it (k8s/weights/job-fetch-weights.yaml)
        fields = ("base", "unet", "lcm_lora", "discriminator", "discriminator_unet")
        return AuthorsLayout(**{field: sources[f"ROREM_{field.upper()}"] or None for field in fields})

    with pytest.raises(BundleError) as raised:
        import_authors_layout(layout(shipped), tmp_path / "bundle", require_pinned=True)
    for repo in ("LetsThink/RORem", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"):
        assert f"https://huggingface.co/{repo}/commits/main" in str(raised.value), "where to pick the commit"
    refuse_unpinned(layout({key: value.replace("@COMMIT", f"@{COMMIT_A}") for key, value in shipped.items()}))


SDXL = HubRef.parse(SDXL_INPAINTING_UNET).repo_id
# what the hub lists, with each weight's GB: diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (its files), and
# two UNet repositories, with .bin weights beside .safetensors ones and with .bin ones only (fp16 aside)
LISTINGS = {
    SDXL: {
        "model_index.json": 0, "README.md": 0, "scheduler/scheduler_config.json": 0,
        "text_encoder/config.json": 0, "text_encoder/model.safetensors": 0.492, "text_encoder/model.fp16.safetensors": 0.246,
        "text_encoder_2/config.json": 0, "text_encoder_2/model.safetensors": 2.78,
        "text_encoder_2/model.fp16.safetensors": 1.39,
        **{f"{tokenizer}/{name}": 0 for tokenizer in ("tokenizer", "tokenizer_2")
           for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")},
        "unet/config.json": 0, "unet/diffusion_pytorch_model.safetensors": 10.3,
        "unet/diffusion_pytorch_model.fp16.safetensors": 5.14,
        "vae/config.json": 0, "vae/diffusion_pytorch_model.safetensors": 0.335,
        "vae/diffusion_pytorch_model.fp16.safetensors": 0.167,
    },
    "someone/both": {
        "unet/config.json": 0, "unet/diffusion_pytorch_model.safetensors": 10.3, "unet/diffusion_pytorch_model.bin": 10.3,
    },
    "someone/bin-only": {
        "unet/config.json": 0, "unet/diffusion_pytorch_model.bin": 10.3,
        "unet/diffusion_pytorch_model.fp16.safetensors": 5.14,
    },
}  # fmt: skip


@pytest.fixture
def listed_hub(tmp_path, monkeypatch):
    """list_repo_files and snapshot_download over LISTINGS: a download writes the files huggingface_hub's own
    filter selects (empty) into the commit's snapshot folder; returns the files downloaded, by repository."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    downloaded = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **_):
        snapshot = tmp_path / "hub" / repo_id / "snapshots" / revision
        for file in filter_repo_objects(
            LISTINGS[repo_id], allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            downloaded.setdefault(repo_id, set()).add(file)
            (snapshot / file).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / file).touch()
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None, **_: list(LISTINGS[repo_id]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return downloaded


def test_a_hub_piece_downloads_only_the_files_the_import_reads(tiny_layout, listed_hub):
    """The base pipeline downloaded the whole repository (20.85 GB: its UNet and every fp16 variant too), the
    discriminator's UNet its fp16 variant beside the weights read."""
    layout = AuthorsLayout(
        base=f"hf:{SDXL}@{COMMIT_A}",
        unet=tiny_layout.unet,
        lcm_lora=tiny_layout.lcm_lora,
        discriminator=tiny_layout.discriminator,
        discriminator_unet=f"hf:{SDXL}@{COMMIT_A}/unet",
    )
    locate(layout)
    weights = {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"}  # fmt: skip
    assert {file for file in listed_hub[SDXL] if LISTINGS[SDXL][file]} == weights
    assert {file for file in LISTINGS[SDXL] if not LISTINGS[SDXL][file]} - listed_hub[SDXL] == {
        "model_index.json",
        "README.md",
    }, "every config and tokenizer file the import reads"
    assert round(sum(LISTINGS[SDXL][file] for file in listed_hub[SDXL]), 2) == 13.91


def test_bin_weights_are_downloaded_only_where_no_safetensors_ones_are_beside_them(tiny_layout, listed_hub):
    layout = AuthorsLayout(
        base=tiny_layout.base,
        unet=f"hf:someone/both@{COMMIT_A}/unet",
        lcm_lora=tiny_layout.lcm_lora,
        discriminator=tiny_layout.discriminator,
        discriminator_unet=f"hf:someone/bin-only@{COMMIT_A}/unet",
    )
    locate(layout)
    assert listed_hub["someone/both"] == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert listed_hub["someone/bin-only"] == {"unet/config.json", "unet/diffusion_pytorch_model.bin"}


@pytest.mark.parametrize("ref", ["hf:LetsThink", "hf:LetsThink/RORem@", "hf:LetsThink/RORem/unet@" + COMMIT_A])
def test_a_malformed_hub_reference_is_refused_with_the_expected_form(ref):
    with pytest.raises(BundleError, match=r"expected hf:OWNER/NAME\[@REVISION\]\[/SUBPATH\]"):
        fetch(ref)


def test_a_local_piece_replaced_at_the_same_path_is_imported_again_and_unchanged_files_are_not_reread(
    tiny_layout, tmp_path, monkeypatch
):
    from engines import sources

    lora = tmp_path / "RORem-LCM" / LORA_FILENAME
    lora.parent.mkdir()
    shutil.copy(tiny_layout.lcm_lora, lora)
    layout = AuthorsLayout(base=tiny_layout.base, unet=tiny_layout.unet, lcm_lora=str(lora.parent))
    first = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert first.manifest.provenance["inputs_sha256"][str(lora)] == sha256_of(lora)
    assert str(Path(tiny_layout.unet) / "config.json") in first.manifest.provenance["inputs_sha256"]

    before = lora.stat()
    with safe_open(lora, "pt") as published:
        metadata = published.metadata()
    save_file({k: v * 3 for k, v in load_file(lora).items()}, lora, metadata=metadata)  # same size, and mtime:
    os.utime(lora, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert lora.stat().st_size == before.st_size
    replaced = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert replaced.path != first.path, "the import of the old LoRA is not served"
    assert replaced.manifest.provenance["inputs_sha256"][str(lora)] == sha256_of(lora)
    old, new = load_file(first.path / UNET_WEIGHTS), load_file(replaced.path / UNET_WEIGHTS)
    assert any(not torch.equal(old[k], new[k]) for k in old), "the new LoRA is fused"

    hashed = []
    monkeypatch.setattr(sources, "sha256_of", lambda file: hashed.append(file) or sha256_of(file))
    again = open_bundle(path=None, authors=layout, cache_dir=tmp_path / "cache", import_dtype="float32")
    assert again.path == replaced.path and hashed == [], "a start re-reads no unchanged input"


def test_a_bundle_imported_by_another_importer_version_is_imported_again(tiny_layout, tmp_path, monkeypatch):
    """A fixed import (the discriminator's trunk, fp32 prompt embeddings) was hidden by the bundle an older importer
    had cached from the same inputs: the cache key named the inputs, prompt and dtype only."""
    layout = AuthorsLayout(base=tiny_layout.base, unet=tiny_layout.unet, lcm_lora=tiny_layout.lcm_lora)
    older = open_bundle(path=None, authors=layout, cache_dir=tmp_path, import_dtype="float32")
    monkeypatch.setattr(authors_layout, "IMPORTER_VERSION", older.manifest.provenance["importer_version"] + 1)
    newer = open_bundle(path=None, authors=layout, cache_dir=tmp_path, import_dtype="float32")
    assert newer.path != older.path
    assert newer.manifest.provenance["importer_version"] == authors_layout.IMPORTER_VERSION


def test_an_unpinned_hub_piece_is_pinned_once_where_the_app_is_built_for_every_replica(monkeypatch, caplog):
    """Each replica pinned the branch at its own start: one started (or restarted by Serve) after the branch moved
    served other weights than its siblings, and the Remover and the Scorer could differ."""
    from ray.serve.deployment import Application

    from engines import authors_layout
    from serve.app import build_app

    head, asked = {"main": COMMIT_A}, []
    monkeypatch.setattr(authors_layout, "_head_commit", lambda hub: asked.append(hub.repo_id) or head["main"], raising=False)
    monkeypatch.setattr(authors_layout, "_snapshot", lambda *a: pytest.fail("downloaded where the app is built"))
    authors = {"base": "hf:LetsThink/RORem", "lcm_lora": "/models/RORem-LCM", "discriminator": "/models/RORem-D",
               "discriminator_unet": f"{SDXL_INPAINTING_UNET}"}  # fmt: skip
    app = build_app({"bundle": {"authors": authors}, "scorer": {"enabled": True}})
    head["main"] = COMMIT_B  # the branch moves after the build: the replicas' args are fixed
    bundles, pending = {}, [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        bound = (*deployment.init_args, *deployment.init_kwargs.values())
        bundles.update({deployment.name: arg["bundle"] for arg in bound if isinstance(arg, dict) and "bundle" in arg})
        pending += [arg for arg in bound if isinstance(arg, Application)]
    assert set(bundles) == {"Ingress", "Remover", "Scorer"}
    sdxl = HubRef.parse(SDXL_INPAINTING_UNET)
    for name, bundle in bundles.items():
        assert bundle["authors"]["base"] == f"hf:LetsThink/RORem@{COMMIT_A}", name
        assert bundle["authors"]["discriminator_unet"] == sdxl.at(COMMIT_A), name
        assert bundle["authors"]["lcm_lora"] == "/models/RORem-LCM", name
    assert sorted(asked) == sorted(["LetsThink/RORem", sdxl.repo_id]), "each piece asked once, nothing downloaded"
    assert "hf:LetsThink/RORem is not pinned to a commit" in caplog.text


def test_a_branch_the_hub_says_it_has_not_is_refused_and_only_an_unreachable_hub_falls_back_to_the_cache(monkeypatch):
    """Every hub error counted as "offline": a revision or repository the hub answered it has not (gated too) was
    then pinned to whatever commit a stale local cache still knew."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    from engines import authors_layout
    from engines.hub_refs import HubRef

    cached = "c" * 40
    looked_in_cache = []

    def cache(repo_id, revision=None, local_files_only=False):
        looked_in_cache.append(revision)
        return f"/cache/{repo_id}/snapshots/{cached}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache)
    answer = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/o/n"))
    hub = HubRef.parse("hf:owner/name@main")
    for refusal in (RevisionNotFoundError("no main", response=answer), GatedRepoError("gated", response=answer)):
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, refusal=refusal, **k: (_ for _ in ()).throw(refusal))
        with pytest.raises(BundleError, match="hub has no owner/name at main"):
            authors_layout._head_commit(hub)
    assert looked_in_cache == []
    offline = httpx2.ConnectError("no route to host")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: (_ for _ in ()).throw(offline))
    assert authors_layout._head_commit(hub) == cached and looked_in_cache == ["main"]
