"""The on-disk model bundle: a manifest plus the components serving needs, nothing else.

Layout (the manifest is the one source of truth for architecture sizes and dtype):

    manifest.json                                  format version, architecture, dtype, hashes, provenance
    unet/diffusion_pytorch_model.safetensors       the RORem UNet with the LCM LoRA already fused
    vae/diffusion_pytorch_model.safetensors        the SDXL VAE
    prompt_embeds.safetensors                      constant prompt embeddings (no text encoder at serve time)
    discriminator/model.safetensors                optional: RORem's discriminator (trunk + head, LoRA fused)
    discriminator/prompt_embeds.safetensors        optional: its embeddings of the prompt "" (as trained)

The discriminator section of the manifest is optional, so bundles written before it still load.

Every file the manifest lists lies inside the folder: its name is relative, without "..", and neither
it nor a folder on its way resolves outside (a symlink out of the folder is refused). The components
are loaded from the very bytes checked against their sha256 (`Bundle.read`): a file replaced after
`verify` is refused, not loaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import save_file

from engines.errors import BundleError, validation_line
from engines.sampling import DEFAULT_STEPS, DEFAULT_STRENGTH

if TYPE_CHECKING:
    from engines.scorer import Discriminator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
PROMPT_EMBEDS = "prompt_embeds.safetensors"
DISCRIMINATOR_WEIGHTS = "discriminator/model.safetensors"
DISCRIMINATOR_PROMPT_EMBEDS = "discriminator/prompt_embeds.safetensors"
# loaded only through `Bundle.read`, which hashes the bytes it hands over
HASHED_AS_READ = frozenset({UNET_WEIGHTS, VAE_WEIGHTS, PROMPT_EMBEDS, DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_PROMPT_EMBEDS})
# exported UNets (engines.runners): each file is loaded only by the runner that serves it, from bytes it hashes;
# not part of `Bundle.verify` (is_export)
EXPORTS_DIR = "exports"
RUN_SUMMARY = "summary.json"  # `python -m training bundle` writes its run's record beside the manifest, unlisted
RUN_LOCK = ".lock"  # and holds the folder with this lock file while it runs (training.common.claim_out)

DTypeName = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}




class PromptInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    sequence_length: int
    embed_dim: int
    pooled_dim: int


class Architecture(BaseModel):
    """diffusers configs of each component, as diffusers' `from_config` takes them."""

    model_config = ConfigDict(extra="forbid")
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    prompt: PromptInfo


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=50)
    strength: float = Field(DEFAULT_STRENGTH, gt=0.0, le=1.0)


