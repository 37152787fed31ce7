"""Resumable checkpoints: out/checkpoints/step-NNNNNNN/ with everything the next step depends on.

    trainable.safetensors   the trainable tensors only (full UNet for finetune; LoRA (+ head) otherwise:
                            frozen weights come back from the base, so an SDXL LoRA checkpoint stays small)
    optimizer.pt            AdamW state
    lr_scheduler.pt         learning-rate schedule state
    extra.pt                EMA weights, the fp16 grad scaler, when used
    rng-<process>.pt        python / numpy / torch (and CUDA) RNG states of each process, as tensors and plain values
    state.json              step, stage, settings, sha256 of the data file and of the weights trained against,
                            the process count, the losses so far (the summary continues from them)

The data order and each step's noise come from `step_generator(seed, step, ...)`, so together with
the tensors above a resumed run computes the same next loss as an uninterrupted one. A checkpoint
is written into a staging folder and renamed, so a folder named step-* is always complete.

A checkpoint continues the run that wrote it: `resume_changes` lists what differs between its
recorded settings, data, weights and process count and the current ones, and the loop refuses to
resume over any of them.

`--resume PATH` takes any folder, so every .pt file is read with torch.load(weights_only=True): only
tensors and plain values are built, and a file holding anything else (a pickle that would run code, or
an rng-*.pt of the older format with numpy's state as a numpy array) is refused with a TrainingError.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import reprlib
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic_core import to_jsonable_python
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engines.bundle import readable_as_any_file, replace_folder
from training.common import TrainingError, TrainSettings, read_json_object

PREFIX = "step-"
SET_ASIDE = "set-aside-"
SCHEDULES_OVER_STEPS = frozenset({"linear", "cosine"})


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint does not fit the model: {len(missing)} trainable tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    reshaped = [f"{name} {tuple(state[name].shape)} -> {tuple(p.shape)}" for name, p in params.items()
                if state[name].shape != p.shape]  # fmt: skip
    if reshaped:
        raise TrainingError(
            f"checkpoint does not fit the model: {len(reshaped)} trainable tensors of another shape (e.g. "
            f"{reshaped[:2]}; a changed lora_rank?): start a new run"
        )
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))


def rng_state() -> dict[str, Any]:
    """numpy's state goes in as plain values: torch.load(weights_only=True) refuses numpy arrays."""
    bit_generator, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = {
        "bit_generator": str(bit_generator),
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def set_aside_other_runs(out: Path, start: int, resumed: Path | None) -> tuple[Path, list[str]] | None:
    """A run that starts at step `start` (0: fresh) keeps out/checkpoints to its own history: checkpoints past
    `start` (an earlier run in this --out, or the steps a rollback `--resume PATH` abandons), and all of them
    when the run resumed from outside out/checkpoints, are moved into out/checkpoints/set-aside-<UTC time>-*/.
    Left in place, pruning by step number would delete the run's own newer checkpoints and a later
    `resume: latest` would silently continue the other run. Nothing is deleted: the folder is the user's to remove.
    Returns (the folder, the names moved), or None when nothing was in the way."""
    root = Path(out) / "checkpoints"
    own = resumed is not None and Path(resumed).resolve().parent == root.resolve()
    others = [p for p in checkpoints(root) if not own or int(p.name[len(PREFIX) :]) > start]
    if not others:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = Path(tempfile.mkdtemp(prefix=f"{SET_ASIDE}{stamp}-", dir=root))
    for path in others:
        path.rename(aside / path.name)
    return aside, [p.name for p in others]


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """'latest' -> the newest under out/checkpoints (None if there is none); a path -> that folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(Path(out) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume).expanduser()
    _a_file(path / "state.json")
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no state.json)")
    return path


def weights_sha256(path: Path, cache_dir: Path) -> str:
    """One sha256 for a weights folder (or file), of its files' sha256 by name (files_sha256)."""
    return hashlib.sha256(json.dumps(files_sha256(path, cache_dir)).encode()).hexdigest()


def files_sha256(path: Path, cache_dir: Path) -> dict[str, str]:
    """The sha256 of each file of a folder (or of the file), by name. A file's sha256 is remembered by its size, mtime,
    ctime and inode, as for imports: gigabytes are read once, not at each start."""
    from engines.authors_layout import folder_files
    from engines.sources import INPUT_HASHES, RememberedSha256

    path, cache = Path(path).resolve(), Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    hashes = RememberedSha256(cache / INPUT_HASHES)
    named = {str(file.relative_to(path)): hashes.of(file) for file in sorted(folder_files(path))}
    hashes.save()
    return named


def resume_changes(state: dict[str, Any], settings: TrainSettings, facts: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's state.json and the current run, one "name: old -> new" line each.

    Resuming continues the recorded run as if nothing changed, so any setting that decides what is
    trained or how (data, base, lr, schedule, batch, seed, precision, EMA, LoRA...) counts, and so
    do the `facts` of the run (see training.loop.run_facts): the content of the data's metadata file
    (the same path may now list other images) and of the weights trained against (a teacher retrained
    in place), and the process count (each step's samples).
    `settings.RESUME_MAY_CHANGE` is left out: the step total (a resumed run continues to it;
    but a linear or cosine schedule spreads over it, so there it counts),
    how to resume, when checkpoints are written and how many are kept, where the run, its
    checkpoint and the tiny base live (a checkpoint may be copied to another folder), and how the
    same computation is carried out (DataLoader workers, CPU or GPU, gradient checkpointing),
    which a preempted job coming back on other hardware may need to change. A setting the
    checkpoint does not record (added since) compares as its default, or as what runs did before it
    existed (`settings.BEFORE_RECORDED`).
    """
    recorded = state.get("settings") or {}
    current = json.loads(settings.model_dump_json())
    fields = type(settings).model_fields
    may_change = settings.RESUME_MAY_CHANGE
    if settings.lr_scheduler in SCHEDULES_OVER_STEPS:
        may_change = may_change - {"steps"}
    changes = []
    for name in sorted(set(recorded) | set(current)):
        if name in may_change:
            continue
        new = current.get(name, "(no such setting)")
        if name in recorded:
            old = recorded[name]
        elif name in settings.BEFORE_RECORDED:
            old = settings.BEFORE_RECORDED[name]
        elif name in fields and not fields[name].is_required():
            old = to_jsonable_python(fields[name].get_default(call_default_factory=True))
        else:
            old = "(not recorded)"
        if old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    old_sha, data_sha256 = state.get("data_sha256"), facts["data_sha256"]
    if old_sha != data_sha256:
        old_text = old_sha[:16] if old_sha else "(not recorded: the checkpoint predates data hashing)"
        changes.append(f"sha256 of the data file {settings.data}: {old_text} -> {data_sha256[:16]}")
    recorded_inputs = state.get("inputs_sha256") or {}
    for name, sha in facts["inputs_sha256"].items():
        old_sha = recorded_inputs.get(name)
        if old_sha != sha:
            old_text = old_sha[:16] if old_sha else "(not recorded: the checkpoint predates weights hashing)"
            changes.append(f"sha256 of the {name}: {old_text} -> {sha[:16]}")
    processes = state.get("processes", "(not recorded)")
    if processes != facts["processes"]:
        changes.append(f"processes: {processes} -> {facts['processes']}")
    return changes


def save_checkpoint(
    accelerator,
    out: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write step-NNNNNNN (every process writes its RNG state; the main process the rest). A write that fails (a full
    disk) removes the staging folder, which would fill the disk further, and raises a TrainingError."""
    root = Path(out) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    staging = root / f".{final.name}.partial"
    try:
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), staging / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(trainable_state(accelerator.unwrap_model(model)), str(staging / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), staging / "lr_scheduler.pt")
            extra = dict(extra or {})
            if accelerator.scaler is not None:
                extra["grad_scaler"] = accelerator.scaler.state_dict()
            torch.save(extra, staging / "extra.pt")
            (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1, default=str))
            readable_as_any_file(staging)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a full disk as a RuntimeError
        free = _free_mib(root)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        done = checkpoints(root)
        newest = f"the newest complete checkpoint, {done[-1].name}, is still good" if done else "none was complete yet"
        raise TrainingError(
            f"checkpoint write failed: {exc} (writing {final}, {free} MiB free there before the partial checkpoint "
            f"was removed; {newest})"
        ) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(staging, final)
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _free_mib(folder: Path) -> int | str:
    """Free space on folder's disk: torch.save reports a full disk only as "unexpected pos 3419712 vs 3419604"."""
    try:
        return shutil.disk_usage(folder).free // 2**20
    except OSError:
        return "?"


def unreadable(path: Path, reason: str) -> TrainingError:
    """A checkpoint file cut short or overwritten: one line naming it, not torch's or safetensors' traceback."""
    return TrainingError(f"{path}: not a readable checkpoint ({reason})")


def _a_file(path: Path) -> None:
    """A folder where a checkpoint file belongs (a copy gone wrong) is refused naming it, not an IsADirectoryError."""
    if Path(path).is_dir():
        raise unreadable(path, "a folder, not a file")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(state: dict[str, Any], key: str) -> str:
    return reprlib.repr(state[key]) if key in state else "none"


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (path: the checkpoint folder). The step and the losses a resume continues from are
    checked here: one edited by hand, or of another program, is refused naming the field, not a KeyError later."""
    file = Path(path) / "state.json"
    _a_file(file)
    state = read_json_object(file)
    if not _is_count(state.get("step")):
        raise unreadable(file, f"step: expected a whole number of steps, got {_shown(state, 'step')}")
    losses = state.get("losses")
    if not isinstance(losses, list):
        raise unreadable(file, f"losses: expected a list, got {_shown(state, 'losses')}")
    for entry in losses:
        if not (isinstance(entry, dict) and _is_count(entry.get("step"))
                and all(_is_number(entry.get(key)) for key in ("loss", "seconds"))):  # fmt: skip
            raise unreadable(file, f"losses: expected entries of step, loss and seconds, got {reprlib.repr(entry)}")
    return state


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    _a_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:  # "Error while deserializing header: invalid header length"
        raise unreadable(path, str(exc).rpartition(": ")[2] or str(exc)) from None


# how torch.save's older, non-zip format begins: its magic number, pickled (protocol 2)
_LEGACY_TORCH_SAVE = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]


def _written_by_torch_save(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_TORCH_SAVE)) == _LEGACY_TORCH_SAVE


def load_tensors_and_values(path: Path) -> Any:
    """torch.load for files that may come from anyone: unpickling more than tensors and plain values can run code."""
    _a_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # torch's older, non-zip format too
    except OSError:
        raise
    except pickle.UnpicklingError:
        if not _written_by_torch_save(path):  # garbage: refused by the same unpickler as code would be
            raise unreadable(path, "not a file torch.save writes: cut short or overwritten") from None
        raise TrainingError(
            f"{path} holds more than tensors and plain values and is not loaded: unpickling it could run any code. "
            "(An rng-*.pt written before RNG states were saved as plain values holds numpy's state as a numpy array: "
            "that checkpoint cannot be resumed; start the run again without --resume.)"
        ) from None
    except Exception as exc:  # the zip reader's or the unpickler's on bytes torch.save did not write (any kind)
        said = str(exc).split(". ")[0] if isinstance(exc, RuntimeError) or _written_by_torch_save(path) else ""
        raise unreadable(path, said or "not a file torch.save writes: cut short or overwritten") from None


def load_checkpoint(accelerator, path: Path, *, model: nn.Module, optimizer, lr_scheduler) -> tuple[dict, dict]:
    """Restore into prepared model / optimizer; returns (state.json contents, extra.pt contents).
    Every file is read before anything is restored, so a refused checkpoint leaves the run untouched."""
    trainable = load_trainable(path / "trainable.safetensors")
    optimizer_state = load_tensors_and_values(path / "optimizer.pt")
    lr_scheduler_state = load_tensors_and_values(path / "lr_scheduler.pt")
    extra = load_tensors_and_values(path / "extra.pt")
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    rng = load_tensors_and_values(rng_file) if rng_file.exists() else None  # a folder there is refused
    state = read_state(path)
    load_trainable_state(accelerator.unwrap_model(model), trainable)
    optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(lr_scheduler_state)
    if accelerator.scaler is not None and "grad_scaler" in extra:
        accelerator.scaler.load_state_dict(extra["grad_scaler"])
    if rng is not None:
        set_rng_state(rng)
    return state, extra
