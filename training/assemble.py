"""`bundle`: assemble a servable bundle from trained parts.

The trained parts are in the authors' published layout (a diffusers UNet folder from `finetune`,
a LoRA file from `distill`, a `pytorch_lora_weights.safetensors` + `cls_pred_branch.pt` folder from
`discriminator`), so this stage *is* the authors' import (`engines.authors_layout.import_authors_layout`:
fuse the LCM LoRA with every tensor applied, compute the prompt embeddings once, write the bundle
with sha256 hashes), with the training runs recorded in the manifest's provenance: stage, steps,
final loss, finish time, config and metrics of each run (the import adds the sha256 of each input file).

Each part may be given as the file/folder itself or as the training run's output folder (the one
holding summary.json): `--unet runs/finetune`, `--lcm-lora runs/distill`, `--discriminator runs/disc`.

An LCM LoRA given as its distill run is fused only into the UNet it was distilled against (the run's
sha256 of its teacher UNet against the --unet weights'): `--allow-other-teacher` fuses it into another,
and the bundle's provenance records both hashes. The bundle's LCMScheduler samples on the grid the LoRA
was distilled on: the run's --num-ddim-timesteps and --timestep-scaling-factor become its
original_inference_steps and timestep_scaling.

Each run given as its folder trained against the base's VAE and text encoders (its inputs_sha256): the bundle takes
those from --base, so a --base whose parts are other weights is refused (`--allow-other-base` assembles it anyway,
and the provenance records the hashes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from engines.sampling import DEFAULT_STEPS, DEFAULT_STRENGTH
from training.checkpoint import files_sha256, weights_sha256
from training.common import (
    DEFAULT_CACHE,
    RunSummary,
    StageSettings,
    TrainingError,
    TrainSettings,
    frozen_base_parts,
    resolve_base,
    resolve_part,
)

LORA_FILENAME = "pytorch_lora_weights.safetensors"


class BundleStageSettings(StageSettings):
    out: Path = Field(
        description="the bundle folder, replaced whole (a previous bundle too; a folder of other files is refused), "
        "with summary.json"
    )
    base: str = Field(description=TrainSettings.model_fields["base"].description)  # the runs' base, checked
    unet: str = Field(description="the fine-tuned UNet folder, or the finetune run folder")
    lcm_lora: str = Field(description="LCM LoRA file (or the distill run folder); fused into the UNet (4 LCM steps)")
    discriminator: str | None = Field(None, description="discriminator folder (or the discriminator run folder)")
    name: str = "rorem-4s-trained"
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="weights dtype in the bundle")
    prompt: str = Field("", description="prompt whose embeddings are baked in (training used '')")
    steps: int = Field(
        DEFAULT_STEPS, ge=1, le=50, description=f"default sampling steps ({DEFAULT_STEPS} for an LCM-distilled UNet)"
    )
    strength: float = Field(DEFAULT_STRENGTH, gt=0, le=1)
    allow_other_teacher: bool = Field(
        False, description="fuse the LCM LoRA into a UNet other than the teacher its distill run was trained against"
    )
    allow_other_base: bool = Field(
        False, description="assemble with a --base whose VAE or text encoders are not the ones the runs trained against"
    )
    cache_dir: Path = Field(Path(DEFAULT_CACHE), description="where base 'tiny' is generated")

    @field_validator("out")
    @classmethod
    def _out_is_replaceable(cls, out: Path) -> Path:
        """Refused before the run marks it (summary.json) and before minutes of fusing: the bundle replaces the
        folder whole, so it must be new, empty or a bundle."""
        from engines.bundle import BundleError, check_replaceable

        try:
            check_replaceable(Path(out).expanduser())
        except BundleError as exc:
            raise ValueError(str(exc)) from None
        return out


def assemble(settings: BundleStageSettings) -> dict:
    from engines.authors_layout import AuthorsLayout, import_authors_layout
    from engines.bundle import SamplingDefaults

    summary = RunSummary("bundle", settings)
    base = resolve_base(settings.base, settings.cache_dir)
    unet_dir, unet_run = resolve_part(settings.unet, "finetune", "unet")
    training: dict[str, Any] = {"unet": unet_run}
    lora, training["lcm_lora"] = resolve_part(settings.lcm_lora, "distill", "lora", inner=LORA_FILENAME)
    other_teacher = _check_teacher(unet_dir, training["lcm_lora"], settings)
    disc = None
    if settings.discriminator:
        disc, training["discriminator"] = resolve_part(settings.discriminator, "discriminator", "discriminator")

    other_base = _check_base(base, training, settings)
    trunk = _discriminator_unet(training.get("discriminator"), base) if disc else None
    if trunk:
        _check_trunk(unet_dir, Path(trunk), settings)
    layout = AuthorsLayout(
        base=str(base),
        unet=str(unet_dir),
        lcm_lora=str(lora),
        discriminator=str(disc) if disc else None,
        discriminator_unet=trunk,
    )
    bundle = import_authors_layout(
        layout,
        settings.out,
        prompt=settings.prompt,
        dtype=settings.dtype,
        name=settings.name,
        sampling=SamplingDefaults(steps=settings.steps, strength=settings.strength),
        lcm_schedule=_lcm_schedule(training["lcm_lora"], settings.steps),
        provenance={
            "training": training,
            "assembled_by": "python -m training bundle",
            **({"other_teacher": other_teacher} if other_teacher else {}),
            **({"other_base": other_base} if other_base else {}),
        },
    )
    summary.data["outputs"] = {"bundle": str(bundle.path)}
    summary.data["metrics"] = {
        "name": bundle.manifest.name,
        "dtype": bundle.manifest.dtype,
        "files": {name: entry.bytes for name, entry in bundle.manifest.files.items()},
        "lcm_lora": bundle.manifest.provenance.get("lcm_lora"),
        "discriminator": bundle.has_discriminator,
    }
    summary.write("completed")  # out/summary.json sits beside the manifest; the bundle does not list it
    return summary.data


def _check_teacher(unet: Path, distill_run: dict[str, Any] | None, settings: BundleStageSettings) -> dict | None:
    """An LCM LoRA is a correction of its teacher's sampling: fused into other weights it samples them wrongly, with
    nothing to show for it. None when the LoRA was not given as a distill run (nothing recorded to compare) or the
    UNet is its teacher; else, with allow_other_teacher, the two sha256 for the provenance."""
    if distill_run is None:
        return None
    teacher = (distill_run.get("inputs_sha256") or {}).get("teacher UNet")
    fused_into = weights_sha256(unet, settings.cache_dir)
    if teacher == fused_into:
        return None
    found = (
        f"was distilled against a teacher UNet with weights sha256 {teacher[:16]}, not {unet} ({fused_into[:16]})"
        if teacher
        else "does not record the sha256 of its teacher UNet (a run from before it was recorded)"
    )
    if not settings.allow_other_teacher:
        raise TrainingError(
            f"the LCM LoRA of the distill run {distill_run['run']} {found}: fused into other weights, it samples them "
            "wrongly. Distill against this UNet (distill --unet), or pass --allow-other-teacher to fuse it anyway "
            "(the bundle's provenance records it)."
        )
    return {"allowed": True, "teacher_sha256": teacher, "unet_sha256": fused_into}


def _check_base(base: Path, runs: dict[str, dict[str, Any] | None], settings: BundleStageSettings) -> list | None:
    """The bundle encodes images with --base's VAE and bakes its prompt embeddings: a UNet, LoRA or discriminator
    trained against another base's latents and embeddings sees inputs it never learned, with nothing to show for it.
    None when every run given as its folder recorded these very parts (a part a run does not record is not compared);
    else, with allow_other_base, each difference (run, part, both sha256) for the provenance."""
    base_sha256: dict[str, str] = {}
    differences = []
    for run in filter(None, runs.values()):
        recorded = run.get("inputs_sha256") or {}
        for part, folder in frozen_base_parts(base).items():
            if part not in recorded:
                continue
            if part not in base_sha256:
                base_sha256[part] = weights_sha256(folder, settings.cache_dir)
            if recorded[part] != base_sha256[part]:
                differences.append(
                    {"run": run["run"], "stage": run["stage"], "part": part, "run_sha256": recorded[part],
                     "base_sha256": base_sha256[part]}
                )  # fmt: skip
    if not differences:
        return None
    if not settings.allow_other_base:
        listed = "; ".join(
            f"the {d['stage']} run {d['run']} trained against a {d['part']} with weights sha256 "
            f"{d['run_sha256'][:16]}, not --base's ({d['base_sha256'][:16]})"
            for d in differences
        )
        raise TrainingError(
            f"--base {settings.base} is not the base the runs trained on: {listed}. The bundle takes the VAE and the "
            "prompt embeddings from --base, so the runs' weights would see latents and embeddings "
            "they never learned. Give the --base the runs trained on, or pass --allow-other-base to assemble it anyway "
            "(the bundle's provenance records it)."
        )
    return [{"allowed": True, **d} for d in differences]


def _check_trunk(unet: Path, trunk: Path, settings: BundleStageSettings) -> None:
    """The import refuses a discriminator trunk that shares weights with the removal UNet (the authors' discriminator
    was trained on the SDXL-inpainting UNet, not RORem's) and names its discriminator_unet setting, which this
    command has no flag for: it takes the UNet the discriminator run trained on. Refused here in this command's
    terms."""
    from engines.authors_layout import WEIGHT_SUFFIXES

    if (trunk / "unet").is_dir():
        trunk = trunk / "unet"

    def weights(folder: Path) -> set[str]:
        return {sha for name, sha in files_sha256(folder, settings.cache_dir).items() if name.endswith(WEIGHT_SUFFIXES)}

    if weights(unet) & weights(trunk):
        raise TrainingError(
            f"--unet {settings.unet} has the weights of the UNet the discriminator was trained on ({trunk}), and a "
            "bundle's discriminator must sit on other weights than its removal UNet: give --unet a finetune run "
            "(the fine-tuned UNet), or train the discriminator on the base's UNet (discriminator without --unet), "
            "or leave out --discriminator"
        )


def _lcm_schedule(distill_run: dict[str, Any] | None, steps: int) -> dict[str, Any] | None:
    """The student learned consistency at the DDIM timesteps of its run, with its boundary scaling: sampled on
    LCMScheduler's default grid (50 steps) after distilling on another, it is asked at timesteps it never learned.
    None (the defaults, the authors' 50 and 10) for a LoRA given as a bare file."""
    if distill_run is None:
        return None
    config = distill_run.get("config") or {}
    missing = [key for key in ("num_ddim_timesteps", "timestep_scaling_factor") if key not in config]
    if missing:
        raise TrainingError(f"the distill run {distill_run['run']} records no {' or '.join(missing)} in its summary")
    if steps > config["num_ddim_timesteps"]:
        raise TrainingError(
            f"--steps {steps}: the LCM LoRA of {distill_run['run']} was distilled on {config['num_ddim_timesteps']} "
            "DDIM timesteps, and LCM samples a subset of them"
        )
    return {
        "original_inference_steps": config["num_ddim_timesteps"],
        "timestep_scaling": config["timestep_scaling_factor"],
    }


def _discriminator_unet(run: dict[str, Any] | None, base: Path) -> str:
    """The UNet the discriminator run trained on (its metrics say), else base's unet/ (the discriminator stage's
    default)."""
    return ((run or {}).get("metrics") or {}).get("base_unet") or str(base)
