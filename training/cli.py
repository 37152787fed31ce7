"""python -m training {synthetic,finetune,discriminator,distill,annotate,bundle,evaluate,compare,export-labels}:
train the served bundle, and measure it before it ships.

    python -m training synthetic --out runs/data --n 32 --size 128
    python -m training finetune --base tiny --data runs/data/metadata.json --out runs/finetune --resolution 64 --steps 200
    python -m training distill --base tiny --unet runs/finetune --data runs/data/metadata.json --out runs/distill \\
        --resolution 64 --lora-rank 8 --steps 100
    python -m training discriminator --base tiny --data runs/data/discriminator/metadata.json --out runs/disc --steps 50
    python -m training bundle --base tiny --unet runs/finetune --lcm-lora runs/distill --discriminator runs/disc \\
        --out runs/bundle --dtype float32
    python -m training annotate --bundle runs/bundle --data pairs.json --out runs/round1 --threshold 0.9
    python -m training export-labels --serve-config serve/configs/local.yaml --out runs/labels --min-count 100
    python -m training evaluate --bundle runs/bundle --data test/metadata.json --out runs/eval-torch
    python -m training compare --a runs/eval-torch --b runs/eval-onnx --out runs/cmp \\
        --thresholds training/configs/eval_thresholds.yaml          # exit 1 when the gate fails
    accelerate launch -m training finetune --config finetune.yaml        # multi-GPU (one process per GPU)

Every setting is a flag (--lora-rank 8) or a key of the --config YAML (lora_rank: 8); flags win.
Training stages take --resume [PATH] (no PATH: the newest checkpoint in OUT/checkpoints, if any).
OUT is made, checked writable and locked (OUT/.lock: one run at a time) before anything loads; an OUT
holding another stage's run is refused (exit 2). Each stage writes OUT/summary.json (config, versions, losses,
step times, metrics, outputs): status "running" from its start (a training stage's, evaluate's, annotate's and
compare's: once its settings, data, bundle, runs or resume checks passed; a rerun they refuse leaves OUT as it
was), "completed" at its end,
"failed" (with the error) when it fails.
Exit codes: 0 done (a gate passed); 1 a failed run or gate; 2 invalid settings (also fp16 or a CUDA device
this machine cannot run, an OUT that cannot be written or that another run holds); 130 stopped by Ctrl-C (SIGINT:
one line says at which step and what --resume continues from; the summary keeps the steps done and their losses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engines.errors import validation_line


def _stages() -> dict[str, tuple[type[BaseModel], Callable[[Any], dict], str]]:
    from training.annotate import AnnotateSettings, annotate
    from training.assemble import BundleStageSettings, assemble
    from training.compare import CompareSettings, compare
    from training.discriminator import DiscriminatorSettings, train_discriminator
    from training.distill import DistillSettings, distill
    from training.evaluate import EvaluateSettings, evaluate
    from training.export_labels import ExportLabelsSettings, export_labels
    from training.finetune import FinetuneSettings, finetune
    from training.synthetic import SyntheticSettings, run_synthetic

    return {
        "synthetic": (SyntheticSettings, run_synthetic, "synthetic triplets and discriminator negatives"),
        "finetune": (FinetuneSettings, finetune, "full UNet fine-tune on triplets (RORem)"),
        "discriminator": (DiscriminatorSettings, train_discriminator, "train the discriminator's LoRA + head"),
        "distill": (DistillSettings, distill, "LCM-LoRA distillation (RORem-4S)"),
        "annotate": (AnnotateSettings, annotate, "one automated data round: remove, score, keep >= threshold"),
        "bundle": (BundleStageSettings, assemble, "assemble a servable bundle from the trained parts"),
        "export-labels": (ExportLabelsSettings, export_labels, "the service's human verdicts as a discriminator set"),
        "evaluate": (EvaluateSettings, evaluate, "run an engine over a test set: outputs, per-image CSV, metrics"),
        "compare": (CompareSettings, compare, "two evaluate runs paired per image; gate on allowed deltas"),
    }


def _is_bool(annotation) -> bool:
    return annotation is bool


def _is_list(annotation) -> bool:
    """list[...] or tuple[...], also optional (list[str] | None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) in (list, tuple)


def build_parser(stages=None) -> argparse.ArgumentParser:
    stages = stages or _stages()
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (model, _, help_text) in stages.items():
        stage = sub.add_parser(name, help=help_text, description=help_text, argument_default=argparse.SUPPRESS)
        stage.add_argument("--config", help="YAML or JSON file of settings (keys as below, with underscores)")
        for field_name, field in model.model_fields.items():
            flag = "--" + field_name.replace("_", "-")
            default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
            help_text = (field.description or "") + default
            if _is_bool(field.annotation):
                stage.add_argument(flag, nargs="?", const="true", metavar="BOOL", help=help_text)
            elif field_name == "resume":
                stage.add_argument(flag, nargs="?", const="latest", metavar="PATH", help=help_text)
            elif _is_list(field.annotation):
                stage.add_argument(flag, type=lambda v: [x.strip() for x in v.split(",") if x.strip()], help=help_text)
            else:
                stage.add_argument(flag, metavar=field_name.upper(), help=help_text)
    return parser


