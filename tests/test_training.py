"""The training pipeline on the tiny architecture with synthetic data, on CPU: every stage runs a few
steps; fine-tuning overfits one batch; a resumed run repeats the uninterrupted run's losses; the
trained parts load with the serving code (LoRA fuse, published discriminator format, bundle)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DatasetError, StepBatchSampler, Triplet, TripletDataset, load_metadata, write_metadata
from training.synthetic import NEGATIVE_KINDS, degrade, make_negatives, make_synthetic_triplets

REPO = Path(__file__).resolve().parent.parent
SIDE = 64  # fine-tune / distill / annotate resolution: latents 8x8
# The discriminator's head needs a 16x16 mid block: 512 px for SDXL and for the tiny trunk alike.
DISC_SIDE = 512
OVERFIT_STEPS, OVERFIT_FACTOR = 12, 3.0  # measured: 1.01 -> 0.18 in 12 steps (5.5x) at lr 1e-3


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def data(work):
    triplets = make_synthetic_triplets(work / "data", n=4, size=SIDE, seed=0)
    labelled = make_negatives(triplets, work / "data" / "discriminator", kinds=("blur", "no-change"), seed=0)
    return triplets, labelled


def _common(base, out, data_path, **overrides):
    return {
        "base": str(base), "out": out, "data": data_path, "resolution": SIDE, "checkpoint_every": 0,
        "cache_dir": Path(out).parent / "cache", **overrides,
    }  # fmt: skip


@pytest.fixture(scope="module")
def finetune_run(tiny_layout, data, work):
    """4 optimizer steps of 2 micro-batches, EMA on, checkpoints at steps 2 and 4."""
    from training.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        **_common(tiny_layout.base, work / "finetune", data[0], checkpoint_every=2),
        steps=4,
        batch_size=1,
        grad_accum=2,
        lr=1e-4,
        ema=True,
        ema_decay=0.9,
    )
    return settings, finetune(settings)


# ---------------------------------------------------------------- data


def test_synthetic_triplets_are_valid_and_the_object_is_inside_the_mask(data):
    records = load_metadata(data[0])
    assert len(records) == 4
    for record in records:
        source, gt = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (record.source, record.gt))
        mask = np.asarray(Image.open(record.mask)) > 127
        assert source.shape == gt.shape == (*mask.shape, 3)
        assert 0.02 < mask.mean() < 0.6
        assert np.array_equal(source[~mask], gt[~mask])  # the object is only where the mask is
        assert np.abs(source[mask] - gt[mask]).mean() > 1


def test_negatives_are_labelled_in_the_papers_format(data):
    raw = json.loads(Path(data[1]).read_text())
    assert set(raw[0]) == {"source", "mask", "GT", "score"}  # GT = the edited image being judged
    records = load_metadata(data[1], require=("source", "mask", "GT", "score"))
    assert len(records) == 4 * 3
    assert sum(r.score == 1.0 for r in records) == 4 and sum(r.score == 0.0 for r in records) == 8
    rng = np.random.default_rng(0)
    triplet = load_metadata(data[0])[0]
    source, good = (np.asarray(Image.open(p).convert("RGB")) for p in (triplet.source, triplet.gt))
    mask = np.asarray(Image.open(triplet.mask)) > 127
    for kind in NEGATIVE_KINDS:
        edited = degrade(kind, source, mask, good, rng)
        assert np.array_equal(edited[~mask], (source if kind == "no-change" else good)[~mask]), kind
        assert not np.array_equal(edited[mask], good[mask]), kind


def test_metadata_errors_name_the_file_entry_and_field(data, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"source": "a.png",')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON \(line 1"):
        load_metadata(bad_json)

    not_list = tmp_path / "obj.json"
    not_list.write_text('{"source": "a.png"}')
    with pytest.raises(DatasetError, match="expected a JSON array"):
        load_metadata(not_list)

    good = load_metadata(data[0])
    missing = tmp_path / "missing.json"
    write_metadata(missing, [good[0], Triplet(good[1].source, tmp_path / "nope.png", good[1].gt)])
    with pytest.raises(DatasetError, match=r"missing\.json: entry 1: field 'mask': file nope\.png not found"):
        load_metadata(missing)

    no_field = tmp_path / "nofield.json"
    no_field.write_text(json.dumps([{"source": str(good[0].source), "mask": str(good[0].mask)}]))
    with pytest.raises(DatasetError, match="entry 0: field 'GT' is missing"):
        load_metadata(no_field)
    assert load_metadata(no_field, require=("source", "mask"))[0].gt is None

    small = tmp_path / "small.png"
    Image.open(good[0].gt).resize((32, 32)).save(small)
    mismatch = tmp_path / "mismatch.json"
    write_metadata(mismatch, [Triplet(good[0].source, good[0].mask, small)])
    with pytest.raises(DatasetError, match=r"entry 0: image sizes differ \(source 64x64, mask 64x64, GT 32x32\)"):
        load_metadata(mismatch)

    bad_score = tmp_path / "score.json"
    bad_score.write_text(json.dumps([{"source": str(good[0].source), "mask": str(good[0].mask), "score": "yes"}]))
    with pytest.raises(DatasetError, match="entry 0: field 'score' must be a finite number"):
        load_metadata(bad_score, require=("source", "mask"))


def test_metadata_paths_are_relative_to_the_file(data, tmp_path):
    records = load_metadata(data[0])
    path = write_metadata(tmp_path / "sub" / "meta.json", records)
    raw = json.loads(path.read_text())
    assert not Path(raw[0]["source"]).is_absolute() and raw[0]["source"].startswith("../")
    assert load_metadata(path) == records


def test_dataset_resizes_crops_and_binarizes(data):
    dataset = TripletDataset(load_metadata(data[0]), resolution=128)
    item = dataset[0]
    assert item["source"].shape == item["gt"].shape == (3, 128, 128)
    assert item["mask"].shape == (1, 128, 128)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert -1.0 <= item["source"].min() and item["source"].max() <= 1.0
    with pytest.raises(ValueError, match="multiple of 64"):
        TripletDataset(dataset.records, resolution=100)


def test_batch_sampler_is_a_pure_function_of_the_batch_number():
    full = StepBatchSampler(10, 3, seed=5)
    stream = iter(full)
    first = [next(stream) for _ in range(8)]
    resumed = iter(StepBatchSampler(10, 3, seed=5, start_batch=4))
    assert [next(resumed) for _ in range(4)] == first[4:]
    flat = [i for batch in first[:10] for i in batch]
    assert sorted(flat[:10]) == list(range(10))  # one epoch is a permutation
    ranks = [StepBatchSampler(10, 2, seed=5, world=2, rank=r).batch(0) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


# ---------------------------------------------------------------- finetune


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_finetune_overfits_one_batch(tiny_layout, data, work):
    """The same batch, noise and timesteps every step, lr 1e-3: the loss falls by >= 3x in 12 steps."""
    from training.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        **_common(tiny_layout.base, work / "overfit", data[0]),
        steps=OVERFIT_STEPS,
        batch_size=2,
        lr=1e-3,
        overfit_one_batch=True,
    )
    summary = finetune(settings)
    losses = [entry["loss"] for entry in summary["losses"]]
    assert len(losses) == OVERFIT_STEPS
    assert losses[-1] * OVERFIT_FACTOR <= losses[0], losses
    on_disk = json.loads((work / "overfit" / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["final_loss"] == losses[-1]
    assert set(on_disk["step_time_s"]) == {"first", "mean", "median"}
    assert on_disk["versions"]["diffusers"] and on_disk["config"]["lr"] == 1e-3


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_finetune_writes_a_diffusers_unet_and_checkpoints(finetune_run):
    from diffusers import UNet2DConditionModel

    settings, summary = finetune_run
    assert [e["step"] for e in summary["losses"]] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) for e in summary["losses"])
    unet = UNet2DConditionModel.from_pretrained(summary["outputs"]["unet"])
    assert unet.config.in_channels == 9
    names = sorted(p.name for p in (settings.out / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000004"]
    assert {p.name for p in (settings.out / "checkpoints" / "step-0000002").iterdir()} >= {
        "trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "extra.pt", "rng-0.pt", "state.json",
    }  # fmt: skip


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_trained_weights_get_the_mode_of_any_new_file(finetune_run, distill_run, disc_run):
    """safetensors writes 0600 where config.json gets 0644: a bundle trained by one uid could not be loaded by the
    serving uid."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    outputs = (
        finetune_run[1]["outputs"]["unet"],
        distill_run[1]["outputs"]["lora"],
        disc_run[1]["outputs"]["discriminator"],
    )
    files = [file for output in outputs for file in Path(output).parent.rglob("*.safetensors")]
    assert len(files) >= 3 and {file.stat().st_mode & 0o777 for file in files} == {0o666 & ~umask}


