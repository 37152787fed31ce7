import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from engines.authors_layout import AuthorsLayout, encode_constant_prompt, import_authors_layout
from engines.bundle import DISCRIMINATOR_PROMPT_EMBEDS, DISCRIMINATOR_WEIGHTS, MANIFEST, Bundle, BundleError, sha256_of
from engines.scorer import (
    HEAD_FILENAME,
    HEAD_KEYS,
    LORA_FILENAME,
    Discriminator,
    DiscriminatorError,
    DiscriminatorHead,
    ScoreJob,
    ScoringEngine,
    head_scores,
    load_published_discriminator,
)
from engines.tiny import DISCRIMINATOR_LORA_RANK, DISCRIMINATOR_LORA_TARGETS
from tests.helpers import photo, torch_threads

SCORE_ATOL = 1e-5  # float32 CPU


@pytest.fixture(scope="module")
def files(tiny_layout):
    folder = Path(tiny_layout.discriminator)
    return Path(tiny_layout.base) / "unet", folder / LORA_FILENAME, folder / HEAD_FILENAME


@pytest.fixture(scope="module")
def base_unet(files):
    return UNet2DConditionModel.from_pretrained(files[0], torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def published(base_unet, files):
    return load_published_discriminator(base_unet, files[1], files[2])


@pytest.fixture(scope="module")
def empty_prompt(tiny_layout):
    return encode_constant_prompt(Path(tiny_layout.base), "")


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return ScoringEngine.from_bundle(tiny_bundle)


def _engine_for(discriminator, tiny_bundle, empty_prompt) -> ScoringEngine:
    return ScoringEngine(tiny_bundle.load_vae(), discriminator, *empty_prompt, score_size=512)


def _trunk_inputs(config, batch=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 9, side, side, generator=g),
        "timestep": torch.tensor(0),
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
        "text_embeds": torch.randn(batch, 32, generator=g),
        "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]]).expand(batch, -1),
    }