def load_config(path: str | Path) -> dict[str, Any]:
    """The settings of a --config file (keys with `-` or `_`); one that cannot be read, or is not a YAML mapping,
    raises a ValueError in one line naming it (training.common.read_yaml_mapping)."""
    from training.common import read_yaml_mapping

    return {str(k).replace("-", "_"): v for k, v in read_yaml_mapping(path).items()}


def settings_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    values = vars(args).copy()
    values.pop("stage", None)
    config = values.pop("config", None)
    merged = {**(load_config(config) if config else {}), **values}
    return model.model_validate(merged)


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


# the engines' errors about their inputs (a broken bundle, LoRA or discriminator file), by module and name
INPUT_ERRORS = {"engines.errors": "BundleError", "engines.lora": "LoRAError", "engines.scorer": "DiscriminatorError"}


def _is_input_error(exc: BaseException) -> bool:
    """The engines (and with them diffusers) are imported only by the stages that need them."""
    return any(isinstance(exc, getattr(sys.modules[m], name)) for m, name in INPUT_ERRORS.items() if m in sys.modules)


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT (128 + 2)


def interrupted(settings: BaseModel, exc: KeyboardInterrupt, started_at: float) -> str:
    """The one line a Ctrl-C prints: where the stage stopped and, for a training stage, what --resume continues
    from (the newest checkpoint of this run, not the step it stopped at). Before the loop's first step the
    checkpoints in out/ are an earlier run's (a fresh rerun sets them aside only then): not this run's to offer."""
    from training.annotate import AnnotateSettings
    from training.checkpoint import PREFIX, checkpoints
    from training.common import InterruptedAtStep, TrainSettings, describe_error

    line = describe_error(exc)
    if isinstance(settings, AnnotateSettings):
        return f"{line}; rerun with --resume to keep the scores logged so far"
    if not isinstance(settings, TrainSettings):
        return line
    found = [
        path for path in checkpoints(Path(settings.out) / "checkpoints")
        if isinstance(exc, InterruptedAtStep) or (path / "state.json").stat().st_mtime >= started_at
    ]  # fmt: skip
    if found:
        step = int(found[-1].name[len(PREFIX) :])
        return f"{line}; rerun with --resume to continue from step {step} ({found[-1]})"
    if settings.resume is not None:
        return f"{line}; no checkpoint was written yet: rerun with the same --resume {settings.resume}"
    return f"{line}; no checkpoint was written yet: a rerun starts from step 0"


def main(argv: list[str] | None = None) -> int:
    from training.common import SUMMARY, SettingsError, TrainingError, claim_out, mark_run
    from training.data import DatasetError

    stages = _stages()
    args = build_parser(stages).parse_args(argv)
    model, run, _ = stages[args.stage]
    try:
        settings = settings_from_args(model, args)
    except ValidationError as exc:
        problems = validation_line(exc.errors(include_url=False, include_input=False), root="settings")
        print(f"python -m training {args.stage}: invalid settings: {problems}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a --config file that cannot be read as settings (load_config)
        print(f"python -m training {args.stage}: invalid settings: {exc}", file=sys.stderr)
        return 2
    main_process = _is_main_process()
    started_at = time.time()
    held = contextlib.ExitStack()
    if main_process:
        try:
            held.callback(claim_out(settings.out, args.stage, type(settings).OUT_MODE).release)
        except SettingsError as exc:
            print(f"python -m training {args.stage}: {exc}", file=sys.stderr)
            return 2
    from engines.stopping import stopping_on_sigterm

    caught = held.enter_context(stopping_on_sigterm())
    try:
        if main_process and not type(settings).MARKS_ITS_START:
            mark_run(settings.out, args.stage, settings)
        summary = run(settings)
    except BaseException as exc:
        caught.stopping = True
        if main_process:  # a previous run's "completed" summary must not stand for this one, once it started
            with contextlib.suppress(OSError):  # (the error itself is what to report)
                mark_run(settings.out, args.stage, settings, error=exc)
        if isinstance(exc, KeyboardInterrupt):
            line = interrupted(settings, exc, started_at)
            if caught.signal is not None:
                line = line.replace("interrupted", "interrupted by SIGTERM", 1)
            print(f"python -m training {args.stage}: {line}", file=sys.stderr)
            return INTERRUPTED if caught.signal is None else 128 + caught.signal
        if isinstance(exc, SettingsError):
            print(f"python -m training {args.stage}: invalid settings: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, DatasetError):
            print(f"python -m training {args.stage}: bad data: {exc}", file=sys.stderr)
            return 1
        if not isinstance(exc, (TrainingError, FileNotFoundError)) and not _is_input_error(exc):
            raise
        print(f"python -m training {args.stage}: {exc}", file=sys.stderr)
        return 1
    finally:
        held.close()
    if _is_main_process():
        path = Path(settings.out) / SUMMARY
        final = summary.get("final_loss")
        loss = f", final loss {final:.6g}" if isinstance(final, float) else ""
        print(f"[{args.stage}] done{loss}; outputs: {json.dumps(summary.get('outputs', {}))}")
        print(f"[{args.stage}] summary: {path}")
        if summary.get("report"):
            print(summary["report"])
    gate = summary.get("gate")
    if gate is not None and not gate["passed"]:
        for failure in gate["failures"]:
            print(f"python -m training {args.stage}: gate failed: {failure}", file=sys.stderr)
        return 1
    return 0
