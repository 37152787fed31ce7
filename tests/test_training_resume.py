"""Resuming, through the training loop on a toy model (seconds, no diffusion model): a checkpoint
continues only the run that wrote it (same settings and data, or an explicit override), the
settings that may change do not stop it, the resumed losses and EMA equal the uninterrupted run's,
and the EMA follows the model onto its device after a resume (the meta device stands in for CUDA)."""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.common import RunSummary, TrainingError

STEPS = 4


class _Accelerator:
    """What training.loop uses of accelerate's Accelerator, for one process on `device`; prepare()
    leaves the model where the test built it."""

    is_main_process, is_local_main_process, process_index, scaler = True, False, 0, None

    def __init__(self, device="cpu", processes=1):
        self.device, self.num_processes = torch.device(device), processes

    def main_process_first(self):
        return nullcontext()

    def prepare(self, *objects):
        return objects

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor, reduction="mean"):
        return torch.zeros(()) if tensor.is_meta else tensor

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        print(*args)


def _dataset(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(3, generator=g), "y": torch.randn(1, generator=g)} for _ in range(n)]


def _loss(model, batch, generator):
    noise = torch.randn(batch["y"].shape, generator=generator).to(batch["y"].device)
    return ((model(batch["x"]) - batch["y"] - 0.1 * noise) ** 2).mean()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data" / "metadata.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"source": "a.png", "mask": "a.png", "GT": "a.png"}]))
    return path


def _settings(data_file, out, **overrides):
    from training.finetune import FinetuneSettings

    values = {
        "base": "tiny", "data": data_file, "out": out, "steps": STEPS, "batch_size": 2, "lr": 1e-2,
        "checkpoint_every": 2, "ema": True, "ema_decay": 0.9, "resume": "latest",
        "cache_dir": data_file.parent.parent / "cache", **overrides,
    }  # fmt: skip
    return FinetuneSettings(**values)


def _run(settings, device="cpu", processes=1, inputs=None):
    """The loop as finetune runs it, with a toy model and an EMA of it; returns (summary, model, ema)."""
    from diffusers.training_utils import EMAModel

    from training.loop import train

    torch.manual_seed(settings.seed)
    model = nn.Linear(3, 1).to(device)
    ema = EMAModel(model.parameters(), decay=settings.ema_decay) if settings.ema else None
    accelerator = _Accelerator(device, processes)
    summary = RunSummary("finetune", settings, accelerator)
    trained = train(settings, accelerator, summary, model, _dataset(), _loss, ema=ema, inputs=inputs)
    summary.write("completed")
    return summary.data, trained, ema


def _losses(summary):
    return {e["step"]: e["loss"] for e in summary["losses"]}


