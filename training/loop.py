"""The one optimizer loop all three training stages run; each stage supplies its model and its loss.

    for step in start+1 .. steps:
        for micro in range(grad_accum):              # gradients sync across processes on the last one only
            batch  = the next micro-batch             # (seed, batch number, process) decide which samples
            loss   = compute_loss(model, batch, step_generator(seed, step, micro, process))
            backward(loss / grad_accum)
        clip to max_grad_norm; AdamW step; lr schedule step; EMA step (if any)
        log the mean loss over micro-batches and processes; checkpoint every `checkpoint_every`

`compute_loss` must draw every random number from the generator it is given; then a run resumed
from a checkpoint reproduces exactly the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.bundle import sha256_of
from training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    read_state,
    resume_changes,
    save_checkpoint,
    set_aside_other_runs,
    weights_sha256,
)
from training.common import (
    InterruptedAtStep, RunSummary, SettingsError, TrainingError, TrainSettings, progress_bar, step_generator,
)  # fmt: skip
from training.data import StepBatchSampler

LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator], torch.Tensor]


def train(
    settings: TrainSettings,
    accelerator,
    summary: RunSummary,
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    compute_loss: LossFn,
    ema=None,
    inputs: dict[str, Path] | None = None,
) -> nn.Module:
    """Train the parameters of `model` that require grad; returns the model unwrapped (EMA not applied).
    `inputs`: the frozen weights the run trains against, by what they are ("teacher UNet": its folder)."""
    from diffusers.optimization import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, **adamw_settings(settings))
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=settings.steps,
    )
    # the scheduler is stepped here once per optimizer step, so it is not handed to accelerate
    model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    facts = run_facts(settings, accelerator, inputs or {})
    summary.data["inputs_sha256"] = facts["inputs_sha256"]
    checkpoint = find_checkpoint(settings.out, settings.resume)
    if checkpoint is not None:
        check_resumable(checkpoint, settings, summary, accelerator, facts)
        state, extra = load_checkpoint(
            accelerator, checkpoint, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        follow_settings(optimizer, lr_scheduler, adamw_settings(settings))
        start = state["step"]
        summary.losses[:] = [entry for entry in state["losses"] if entry["step"] <= start]
        summary.data["resumed_from"] = str(checkpoint)
        if ema is not None and "ema" in extra:
            decay = ema.decay
            ema.load_state_dict(extra["ema"])
            ema.decay = decay  # the current setting, as for the optimizer
        elif ema is not None:  # EMA turned on at this resume (listed in resume_changes): it starts here
            ema.shadow_params = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
        accelerator.print(f"[{summary.stage}] resumed from {checkpoint} at step {start}")
    summary.write()  # the run starts: its checks passed, and from here on it changes out/ (a failure is recorded)
    if accelerator.is_main_process:
        moved = set_aside_other_runs(settings.out, start, checkpoint)
        if moved is not None:
            summary.data["checkpoints_set_aside"] = {"folder": str(moved[0]), "checkpoints": moved[1]}
            accelerator.print(
                f"[{summary.stage}] moved checkpoints of another run (or past step {start}) out of the way: "
                f"{', '.join(moved[1])} -> {moved[0]}"
            )
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.to(accelerator.device)  # after loading: extra.pt is read onto the CPU

    warn_of_repeats(settings, accelerator, summary, len(dataset))
    sampler = StepBatchSampler(
        len(dataset),
        settings.batch_size,
        settings.seed,
        start_batch=start * settings.grad_accum,
        repeat_first=settings.overfit_one_batch,
        world=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=settings.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=settings.num_workers > 0,
    )
    batches = iter(loader)
    bar = progress_bar(settings.steps, start, summary.stage, accelerator.is_local_main_process)
    model.train()
    step = start + 1
    good = start if checkpoint is not None else None  # the newest checkpoint of this run: the resumed one, or written
    try:
        for step in range(start + 1, settings.steps + 1):
            began = time.perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(settings.grad_accum):
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                draw = 0 if settings.overfit_one_batch else step  # overfit: the same draws every step
                generator = step_generator(settings.seed, draw, micro, accelerator.process_index)
                last = micro == settings.grad_accum - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    loss = compute_loss(model, batch, generator)
                    accelerator.backward(loss / settings.grad_accum)
                step_loss += loss.detach().float() / settings.grad_accum
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            loss_value = accelerator.reduce(step_loss, reduction="mean").item()
            if not math.isfinite(loss_value):  # every process sees the same mean: all stop here, before a checkpoint
                kept = (
                    "no checkpoint was written yet" if good is None
                    else f"no checkpoint of this step is written, the newest one (step {good}) is still good"
                )  # fmt: skip
                raise TrainingError(
                    f"step {step}: the loss is {loss_value}: the run diverged (a lower --lr, or --mixed-precision bf16 "
                    f"or no instead of fp16?); {kept}"
                )
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            summary.log_step(step, loss_value, lr, time.perf_counter() - began)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if step == settings.steps or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
                save_checkpoint(
                    accelerator,
                    settings.out,
                    step,
                    model=model,
                    optimizer=optimizer,
                    lr_scheduler=lr_scheduler,
                    state=_checkpoint_state(summary, facts),
                    extra={"ema": ema.state_dict()} if ema is not None else None,
                    keep=settings.keep_checkpoints,
                )
                good = step
                summary.write()
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the losses since the last checkpoint go in the failed summary
            summary.write()
        if isinstance(exc, KeyboardInterrupt):  # the summary's error then says where the run stopped
            raise InterruptedAtStep(step) from None
        raise
    finally:  # the bar's line ends before the CLI prints where a Ctrl-C stopped the run
        bar.close()
    model.eval()
    return accelerator.unwrap_model(model)


def warn_of_repeats(settings: TrainSettings, accelerator, summary: RunSummary, samples: int) -> None:
    """A batch larger than the data set is filled with repeats of its samples (StepBatchSampler): allowed, as a tiny
    set is a fair debug run, but said on stderr and in the summary's `warnings`, as a careful run would want to know."""
    per_step = settings.batch_size * accelerator.num_processes
    if per_step <= samples:
        return
    message = (
        f"batch size {settings.batch_size} x {accelerator.num_processes} process(es) = {per_step} is more than the "
        f"{samples} samples of {settings.data}: each batch repeats samples"
    )
    summary.data.setdefault("warnings", []).append(message)
    if accelerator.is_main_process:
        print(f"[{summary.stage}] warning: {message}", file=sys.stderr)