def _jobs(sides=(512, 256, 1024), seed=0):
    """Real photo crops; the edited one fills the mask with a blur of the source."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i, side in enumerate(sides):
        source = photo(256, 256) if side == 256 else photo(512, 412)[:, :412]
        source = np.asarray(Image.fromarray(source).resize((side, side), Image.BICUBIC))
        mask = np.zeros((side, side), bool)
        top, left = rng.integers(side // 8, side // 3, size=2)
        mask[top : top + side // 3, left : left + side // 4 + 8 * i] = True
        blurred = np.asarray(Image.fromarray(source).filter(ImageFilter.GaussianBlur(side / 64)))
        edited = source.copy()
        edited[mask] = blurred[mask]
        jobs.append(ScoreJob(source=source, mask=mask, edited=edited))
    return jobs


# ---------------------------------------------------------------- the model


@torch.no_grad()
def test_trunk_mid_block_equals_the_diffusers_unet_mid_block(base_unet):
    disc = Discriminator.from_unet(base_unet).eval()
    trunk_keys = {k for k in disc.state_dict() if not k.startswith("cls_pred_branch.")}
    assert trunk_keys <= set(base_unet.state_dict()), "trunk keys are the UNet's own"
    assert not any(k.startswith(("up_blocks", "conv_out", "conv_norm_out")) for k in disc.state_dict())
    assert {k for k in disc.state_dict() if k.startswith("cls_pred_branch.")} == set(HEAD_KEYS)

    captured = []
    hook = base_unet.mid_block.register_forward_hook(lambda module, args, output: captured.append(output))
    inputs = _trunk_inputs(disc.unet_config)
    try:
        base_unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
        )
    finally:
        hook.remove()
    ours = disc.features(**inputs)
    assert ours.shape == (2, 64, 16, 16)
    torch.testing.assert_close(ours, captured[0], rtol=0, atol=1e-5)
    other_time_ids = disc.features(**{**inputs, "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]]).expand(2, -1)})
    assert (other_time_ids - ours).abs().max() > 1e-4, "the added embeddings reach the trunk"


def test_head_needs_a_512_view_and_averages_larger_maps():
    head = DiscriminatorHead(64).eval()
    mid = torch.randn(2, 64, 32, 32)  # what a 1024 input gives
    with torch.no_grad():
        logits = head.cls_pred_branch(mid)
        assert logits.shape == (2, 1, 2, 2)
        torch.testing.assert_close(head(mid), torch.nn.functional.softplus(logits.mean(dim=(1, 2, 3))))
        with pytest.raises(ValueError, match="at least 16x16"):
            head_scores(head.cls_pred_branch, torch.randn(1, 64, 8, 8))
    assert list(head.state_dict()) == list(HEAD_KEYS)


# ---------------------------------------------------------------- the authors' published files


@torch.no_grad()
def test_published_loader_equals_the_unfused_peft_adapter(base_unet, files, published, tiny_bundle, empty_prompt):
    """Fusing the published LoRA gives what peft computes with the adapter attached, every tensor applied."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    before = {k: v.clone() for k, v in base_unet.state_dict().items()}
    fused, info = published
    keys = load_file(files[1]).keys()
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys), "the authors' format"
    attention_projections = [
        n for n, _ in fused.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]
    assert info["lora"]["tensors_applied"] == info["lora"]["tensors_in_file"] == len(keys)
    assert info["lora"]["modules"] == len(attention_projections) and info["lora"]["scale"] == 1.0
    assert info["head"] == HEAD_FILENAME

    adapted = Discriminator.from_unet(base_unet)
    adapted = inject_adapter_in_model(
        LoraConfig(
            r=DISCRIMINATOR_LORA_RANK, lora_alpha=DISCRIMINATOR_LORA_RANK, target_modules=DISCRIMINATOR_LORA_TARGETS
        ),
        adapted,
    )
    state = {
        k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
        for k, v in load_file(files[1]).items()
    }
    result = set_peft_model_state_dict(adapted, state)
    assert not result.unexpected_keys
    head = torch.load(files[2], weights_only=True)
    adapted.cls_pred_branch.load_state_dict({k.removeprefix("cls_pred_branch."): v for k, v in head.items()})
    adapted.eval()
    plain = Discriminator.from_unet(base_unet).eval()

    inputs = _trunk_inputs(fused.unet_config)
    expected = adapted.features(**inputs)
    assert (expected - plain.features(**inputs)).abs().max() > 1e-3, (
        "the LoRA must matter for this test to mean anything"
    )
    torch.testing.assert_close(fused.features(**inputs), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused(**inputs), adapted(**inputs), rtol=1e-4, atol=1e-5)

    jobs = _jobs()
    got = _engine_for(fused, tiny_bundle, empty_prompt).score(jobs)
    want = _engine_for(adapted, tiny_bundle, empty_prompt).score(jobs)
    np.testing.assert_allclose(got, want, rtol=0, atol=SCORE_ATOL)
    for key, value in base_unet.state_dict().items():
        assert torch.equal(value, before[key]), f"the loader modified the caller's base UNet ({key})"


def _bad_lora(files, tmp_path, edit) -> Path:
    state = load_file(files[1])
    edit(state)
    path = tmp_path / LORA_FILENAME
    save_file(state, str(path))
    return path


def _add_pair(state, module, rank=DISCRIMINATOR_LORA_RANK, width=64):
    state[f"unet.{module}.lora.down.weight"] = torch.zeros(rank, width)
    state[f"unet.{module}.lora.up.weight"] = torch.zeros(width, rank)


def _rename_peft_style(state, adapters):
    for i, key in enumerate(sorted(state)):
        name = adapters[i % len(adapters)]
        new = key.replace(".lora.down.weight", f".lora_A.{name}.weight").replace(
            ".lora.up.weight", f".lora_B.{name}.weight"
        )
        state[new] = state.pop(key)