def test_an_interrupted_run_resumes_to_the_uninterrupted_losses_and_ema_with_what_may_change(data_file, tmp_path):
    """Steps 1-2 in one folder; the checkpoint copied elsewhere and resumed to step 4 with every
    setting that may change changed: the same losses, weights and EMA as 4 steps in one go."""
    whole, whole_model, whole_ema = _run(_settings(data_file, tmp_path / "whole"))
    _run(_settings(data_file, tmp_path / "first", steps=2))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "first" / "checkpoints", moved / "checkpoints")
    may_change = {
        "out": moved, "steps": STEPS, "checkpoint_every": 1, "keep_checkpoints": 3, "num_workers": 1, "cpu": True,
        "gradient_checkpointing": True, "cache_dir": tmp_path / "cache", "resume": "latest",
    }  # fmt: skip
    resumed, model, ema = _run(_settings(data_file, **may_change))
    assert resumed["resumed_from"].endswith("step-0000002") and "resume_changes" not in resumed
    assert list(_losses(resumed)) == [1, 2, 3, 4]
    assert _losses(resumed) == pytest.approx(_losses(whole), abs=1e-7, rel=0)
    for a, b in zip(model.parameters(), whole_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    for a, b in zip(ema.shadow_params, whole_ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert ema.optimization_step == whole_ema.optimization_step == STEPS


def test_resume_refuses_a_checkpoint_of_other_settings_naming_each_change_and_the_way_out(data_file, tmp_path):
    """The review's case: a second round into the same folder with `resume: latest` and another seed and lr."""
    out = tmp_path / "run"
    _run(_settings(data_file, out))
    before = (out / "summary.json").read_text()
    with pytest.raises(TrainingError) as refused:
        _run(_settings(data_file, out, seed=1, lr=1e-3, steps=STEPS + 2))
    message = str(refused.value)
    assert "step-0000004 was written by a run with other settings or data" in message
    assert "lr: 0.01 -> 0.001" in message and "seed: 0 -> 1" in message
    assert "steps" not in message  # the step total may change
    assert "new output folder" in message and "--resume-despite-changes" in message
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_resume_refuses_other_data_at_the_same_path(data_file, tmp_path):
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    data_file.write_text(json.dumps([{"source": "b.png", "mask": "b.png", "GT": "b.png"}]))
    with pytest.raises(TrainingError, match=r"sha256 of the data file .*metadata.json: [0-9a-f]{16} -> [0-9a-f]{16}"):
        _run(_settings(data_file, out))


def test_resume_refuses_a_checkpoint_that_did_not_record_its_data(data_file, tmp_path):
    """A checkpoint written before data hashing cannot show its data is the same: refused, saying so."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    state_file = out / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["data_sha256"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match=r"not recorded: the checkpoint predates data hashing"):
        _run(_settings(data_file, out))
    resumed, _, _ = _run(_settings(data_file, out, resume_despite_changes=True))
    assert resumed["resumed_from"].endswith("step-0000002")


def test_resume_despite_changes_continues_and_records_them(data_file, tmp_path):
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    resumed, _, _ = _run(_settings(data_file, out, lr=1e-3, resume_despite_changes=True))
    assert resumed["resumed_from"].endswith("step-0000002")
    assert [e["step"] for e in resumed["losses"]] == [1, 2, 3, 4]
    assert resumed["resume_changes"] == ["lr: 0.01 -> 0.001"]
    assert json.loads((out / "summary.json").read_text())["resume_changes"] == ["lr: 0.01 -> 0.001"]


def test_resume_despite_changes_trains_with_the_changed_optimizer_settings(data_file, tmp_path):
    """The restored optimizer and EMA kept the recorded lr, betas, weight decay, eps and EMA decay:
    a change listed in resume_changes was not the one that ran."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    changed = {"lr": 1e-3, "adam_beta1": 0.5, "adam_beta2": 0.9, "adam_weight_decay": 0.5, "adam_epsilon": 1e-6}
    resumed, _, ema = _run(_settings(data_file, out, ema_decay=0.5, resume_despite_changes=True, **changed))
    assert len(resumed["resume_changes"]) == 6
    assert [e["lr"] for e in resumed["losses"]] == [1e-2, 1e-2, 1e-3, 1e-3]
    group = torch.load(out / "checkpoints" / "step-0000004" / "optimizer.pt")["param_groups"][0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-3, (0.5, 0.9), 0.5, 1e-6)
    assert ema.decay == 0.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_schedule_over_the_steps_follows_a_changed_step_total_from_the_resumed_step(data_file, tmp_path, schedule):
    """The restored schedule was the recorded run's: resumed from its last step to a larger total, the
    next step ran at its lr (0 for linear), then jumped to the new schedule. The step total shapes these
    schedules, so its change is listed (and refused without --resume-despite-changes)."""
    from diffusers.optimization import get_scheduler

    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2, lr_scheduler=schedule))
    with pytest.raises(TrainingError, match=r"steps: 2 -> 4"):
        _run(_settings(data_file, out, lr_scheduler=schedule))
    resumed, _, _ = _run(_settings(data_file, out, lr_scheduler=schedule, resume_despite_changes=True))
    assert resumed["resume_changes"] == ["steps: 2 -> 4"]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    (fraction,) = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=STEPS).lr_lambdas
    assert [e["lr"] for e in resumed["losses"][2:]] == pytest.approx([1e-2 * fraction(2), 1e-2 * fraction(3)])