def adamw_settings(settings: TrainSettings) -> dict[str, Any]:
    return {
        "lr": settings.lr,
        "betas": (settings.adam_beta1, settings.adam_beta2),
        "weight_decay": settings.adam_weight_decay,
        "eps": settings.adam_epsilon,
    }


def follow_settings(optimizer, lr_scheduler, hyperparameters: dict[str, Any]) -> None:
    """A restored optimizer and schedule hold the recorded run's lr, betas...: a run resumed despite
    changes goes on with its own. The lr of the resumed step is recomputed from the current base lr
    and schedule (for an unchanged run, the very lr restored)."""
    for group in optimizer.param_groups:
        group.update(hyperparameters, initial_lr=hyperparameters["lr"])
    lr_scheduler.base_lrs = [hyperparameters["lr"] for _ in optimizer.param_groups]
    lr_scheduler.last_epoch -= 1
    lr_scheduler.step()


def run_facts(settings: TrainSettings, accelerator, inputs: dict[str, Path]) -> dict[str, Any]:
    """What a run trains with besides its settings, which its checkpoints record and a resume must match."""
    with accelerator.main_process_first():  # the other processes then find the weights' sha256 remembered
        inputs_sha256 = {name: weights_sha256(path, settings.cache_dir) for name, path in inputs.items()}
    return {
        "data_sha256": sha256_of(Path(settings.data)),
        "inputs_sha256": inputs_sha256,
        "processes": accelerator.num_processes,
    }


def check_resumable(checkpoint, settings: TrainSettings, summary: RunSummary, accelerator, facts: dict) -> None:
    """Refuse, before anything is restored, a checkpoint of another stage or past --steps, and one of a run with
    other settings, data, weights or process count (unless resume_despite_changes: then the differences go
    in the summary)."""
    state = read_state(Path(checkpoint))
    if state.get("stage") != summary.stage:
        raise TrainingError(f"{checkpoint} is a {state.get('stage')} checkpoint, not {summary.stage}")
    step = state.get("step")
    if isinstance(step, int) and step > settings.steps:  # it trained nothing and reported its weights as done
        raise SettingsError(
            f"{checkpoint} is at step {step}, past --steps {settings.steps}: pass --steps {step} or more to continue "
            f"it, or --resume a checkpoint at step {settings.steps} or before (a new run: a new --out, no --resume)"
        )
    state.setdefault("processes", len(list(Path(checkpoint).glob("rng-*.pt"))))  # before it was recorded
    changes = resume_changes(state, settings, facts)
    if not changes:
        return
    listed = "\n".join(f"  {change}" for change in changes)
    if not settings.resume_despite_changes:
        raise TrainingError(
            f"{checkpoint} was written by a run with other settings or data:\n{listed}\n"
            "Resuming would continue that run as if they were the same. Train into a new output folder "
            "(--out, and no --resume PATH), or pass --resume-despite-changes (resume_despite_changes: true) "
            "to continue from this checkpoint with these changes."
        )
    summary.data["resume_changes"] = changes
    accelerator.print(f"[{summary.stage}] resuming {checkpoint} despite these changes:\n{listed}")


def _checkpoint_state(summary: RunSummary, facts: dict[str, Any]) -> dict[str, Any]:
    return {"stage": summary.stage, "settings": summary.data["config"], **facts, "losses": list(summary.losses)}