def _two_ranks(state):
    key = next(k for k in sorted(state) if k.endswith(".lora.down.weight"))
    state[key] = torch.zeros(2, state[key].shape[1])
    up = key.replace(".lora.down.", ".lora.up.")
    state[up] = torch.zeros(state[up].shape[0], 2)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: _add_pair(s, "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            r"not attention projections .* down or mid blocks, e\.g\. \['up_blocks\.0",
        ),
        (
            lambda s: _add_pair(s, "down_blocks.1.attentions.0.proj_in"),
            r"not attention projections .*down_blocks\.1\.attentions\.0\.proj_in",
        ),
        (_two_ranks, r"one rank across the file, found ranks \[2, 4\]"),
        (lambda s: _rename_peft_style(s, ["default"]), r"adapter names \['default'\]"),
        (lambda s: _rename_peft_style(s, ["default", "other"]), r"adapter names \['default', 'other'\]"),
    ],
    ids=["up-block-target", "non-attention-target", "two-ranks", "named-adapter", "two-adapters"],
)
def test_a_wrong_lora_file_is_refused_clearly(base_unet, files, tmp_path, edit, message):
    bad = _bad_lora(files, tmp_path, edit)
    with pytest.raises(DiscriminatorError, match=message):
        load_published_discriminator(base_unet, bad, files[2])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("cls_pred_branch.7.bias"), r"missing \['cls_pred_branch\.7\.bias'\], unexpected \[\]"),
        (
            lambda s: s.update({"cls_pred_branch.10.weight": torch.zeros(1)}),
            r"unexpected \['cls_pred_branch\.10\.weight'\]",
        ),
        (
            lambda s: s.update({"cls_pred_branch.0.weight": torch.zeros(64, 64, 3, 3)}),
            r"does not fit a 64-channel mid block: \['cls_pred_branch\.0\.weight \(64, 64, 3, 3\) \(expected \(64, 64, 4, 4\)\)'\]",
        ),
    ],
    ids=["missing-key", "extra-key", "wrong-shape"],
)
def test_a_wrong_head_file_is_refused_clearly(base_unet, files, tmp_path, edit, message):
    head = torch.load(files[2], weights_only=True)
    edit(head)
    bad = tmp_path / HEAD_FILENAME
    torch.save(head, bad)
    with pytest.raises(DiscriminatorError, match=message):
        load_published_discriminator(base_unet, files[1], bad)


_UNPICKLED = []


def _side_effect():
    _UNPICKLED.append("executed")
    return torch.zeros(1)


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def test_the_head_file_is_loaded_with_weights_only(base_unet, files, tmp_path):
    head = torch.load(files[2], weights_only=True)
    head["cls_pred_branch.9.bias"] = _Payload()
    bad = tmp_path / HEAD_FILENAME
    torch.save(head, bad)
    with pytest.raises(DiscriminatorError, match="weights_only=True"):
        load_published_discriminator(base_unet, files[1], bad)
    assert _UNPICKLED == [], "nothing in the file ran"
    torch.load(bad, weights_only=False)  # the file really does run code when unpickled unsafely
    assert _UNPICKLED == ["executed"]


# ---------------------------------------------------------------- the bundle


def test_the_bundle_discriminator_scores_like_the_published_loader(tiny_bundle, published, empty_prompt, engine):
    fused, _ = published
    bundled = tiny_bundle.load_discriminator()
    assert set(bundled.state_dict()) == set(fused.state_dict())
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in bundled.state_dict().items())
    assert not any(p.requires_grad for p in bundled.parameters()) and not bundled.training
    jobs = _jobs()
    from_published = _engine_for(fused, tiny_bundle, empty_prompt).score(jobs)
    np.testing.assert_allclose(engine.score(jobs), from_published, rtol=0, atol=1e-6)
    prompt_embeds, pooled = tiny_bundle.load_discriminator_prompt_embeds()
    assert torch.equal(prompt_embeds, empty_prompt[0]) and torch.equal(pooled, empty_prompt[1])