def test_resume_refuses_another_process_count(data_file, tmp_path):
    """Each step's samples depend on the process count: resuming with another was accepted silently. A
    checkpoint written before the count was recorded has one rng-*.pt per process that wrote it."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    with pytest.raises(TrainingError, match=r"processes: 1 -> 2"):
        _run(_settings(data_file, out), processes=2)
    state_file = out / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("processes") == 1
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match=r"processes: 1 -> 2"):
        _run(_settings(data_file, out), processes=2)
    resumed, _, _ = _run(_settings(data_file, out, resume_despite_changes=True), processes=2)
    assert resumed["resume_changes"] == ["processes: 1 -> 2"]


def test_resume_refuses_weights_trained_against_that_changed_in_place(data_file, tmp_path):
    """A teacher retrained into the same folder: only settings and data were compared, so the resumed
    run went on against other weights. A checkpoint that did not record them cannot show they are the same."""
    teacher = tmp_path / "teacher"
    (teacher / "unet").mkdir(parents=True)
    (teacher / "unet" / "weights.safetensors").write_bytes(b"first round")
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2), inputs={"teacher UNet": teacher})
    (teacher / "unet" / "weights.safetensors").write_bytes(b"second round")
    with pytest.raises(TrainingError, match=r"sha256 of the teacher UNet: [0-9a-f]{16} -> [0-9a-f]{16}"):
        _run(_settings(data_file, out), inputs={"teacher UNet": teacher})
    resumed, _, _ = _run(_settings(data_file, out, resume_despite_changes=True), inputs={"teacher UNet": teacher})
    assert [line.split(":")[0] for line in resumed["resume_changes"]] == ["sha256 of the teacher UNet"]
    assert _run(_settings(data_file, out, steps=6), inputs={"teacher UNet": teacher})[0]["resumed_from"]

    state_file = out / "checkpoints" / "step-0000006" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "inputs_sha256": {}}))
    with pytest.raises(TrainingError, match=r"teacher UNet: \(not recorded: the checkpoint predates weights hashing"):
        _run(_settings(data_file, out, steps=8), inputs={"teacher UNet": teacher})


def test_ema_turned_on_at_a_resume_starts_from_the_restored_weights(data_file, tmp_path):
    """A checkpoint without an EMA, resumed with EMA on (despite the change): a KeyError 'ema' stopped the run."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2, ema=False))
    with pytest.raises(TrainingError, match=r"ema: False -> True"):
        _run(_settings(data_file, out))
    resumed, model, ema = _run(_settings(data_file, out, steps=2, resume_despite_changes=True))
    assert resumed["resume_changes"] == ["ema: False -> True"] and resumed["resumed_from"].endswith("step-0000002")
    for a, b in zip(ema.shadow_params, model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    resumed, _, ema = _run(_settings(data_file, out, resume_despite_changes=True))
    assert [e["step"] for e in resumed["losses"]] == [1, 2, 3, 4] and ema.optimization_step == 2


def test_resume_refuses_a_checkpoint_of_another_stage_even_despite_changes(data_file, tmp_path):
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    state_file = out / "checkpoints" / "step-0000002" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "stage": "distill"}))
    with pytest.raises(TrainingError, match="is a distill checkpoint, not finetune"):
        _run(_settings(data_file, out, resume_despite_changes=True))


def test_resume_changes_of_each_stage(data_file, tmp_path):
    """What each stage's settings model lets change (the discriminator: its evaluation batch too);
    a setting the checkpoint does not record compares as its default."""
    from training.checkpoint import resume_changes
    from training.discriminator import DiscriminatorSettings
    from training.distill import DistillSettings

    common = {"base": "tiny", "data": data_file, "out": tmp_path / "run"}
    for model, changed, allowed in (
        (DiscriminatorSettings, {"lora_rank": 8, "holdout_fraction": 0.5}, {"eval_batch_size": 2}),
        (DistillSettings, {"lora_rank": 8, "loss_type": "huber"}, {"num_workers": 4}),
    ):
        facts = {"data_sha256": "0" * 64, "inputs_sha256": {"base UNet": "1" * 64}, "processes": 1}
        recorded = {"settings": json.loads(model(**common).model_dump_json()), **facts}
        assert resume_changes(recorded, model(**common, **allowed), facts) == []
        found = resume_changes(recorded, model(**common, **changed, **allowed), facts)
        assert [line.split(":")[0] for line in found] == sorted(changed)
        del recorded["settings"]["lora_rank"]
        assert resume_changes(recorded, model(**common), facts) == []
        assert resume_changes(recorded, model(**common, lora_rank=8), facts)[0].endswith("-> 8")


def test_a_distill_checkpoint_from_before_the_guided_teacher_resumes_only_unguided(data_file, tmp_path):
    """Its settings do not name the teacher's prompts or guidance: it trained unguided with prompt "", so it is no
    run with the defaults (the authors' guided teacher), which compared as unchanged."""
    from training.checkpoint import resume_changes
    from training.distill import DistillSettings

    common = {"base": "tiny", "data": data_file, "out": tmp_path / "run"}
    facts = {"data_sha256": "0" * 64, "inputs_sha256": {"teacher UNet": "1" * 64}, "processes": 1}
    recorded = {"settings": json.loads(DistillSettings(**common).model_dump_json()), **facts}
    for name in ("teacher_prompt", "teacher_negative_prompt", "w_min", "w_max"):
        del recorded["settings"][name]
    found = resume_changes(recorded, DistillSettings(**common), facts)
    assert [line.split(":")[0] for line in found] == ["teacher_negative_prompt", "teacher_prompt", "w_max", "w_min"]
    unguided = DistillSettings(**common, teacher_prompt="", teacher_negative_prompt="", w_min=0, w_max=0)
    assert resume_changes(recorded, unguided, facts) == []


