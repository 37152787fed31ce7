"""How `python -m training` ends a stage that fails (seconds, no model): summary.json says the run failed
(a previous run's "completed" one never stands for it), and settings this machine cannot run (fp16 or a
CUDA device without a GPU) exit 2, "invalid settings", not 1, which `compare` uses for a failed gate."""

from __future__ import annotations

import json

import pytest
import torch

from training import cli
from training.common import SettingsError, StageSettings, TrainingError, read_summary, resolve_part


def _stage(monkeypatch, fails):
    """A stage named "toy" that records what its summary.json said while it ran, then raises `fails`."""
    seen = {}

    def run(settings):
        seen["status"] = (read_summary(settings.out) or {}).get("status")
        raise fails

    monkeypatch.setattr(cli, "_stages", lambda: {"toy": (StageSettings, run, "a stage that fails")})
    return seen


def _completed_before(out, stage="toy"):
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"stage": stage, "status": "completed", "outputs": {"x": str(out)}}))


def test_a_failed_rerun_leaves_a_failed_summary_not_the_previous_completed_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _completed_before(out)
    seen = _stage(monkeypatch, TrainingError("the checkpoint does not fit"))
    assert cli.main(["toy", "--out", str(out)]) == 1
    assert seen["status"] == "running"
    summary = read_summary(out)
    assert summary["status"] == "failed" and "the checkpoint does not fit" in summary["error"]
    assert summary["config"]["out"] == str(out) and summary["started_at"]
    with pytest.raises(TrainingError, match="has not completed"):
        resolve_part(str(out), "toy", "x")


def test_an_unexpected_error_marks_the_run_failed_and_still_raises(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _completed_before(out)
    _stage(monkeypatch, RuntimeError("dtype mismatch"))
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        cli.main(["toy", "--out", str(out)])
    assert read_summary(out)["status"] == "failed"


def test_a_settings_error_exits_2(tmp_path, monkeypatch, capsys):
    _stage(monkeypatch, SettingsError("no GPU here"))
    assert cli.main(["toy", "--out", str(tmp_path / "run")]) == 2
    assert "invalid settings: no GPU here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # an --out not there is left to the stage to make


@pytest.mark.parametrize("stage", ["finetune", "distill", "discriminator"])
def test_fp16_on_cpu_is_refused_as_invalid_settings(tmp_path, capsys, stage):
    """finetune trained fp32 silently; distill and discriminator crashed with a dtype traceback."""
    _completed_before(tmp_path / "run", stage)
    argv = [stage, "--base", "tiny", "--data", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "run"),
            "--mixed-precision", "fp16", "--cpu"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "fp16 needs a GPU; on CPU use bf16 or no" in capsys.readouterr().err
    assert read_summary(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("stage", ["evaluate", "annotate"])
def test_a_cuda_device_the_machine_lacks_exits_2_with_a_reason(tmp_path, capsys, stage):
    """It was a bare AssertionError from torch, exit 1 (a failed gate, in the documented table)."""
    argv = [stage, "--bundle", "tiny", "--data", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "run"),
            "--device", "cuda:99"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--device cuda:99: this machine has" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_settings_error():
    from training.common import training_device

    with pytest.raises(SettingsError, match="0 CUDA device"):
        training_device("cuda")
    assert training_device("auto") == torch.device("cpu")


def test_bundle_out_naming_a_folder_that_is_not_a_bundle_is_refused_and_left_as_it_was(tmp_path, capsys):
    """The bundle replaced the folder at --out whole: a training run's folder given as --out was deleted."""
    out = tmp_path / "runs"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "precious.txt").write_text("weeks of training")
    argv = ["bundle", "--base", "tiny", "--unet", str(tmp_path / "unet"), "--lcm-lora", str(tmp_path / "lora"),
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} is a folder that holds files and is not a bundle" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["finetune", "finetune/precious.txt"]


@pytest.mark.parametrize(
    "error",
    [
        "engines.lora:LoRAError:LoRA file lora.safetensors: not a readable safetensors file",
        "engines.scorer:DiscriminatorError:discriminator head cls_pred_branch.pt: not a plain tensor dict",
        "engines.errors:BundleError:unet/diffusion_pytorch_model.safetensors: not a readable safetensors file",
    ],
)
def test_an_engine_s_error_about_its_input_files_is_one_line_exit_1(tmp_path, monkeypatch, capsys, error):
    """A cut LoRA file or a refused pickled discriminator head came out of `training bundle` as a traceback."""
    import importlib

    module, name, message = error.split(":", 2)
    _stage(monkeypatch, getattr(importlib.import_module(module), name)(message))
    assert cli.main(["toy", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == f"python -m training toy: {message}\n"