def test_resume_repeats_the_uninterrupted_losses(finetune_run, work):
    """Restart from the step-2 checkpoint: steps 3 and 4 give the same losses and the same weights."""
    from safetensors.torch import load_file

    from training.finetune import finetune

    settings, summary = finetune_run
    resumed_out = work / "finetune-resumed"
    shutil.copytree(settings.out / "checkpoints" / "step-0000002", resumed_out / "checkpoints" / "step-0000002")
    resumed = finetune(settings.model_copy(update={"out": resumed_out, "resume": "latest"}))
    assert resumed["resumed_from"].endswith("step-0000002")
    expected = {e["step"]: e["loss"] for e in summary["losses"]}
    got = {e["step"]: e["loss"] for e in resumed["losses"]}
    assert list(got) == [1, 2, 3, 4]  # the history continues from the checkpoint
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    a = load_file(str(Path(summary["outputs"]["unet"]) / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(Path(resumed["outputs"]["unet"]) / "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # EMA weights included


class _OneProcess:
    """The part of accelerate's Accelerator that checkpoint.py uses, for one process without a grad scaler."""

    is_main_process, process_index, scaler = True, 0, None

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def _write_checkpoint(out):
    """A checkpoint as the training loop writes it: a stepped AdamW, diffusers' lr schedule and EMA."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from training.checkpoint import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    lr_scheduler.step()
    ema = EMAModel(model.parameters())
    ema.step(model.parameters())
    state = {"stage": "finetune", "losses": [{"step": 1, "loss": 0.5, "lr": 1e-3, "seconds": 0.1}]}
    return save_checkpoint(
        _OneProcess(), out, 1, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, state=state,
        extra={"ema": ema.state_dict()},
    )  # fmt: skip


def _fresh_run():
    from diffusers.optimization import get_scheduler

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)


def _draws():
    import random

    return random.random(), np.random.standard_normal(3).tolist(), np.random.rand(), torch.rand(3).tolist()


def test_resume_restores_the_rng_streams_exactly(tmp_path):
    """Python, numpy (with its cached gaussian) and torch continue from a checkpoint as they did after it was written."""
    from training.checkpoint import find_checkpoint, load_checkpoint

    np.random.standard_normal()  # leaves half of a gaussian pair cached in numpy's state
    path = _write_checkpoint(tmp_path)
    expected = _draws()
    _draws()
    model, optimizer, lr_scheduler = _fresh_run()
    state, extra = load_checkpoint(
        _OneProcess(), find_checkpoint(tmp_path, str(path)), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler
    )
    assert _draws() == expected
    assert state["step"] == 1 and extra["ema"]["optimization_step"] == 1
    assert lr_scheduler.last_epoch == 1 and optimizer.state_dict()["state"][0]["step"].item() == 1


class _RunsCode:
    """Unpickling this opens (creates) the marker file: a stand-in for any code a crafted pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["optimizer.pt", "lr_scheduler.pt", "extra.pt", "rng-0.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(tmp_path, name):
    """`--resume PATH` takes any folder: its .pt files are not unpickled beyond tensors and plain values."""
    from training.checkpoint import find_checkpoint, load_checkpoint
    from training.common import TrainingError

    path = _write_checkpoint(tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save(_RunsCode(marker), path / name)
    model, optimizer, lr_scheduler = _fresh_run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match=rf"{name} holds more than tensors and plain values and is not loaded"):
        load_checkpoint(
            _OneProcess(), find_checkpoint(tmp_path, str(path)), model=model, optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )  # fmt: skip
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was restored


def test_resume_refuses_an_rng_file_of_the_older_format(tmp_path):
    """Older checkpoints kept numpy's RNG state as a numpy array, which only full unpickling reads."""
    import random

    from training.checkpoint import load_checkpoint
    from training.common import TrainingError

    path = _write_checkpoint(tmp_path)
    older = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(older, path / "rng-0.pt")
    model, optimizer, lr_scheduler = _fresh_run()
    with pytest.raises(TrainingError, match="rng-0.pt holds more .* start the run again without --resume"):
        load_checkpoint(_OneProcess(), path, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)


# ---------------------------------------------------------------- distill


@pytest.fixture(scope="module")
def distill_run(tiny_layout, data, work, finetune_run):
    from training.distill import DistillSettings, distill

    settings = DistillSettings(
        **_common(tiny_layout.base, work / "distill", data[0]),
        unet=str(finetune_run[0].out),  # a finetune run folder: its unet/ is the teacher
        steps=2,
        batch_size=2,
        lora_rank=4,
        lora_alpha=8,  # scale 2: folded into the up matrices of the file
    )
    return settings, distill(settings)


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_distill_writes_a_lora_that_fuses_fully_and_equals_the_trained_adapter(distill_run, finetune_run):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    from engines.lora import fuse_lora_file
    from engines.tiny import LCM_LORA_TARGETS
    from training.checkpoint import load_trainable_state

    settings, summary = distill_run
    assert summary["metrics"]["skip"] == 20 and summary["metrics"]["ddim_timesteps"] == 50
    assert all(np.isfinite(e["loss"]) for e in summary["losses"])
    lora_path = summary["outputs"]["lora"]
    keys = list(load_file(lora_path))
    assert any(".lora.down." in k for k in keys) and any(".lora_A." in k for k in keys)  # the authors' mixed style

    teacher_dir = finetune_run[1]["outputs"]["unet"]
    fused = UNet2DConditionModel.from_pretrained(teacher_dir).eval()
    info = fuse_lora_file(fused, lora_path)
    assert info.tensors_applied == info.tensors_in_file == len(keys) and info.rank == 4 and info.scale == 1.0

    student = UNet2DConditionModel.from_pretrained(teacher_dir)
    student.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LCM_LORA_TARGETS))
    student.requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_("lora_" in name)
    checkpoint = settings.out / "checkpoints" / "step-0000002" / "trainable.safetensors"
    load_trainable_state(student, load_file(str(checkpoint)))
    assert info.modules == sum(1 for n, _ in student.named_parameters() if n.endswith("lora_A.default.weight"))
    torch.manual_seed(0)
    inputs = dict(
        sample=torch.randn(1, 9, 8, 8),
        timestep=torch.tensor(759),
        encoder_hidden_states=torch.randn(1, 77, fused.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    )
    with torch.no_grad():
        expected, got = student.eval()(**inputs).sample, fused(**inputs).sample
        plain = UNet2DConditionModel.from_pretrained(teacher_dir).eval()(**inputs).sample
    assert (expected - plain).abs().max() > 1e-6  # the LoRA learned something
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_guided_teacher_is_the_positive_prediction_plus_w_times_its_difference_from_the_negative():
    """The authors' teacher is guided (train_RORem_lcm.py: p + w (p - n), w ~ U[3, 10]); distill's had no guidance."""
    from training.distill import guided

    positive, negative = (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)), (torch.randn(2, 4, 8, 8),) * 2
    w = torch.tensor([3.0, 10.0]).view(-1, 1, 1, 1)
    for got, p, n in zip(guided(positive, negative, w), positive, negative):
        torch.testing.assert_close(got, p + w * (p - n))
    assert guided(positive, None, w) is positive


def test_distill_teacher_is_guided_by_the_teacher_prompts(tiny_layout, data, tmp_path):
    """w ~ U[w_min, w_max] weighs the teacher's prompt against its negative: equal prompts make w irrelevant (the
    unguided teacher with prompt "", the stage's teacher before), the authors' prompts (the default) do not."""
    from training.distill import AUTHORS_TEACHER_PROMPT, DistillSettings, distill

    def losses(name, **teacher):
        common = _common(tiny_layout.base, tmp_path / name, data[0])
        summary = distill(DistillSettings(**common, steps=1, batch_size=2, lora_rank=4, **teacher))
        return torch.tensor([entry["loss"] for entry in summary["losses"]])

    unguided = losses("unguided", w_min=0, w_max=0, teacher_prompt="")
    same_prompts = losses("same-prompts", w_min=3, w_max=10, teacher_prompt="", teacher_negative_prompt="")
    torch.testing.assert_close(same_prompts, unguided, rtol=1e-4, atol=1e-7)
    guided = losses("guided")
    assert DistillSettings(base="tiny", data=data[0], out=tmp_path).teacher_prompt == AUTHORS_TEACHER_PROMPT
    with pytest.raises(ValueError, match="w_min 5.0 is above w_max 3.0"):
        DistillSettings(base="tiny", data=data[0], out=tmp_path, w_min=5, w_max=3)
    assert (guided - unguided).abs().max() > 1e-2 * unguided.abs().max()


@pytest.mark.parametrize("stage, weights", [("distill", "teacher UNet"), ("discriminator", "base UNet")])
def test_resume_refuses_a_unet_trained_against_that_was_retrained_in_place(tiny_layout, data, tmp_path, stage, weights):
    """Only settings and data were compared: a teacher (or base) UNet retrained into the same folder
    went unnoticed, and the resumed run trained against other weights."""
    from safetensors.torch import load_file, save_file

    from training.common import TrainingError
    from training.discriminator import DiscriminatorSettings, train_discriminator
    from training.distill import DistillSettings, distill

    unet = tmp_path / "unet"
    shutil.copytree(Path(tiny_layout.base) / "unet", unet)
    common = _common(tiny_layout.base, tmp_path / stage, data[0], unet=str(unet), steps=1, batch_size=1, resume="latest")
    if stage == "distill":
        run, settings = distill, DistillSettings(**common, lora_rank=4)
    else:
        common.update(data=data[1], resolution=DISC_SIDE)
        run, settings = train_discriminator, DiscriminatorSettings(**common)
    run(settings)
    file = unet / "diffusion_pytorch_model.safetensors"
    save_file({name: tensor + 1 for name, tensor in load_file(file).items()}, str(file))
    with pytest.raises(TrainingError, match=rf"sha256 of the {weights}: [0-9a-f]{{16}} -> [0-9a-f]{{16}}"):
        run(settings.model_copy(update={"steps": 2}))


@pytest.mark.parametrize(
    "stage, part, folder",
    [("finetune", "base VAE", "vae"), ("discriminator", "base text encoder 2", "text_encoder_2")],
)
def test_resume_refuses_a_base_whose_frozen_parts_changed(tiny_layout, data, tmp_path, stage, part, folder):
    """The VAE (latents) and text encoders (the empty prompt) every stage trains against were compared by the
    base's path only: a base re-downloaded or replaced in place went unnoticed at a resume."""
    from safetensors.torch import load_file, save_file

    from training.common import TrainingError
    from training.discriminator import DiscriminatorSettings, train_discriminator
    from training.finetune import FinetuneSettings, finetune

    base = tmp_path / "base"
    shutil.copytree(tiny_layout.base, base)
    common = _common(base, tmp_path / stage, data[0], steps=1, batch_size=1, resume="latest")
    if stage == "finetune":
        run, settings = finetune, FinetuneSettings(**common)
    else:
        common.update(data=data[1], resolution=DISC_SIDE)
        run, settings = train_discriminator, DiscriminatorSettings(**common)
    run(settings)
    (file,) = (base / folder).glob("*.safetensors")
    save_file({name: tensor + 1 for name, tensor in load_file(file).items()}, str(file))
    with pytest.raises(TrainingError, match=rf"sha256 of the {part}: [0-9a-f]{{16}} -> [0-9a-f]{{16}}"):
        run(settings.model_copy(update={"steps": 2}))


def _scored_by_the_service(paths, crops, size):
    """(edited, mask, source) views the service's Scorer is given of a POST /score with these files."""
    from engines import imaging
    from engines.pipeline import RemovalPipeline
    from engines.scorer import ScoringEngine

    jobs = RemovalPipeline(None, crops, imaging.DecodeLimits()).prepare_score(*(p.read_bytes() for p in paths))
    scorer = object.__new__(ScoringEngine)
    scorer.device, scorer.score_size = torch.device("cpu"), size
    return scorer.prepare(jobs)


def test_the_discriminator_learns_on_the_very_view_the_scorer_scores(tmp_path):
    """Its data was brought to the training resolution by PIL's bicubic, while the service's Scorer views a crop
    bilinear and antialiased: ~1 level apart on average, 8 at the 99th percentile (a 1024 window to 512)."""
    from engines.pipeline import CropSettings

    rng = np.random.default_rng(0)
    source, edited = (rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2))
    mask = np.zeros((128, 128), bool)
    mask[41:90, 29:71] = True
    paths = [tmp_path / f"{name}.png" for name in ("source", "mask", "edited")]
    for path, pixels in zip(paths, (source, mask.astype(np.uint8) * 255, edited)):
        Image.fromarray(pixels).save(path)
    record = Triplet(source=paths[0], mask=paths[1], gt=paths[2], score=1.0)
    crops = CropSettings(buckets=(128,), crop_margin=8, dilate=3, feather=0)  # a 128 window, viewed at 64
    item = TripletDataset([record], 64, crops)[0]
    scored_edited, scored_mask, scored_source = _scored_by_the_service(paths, crops, 64)
    assert torch.equal(item["source"], scored_source[0]) and torch.equal(item["gt"], scored_edited[0])
    assert torch.equal(item["mask"], scored_mask[0])
    assert not torch.equal(TripletDataset([record], 64)[0]["source"], item["source"]), "the other stages: bicubic"


def test_the_discriminator_learns_on_the_window_the_service_cuts_around_the_mask(tmp_path):
    """It trained on the center square: an object at the side of a wide photo was not in it, so a removal and the
    untouched source were the same input, labelled 1 and 0."""
    from engines.jobs import SCORE_SIZE
    from engines.pipeline import CropSettings
    from serve.config import ImagingSettings

    gt = np.random.default_rng(0).integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    mask = np.zeros((512, 1024), bool)
    mask[200:300, 40:200] = True
    source = gt.copy()
    source[mask] = [255, 0, 0]
    paths = [tmp_path / f"{name}.png" for name in ("source", "mask", "gt")]
    for path, pixels in zip(paths, (source, mask.astype(np.uint8) * 255, gt)):
        Image.fromarray(pixels).save(path)
    good, unchanged = Triplet(*paths, score=1.0), Triplet(paths[0], paths[1], paths[0], score=0.0)
    crops = CropSettings.from_imaging(ImagingSettings())
    removed, kept = TripletDataset([good, unchanged], SCORE_SIZE, crops)
    assert removed["mask"].sum() > 0 and not torch.equal(removed["gt"], kept["gt"])
    scored_edited, scored_mask, scored_source = _scored_by_the_service(paths, crops, SCORE_SIZE)
    assert torch.equal(removed["source"], scored_source[0]) and torch.equal(removed["gt"], scored_edited[0])
    assert torch.equal(removed["mask"], scored_mask[0])


def test_the_discriminator_refuses_data_with_no_mask(tiny_layout, tmp_path):
    """A record with an empty mask has no removal to judge and no window to cut: left out, and counted."""
    from training.common import TrainingError
    from training.discriminator import DiscriminatorSettings, train_discriminator, without_empty_masks

    photo = np.zeros((64, 64, 3), np.uint8)
    paths = [tmp_path / f"{name}.png" for name in ("source", "mask")]
    Image.fromarray(photo).save(paths[0])
    Image.fromarray(photo[..., 0]).save(paths[1])
    empty = Triplet(paths[0], paths[1], paths[0], score=0.0)
    data = write_metadata(tmp_path / "metadata.json", [empty])
    settings = DiscriminatorSettings(**_common(tiny_layout.base, tmp_path / "disc", data, resolution=512), steps=1)
    with pytest.raises(TrainingError, match="every record's mask is empty"):
        train_discriminator(settings)
    masked = Triplet(paths[0], tmp_path / "masked.png", paths[0], score=0.0)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masked.mask)
    assert without_empty_masks([empty, masked, empty]) == ([masked], [empty, empty])