def test_a_discriminator_checkpoint_from_before_the_service_s_windows_is_no_silent_resume(data_file, tmp_path):
    """It trained on each image's centre square; its settings name no window, which compared as the defaults, so it
    resumed onto the service's windows without a word."""
    from training.checkpoint import resume_changes
    from training.discriminator import DiscriminatorSettings

    settings = DiscriminatorSettings(base="tiny", data=data_file, out=tmp_path / "run", resolution=512)
    facts = {"data_sha256": "0" * 64, "inputs_sha256": {}, "processes": 1}
    recorded = {"settings": json.loads(settings.model_dump_json()), **facts}
    assert resume_changes(recorded, settings, facts) == []
    for name in ("buckets", "crop_margin", "dilate"):
        del recorded["settings"][name]
    assert [line.split(":")[0] for line in resume_changes(recorded, settings, facts)] == ["dilate"]


def test_teacher_guidance_is_a_finite_range():
    from pydantic import ValidationError

    from training.distill import DistillSettings

    with pytest.raises(ValidationError, match="finite"):
        DistillSettings(base="tiny", data="d.json", out="o", w_max=float("inf"))


def test_ema_follows_the_model_onto_its_device_after_a_resume(data_file, tmp_path, monkeypatch):
    """extra.pt is read onto the CPU: an EMA moved to the device before loading it kept CPU shadow
    weights, and its first step next to CUDA weights failed. No GPU here: the meta device stands in."""
    import training.loop

    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=2))
    saved = []
    monkeypatch.setattr(training.loop, "save_checkpoint", lambda *args, extra, **kw: saved.append(extra))
    resumed, model, ema = _run(_settings(data_file, out, steps=3), device="meta")
    assert resumed["resumed_from"].endswith("step-0000002")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    assert ema.optimization_step == 3 and len(saved) == 1


def test_a_checkpoint_written_again_is_never_found_half_deleted(tmp_path, monkeypatch):
    """A step folder written again (a run resumed from an earlier step) deleted the old one in place first: a
    crash mid-delete left a partial step-* with its state.json, which `latest` would resume from."""
    import engines.bundle
    from training.checkpoint import checkpoints, save_checkpoint

    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(run: str):
        return save_checkpoint(_Accelerator(), tmp_path, 2, model=model, optimizer=optimizer,
                               lr_scheduler=lr_scheduler, state={"run": run})  # fmt: skip

    final = save("old")

    def dies_midway(folder, *args, **kwargs):
        (Path(folder) / "trainable.safetensors").unlink()
        raise OSError("killed while deleting")

    with monkeypatch.context() as patched:
        patched.setattr(engines.bundle.shutil, "rmtree", dies_midway)
        with pytest.raises(OSError, match="killed while deleting"):
            save("new")
    assert checkpoints(tmp_path / "checkpoints") == [final], "the half-deleted old one is hidden, not a checkpoint"
    assert json.loads((final / "state.json").read_text())["run"] == "new"
    assert (final / "trainable.safetensors").is_file()
    save("newer")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"], "the leftover goes next time"


def test_a_checkpoint_of_other_tensor_shapes_is_refused_with_a_reason_not_a_torch_traceback():
    """Names were checked, shapes not: a resume despite a changed lora_rank stopped in torch's copy_ with a
    size-mismatch RuntimeError."""
    from training.checkpoint import load_trainable_state

    model = nn.Linear(3, 1)
    wider, before = {"weight": torch.zeros(2, 3), "bias": torch.zeros(1)}, model.bias.detach().clone()
    with pytest.raises(TrainingError, match=r"another shape.*weight \(2, 3\) -> \(1, 3\).*lora_rank"):
        load_trainable_state(model, wider)
    assert torch.equal(model.bias, before), "nothing is copied from a checkpoint that does not fit"


def _names(out):
    from training.checkpoint import checkpoints

    return [p.name for p in checkpoints(Path(out) / "checkpoints")]


