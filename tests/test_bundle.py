import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engines.authors_layout import AuthorsLayout, encode_constant_prompt, fetch, import_authors_layout
from engines.bundle import (
    HASHED_AS_READ,
    DISCRIMINATOR_PROMPT_EMBEDS,
    DISCRIMINATOR_WEIGHTS,
    MANIFEST,
    PROMPT_EMBEDS,
    UNET_WEIGHTS,
    VAE_WEIGHTS,
    Bundle,
    BundleError,
)
from engines.lora import read_lora_file


def test_manifest_records_architecture_hashes_and_provenance(tiny_bundle):
    manifest = json.loads((tiny_bundle.path / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["architecture"]["unet"]["in_channels"] == 9
    assert len(manifest["architecture"]["unet"]["block_out_channels"]) == 3
    assert manifest["architecture"]["unet"]["addition_embed_type"] == "text_time"
    assert len(manifest["architecture"]["vae"]["block_out_channels"]) == 4
    assert set(manifest["files"]) == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "prompt_embeds.safetensors",
        "discriminator/model.safetensors",
        "discriminator/prompt_embeds.safetensors",
    }
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert manifest["provenance"]["lcm_lora"]["tensors_applied"] == manifest["provenance"]["lcm_lora"]["tensors_in_file"]


def test_bundle_round_trips_its_components(tiny_bundle):
    bundle = Bundle.load(tiny_bundle.path)
    unet, vae = bundle.load_unet(), bundle.load_vae()
    assert unet.config.in_channels == 9 and vae.config.latent_channels == 4
    prompt_embeds, pooled = bundle.load_prompt_embeds()
    arch = bundle.manifest.architecture
    assert prompt_embeds.shape == (1, 77, arch.unet["cross_attention_dim"])
    assert pooled.shape == (1, arch.prompt.pooled_dim)
    scheduler = bundle.make_scheduler()
    scheduler.set_timesteps(4)
    assert type(scheduler).__name__ == "LCMScheduler"
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_a_corrupted_file_fails_verification(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    weights = copy / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(copy)
    (copy / UNET_WEIGHTS).unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(copy)


def test_a_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize(
    "text, said",
    [("{", "Invalid JSON: EOF while parsing an object"),
     ('{"format": 1}', "name: Field required; dtype: Field required")],
    ids=["cut-short", "fields-missing"],
)
def test_a_broken_manifest_is_refused_in_one_line_naming_what_is_wrong(tmp_path, text, said):
    """pydantic's message was three lines, with a URL and the text it read: the CLIs' one-line refusals were not."""
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError) as refused:
        Bundle.load(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'} is not a valid manifest: ") and said in message
    assert "\n" not in message and "pydantic.dev" not in message, message


def test_import_applies_every_lora_tensor_of_the_mixed_format_file(tiny_layout, tiny_bundle):
    groups, _ = read_lora_file(tiny_layout.lcm_lora)
    keys = load_file(tiny_layout.lcm_lora).keys()
    assert any(".lora.down." in k for k in keys) and any(".lora_A." in k for k in keys), "the file mixes both styles"
    lora = tiny_bundle.manifest.provenance["lcm_lora"]
    assert lora["tensors_applied"] == len(keys) == 2 * len(groups)


def test_prompt_embeddings_match_diffusers_encode_prompt(tiny_layout, tiny_bundle):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_layout.base)
    expected, _, expected_pooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
    prompt_embeds, pooled = tiny_bundle.load_prompt_embeds()
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    other, _ = encode_constant_prompt(Path(tiny_layout.base), "a photo")
    assert not torch.equal(other, prompt_embeds), "the configured prompt changes the embeddings"


def test_prompt_embeddings_are_float32_whatever_dtype_the_text_encoders_are_stored_in(tiny_layout, tmp_path):
    """LetsThink/RORem stores its text encoders in fp16, and transformers 5 loads a model in its stored dtype: the
    baked embeddings were fp16 there and fp32 under transformers 4, so they depended on the library's version."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = Path(tiny_layout.base)
    for dtype in (torch.float16, torch.float32):
        for part in ("tokenizer", "tokenizer_2"):
            shutil.copytree(base / part, tmp_path / str(dtype) / part)
        for part, model in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            rounded = model.from_pretrained(base / part).half()  # the same weights in both folders
            rounded.to(dtype).save_pretrained(tmp_path / str(dtype) / part)
    stored_fp16 = encode_constant_prompt(tmp_path / str(torch.float16), "")
    stored_fp32 = encode_constant_prompt(tmp_path / str(torch.float32), "")
    for fp16, fp32 in zip(stored_fp16, stored_fp32):
        torch.testing.assert_close(fp16, fp32)  # dtype included
        assert fp32.dtype == torch.float32


def test_hub_reference_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BundleError, match="(?s)cannot fetch LetsThink/RORem .*local folder"):
        fetch("hf:LetsThink/RORem/unet")


def test_import_refuses_a_base_folder_that_is_not_a_pipeline(tiny_layout, tmp_path):
    layout = AuthorsLayout(base=str(tmp_path), unet=tiny_layout.unet, lcm_lora=tiny_layout.lcm_lora)
    with pytest.raises(BundleError, match="not an SDXL-inpainting pipeline folder"):
        import_authors_layout(layout, tmp_path / "out")


def test_an_import_without_the_lcm_lora_is_refused_before_any_download(tiny_layout, tmp_path, monkeypatch):
    """The engine samples 4 LCM steps only: without the LoRA that would be the wrong sampler for the UNet."""
    from engines import authors_layout

    monkeypatch.setattr(authors_layout, "fetch", lambda ref: pytest.fail(f"fetched {ref}"))
    for base in (tiny_layout.base, "hf:LetsThink/RORem"):
        with pytest.raises(BundleError, match=r"lcm_lora is not set: .*4 LCM steps.*RORem-LCM from https://drive"):
            import_authors_layout(AuthorsLayout(base=base, unet=tiny_layout.unet), tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_the_tiny_bundle_bakes_the_configured_prompt_even_when_one_is_cached(tmp_path):
    from engines.sources import open_bundle
    from engines.tiny import tiny_bundle

    tiny_bundle(tmp_path / "tiny-0", prompt="left by an older cache")  # where the prompt "" is kept now
    plain = open_bundle(path=None, authors=None, cache_dir=tmp_path)
    assert plain.path.name == "tiny-0" and plain.manifest.architecture.prompt.text == ""
    prompted = open_bundle(path=None, authors=None, cache_dir=tmp_path, prompt="remove the object")
    assert prompted.manifest.architecture.prompt.text == "remove the object"
    assert open_bundle(path=None, authors=None, cache_dir=tmp_path).path == plain.path


def test_a_bundle_folder_refuses_a_prompt_or_dtype_it_was_not_written_with(tiny_bundle, tmp_path):
    from serve.config import BundleSettings

    def opened(**settings):
        return BundleSettings(path=str(tiny_bundle.path), cache_dir=str(tmp_path), **settings).open()

    with pytest.raises(BundleError, match=r"bundle.prompt is 'a photo', but \S+ holds ''"):
        opened(prompt="a photo")
    with pytest.raises(BundleError, match=r"bundle.import_dtype is 'float16', but \S+ holds 'float32'"):
        opened(import_dtype="float16")
    assert opened().path == opened(prompt="", import_dtype="float32").path == tiny_bundle.path


def _copy_bundle(tiny_bundle, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    return copy


def _edit_manifest(bundle_path: Path, edit) -> None:
    manifest = json.loads((bundle_path / MANIFEST).read_text())
    edit(manifest)
    (bundle_path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name, load",
    [
        (UNET_WEIGHTS, Bundle.load_unet),
        (VAE_WEIGHTS, Bundle.load_vae),
        (PROMPT_EMBEDS, Bundle.load_prompt_embeds),
        (DISCRIMINATOR_WEIGHTS, Bundle.load_discriminator),
        (DISCRIMINATOR_PROMPT_EMBEDS, Bundle.load_discriminator_prompt_embeds),
    ],
)
def test_a_file_replaced_after_verification_is_refused_not_loaded(tiny_bundle, tmp_path, name, load):
    """What is loaded is what was hashed: a valid file of the same layout landing after verify is caught."""
    import os

    copy = _copy_bundle(tiny_bundle, tmp_path)
    bundle = Bundle.load(copy, verify=True)
    replacement = {key: tensor + 1 for key, tensor in load_file(copy / name).items()}
    save_file(replacement, str(tmp_path / "replacement.safetensors"))
    os.replace(tmp_path / "replacement.safetensors", copy / name)
    with pytest.raises(BundleError, match=f"{name}: sha256 differs"):
        load(bundle)


def test_a_symlink_out_of_the_bundle_folder_is_refused(tiny_bundle, tmp_path):
    copy = _copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.safetensors"
    (copy / PROMPT_EMBEDS).rename(outside)
    (copy / PROMPT_EMBEDS).symlink_to(outside)  # same bytes, so the sha256 still matches
    with pytest.raises(BundleError, match=f"{PROMPT_EMBEDS}: a symlink"):
        Bundle.load(copy, verify=True)
    with pytest.raises(BundleError, match=f"{PROMPT_EMBEDS}: a symlink"):
        Bundle.load(copy, verify=False).load_prompt_embeds()


@pytest.mark.parametrize("name", ["../secret.txt", "unet/../../secret.txt", "{absolute}"])
def test_a_manifest_naming_a_file_outside_the_bundle_folder_is_refused(tiny_bundle, tmp_path, name):
    from engines.bundle import sha256_of

    copy = _copy_bundle(tiny_bundle, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    name = name.format(absolute=secret)
    entry = {"sha256": sha256_of(secret), "bytes": secret.stat().st_size}
    _edit_manifest(copy, lambda m: m["files"].update({name: entry}))
    for verify in (True, False):
        with pytest.raises(BundleError, match="inside the bundle folder"):
            Bundle.load(copy, verify=verify)


def test_a_serving_start_hashes_the_weights_once_as_read_and_no_export_at_open(tiny_bundle, tmp_path, monkeypatch):
    """Hashing the weights in `verify` and again in `read` cost an SDXL replica a second pass over ~10 GB; hashing
    every export at open cost each replica (the Scorer too) ~20 GB it never loads, and the ONNX runner's graph
    was hashed twice (at open and by read_checked)."""
    import engines.bundle
    from engines.sources import open_bundle

    copy = _copy_bundle(tiny_bundle, tmp_path)
    weights = copy / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, other bytes
    hashed_at_open = []
    real_sha256_of = engines.bundle.sha256_of
    monkeypatch.setattr(engines.bundle, "sha256_of", lambda path: hashed_at_open.append(path) or real_sha256_of(path))

    bundle = open_bundle(path=str(copy), authors=None, cache_dir=tmp_path / "cache")
    assert not any(str(path).endswith(tuple(HASHED_AS_READ)) for path in hashed_at_open), hashed_at_open
    with pytest.raises(BundleError, match=f"{UNET_WEIGHTS}: sha256 differs"):
        bundle.load_unet()  # what is loaded is still hashed
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(copy)  # a full verify (the weights Job, `bundle verify`) hashes every file

    weights.write_bytes((tiny_bundle.path / UNET_WEIGHTS).read_bytes())
    export = copy / "exports" / "unet.onnx"  # loaded only by a runner, through read_checked: not hashed at open
    export.parent.mkdir()
    export.write_bytes(b"graph")
    entry = {"sha256": real_sha256_of(export), "bytes": 5}
    _edit_manifest(copy, lambda m: m["files"].update({"exports/unet.onnx": entry}))
    export.write_bytes(b"GRAPH")  # same size, other bytes
    hashed_at_open.clear()
    assert open_bundle(path=str(copy), authors=None, cache_dir=tmp_path / "cache").load_unet() is not None
    assert hashed_at_open == [], "nothing is hashed at open: each file by the code that loads it"
    Bundle.load(copy)  # a full verify leaves the exports to what reads them: a broken one stops only its runner
    with pytest.raises(BundleError, match="exports/unet.onnx: sha256 differs"):
        Bundle.load(copy).check_files(["exports/unet.onnx"])  # what an export command reads, it hashes
    export.write_bytes(b"GRAPHS")
    open_bundle(path=str(copy), authors=None, cache_dir=tmp_path / "cache")
    with pytest.raises(BundleError, match="exports/unet.onnx: 6 bytes, manifest says 5"):
        Bundle.load(copy).check_files(["exports/unet.onnx"])
    export.unlink()
    Bundle.load(copy)
    with pytest.raises(BundleError, match="exports/unet.onnx: missing"):
        Bundle.load(copy).check_files(["exports/unet.onnx"])


def _rewrite(bundle: Bundle, path: Path, name: str) -> Bundle:
    prompt_embeds, pooled = bundle.load_prompt_embeds()
    return Bundle.write(
        path, name=name, unet=bundle.load_unet(), vae=bundle.load_vae(), scheduler=bundle.make_scheduler(),
        prompt="", prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, dtype="float32",
    )  # fmt: skip


def test_a_write_that_dies_deleting_the_old_bundle_leaves_the_new_one_whole(tiny_bundle, tmp_path, monkeypatch):
    """The old folder was deleted in place before the new one was renamed in: a crash mid-delete left
    a partial bundle, manifest and all, at the path. A leftover old folder goes at the next write."""
    import engines.bundle

    copy = _copy_bundle(tiny_bundle, tmp_path)
    aside = copy.with_name(".bundle.old")

    def dies_midway(folder, *args, **kwargs):
        (Path(folder) / UNET_WEIGHTS).unlink()
        raise OSError("killed while deleting")

    with monkeypatch.context() as patched:
        patched.setattr(engines.bundle.shutil, "rmtree", dies_midway)
        with pytest.raises(OSError, match="killed while deleting"):
            _rewrite(tiny_bundle, copy, "new")
    assert Bundle.load(copy, verify=True).manifest.name == "new"
    assert _rewrite(tiny_bundle, copy, "newer").manifest.name == "newer" and not aside.exists()

    copy.rename(aside)  # a crash between moving the old bundle aside and renaming the new one in
    assert _rewrite(tiny_bundle, copy, "again").manifest.name == "again" and not aside.exists()
    assert Bundle.load(copy, verify=True).manifest.name == "again"


def test_a_bundle_path_that_is_a_symbolic_link_is_refused_before_anything_is_written(tiny_bundle, tmp_path):
    """The new folder replaced the link (not where it pointed), then deleting the link aside failed, and every
    later write failed on the leftover."""
    real = _copy_bundle(tiny_bundle, tmp_path)
    link = tmp_path / "current"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="is a symbolic link: write to the folder it points to"):
        _rewrite(tiny_bundle, link, "new")
    assert link.is_symlink() and Bundle.load(link, verify=True).manifest.name != "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([real.name, "current"]), "nothing left behind"


def test_a_missing_weight_file_with_verify_off_is_a_bundle_error_naming_it(tiny_bundle, tmp_path):
    """bundle.verify: false met a missing file only in `read`, as a bare FileNotFoundError."""
    copy = _copy_bundle(tiny_bundle, tmp_path)
    (copy / VAE_WEIGHTS).unlink()
    bundle = Bundle.load(copy, verify=False)
    with pytest.raises(BundleError, match=f"{VAE_WEIGHTS}: missing from bundle {copy}"):
        bundle.load_vae()


def test_a_write_over_a_folder_that_is_not_a_bundle_is_refused_and_leaves_it(tiny_bundle, tmp_path):
    """Bundle.write replaced whatever folder was at its path: `training bundle --out runs` deleted the runs."""
    runs = tmp_path / "runs"
    (runs / "finetune").mkdir(parents=True)
    (runs / "finetune" / "weights.bin").write_text("weeks of training")
    with pytest.raises(BundleError, match=f"{runs} is a folder that holds files and is not a bundle"):
        _rewrite(tiny_bundle, runs, "new")
    assert (runs / "finetune" / "weights.bin").read_text() == "weeks of training"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "nothing left behind"
    (tmp_path / "empty").mkdir()
    assert Bundle.load(_rewrite(tiny_bundle, tmp_path / "empty", "new").path).manifest.name == "new"
    assert Bundle.load(_rewrite(tiny_bundle, tmp_path / "empty", "newer").path).manifest.name == "newer"


def test_a_listed_file_that_does_not_parse_is_a_bundle_error_naming_it(tiny_bundle, tmp_path):
    """Bytes that match their manifest entry but are no safetensors file (a bundle written with them) raised
    safetensors' own error: a traceback from the export CLI, and not a BundleError in a serving replica."""
    from engines.bundle import sha256_of

    copy = _copy_bundle(tiny_bundle, tmp_path)
    (copy / PROMPT_EMBEDS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    entry = {"sha256": sha256_of(copy / PROMPT_EMBEDS), "bytes": (copy / PROMPT_EMBEDS).stat().st_size}
    _edit_manifest(copy, lambda m: m["files"].update({PROMPT_EMBEDS: entry}))
    with pytest.raises(BundleError, match=f"{PROMPT_EMBEDS}: not a readable safetensors file in bundle {copy}"):
        Bundle.load(copy, verify=True).load_prompt_embeds()