# ---------------------------------------------------------------- discriminator


@pytest.fixture(scope="module")
def disc_run(tiny_layout, data, work):
    from training.discriminator import DiscriminatorSettings, train_discriminator

    settings = DiscriminatorSettings(
        **_common(tiny_layout.base, work / "disc", data[1], resolution=DISC_SIDE),
        steps=2,
        batch_size=2,
        holdout_fraction=0.25,
    )
    return settings, train_discriminator(settings)


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_discriminator_reports_metrics_and_loads_in_the_published_format(disc_run, tiny_layout):
    from diffusers import AutoencoderKL

    from engines.authors_layout import encode_constant_prompt
    from engines.pipeline import CropSettings
    from engines.scorer import ScoringEngine, load_published_discriminator
    from training.discriminator import split_by_source

    settings, summary = disc_run
    metrics = summary["metrics"]
    assert metrics["train_records"] == 9 and metrics["heldout_records"] == 3  # one source's 3 records
    assert metrics["empty_mask_records"] == 0
    held = metrics["heldout"]
    for threshold in ("0.5", "0.9"):
        assert set(held["thresholds"][threshold]) >= {"precision", "recall", "f1", "accuracy"}
    folder = Path(summary["outputs"]["discriminator"])
    disc, info = load_published_discriminator(
        Path(tiny_layout.base) / "unet", folder / "pytorch_lora_weights.safetensors", folder / "cls_pred_branch.pt"
    )
    assert info["lora_rank"] == 4 and info["lora"]["tensors_applied"] == info["lora"]["tensors_in_file"] == 48

    # the serving engine gives the loaded discriminator the scores training measured on the held-out set
    embeds, pooled = encode_constant_prompt(Path(tiny_layout.base), "")
    engine = ScoringEngine(AutoencoderKL.from_pretrained(Path(tiny_layout.base) / "vae"), disc, embeds, pooled)
    _, held_out = split_by_source(load_metadata(settings.data), settings.holdout_fraction, settings.seed)
    crops = CropSettings(tuple(settings.buckets), settings.crop_margin, settings.dilate, feather=0)
    items = [TripletDataset(held_out, DISC_SIDE, crops)[i] for i in range(len(held_out))]
    scores = engine.score_tensors(
        torch.stack([it["gt"] for it in items]),
        torch.stack([it["mask"] for it in items]),
        torch.stack([it["source"] for it in items]),
    )
    np.testing.assert_allclose(scores.numpy(), held["scores"], atol=1e-4)