def test_a_fresh_run_into_a_used_out_sets_aside_the_earlier_run_s_checkpoints(data_file, tmp_path):
    """Pruning by step number deleted the fresh run's own checkpoints, and `resume: latest` then took the
    earlier run's: they are moved into checkpoints/set-aside-*/ when the fresh run starts."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=8, resume=None, ema=False))
    assert _names(out) == ["step-0000006", "step-0000008"]
    second, _, _ = _run(_settings(data_file, out, steps=4, resume=None, ema=False, seed=1))
    assert _names(out) == ["step-0000002", "step-0000004"]
    aside = Path(second["checkpoints_set_aside"]["folder"])
    assert aside.parent == out / "checkpoints" and sorted(p.name for p in aside.iterdir()) == [
        "step-0000006",
        "step-0000008",
    ]
    resumed, _, _ = _run(_settings(data_file, out, steps=8, resume="latest", ema=False, seed=1))
    assert resumed["resumed_from"].endswith("step-0000004")


def test_a_rollback_sets_aside_the_abandoned_later_checkpoints(data_file, tmp_path):
    """--resume PATH of an earlier step: the later checkpoints are another future; `resume: latest`
    continues the rollback, not them."""
    out = tmp_path / "run"
    _run(_settings(data_file, out, steps=8, resume=None, ema=False, keep_checkpoints=4))
    back = out / "checkpoints" / "step-0000004"
    _run(_settings(data_file, out, steps=6, resume=str(back), ema=False, keep_checkpoints=4))
    assert _names(out) == ["step-0000002", "step-0000004", "step-0000006"]
    resumed, _, _ = _run(_settings(data_file, out, steps=8, resume="latest", ema=False, keep_checkpoints=4))
    assert resumed["resumed_from"].endswith("step-0000006")


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(data_file, tmp_path, monkeypatch):
    """A NaN loss once ran on to the end, pruned the good checkpoints and wrote NaN into summary.json."""
    calls, loss_of = [], _loss

    def diverging(model, batch, generator):
        calls.append(1)
        loss = loss_of(model, batch, generator)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setitem(globals(), "_loss", diverging)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="step 3: the loss is nan"):
        _run(_settings(data_file, out, resume=None, ema=False))
    assert _names(out) == ["step-0000002"]


@pytest.mark.parametrize(
    ("first", "diverges_at", "kept"),
    [
        (None, 1, "no checkpoint was written yet"),  # nothing to resume from: it said "the newest one is still good"
        (None, 3, "no checkpoint of this step is written, the newest one (step 2) is still good"),
        (2, 3, "no checkpoint of this step is written, the newest one (step 2) is still good"),  # the resumed one
    ],
)
def test_a_diverged_run_says_which_checkpoint_is_still_good_or_that_none_was_written(
    data_file, tmp_path, monkeypatch, first, diverges_at, kept
):
    out, loss_of, calls = tmp_path / "run", _loss, []
    if first:
        _run(_settings(data_file, out, steps=first, resume=None, ema=False))

    def diverging(model, batch, generator):  # one call a step (grad_accum 1), from the resumed step on
        calls.append(1)
        loss = loss_of(model, batch, generator)
        return loss * float("nan") if (first or 0) + len(calls) >= diverges_at else loss

    monkeypatch.setitem(globals(), "_loss", diverging)
    with pytest.raises(TrainingError) as stopped:
        _run(_settings(data_file, out, resume="latest" if first else None, ema=False))
    assert str(stopped.value).startswith(f"step {diverges_at}: the loss is nan")
    assert str(stopped.value).endswith(f"; {kept}")


def test_a_summary_refuses_to_write_a_bare_nan(data_file, tmp_path):
    summary = RunSummary("finetune", _settings(data_file, tmp_path / "run"))
    summary.log_step(1, float("nan"), 1e-3, 0.1)
    with pytest.raises(ValueError, match="JSON"):
        summary.write()


def _cli_toy_finetune(monkeypatch, data_file, out, *flags):
    """`python -m training finetune` with the toy model's loop as the stage."""
    from training import cli
    from training.finetune import FinetuneSettings

    stage = (FinetuneSettings, lambda settings: _run(settings)[0], "the toy loop")
    monkeypatch.setattr(cli, "_stages", lambda: {"finetune": stage})
    argv = ["finetune", "--base", "tiny", "--data", str(data_file), "--out", str(out), "--steps", str(STEPS),
            "--checkpoint-every", "2", "--cache-dir", str(out.parent / "cache"), *flags]  # fmt: skip
    return cli.main(argv)


