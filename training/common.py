"""What every training stage shares: settings, the Accelerator, the base model folder, step seeds,
the null prompt, the run summary (summary.json) and the progress bar.

Each stage's loop lives in its own module and reads top to bottom; this module holds only the
pieces that are the same in all of them. Checkpoints are in `training.checkpoint`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines.bundle import RUN_LOCK, RUN_SUMMARY

MixedPrecision = Literal["no", "fp16", "bf16"]
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUMMARY = RUN_SUMMARY  # a run's record; the bundle writer leaves it beside the manifest
DEFAULT_CACHE = "~/.cache/rorem"


class TrainingError(ValueError):
    """A run cannot go on as configured (wrong part, incompatible checkpoint, too small a resolution...)."""


class InterruptedAtStep(KeyboardInterrupt):
    """A Ctrl-C inside the training loop: the checkpoints in out/ are then this run's own (other runs' were set
    aside as it started), so the newest is what --resume continues."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


class SettingsError(TrainingError):
    """Settings this machine cannot run (fp16 or a CUDA device without a GPU): exit 2, as for invalid
    settings, not 1, which `compare` uses for a failed gate."""


class StageSettings(BaseModel):
    """Settings every stage has. Unknown keys are refused (a typo in a config is an error)."""

    model_config = ConfigDict(extra="forbid")
    out: Path = Field(description="output folder: results, checkpoints/, summary.json")
    seed: int = Field(0, description="seed of every random draw of the run")

    OUT_MODE: ClassVar[int] = 0o777
    """The mode `claim_out` makes a missing out/ with (less the umask)."""
    MARKS_ITS_START: ClassVar[bool] = False
    """The stage writes its own status-running summary once its checks passed (training.loop.train, evaluate);
    otherwise the CLI marks the run at its start (mark_run)."""


class TrainSettings(StageSettings):
    """Settings of the three training stages (finetune, discriminator, distill)."""

    MARKS_ITS_START: ClassVar[bool] = True  # a rerun refused by its checks leaves a finished run's record as it was

    base: str = Field(
        description="SDXL-inpainting pipeline folder (vae/, unet/, scheduler/, text encoders), "
        "hf:OWNER/NAME[@REVISION], or 'tiny' / 'tiny:SEED' for the tiny architecture (generated in cache_dir)"
    )
    data: Path = Field(description="metadata JSON (RORem format)")
    resolution: int = Field(512, description="training side in pixels, a multiple of 64")
    steps: int = Field(1000, ge=1, description="optimizer steps in total (a resumed run continues to this)")
    batch_size: int = Field(4, ge=1, description="samples per process per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1, in [0, 1)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2, in [0, 1)")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    mixed_precision: MixedPrecision = Field("no", description="no | fp16 | bf16 (frozen parts are cast to it)")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    resume: str | None = Field(None, description="'latest' (none yet: start fresh) or a checkpoint folder")
    resume_despite_changes: bool = Field(
        False,
        description="resume even from a checkpoint written with other settings or data "
        "(refused otherwise; the differences are recorded in the summary as resume_changes)",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cpu: bool = Field(False, description="run on CPU even if a GPU is there")
    cache_dir: Path = Field(Path(DEFAULT_CACHE), description="where base 'tiny' is generated")
    overfit_one_batch: bool = Field(
        False, description="debug: the same batch, noise and timesteps every step (the loss must fall)"
    )

    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset(
        {
            "steps",
            "resume",
            "resume_despite_changes",
            "checkpoint_every",
            "keep_checkpoints",
            "out",
            "cache_dir",
            "num_workers",
            "cpu",
            "gradient_checkpointing",
        }
    )
    """Settings a resumed run may have changed: see training.checkpoint.resume_changes."""
    BEFORE_RECORDED: ClassVar[dict[str, Any]] = {}
    """A setting added since, by what a checkpoint that does not record it trained with, where that is not its
    default: see training.checkpoint.resume_changes."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value <= 0 or value % 64:
            raise ValueError(f"resolution must be a positive multiple of 64, got {value}")
        return value


# ---------------------------------------------------------------- environment


def make_accelerator(settings: TrainSettings):
    """The run's Accelerator. Launched as several processes (accelerate launch, torchrun) on a machine
    without a GPU, accelerate only sets up CPU data parallelism when told cpu=True: done here, else
    every process would train alone and all of them would write the same files."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = settings.cpu or (launched and not torch.cuda.is_available())
    if settings.mixed_precision == "fp16" and (settings.cpu or not torch.cuda.is_available()):
        # accelerate would fail deep in a stage (a dtype traceback) or quietly train fp32
        raise SettingsError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=cpu, project_dir=str(settings.out))