def test_classification_metrics():
    from training.discriminator import classification_metrics

    m = classification_metrics([0.95, 0.6, 0.2, 0.7], [1, 1, 0, 0], 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0 and m["accuracy"] == 0.75
    assert classification_metrics([0.1], [1], 0.9)["precision"] == 0.0


# ---------------------------------------------------------------- bundle and annotate


@pytest.fixture(scope="module")
def trained_bundle(tiny_layout, work, finetune_run, distill_run, disc_run):
    from training.assemble import BundleStageSettings, assemble

    settings = BundleStageSettings(
        out=work / "bundle",
        base=tiny_layout.base,
        unet=str(finetune_run[0].out),
        lcm_lora=str(distill_run[0].out),
        discriminator=str(disc_run[0].out),
        dtype="float32",
        name="tiny-trained",
    )
    return assemble(settings)


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_bundle_stage_output_verifies_and_serves(trained_bundle, data):
    from engines.bundle import Bundle
    from engines.jobs import RemovalJob, ScoreJob
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine
    from training.data import load_mask, load_rgb

    bundle = Bundle.load(trained_bundle["outputs"]["bundle"], verify=True)
    provenance = bundle.manifest.provenance
    assert provenance["lcm_lora"]["tensors_applied"] == provenance["lcm_lora"]["tensors_in_file"]
    assert provenance["training"]["unet"]["stage"] == "finetune" and provenance["training"]["unet"]["steps_done"] == 4
    assert provenance["training"]["lcm_lora"]["stage"] == "distill"
    assert "0.5" in provenance["training"]["discriminator"]["metrics"]["heldout"]["thresholds"]
    assert "scores" not in provenance["training"]["discriminator"]["metrics"]["heldout"]  # no per-item lists
    assert len(provenance["inputs_sha256"][provenance["source"]["lcm_lora"]]) == 64
    trunk = provenance["training"]["discriminator"]["metrics"]["base_unet"]
    assert provenance["source"]["discriminator_unet"] == trunk, "the discriminator on the UNet it was trained on"
    assert bundle.has_discriminator and bundle.manifest.sampling.steps == 4

    record = load_metadata(data[0])[0]
    image, mask = load_rgb(record.source, SIDE), load_mask(record.mask, SIDE)
    [result] = RemovalEngine.from_bundle(bundle).remove([RemovalJob(image=image, mask=mask, seed=1)])
    assert result.shape == image.shape and result.dtype == np.uint8
    [score] = ScoringEngine.from_bundle(bundle).score([ScoreJob(source=image, mask=mask, edited=result)])
    assert np.isfinite(score) and score >= 0


def test_bundle_refuses_an_lcm_lora_distilled_against_another_unet_unless_allowed(tiny_layout, data, tmp_path):
    """A LoRA distilled against one UNet was fused into any other --unet without a word."""
    from safetensors.torch import load_file, save_file

    from engines.bundle import Bundle
    from training.assemble import BundleStageSettings, assemble
    from training.common import TrainingError
    from training.distill import DistillSettings, distill

    distill(DistillSettings(**_common(tiny_layout.base, tmp_path / "distill", data[0]), steps=1, batch_size=1, lora_rank=4))
    other = tmp_path / "other-unet"
    shutil.copytree(Path(tiny_layout.base) / "unet", other)
    file = other / "diffusion_pytorch_model.safetensors"
    save_file({name: tensor + 1 for name, tensor in load_file(file).items()}, str(file))
    settings = BundleStageSettings(
        out=tmp_path / "bundle", base=tiny_layout.base, unet=str(other), lcm_lora=str(tmp_path / "distill"),
        dtype="float32", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    with pytest.raises(TrainingError, match=r"distilled against a teacher UNet with weights sha256 [0-9a-f]{16}, not"):
        assemble(settings)
    assert not (tmp_path / "bundle" / "manifest.json").exists()

    allowed = assemble(settings.model_copy(update={"allow_other_teacher": True}))
    recorded = Bundle.load(allowed["outputs"]["bundle"], verify=True).manifest.provenance["other_teacher"]
    assert recorded["allowed"] and recorded["teacher_sha256"] != recorded["unet_sha256"]


def test_bundle_refuses_a_base_other_than_the_one_its_runs_trained_on_unless_allowed(tiny_layout, data, tmp_path):
    """`bundle --base tiny:1` over runs trained on tiny (seed 0) took the other base's VAE and prompt embeddings
    beside the trained weights, silently."""
    from engines.bundle import Bundle
    from training.assemble import BundleStageSettings, assemble
    from training.common import TrainingError
    from training.distill import DistillSettings, distill

    common = _common(tiny_layout.base, tmp_path / "distill", data[0])
    distill(DistillSettings(**common, steps=1, batch_size=1, lora_rank=4))
    settings = BundleStageSettings(
        out=tmp_path / "bundle", base="tiny:1", unet=str(Path(tiny_layout.base) / "unet"),
        lcm_lora=str(tmp_path / "distill"), dtype="float32", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    run = str((tmp_path / "distill").resolve())
    for part in ("base VAE", "base text encoder", "base text encoder 2"):
        with pytest.raises(TrainingError, match=rf"the distill run {run} trained against a {part} with weights sha256"):
            assemble(settings)
    with pytest.raises(TrainingError, match="pass --allow-other-base"):
        assemble(settings)
    assert not (tmp_path / "bundle" / "manifest.json").exists()

    allowed = assemble(settings.model_copy(update={"allow_other_base": True}))
    recorded = Bundle.load(allowed["outputs"]["bundle"], verify=True).manifest.provenance["other_base"]
    assert {entry["part"] for entry in recorded} == {"base VAE", "base text encoder", "base text encoder 2"}
    assert all(entry["allowed"] and entry["run_sha256"] != entry["base_sha256"] for entry in recorded)


def test_bundle_samples_on_the_grid_and_scaling_the_lora_was_distilled_with(tiny_layout, data, tmp_path):
    """The bundle's LCMScheduler kept LCM's defaults (50 steps, scaling 10) whatever distill trained with."""
    from diffusers import DDPMScheduler

    from engines.bundle import Bundle
    from engines.lcm import LCMSchedule
    from training.assemble import BundleStageSettings, assemble
    from training.distill import DDIMSolver, DistillSettings, distill

    distill_settings = DistillSettings(
        **_common(tiny_layout.base, tmp_path / "distill", data[0]), steps=1, batch_size=1, lora_rank=4,
        num_ddim_timesteps=25, timestep_scaling_factor=7.0,
    )  # fmt: skip
    distill(distill_settings)
    summary = assemble(BundleStageSettings(
        out=tmp_path / "bundle", base=tiny_layout.base, unet=str(Path(tiny_layout.base) / "unet"),
        lcm_lora=str(tmp_path / "distill"), dtype="float32", cache_dir=tmp_path / "cache",
    ))  # fmt: skip
    scheduler = Bundle.load(summary["outputs"]["bundle"], verify=True).make_scheduler()
    assert scheduler.config.original_inference_steps == 25 and scheduler.config.timestep_scaling == 7.0
    ddpm = DDPMScheduler.from_pretrained(Path(tiny_layout.base) / "scheduler")
    grid = set(DDIMSolver(ddpm.alphas_cumprod, ddpm.config.num_train_timesteps, 25).timesteps.tolist())
    assert set(LCMSchedule.from_scheduler(scheduler, 4, 1.0).timesteps) <= grid


def test_bundle_refuses_more_steps_than_the_grid_the_lora_was_distilled_on():
    from training.assemble import _lcm_schedule
    from training.common import TrainingError

    run = {"run": "runs/distill", "config": {"num_ddim_timesteps": 4, "timestep_scaling_factor": 10.0}}
    assert _lcm_schedule(run, 4) == {"original_inference_steps": 4, "timestep_scaling": 10.0}
    with pytest.raises(TrainingError, match="distilled on 4 DDIM timesteps"):
        _lcm_schedule(run, 5)


def test_bundle_provenance_hashes_the_discriminator_head_that_is_loaded(tiny_layout, tmp_path):
    """The import prefers cls_pred_branch.safetensors to the authors' .pt: provenance hashes the file it loaded."""
    import hashlib

    from safetensors.torch import save_file

    from engines.bundle import Bundle
    from training.assemble import LORA_FILENAME, BundleStageSettings, assemble

    disc = tmp_path / "discriminator"
    shutil.copytree(tiny_layout.discriminator, disc)  # the LoRA and the authors' cls_pred_branch.pt
    save_file(torch.load(disc / "cls_pred_branch.pt", weights_only=True), disc / "cls_pred_branch.safetensors")
    settings = BundleStageSettings(
        out=tmp_path / "bundle", base=tiny_layout.base, unet=tiny_layout.unet, lcm_lora=tiny_layout.lcm_lora,
        discriminator=str(disc), dtype="float32",
    )  # fmt: skip
    bundle = Bundle.load(assemble(settings)["outputs"]["bundle"], verify=True)
    assert bundle.manifest.provenance["discriminator"]["head"] == "cls_pred_branch.safetensors"
    hashed = {Path(path).resolve(): sha for path, sha in bundle.manifest.provenance["inputs_sha256"].items()}
    for name in (LORA_FILENAME, "cls_pred_branch.safetensors"):
        assert hashed[(disc / name).resolve()] == hashlib.sha256((disc / name).read_bytes()).hexdigest()


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_annotate_keeps_only_results_at_or_above_the_threshold(trained_bundle, data, work):
    from training.annotate import AnnotateSettings, annotate

    settings = AnnotateSettings(
        out=work / "round1", bundle=trained_bundle["outputs"]["bundle"], data=data[0], resolution=SIDE, batch_size=4
    )
    first = annotate(settings)
    scores = [item["score"] for item in first["metrics"]["items"]]
    assert len(scores) == 4 and len(set(scores)) == 4
    median = statistics.median(scores)
    # re-threshold at the median: the logged scores are reused, nothing runs again
    second = annotate(settings.model_copy(update={"threshold": median, "resume": True}))
    assert second["metrics"]["reused_from_log"] == 4
    kept = load_metadata(second["outputs"]["metadata"], require=("source", "mask", "GT", "score"))
    assert sorted(r.score for r in kept) == sorted(s for s in scores if s >= median)
    assert 0 < len(kept) < 4
    assert sum(second["metrics"]["histogram"].values()) == 4
    for record in kept:
        assert Image.open(record.gt).size == Image.open(record.source).size == (SIDE, SIDE)


def test_annotate_dilates_masks_as_the_service_does_by_default(tmp_path):
    """--dilate defaulted to 0 while the service dilates every mask by imaging.dilate (20)."""
    from serve.config import ImagingSettings
    from training.annotate import AnnotateSettings

    settings = AnnotateSettings(out=tmp_path, bundle="tiny", data=tmp_path / "pairs.json")
    assert settings.dilate == ImagingSettings().dilate == 20


def test_annotate_counts_a_non_finite_score_and_writes_no_nan(tiny_bundle, tmp_path, monkeypatch):
    """A NaN score went into summary.json as a bare NaN (no JSON) and into the histogram and mean."""
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine
    from training.annotate import SCORE_LOG, AnnotateSettings, annotate

    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((SIDE, SIDE, 3), 128, np.uint8)).save(tmp_path / "source.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "source.png", "mask": "mask.png"}] * 2))

    class Remover:
        def remove(self, jobs):
            return [job.image for job in jobs]

    class Scorer:
        def score(self, jobs):
            return [float("nan"), 0.5][: len(jobs)]

    monkeypatch.setattr(RemovalEngine, "from_bundle", classmethod(lambda cls, *a, **k: Remover()))
    monkeypatch.setattr(ScoringEngine, "from_bundle", classmethod(lambda cls, *a, **k: Scorer()))
    out = tmp_path / "round"
    summary = annotate(AnnotateSettings(out=out, bundle=str(tiny_bundle.path), data=tmp_path / "pairs.json",
                                        resolution=SIDE, threshold=0.4))  # fmt: skip
    metrics = summary["metrics"]
    assert metrics["skipped_non_finite_score"] == 1 and metrics["scored"] == 1 and metrics["kept"] == 1
    assert metrics["mean_score"] == 0.5 and sum(metrics["histogram"].values()) == 1
    for text in ((out / "summary.json").read_text(), (out / SCORE_LOG).read_text()):
        assert "NaN" not in text


def test_an_annotate_stopped_by_ctrl_c_says_resume_keeps_its_scores_on_a_line_of_its_own(
    tiny_bundle, tmp_path, monkeypatch, capsys
):
    """It said only "interrupted" (a resume reuses the logged scores), at the end of the progress bar's open line."""
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine
    from training.cli import main

    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((SIDE, SIDE, 3), 128, np.uint8)).save(tmp_path / "source.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "source.png", "mask": "mask.png"}] * 2))
    calls = []

    class Remover:
        def remove(self, jobs):
            calls.append(len(jobs))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return [job.image for job in jobs]

    class Scorer:
        def score(self, jobs):
            return [0.5] * len(jobs)

    monkeypatch.setattr(RemovalEngine, "from_bundle", classmethod(lambda cls, *a, **k: Remover()))
    monkeypatch.setattr(ScoringEngine, "from_bundle", classmethod(lambda cls, *a, **k: Scorer()))
    argv = ["annotate", "--bundle", str(tiny_bundle.path), "--data", str(tmp_path / "pairs.json"),
            "--out", str(tmp_path / "round"), "--resolution", str(SIDE), "--batch-size", "1"]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.split("\n")[-2] == "python -m training annotate: interrupted; rerun with --resume to keep the " \
        "scores logged so far", err


def test_annotate_gives_the_models_each_mask_as_the_service_does(tiny_bundle, tmp_path, monkeypatch):
    """A thin stroke off the latent grid was blacked out in the remover's input with no latent cell to fill: the
    data round now grows it to whole cells as the service's pipeline does (engines.pipeline.removal_mask)."""
    from engines.remover import RemovalEngine
    from engines.scorer import ScoringEngine
    from training.annotate import AnnotateSettings, annotate

    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[20:40, 9] = 255  # 1 px wide, at no multiple of 8
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((SIDE, SIDE, 3), 128, np.uint8)).save(tmp_path / "source.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "source.png", "mask": "mask.png"}]))
    given = []

    class Remover:
        def remove(self, jobs):
            given.extend(job.mask for job in jobs)
            return [job.image for job in jobs]

    class Scorer:
        def score(self, jobs):
            return [0.5 for _ in jobs]

    monkeypatch.setattr(RemovalEngine, "from_bundle", classmethod(lambda cls, *a, **k: Remover()))
    monkeypatch.setattr(ScoringEngine, "from_bundle", classmethod(lambda cls, *a, **k: Scorer()))
    annotate(AnnotateSettings(out=tmp_path / "round", bundle=str(tiny_bundle.path), data=tmp_path / "pairs.json",
                              resolution=SIDE, dilate=0))  # fmt: skip
    (removed,) = given
    assert removed[16:40, 8:16].all() and removed.sum() == 24 * 8, "the stroke's latent cells, whole"


# ---------------------------------------------------------------- CLI


@pytest.mark.slow  # minutes of CPU without Ray: `make test-fast` skips it
def test_cli_runs_a_stage_and_prints_the_summary(tmp_path):
    out = tmp_path / "synthetic"
    config = tmp_path / "synthetic.yaml"
    config.write_text("n: 3\nsize: 32\nkinds: [noise]\n")
    done = subprocess.run(
        [sys.executable, "-m", "training", "synthetic", "--config", str(config), "--out", str(out), "--n", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"summary: {out / 'summary.json'}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n"] == 2 and summary["config"]["kinds"] == ["noise"]  # the flag beats the config
    assert len(load_metadata(out / "discriminator" / "metadata.json", require=("source", "mask", "GT", "score"))) == 4


def test_cli_reports_bad_settings_bad_data_and_wrong_parts(tmp_path, capsys, tiny_layout):
    from training.cli import main

    assert main(["finetune", "--base", "tiny", "--data", "x.json", "--out", str(tmp_path), "--resolution", "100"]) == 2
    assert "resolution: resolution must be a positive multiple of 64" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main(["finetune", "--base", "tiny", "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "bad data:" in capsys.readouterr().err
    not_a_finetune = tmp_path / "run"
    not_a_finetune.mkdir()
    (not_a_finetune / "summary.json").write_text(json.dumps({"stage": "distill", "status": "completed"}))
    args = ["bundle", "--base", tiny_layout.base, "--unet", str(not_a_finetune), "--lcm-lora", str(not_a_finetune)]
    args += ["--out", str(tmp_path / "b")]
    assert main(args) == 1
    assert "is a distill run, expected a finetune run" in capsys.readouterr().err


def test_training_reads_masks_and_photos_as_the_service_does(tmp_path):
    """An opaque black-and-white RGBA mask (as editors save one) was read from its alpha: the whole image to
    remove; an EXIF-rotated photo and mask were read as stored, so the mask fell on another part of the photo."""
    from engines import imaging
    from training.data import load_mask, load_metadata, load_rgb

    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:30] = 255
    opaque = np.dstack([mask, mask, mask, np.full_like(mask, 255)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    expected = imaging.decode_mask((tmp_path / "opaque.png").read_bytes(), (40, 60), imaging.DecodeLimits())
    assert expected.mean() < 0.1
    np.testing.assert_array_equal(load_mask(tmp_path / "opaque.png", 40)[:, :40], expected[:, 10:50])

    photo = np.zeros((40, 60, 3), np.uint8)
    photo[5:15, 10:30] = 255  # the object, where the mask (drawn on the upright photo) is
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's photo: stored turned, shown upright
    Image.fromarray(np.rot90(photo, 1).copy()).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "metadata.json").write_text(json.dumps([{"source": "photo.jpg", "mask": "mask.png"}]))
    load_metadata(tmp_path / "metadata.json", require=("source", "mask"))  # upright sizes agree
    rgb, removed = load_rgb(tmp_path / "photo.jpg", 40), load_mask(tmp_path / "mask.png", 40)
    assert rgb[removed].mean() > 200 and rgb[~removed].mean() < 30, "the mask lies on the object"


def test_training_reads_16_bit_photos_as_the_service_does_and_8_bit_ones_as_before(tmp_path):
    """PIL's convert("RGB") clipped a 16-bit gray PNG's samples to 255 (mid-gray read as white) where the service
    scales them; finetune, distill, discriminator, annotate and make_negatives all read photos this way."""
    from PIL import ImageOps

    from engines import imaging
    from training.data import _resize_crop, load_rgb, read_mask

    Image.fromarray(np.full((40, 60), 32768, np.uint16)).save(tmp_path / "gray16.png")
    served = imaging.decode_image((tmp_path / "gray16.png").read_bytes(), imaging.DecodeLimits()).rgb
    assert load_rgb(tmp_path / "gray16.png", 32).mean() == served.mean() == 128  # 32768 / 65535 of 255

    photo = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90, exif=exif)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(photo).convert("P").save(tmp_path / "palette.png")
    for name in ("photo.jpg", "photo.png", "palette.png"):
        for side in (None, 32, 96):
            with Image.open(tmp_path / name) as img:
                before = _resize_crop(ImageOps.exif_transpose(img).convert("RGB"), side, Image.Resampling.BICUBIC)
            np.testing.assert_array_equal(load_rgb(tmp_path / name, side), np.asarray(before), err_msg=f"{name} {side}")

    mask = np.zeros((40, 60), bool)
    mask[5:15, 10:30] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    triplet = Triplet(tmp_path / "gray16.png", tmp_path / "mask.png", tmp_path / "gray16.png")
    labelled = load_metadata(make_negatives([triplet], tmp_path / "disc", kinds=("no-change",)))
    edited = np.asarray(Image.open(labelled[1].gt))
    assert edited.shape == (40, 60, 3) and edited.mean() == pytest.approx(128.0), "negatives read photos alike"
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)


def test_the_discriminator_trains_only_at_the_side_the_service_scores(tiny_layout, data, tmp_path):
    """--resolution 1024 was accepted, and the bundle then served the discriminator on a 512 view it never saw."""
    from engines.jobs import SCORE_SIZE
    from training.discriminator import DiscriminatorSettings

    common = _common(tiny_layout.base, tmp_path / "disc", data[1], resolution=2 * SCORE_SIZE)
    with pytest.raises(ValueError, match=rf"resolution {2 * SCORE_SIZE}: the discriminator trains at {SCORE_SIZE}"):
        DiscriminatorSettings(**common, steps=1, batch_size=1, holdout_fraction=0)
    assert not (tmp_path / "disc").exists(), "refused before anything is written"


def test_another_discriminator_resolution_exits_2_before_anything_is_loaded_or_written(data, tmp_path, capsys):
    """--resolution 256 exited 1 after writing .lock and a failed summary.json over a completed run's: the docs say
    invalid settings (exit 2), refused before anything is loaded or written (not even the tiny base is generated)."""
    from training import cli

    out = tmp_path / "disc"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"stage": "discriminator", "status": "completed", "outputs": {}}))
    before = sorted(p.name for p in out.iterdir()), (out / "summary.json").read_bytes()
    argv = ["discriminator", "--base", "tiny", "--cache-dir", str(tmp_path / "cache"), "--data", str(data[1]),
            "--out", str(out), "--resolution", "256", "--steps", "50"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid settings: resolution: resolution 256: the discriminator trains at 512" in err
    assert (sorted(p.name for p in out.iterdir()), (out / "summary.json").read_bytes()) == before
    assert not (tmp_path / "cache").exists()