def test_a_checkpoint_write_that_fails_leaves_no_staging_folder_and_a_failed_summary(
    data_file, tmp_path, monkeypatch, capsys
):
    """A full disk: a RuntimeError traceback, a .step-N.partial left filling the disk, no summary of the failure."""
    import errno
    import os

    import training.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training.checkpoint, "save_file", disk_full)
    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 1
    assert "checkpoint write failed: [Errno 28] No space left on device" in capsys.readouterr().err
    assert list((out / "checkpoints").iterdir()) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint write failed" in summary["error"]


def test_a_rerun_its_checks_refuse_leaves_the_completed_run_exactly_as_it_was(data_file, tmp_path, monkeypatch, capsys):
    """`--resume --lr 1e-3` over a completed run was refused, and the run's summary became a failed one without its
    losses, outputs and inputs_sha256: bundle then refused the run. A rerun that starts still records its failure."""
    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 0
    before = (out / "summary.json").read_bytes()
    assert _cli_toy_finetune(monkeypatch, data_file, out, "--resume", "--lr", "1e-3") == 1
    assert "lr: 5e-05 -> 0.001" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert _names(out) == ["step-0000002", f"step-{STEPS:07d}"]

    def diverges(model, batch, generator):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setitem(globals(), "_loss", diverges)
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "the loss is nan" in summary["error"]


def test_a_resume_from_past_the_step_total_is_refused_naming_both_and_the_way_out(
    data_file, tmp_path, monkeypatch, capsys
):
    """`--steps 10 --resume <step 15>` reported "done" with steps_done 15 > steps 10 and no warning."""
    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 0
    capsys.readouterr()
    before = (out / "summary.json").read_bytes()
    last = out / "checkpoints" / f"step-{STEPS:07d}"
    for resume in (["--resume"], ["--resume", str(last), "--resume-despite-changes"]):
        assert _cli_toy_finetune(monkeypatch, data_file, out, *resume, "--steps", "2") == 2
        assert capsys.readouterr().err == (
            f"python -m training finetune: invalid settings: {last} is at step {STEPS}, past --steps 2: pass --steps "
            f"{STEPS} or more to continue it, or --resume a checkpoint at step 2 or before (a new run: a new --out, "
            "no --resume)\n"
        )
        assert (out / "summary.json").read_bytes() == before
    assert _names(out) == ["step-0000002", f"step-{STEPS:07d}"]
    back = str(out / "checkpoints" / "step-0000002")
    assert _cli_toy_finetune(monkeypatch, data_file, out, "--resume", back, "--steps", "2") == 0  # at the total


def _ctrl_c_at_the_third_loss(monkeypatch):
    """Ctrl-C as step 3 computes its loss (one micro-batch a step)."""
    calls, loss_of = [], _loss

    def interrupted(model, batch, generator):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss_of(model, batch, generator)

    monkeypatch.setitem(globals(), "_loss", interrupted)


def _cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _a_folder(path):
    """A copy gone wrong: a folder where the file was (an IsADirectoryError traceback)."""
    path.unlink()
    path.mkdir()


def _state_edited(**fields):
    """state.json as a JSON object without (None) or with another step / losses (a KeyError or TypeError traceback)."""

    def edit(path):
        state = json.loads(path.read_text())
        for name, value in fields.items():
            if value is None:
                del state[name]
            else:
                state[name] = value
        path.write_text(json.dumps(state))

    return edit