def test_the_manifest_lists_the_discriminator(tiny_bundle, tiny_layout):
    manifest = json.loads((tiny_bundle.path / MANIFEST).read_text())
    for name in (DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_PROMPT_EMBEDS):
        entry = manifest["files"][name]
        assert entry["sha256"] == sha256_of(tiny_bundle.path / name) and len(entry["sha256"]) == 64
        assert entry["bytes"] == (tiny_bundle.path / name).stat().st_size
    section = manifest["discriminator"]
    base_config = UNet2DConditionModel.load_config(Path(tiny_layout.base) / "unet")
    assert section["unet"]["block_out_channels"] == list(base_config["block_out_channels"])
    assert section["unet"]["in_channels"] == 9 and section["score_size"] == 512
    assert section["prompt"] == {"text": "", "sequence_length": 77, "embed_dim": 64, "pooled_dim": 32}
    lora = manifest["provenance"]["discriminator"]["lora"]
    assert lora["tensors_applied"] == lora["tensors_in_file"] == 48
    assert manifest["provenance"]["source"]["discriminator"] == tiny_layout.discriminator
    assert tiny_bundle.summary()["discriminator"] is True


def test_verification_catches_a_corrupted_or_unlisted_discriminator(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    weights = copy / DISCRIMINATOR_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="discriminator/model.safetensors: sha256 differs"):
        Bundle.load(copy)
    shutil.copy(tiny_bundle.path / DISCRIMINATOR_WEIGHTS, weights)
    Bundle.load(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"][DISCRIMINATOR_PROMPT_EMBEDS]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="discriminator/prompt_embeds.safetensors: not listed"):
        Bundle.load(copy)


def test_a_bundle_without_discriminator_loads_and_the_tiny_cache_is_regenerated(tiny_bundle, tmp_path):
    from engines.tiny import tiny_bundle as make_tiny_bundle

    old = tmp_path / "tiny-0"
    shutil.copytree(tiny_bundle.path, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["discriminator"]
    for name in (DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_PROMPT_EMBEDS):
        del manifest["files"][name]
    shutil.rmtree(old / "discriminator")
    (old / MANIFEST).write_text(json.dumps(manifest))

    bundle = Bundle.load(old)
    assert not bundle.has_discriminator and bundle.summary()["discriminator"] is False
    with pytest.raises(BundleError, match="has no discriminator"):
        ScoringEngine.from_bundle(bundle)
    regenerated = make_tiny_bundle(old)
    assert regenerated.has_discriminator and Bundle.load(old).has_discriminator


def test_import_refuses_an_incomplete_discriminator_folder(tiny_layout, tmp_path):
    folder = tmp_path / "discriminator"
    folder.mkdir()
    shutil.copy(Path(tiny_layout.discriminator) / LORA_FILENAME, folder)
    layout = AuthorsLayout(
        base=tiny_layout.base,
        unet=tiny_layout.unet,
        lcm_lora=tiny_layout.lcm_lora,
        discriminator=str(folder),
        discriminator_unet=tiny_layout.discriminator_unet,
    )
    assert layout.describe()["discriminator"] == str(folder)
    assert "discriminator" not in AuthorsLayout(base="b", unet="u").describe(), "an unset discriminator is left out"
    with pytest.raises(BundleError, match=r"the head not found; looked for \S+cls_pred_branch.safetensors or \S+\.pt"):
        import_authors_layout(layout, tmp_path / "out")


# ---------------------------------------------------------------- the engine


# A crop's score batched and alone differs only by float32 rounding: torch picks its convolution kernels by batch
# size and thread count (measured with these jobs: up to 2.4e-5 of the score at 2 threads, 3.8e-5 at 1; the bound
# is 1e-4 of it).
BATCH_RTOL = 1e-4


@pytest.mark.parametrize("threads", [1, 2])  # 1: a CPU Scorer replica's (Ray sets OMP_NUM_THREADS to its num_cpus)
def test_a_score_does_not_depend_on_its_batch_and_is_deterministic(engine, threads):
    jobs = _jobs(sides=(512, 256, 1024, 384))
    with torch_threads(threads):
        batched = engine.score(jobs)
        alone = [engine.score([job])[0] for job in jobs]
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=0)
    assert engine.score([jobs[2], jobs[0]]) == engine.score([jobs[2], jobs[0]]), "same batch, same scores, bit for bit"
    assert all(np.isfinite(batched)) and min(batched) >= 0.0
    assert len(set(np.round(batched, 4))) == len(jobs), "different crops get different scores"


def test_the_edit_matters(engine):
    job = _jobs(sides=(512,))[0]
    unchanged = ScoreJob(source=job.source, mask=job.mask, edited=job.source.copy())
    scores = engine.score([unchanged, job])
    assert abs(scores[0] - scores[1]) > 1e-3, scores


def test_crops_of_any_size_are_scored_on_the_512_view(engine):
    job = _jobs(sides=(512,))[0]
    crops = [
        ScoreJob(
            source=np.asarray(Image.fromarray(job.source).resize((w, h), Image.BICUBIC)),
            mask=np.asarray(Image.fromarray(job.mask).resize((w, h), Image.NEAREST)),
            edited=np.asarray(Image.fromarray(job.edited).resize((w, h), Image.BICUBIC)),
        )
        for w, h in ((1024, 1024), (256, 256), (320, 256))
    ]
    seen = []
    hook = engine.discriminator.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        scores = engine.score(crops)
    finally:
        hook.remove()
    assert seen == [(3, 9, 64, 64)], "one discriminator pass on 512 / 8 = 64 latents"
    assert all(np.isfinite(scores))

    def view(image):  # the documented view: antialiased bilinear to 512, [-1, 1]
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        return torch.nn.functional.interpolate(pixels, size=(512, 512), mode="bilinear", antialias=True)

    big = crops[0]
    mask = torch.from_numpy(big.mask[::2, ::2].copy())[None, None].float()
    assert np.array_equal(big.mask[::2, ::2], np.asarray(Image.fromarray(big.mask).resize((512, 512), Image.NEAREST)))
    explicit = engine.score_tensors(view(big.edited), mask, view(big.source))
    assert abs(float(explicit[0]) - scores[0]) < SCORE_ATOL


def test_timings_and_sizes(engine):
    timings: dict = {}
    engine.score(_jobs(sides=(256, 512)), timings=timings)
    assert set(timings) == {"prepare", "vae_encode", "discriminator"} and all(v > 0 for v in timings.values())
    assert engine.score([]) == []
    with pytest.raises(ValueError, match="one size"):
        job = _jobs(sides=(256,))[0]
        engine.score([ScoreJob(job.source, job.mask[:128], job.edited)])
    disc = engine.discriminator
    with pytest.raises(ValueError, match="score_size 256 does not fit"):
        ScoringEngine(engine.vae, disc, engine.prompt_embeds, engine.pooled_prompt_embeds, score_size=256)


@pytest.mark.parametrize("side", [512, 1024])
def test_a_region_off_the_discriminators_grid_is_still_seen(engine, side):
    """The discriminator sees one crop pixel per cell of its view's latent grid (every side / 64th): a 3 px stroke
    at column 9, or a 3 px dot, had none of them and was invisible to it (a review). Such a region is grown to
    whole cells; a region it sees keeps its mask as the discriminator was trained on it."""
    from engines.imaging import DecodeLimits
    from engines.pipeline import CropSettings, RemovalPipeline
    from tests.helpers import png_bytes

    image = np.asarray(Image.fromarray(photo(512, 412)).resize((side, side), Image.BICUBIC))
    mask = np.zeros((side, side), bool)
    mask[side // 2 : side // 2 + 30, 9:12] = True
    mask[side - 24 : side - 21, side - 24 : side - 21] = True
    mask[100:200, 200:300] = True
    pipeline = RemovalPipeline(None, CropSettings((side,), 16, 0, 6), DecodeLimits())
    [job] = pipeline.prepare_score(png_bytes(image), png_bytes(mask.astype(np.uint8) * 255), png_bytes(image), 0, 1)
    assert job.mask.shape == (side, side) and (job.mask[100:200, 200:300] == mask[100:200, 200:300]).all()

    seen = []
    hook = engine.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, 4].numpy()))
    try:
        engine.score([job])
    finally:
        hook.remove()
    latent = seen[0] > 0
    cell = side // 64
    for rows, cols in ((slice(side // 2, side // 2 + 30), slice(9, 12)), (slice(side - 24, side - 21),) * 2):
        assert latent[rows.start // cell : rows.stop // cell + 1, cols.start // cell : cols.stop // cell + 1].any()