class DiscriminatorInfo(BaseModel):
    """RORem's discriminator: its trunk's architecture is the base UNet's config (not RORem's)."""

    model_config = ConfigDict(extra="forbid")
    unet: dict[str, Any]
    score_size: int = Field(512, gt=0)
    prompt: PromptInfo


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    dtype: DTypeName
    architecture: Architecture
    sampling: SamplingDefaults = SamplingDefaults()
    discriminator: DiscriminatorInfo | None = None
    files: dict[str, FileEntry]
    provenance: dict[str, Any] = {}

    @field_validator("files")
    @classmethod
    def _names_stay_inside_the_folder(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not name or name.startswith("/") or "\\" in name or ".." in PurePosixPath(name).parts:
                raise ValueError(f"file name {name!r} must be a relative path inside the bundle folder, without '..'")
        return files


def replace_folder(staging: Path, final: Path) -> None:
    """Put the complete folder `staging` at `final`, replacing a folder there: the old one is renamed aside
    (hidden, .NAME.old), the new one renamed in, then the old one deleted. Deleting the old one in place first
    left, after a crash mid-delete, a partial folder (manifest or state.json and all) at `final`; now a crash
    leaves a complete one there, or, between the two renames, the old one aside, which `recover_folder` puts
    back."""
    recover_folder(final)
    aside = _aside(final)
    if final.exists():
        final.rename(aside)
    staging.rename(final)
    if aside.exists():
        shutil.rmtree(aside)


def recover_folder(final: Path) -> None:
    """After a crash in `replace_folder`: the old folder back at `final` where nothing replaced it, else gone.
    A `final` that is a symbolic link is refused: the new folder would replace the link, not where it points."""
    if final.is_symlink():
        raise ValueError(f"{final} is a symbolic link: write to the folder it points to ({os.path.realpath(final)})")
    aside = _aside(final)
    if aside.exists():
        if final.exists():
            shutil.rmtree(aside)
        else:
            aside.rename(final)


def readable_as_any_file(folder: str | Path) -> None:
    """safetensors' save_file writes 0600, where torch.save and config.json get 0666 less the umask: weights trained
    by one uid could not be read by the serving one. Every .safetensors under folder gets the mode of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for file in Path(folder).rglob("*.safetensors"):
        file.chmod(0o666 & ~umask)


def check_replaceable(path: Path) -> None:
    """`Bundle.write` replaces the folder at `path` whole, so only a bundle (its manifest.json) or an empty folder
    (but for a training run's summary.json and lock) is replaced: an --out naming any other folder deleted what it
    held."""
    if not path.exists():
        return
    if not path.is_dir():
        raise BundleError(f"{path} is not a folder: a bundle is written as a folder")
    if (path / MANIFEST).is_file():
        return
    if any(entry.name not in (RUN_SUMMARY, RUN_LOCK) for entry in path.iterdir()):
        raise BundleError(
            f"{path} is a folder that holds files and is not a bundle (no {MANIFEST}): not replaced; "
            "write the bundle to a new or empty folder"
        )


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def is_export(name: str) -> bool:
    """Whether listed file `name` is an exported UNet's (under exports/): not part of the bundle's own `verify`, so a
    broken export stops only what loads it (its runner hashes it as it reads it, `engines.runners.read_checked`),
    and the export commands, which open the bundle verified, can still replace it."""
    return PurePosixPath(name).parts[0] == EXPORTS_DIR


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A loaded bundle folder; components are built on request (`load_unet`, `load_vae`, ...)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, *, hash_weights: bool = True) -> "Bundle":
        """`hash_weights=False` is for a process that loads the files it uses through a reader that hashes them
        (`HASHED_AS_READ`): hashing them in `verify` too costs a second pass (about 25 s of an SDXL replica's
        start)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} not found")
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_text())
        except ValidationError as exc:
            why = validation_line(exc.errors(include_url=False, include_input=False), most=3)
            raise BundleError(f"{manifest_path} is not a valid manifest: {why}") from None
        except ValueError as exc:  # not UTF-8
            raise BundleError(f"{manifest_path} is not a valid manifest: {exc}") from None
        bundle = cls(path, manifest)
        if verify:
            bundle.verify(hash_weights=hash_weights)
        return bundle

    def verify(self, *, hash_weights: bool = True) -> None:
        """Check every listed file but the exports (`is_export`): inside the folder, not a symlink, with the recorded
        size and sha256 (with `hash_weights=False`, the sha256 of the files `HASHED_AS_READ` is left to `read`)."""
        own = [name for name in self.manifest.files if not is_export(name)]
        problems = self._file_problems(own, hash_weights=hash_weights)
        required_files = [UNET_WEIGHTS, VAE_WEIGHTS, PROMPT_EMBEDS]
        if self.has_discriminator:
            required_files += [DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_PROMPT_EMBEDS]
        for required in required_files:
            if required not in self.manifest.files:
                problems.append(f"{required}: not listed in the manifest")
        if problems:
            raise BundleError(f"bundle {self.path} failed verification: " + "; ".join(problems))

    def check_files(self, names: list[str]) -> None:
        """Check listed files `names` as `verify` checks the bundle's own, sha256 included: for the export files a
        command reads by path (the parity check, TensorRT's parser) before it records what it read."""
        problems = self._file_problems(names, hash_weights=True)
        if problems:
            raise BundleError(f"bundle {self.path}: " + "; ".join(problems))

    def _file_problems(self, names: list[str], *, hash_weights: bool) -> list[str]:
        problems = []
        for name in names:
            entry = self.manifest.files[name]
            try:
                file = self.file(name)
            except BundleError as exc:
                problems.append(str(exc))
                continue
            if not file.is_file():
                problems.append(f"{name}: missing")
            elif file.stat().st_size != entry.bytes:
                problems.append(f"{name}: {file.stat().st_size} bytes, manifest says {entry.bytes}")
            elif (hash_weights or name not in HASHED_AS_READ) and sha256_of(file) != entry.sha256:
                problems.append(f"{name}: sha256 differs from the manifest")
        return problems

    def file(self, name: str) -> Path:
        """The path of listed file `name`, refused when it is a symlink or resolves outside the bundle folder."""
        if name not in self.manifest.files:
            raise BundleError(f"{name}: not listed in the manifest of {self.path}")
        path = self.path / name
        if path.is_symlink():
            raise BundleError(f"{name}: a symlink; bundle files are plain files inside the bundle folder")
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise BundleError(f"{name}: resolves to {path.resolve()}, not inside the bundle folder {self.path}")
        return path

    def read(self, name: str) -> bytes:
        """The bytes of listed file `name`, checked against its size and sha256 as they are read: what
        the caller loads is what was hashed, whatever happened to the file since `verify`."""
        path = self.file(name)
        entry = self.manifest.files[name]
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.bytes:
                    raise BundleError(f"{name}: {size} bytes, manifest says {entry.bytes}")
                data = f.read()
        except OSError as exc:  # with verify off, a missing file is first met here
            missing = "missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
            raise BundleError(f"{name}: {missing} from bundle {self.path}") from exc
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(f"{name}: sha256 differs from the manifest (the file changed after it was verified)")
        return data

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Bytes that match their manifest entry may still not parse (a bundle written with them): a BundleError
        naming the file, as for any other broken bundle file."""
        try:
            return safetensors.torch.load(self.read(name))
        except safetensors.SafetensorError as exc:
            raise BundleError(f"{name}: not a readable safetensors file in bundle {self.path} ({exc})") from None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]

    @property
    def has_discriminator(self) -> bool:
        return self.manifest.discriminator is not None

    def summary(self, locations: bool = True) -> dict[str, Any]:
        """What an operator wants to see about the loaded model. `locations=False` leaves out where it was read
        from (its folder, the weights it was imported from): for answers anyone may read, such as /readyz."""
        m = self.manifest
        where = {"path": str(self.path), "source": m.provenance.get("source")} if locations else {}
        return {
            "name": m.name,
            "dtype": m.dtype,
            "unet_parameters": m.provenance.get("unet_parameters"),
            "steps": m.sampling.steps,
            "strength": m.sampling.strength,
            "discriminator": self.has_discriminator,
            **where,
        }

    def load_unet(self) -> UNet2DConditionModel:
        """The weights are read before the model is built: the file's bytes and their parsed copy (twice
        the file) are held together only while no float32 model exists; the peak is the model plus one copy."""
        weights = self._tensors(UNET_WEIGHTS)
        unet = UNet2DConditionModel.from_config(self.manifest.architecture.unet)
        unet.load_state_dict(weights, strict=True)
        del weights
        return _cast(unet, self.dtype).eval().requires_grad_(False)

    def load_vae(self) -> AutoencoderKL:
        weights = self._tensors(VAE_WEIGHTS)
        vae = AutoencoderKL.from_config(self.manifest.architecture.vae)
        vae.load_state_dict(weights, strict=True)
        del weights
        return _cast(vae, self.dtype).eval().requires_grad_(False)

    def load_prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self._tensors(PROMPT_EMBEDS)
        return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

    def load_discriminator(self) -> Discriminator:
        """RORem's discriminator (LoRA already fused), strict load, in the bundle dtype, eval, no grad."""
        from engines.scorer import Discriminator

        info = self._discriminator_info()
        weights = self._tensors(DISCRIMINATOR_WEIGHTS)
        discriminator = Discriminator(info.unet, init_weights=False)
        discriminator.load_state_dict(weights, strict=True)
        del weights
        return _cast(discriminator, self.dtype).eval().requires_grad_(False)

    def load_discriminator_prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._discriminator_info()
        tensors = self._tensors(DISCRIMINATOR_PROMPT_EMBEDS)
        return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

    def _discriminator_info(self) -> DiscriminatorInfo:
        if self.manifest.discriminator is None:
            raise BundleError(f"bundle {self.path} has no discriminator (import the authors' layout with one)")
        return self.manifest.discriminator

    def make_scheduler(self) -> LCMScheduler:
        return LCMScheduler.from_config(self.manifest.architecture.scheduler)

    @classmethod
    def write(
        cls,
        path: str | Path,
        *,
        name: str,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: LCMScheduler,
        prompt: str,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        dtype: DTypeName,
        sampling: SamplingDefaults | None = None,
        provenance: dict[str, Any] | None = None,
        discriminator: Discriminator | None = None,
        discriminator_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "Bundle":
        """Save components and a manifest with hashes; the folder is written atomically.

        The new folder is written as NAME.partial and put in place by `replace_folder`; a folder already at
        `path` is replaced only when it is a bundle or empty (`check_replaceable`), else refused before writing.

        `discriminator` (LoRA fused) goes with `discriminator_prompt_embeds` = (prompt_embeds,
        pooled_prompt_embeds) of the prompt "" it was trained with.
        """
        if (discriminator is None) != (discriminator_prompt_embeds is None):
            raise ValueError("a discriminator and its prompt embeddings are written together")
        path = Path(path)
        staging = path.with_name(path.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        recover_folder(path)
        check_replaceable(path)
        torch_dtype = DTYPES[dtype]
        tensors = {
            UNET_WEIGHTS: {k: v.to(torch_dtype).contiguous() for k, v in unet.state_dict().items()},
            VAE_WEIGHTS: {k: v.to(torch_dtype).contiguous() for k, v in vae.state_dict().items()},
            PROMPT_EMBEDS: {
                "prompt_embeds": prompt_embeds.to(torch_dtype).contiguous(),
                "pooled_prompt_embeds": pooled_prompt_embeds.to(torch_dtype).contiguous(),
            },
        }
        discriminator_info = None
        if discriminator is not None:
            disc_embeds, disc_pooled = discriminator_prompt_embeds
            tensors[DISCRIMINATOR_WEIGHTS] = {
                k: v.to(torch_dtype).contiguous() for k, v in discriminator.state_dict().items()
            }
            tensors[DISCRIMINATOR_PROMPT_EMBEDS] = {
                "prompt_embeds": disc_embeds.to(torch_dtype).contiguous(),
                "pooled_prompt_embeds": disc_pooled.to(torch_dtype).contiguous(),
            }
            discriminator_info = DiscriminatorInfo(
                unet=_plain_config(discriminator.unet_config),
                prompt=PromptInfo(
                    text="",
                    sequence_length=disc_embeds.shape[1],
                    embed_dim=disc_embeds.shape[2],
                    pooled_dim=disc_pooled.shape[1],
                ),
            )
        files = {}
        for name_, state in tensors.items():
            target = staging / name_
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(target))
            files[name_] = FileEntry(sha256=sha256_of(target), bytes=target.stat().st_size)
        readable_as_any_file(staging)
        manifest = Manifest(
            name=name,
            dtype=dtype,
            architecture=Architecture(
                unet=_plain_config(unet.config),
                vae=_plain_config(vae.config),
                scheduler=_scheduler_config(scheduler),
                prompt=PromptInfo(
                    text=prompt,
                    sequence_length=prompt_embeds.shape[1],
                    embed_dim=prompt_embeds.shape[2],
                    pooled_dim=pooled_prompt_embeds.shape[1],
                ),
            ),
            sampling=sampling or SamplingDefaults(),
            discriminator=discriminator_info,
            files=files,
            provenance={
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "unet_parameters": sum(p.numel() for p in unet.parameters()),
                **(
                    {"discriminator_parameters": sum(p.numel() for p in discriminator.parameters())}
                    if discriminator is not None
                    else {}
                ),
                **(provenance or {}),
            },
        )
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        try:
            check_replaceable(path)  # again: something may have been put there while the files were written
        except BundleError:
            shutil.rmtree(staging)
            raise
        replace_folder(staging, path)
        return cls(path, manifest)


def _plain_config(config) -> dict[str, Any]:
    """A diffusers FrozenDict as JSON-safe data, without the bookkeeping keys."""
    data = json.loads(json.dumps(dict(config), default=str))
    return {k: v for k, v in data.items() if not k.startswith("_")}



def _scheduler_config(scheduler: LCMScheduler) -> dict[str, Any]:
    """Only the keys LCMScheduler takes: a base pipeline's Euler config carries others."""
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    return {k: v for k, v in _plain_config(scheduler.config).items() if k in accepted}


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model if dtype == torch.float32 else model.to(dtype)