@pytest.mark.parametrize(
    ("name", "spoil", "problem"),
    [
        ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:20]),
         "not a readable checkpoint (invalid header length)"),
        ("trainable.safetensors", lambda p: p.write_bytes(b"\xff" * 64),
         "not a readable checkpoint (header too large)"),
        ("optimizer.pt", _cut_short, "not a readable checkpoint (PytorchStreamReader failed reading zip archive"),
        ("extra.pt", lambda p: p.write_bytes(b"\x80\x02junk" * 8), "not a readable checkpoint ("),
        ("extra.pt", lambda p: p.write_bytes(random.Random(1).randbytes(256)),
         "not a readable checkpoint (not a file torch.save"),
        ("rng-0.pt", lambda p: p.write_bytes(b""), "not a readable checkpoint ("),
        ("state.json", _cut_short, "not valid JSON (Expecting"),
        *[(name, _a_folder, "not a readable checkpoint (a folder, not a file)") for name in
          ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "extra.pt", "rng-0.pt", "state.json")],
        ("state.json", _state_edited(step=None), "not a readable checkpoint (step: expected a whole number"),
        ("state.json", _state_edited(step="2"), "not a readable checkpoint (step: expected a whole number"),
        ("state.json", _state_edited(losses=None), "not a readable checkpoint (losses: expected a list, got none)"),
        ("state.json", _state_edited(losses={"step": 1}), "not a readable checkpoint (losses: expected a list"),
        ("state.json", _state_edited(losses=[{"step": "1", "loss": 0.5, "seconds": 0.1}]),
         "not a readable checkpoint (losses: expected entries of step, loss and seconds"),
        ("state.json", _state_edited(losses=[0.5]), "not a readable checkpoint (losses: expected entries"),
    ],
)  # fmt: skip
def test_a_resume_from_a_corrupt_checkpoint_file_names_it_in_one_line(
    data_file, tmp_path, monkeypatch, capsys, name, spoil, problem
):
    """A checkpoint file cut short (a full disk, a copy stopped) or overwritten was a SafetensorError, a
    PytorchStreamReader RuntimeError or a JSONDecodeError traceback; a folder in a file's place an IsADirectoryError
    (rng-0.pt: silently skipped, the resumed losses then differ); a state.json without its step or losses a
    KeyError or TypeError."""
    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 0
    capsys.readouterr()
    before = (out / "summary.json").read_bytes()
    checkpoint = out / "checkpoints" / "step-0000002"
    spoil(checkpoint / name)
    assert _cli_toy_finetune(monkeypatch, data_file, out, "--resume", str(checkpoint)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m training finetune: {checkpoint / name}: {problem}"), err
    assert len(err.splitlines()) == 1
    assert (out / "summary.json").read_bytes() == before  # refused before it started: the run is as it was


def test_a_checkpoint_file_in_torchs_older_non_zip_format_is_still_read(tmp_path):
    """A zip check before torch.load refused it as "cut short or overwritten" (review)."""
    from training.checkpoint import load_tensors_and_values

    path = tmp_path / "extra.pt"
    torch.save({"step": 3, "losses": [0.5]}, path, _use_new_zipfile_serialization=False)
    assert load_tensors_and_values(path) == {"step": 3, "losses": [0.5]}
    torch.save({"numpy": np.random.get_state()}, path, _use_new_zipfile_serialization=False)  # not garbage either
    with pytest.raises(TrainingError, match="holds more than tensors and plain values"):
        load_tensors_and_values(path)


def test_a_ctrl_c_line_starts_a_line_of_its_own_after_the_progress_bar(data_file, tmp_path, monkeypatch, capsys):
    """It was printed at the end of the progress bar's line, which was still open."""
    _ctrl_c_at_the_third_loss(monkeypatch)
    monkeypatch.setattr(_Accelerator, "is_local_main_process", True)  # the bar is drawn
    assert _cli_toy_finetune(monkeypatch, data_file, tmp_path / "run") == 130
    err = capsys.readouterr().err
    assert "finetune:" in err.split("\n")[0]  # the bar
    assert err.split("\n")[-2].startswith("python -m training finetune: interrupted at step 3; "), err
    assert err.endswith("\n")


@pytest.mark.parametrize(
    ("checkpoint_every", "continues"),
    [("2", "rerun with --resume to continue from step 2"), ("0", "no checkpoint was written yet: a rerun starts")],
)
def test_an_interrupted_run_says_where_in_one_line_and_records_the_steps_done(
    data_file, tmp_path, monkeypatch, capsys, checkpoint_every, continues
):
    """Ctrl-C recorded `error: "KeyboardInterrupt: "`; then it printed a whole traceback, exited with a code the docs
    did not list, and the summary lost the steps done and their losses since the last checkpoint (all of them with
    none yet: steps_done and losses null)."""
    _ctrl_c_at_the_third_loss(monkeypatch)
    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out, "--checkpoint-every", checkpoint_every) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m training finetune: interrupted at step 3; ") and continues in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "interrupted at step 3"
    assert summary["steps_done"] == 2 and [entry["step"] for entry in summary["losses"]] == [1, 2]