def training_device(name: str) -> torch.device:
    """The device of evaluate / annotate ("auto" | "cpu" | "cuda[:N]"), checked before anything is loaded:
    a CUDA device on a machine without it fails later with a bare AssertionError."""
    from serve.placement import available_device

    try:
        return available_device(name)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def resolve_base(ref: str, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """A base pipeline folder: local path, hf: reference, or the tiny one (generated once, under a lock)."""
    from engines.authors_layout import fetch, pipeline_reads

    if ref != "tiny" and not ref.startswith("tiny:"):
        return fetch(ref, pipeline_reads())
    seed = int(ref.split(":", 1)[1]) if ":" in ref else 0
    return tiny_authors_layout(cache_dir, seed) / "base"


def tiny_authors_layout(cache_dir: str | Path, seed: int = 0) -> Path:
    """The tiny authors' layout (base/, rorem_unet/, lcm_lora/, discriminator/) in cache_dir/tiny-authors-SEED."""
    from filelock import FileLock

    from engines.bundle import replace_folder
    from engines.tiny import write_tiny_authors_layout

    folder = Path(cache_dir).expanduser() / f"tiny-authors-{seed}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "base" / "model_index.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
            write_tiny_authors_layout(staging, seed=seed)
            replace_folder(staging, folder)
    return folder


def null_prompt_embeds(base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt "" through the base's two text encoders, once: ([1, 77, D], [1, P]). RORem trains with it."""
    from engines.authors_layout import encode_constant_prompt

    return encode_constant_prompt(base, "")


def sdxl_time_ids(resolution: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for square crops."""
    row = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype)
    return row.expand(batch, -1)


def step_generator(seed: int, *counters: int) -> torch.Generator:
    """A CPU generator for one micro-batch: its draws depend only on (seed, step, micro, process),
    so a resumed run draws the same noise and timesteps as an uninterrupted one, on any device."""
    state = np.random.SeedSequence([seed, *counters]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------- the run summary


class RunSummary:
    """Collects what a run did and writes it to out/summary.json (at checkpoints and at the end).

    Fields: stage, status (running | completed | failed, with error), config, versions, device, processes, started_at,
    finished_at, resumed_from, steps_done, losses [{step, loss, lr, seconds}], step_time_s
    (first, mean, median of the rest), final_loss, outputs, metrics (stage specific), inputs_sha256
    (the frozen weights trained against, by what they are: training.loop.run_facts).
    """

    def __init__(self, stage: str, settings: StageSettings, accelerator=None):
        self.stage = stage
        self.settings = settings
        self.accelerator = accelerator
        self.path = Path(settings.out) / SUMMARY
        self.data: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "config": json.loads(settings.model_dump_json()),
            "versions": versions(),
            "device": str(accelerator.device) if accelerator is not None else "cpu",
            "processes": accelerator.num_processes if accelerator is not None else 1,
            "started_at": _now(),
            "resumed_from": None,
            "losses": [],
            "outputs": {},
            "metrics": {},
        }

    @property
    def losses(self) -> list[dict[str, float]]:
        return self.data["losses"]

    def log_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.losses.append({"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 4)})

    def write(self, status: str = "running") -> Path:
        is_main = self.accelerator is None or self.accelerator.is_main_process
        self.data["status"] = status
        losses = self.losses
        self.data["steps_done"] = losses[-1]["step"] if losses else 0
        self.data["final_loss"] = losses[-1]["loss"] if losses else None
        seconds = [entry["seconds"] for entry in losses]
        if seconds:
            rest = seconds[1:] or seconds
            self.data["step_time_s"] = {
                "first": seconds[0],
                "mean": round(statistics.fmean(rest), 4),
                "median": round(statistics.median(rest), 4),
            }
        if status == "completed":
            self.data["finished_at"] = _now()
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_summary(self.path, self.data)
        return self.path


def claim_out(out: str | Path, stage: str, mode: int = 0o777):
    """Make out/ (with `mode` where missing), prove it writable and lock it (out/.lock) for this run; returns the
    held FileLock. Raises SettingsError, having written nothing, for out/ holding another stage's run (a mistyped
    --out would overwrite it), a folder that cannot be written (noticed otherwise at the first checkpoint, after
    the training) or one another run holds (it would move this run's checkpoints aside and overwrite its outputs)."""
    from filelock import FileLock, Timeout

    out = Path(out)
    try:
        other = (read_summary(out) or {}).get("stage", stage)
    except (OSError, ValueError):
        other = stage
    if other != stage:
        article = "an" if other[:1] in "aeiou" else "a"
        raise SettingsError(
            f"--out {out} holds {article} {other} run (its summary.json): choose another --out for {stage}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=mode)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as exc:
        made = "" if out.is_dir() else f"; the folder could not be made in {out.parent}"  # /proc/x: No such file
        raise SettingsError(f"--out {out}: cannot write there ({exc.strerror or exc}){made}") from None
    lock = FileLock(str(out / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SettingsError(f"--out {out} is in use by another run (it holds {out / RUN_LOCK})") from None
    return lock


def mark_run(out: str | Path, stage: str, settings: StageSettings, error: BaseException | None = None) -> None:
    """out/summary.json of a stage that starts (status running: config, started_at) or failed (status failed,
    with the error, over what the stage wrote). A previous run's "completed" summary never outlives a rerun
    that failed once it started (marked running): bundle, compare and resolve_part take only completed runs. A rerun
    refused before it started wrote nothing, so a previous run's summary stays as it is (it still describes the
    folder); with none there, the failure is recorded. A folder that is not there is not made (`claim_out` makes
    it, with the stage's mode)."""
    path = Path(out) / SUMMARY
    if not path.parent.is_dir():
        return
    if error is None:
        data = {"stage": stage, "status": "running", "config": json.loads(settings.model_dump_json()),
                "started_at": _now()}  # fmt: skip
    else:
        try:
            data = read_summary(out)
        except ValueError:  # a summary.json cut short: no record to keep
            data = None
        if data is not None and (data.get("status") != "running" or data.get("stage") != stage):
            return  # not this run's: it was refused before it started
        data = data or {"stage": stage, "config": json.loads(settings.model_dump_json())}
        data.update(status="failed", error=describe_error(error), finished_at=_now())
    _write_summary(path, data)


def describe_error(error: BaseException) -> str:
    """The summary's `error`: a Ctrl-C (KeyboardInterrupt) says where it stopped the run, not "KeyboardInterrupt: "."""
    if isinstance(error, KeyboardInterrupt):
        return str(error) or "interrupted"
    return f"{type(error).__name__}: {error}"


def _write_summary(path: Path, data: dict) -> None:
    """Whole or not at all; allow_nan=False: a bare NaN is no JSON (bundle and compare would read it as a number)."""
    tmp = path.with_name(SUMMARY + ".partial")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk left an empty summary.json.partial
        raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_yaml_mapping(path: str | Path, what: str = "a mapping of settings") -> dict[str, Any]:
    """A YAML file of settings given on the command line (--config, export-labels' --serve-config); one that cannot be
    read, or is not a YAML mapping, raises SettingsError (a ValueError: invalid settings, exit 2) in one line naming
    it (PyYAML's own error was a traceback, and quotes the file's text)."""
    import yaml

    from serve.config import invalid_because

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: {invalid_because(exc)}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object this package wrote (summary.json, a checkpoint's state.json); one cut short or edited by hand
    raises TrainingError (a ValueError) naming the file, not a JSONDecodeError traceback."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TrainingError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: not valid JSON (expected an object, got {type(data).__name__})")
    return data


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """folder's summary.json, None without one."""
    path = Path(folder) / SUMMARY
    return read_json_object(path) if path.is_file() else None


def resolve_part(ref: str, stage: str, output: str, inner: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """A part given directly, or a run folder of `stage` (its summary's outputs[output]); plus the run's record."""
    path = Path(ref).expanduser()
    summary = read_summary(path)
    if summary is not None:
        if summary.get("stage") != stage:
            raise TrainingError(f"{path} is a {summary.get('stage')} run, expected a {stage} run")
        if summary.get("status") != "completed":
            raise TrainingError(f"the {stage} run in {path} has not completed (status {summary.get('status')})")
        outputs, config = summary.get("outputs"), summary.get("config")
        if not isinstance(outputs, dict) or not isinstance(outputs.get(output), str) or not outputs[output]:
            raise TrainingError(f"{path / SUMMARY} records no {output} output")
        if config is not None and not isinstance(config, dict):
            raise TrainingError(f"{path / SUMMARY} records no config of its run")
        path = Path(outputs[output])
        out = (config or {}).get("out")
        if not path.exists() and isinstance(out, str):  # the run folder was moved or copied: look inside it
            try:
                path = Path(ref).expanduser() / path.relative_to(Path(out).resolve())
            except ValueError:
                pass
        record = {
            "run": str(Path(ref).expanduser().resolve()),
            "stage": stage,
            "steps_done": summary.get("steps_done"),
            "final_loss": summary.get("final_loss"),
            "finished_at": summary.get("finished_at"),
            "config": summary.get("config"),
            "metrics": _compact(summary.get("metrics") or {}),
            "versions": summary.get("versions"),
            "inputs_sha256": summary.get("inputs_sha256"),
        }
    else:
        record = None
    if inner and path.is_dir() and (path / inner).is_file():
        path = path / inner
    if not path.exists():  # the part a run folder names, or the path given (named once)
        named = f"{ref}: {path}" if path != Path(ref).expanduser() else str(path)
        raise FileNotFoundError(f"{named} does not exist")
    return path, record


def _compact(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-item lists (held-out scores), which do not belong in a manifest."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = _compact(value)
        elif not isinstance(value, list):
            out[key] = value
    return out


def resolve_unet(ref: str | None, base: Path) -> Path:
    """A UNet folder: given directly, a finetune run folder (its out/unet), or by default the base's unet/."""
    return resolve_part(ref, "finetune", "unet")[0] if ref else base / "unet"


# ---------------------------------------------------------------- model pieces the stages share


def frozen_base_parts(base: Path) -> dict[str, Path]:
    """The base's frozen pieces every stage trains against (the latents and the empty prompt come from them),
    by what they are: a resume compares their weights' sha256 (training.loop.run_facts)."""
    return {"base VAE": base / "vae", "base text encoder": base / "text_encoder",
            "base text encoder 2": base / "text_encoder_2"}  # fmt: skip


def load_frozen_vae(base: Path, device, weight_dtype: torch.dtype):
    """The base's VAE, frozen, in the mixed dtype, except that SDXL's VAE overflows in fp16
    (config force_upcast): it then stays fp32, as diffusers does."""
    from diffusers import AutoencoderKL

    upcast = AutoencoderKL.load_config(base / "vae").get("force_upcast", True)
    dtype = torch.float32 if (weight_dtype == torch.float16 and upcast) else weight_dtype
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """pixels [B,3,H,W] in [-1,1] -> latents * scaling_factor: a posterior sample drawn from
    `generator` (training targets), or the posterior mean without one (what the scorer uses)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = posterior.mean
    if generator is not None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        latents = latents + posterior.std * noise
    return latents.float() * vae.config.scaling_factor


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """mask [B,1,H,W] in {0,1} at the latent size (nearest), as the remover and scorer do."""
    return torch.nn.functional.interpolate(mask.float(), size=latents.shape[-2:]).to(latents.dtype)