@pytest.mark.parametrize("second", [None, "as main writes the summary", "as the loop writes it", "much later"])
def test_a_sigterm_stops_a_run_as_ctrl_c_does_and_its_summary_says_so(
    data_file, tmp_path, monkeypatch, capsys, second
):
    """A pod's eviction (SIGTERM) ended a stage at once: exit 143 with its summary left `running`, which the next
    stage refused as a run not completed. It now stops as Ctrl-C does, and the handler before it is put back. A
    second SIGTERM (a process group's kill, and the launcher forwarding it) as the failed summary is written, by
    the loop or by main, does not cut that write (reviews); a first one whose KeyboardInterrupt Python swallowed
    (raised in a `__del__`) does not make a much later one ignored (a review: the run could then be stopped by
    SIGKILL only)."""
    import os
    import signal

    import engines.stopping
    import training.common

    monkeypatch.setattr(engines.stopping, "SIGTERM_REPEAT_S", 0.5)

    def signalled_again(write):
        def write_signalled(*args, **kwargs):
            if len(calls) >= 3 and not again:
                again.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            return write(*args, **kwargs)

        return write_signalled

    again: list = []
    if second == "as main writes the summary":
        mark_run = training.common.mark_run
        signalled = signalled_again(mark_run)
        monkeypatch.setattr(training.common, "mark_run", lambda *a, error=None: signalled(*a, error=error))
    if second == "as the loop writes it":
        monkeypatch.setattr(training.common.RunSummary, "write", signalled_again(training.common.RunSummary.write))

    class SignalledOnCollection:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    calls, loss_of = [], _loss

    def terminated(model, batch, generator):
        calls.append(1)
        if second == "much later" and len(calls) == 2:
            SignalledOnCollection()  # the handler raises in __del__: Python prints it and goes on
            time.sleep(0.6)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_of(model, batch, generator)

    monkeypatch.setitem(globals(), "_loss", terminated)
    ignored = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ignored.append(signum))  # pytest's own process
    try:
        try:
            code = _cli_toy_finetune(monkeypatch, data_file, tmp_path / "run", "--checkpoint-every", "0")
        except KeyboardInterrupt:  # would end pytest's session
            code = "KeyboardInterrupt escaped"
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM and not ignored
    assert restored is not None and restored.__name__ == "<lambda>"
    err = capsys.readouterr().err
    assert err.startswith("python -m training finetune: interrupted by SIGTERM at step 3;"), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "interrupted at step 3"
    assert summary["steps_done"] == 2 and [entry["step"] for entry in summary["losses"]] == [1, 2]


def test_a_ctrl_c_before_a_reruns_first_step_offers_no_earlier_runs_checkpoint(
    data_file, tmp_path, monkeypatch, capsys
):
    """A fresh rerun stopped before its first step (while it hashed its inputs) advised `--resume to continue from
    step 4` of the folder's earlier run, whose checkpoints it sets aside only as its loop starts."""
    import training.loop

    out = tmp_path / "run"
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 0
    capsys.readouterr()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.loop, "run_facts", stopped)
    assert _cli_toy_finetune(monkeypatch, data_file, out) == 130
    assert capsys.readouterr().err.strip() == (
        "python -m training finetune: interrupted; no checkpoint was written yet: a rerun starts from step 0"
    )
    assert _cli_toy_finetune(monkeypatch, data_file, out, "--resume", "latest") == 130
    rerun = "no checkpoint was written yet: rerun with the same --resume latest"
    assert capsys.readouterr().err.strip().endswith(rerun)


def test_a_batch_larger_than_the_data_set_is_warned_of_on_stderr_and_in_the_summary(data_file, tmp_path, capsys):
    """It was silently filled with repeats of the samples."""
    summary, _, _ = _run(_settings(data_file, tmp_path / "big", batch_size=10, resume=None))
    warning = "batch size 10 x 1 process(es) = 10 is more than the 8 samples of"
    assert f"[finetune] warning: {warning}" in capsys.readouterr().err
    assert len(summary["warnings"]) == 1 and warning in summary["warnings"][0]
    summary, _, _ = _run(_settings(data_file, tmp_path / "fits", batch_size=8, resume=None))
    assert "warnings" not in summary and "warning" not in capsys.readouterr().err


def test_checkpoint_weights_get_the_mode_of_any_new_file(data_file, tmp_path):
    """safetensors writes 0600: weights trained by one uid could not be read by another (the serving uid)."""
    import os

    umask = os.umask(0o022)
    try:
        _run(_settings(data_file, tmp_path / "run", resume=None))
    finally:
        os.umask(umask)
    files = sorted((tmp_path / "run" / "checkpoints").rglob("*.safetensors"))
    assert files and {file.stat().st_mode & 0o777 for file in files} == {0o644}
