"""How `python -m training` ends a stage that fails (seconds, no model): summary.json says the run failed
(a previous run's "completed" one never stands for it), and settings this machine cannot run (fp16 or a
CUDA device without a GPU) exit 2, "invalid settings", not 1, which `compare` uses for a failed gate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

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


def _runs(monkeypatch):
    """A stage named "toy" that records that it ran and completes."""
    ran = []

    def run(settings):
        ran.append(settings.out)
        return {}

    monkeypatch.setattr(cli, "_stages", lambda: {"toy": (StageSettings, run, "a stage")})
    return ran


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
    assert read_summary(tmp_path / "run")["status"] == "failed"  # --out is made before the stage runs


@pytest.mark.parametrize("stage", ["finetune", "distill", "discriminator"])
def test_fp16_on_cpu_is_refused_as_invalid_settings(tmp_path, capsys, stage):
    """finetune trained fp32 silently; distill and discriminator crashed with a dtype traceback."""
    _completed_before(tmp_path / "run", stage)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    argv = [stage, "--base", "tiny", "--data", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "run"),
            "--mixed-precision", "fp16", "--cpu"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "fp16 needs a GPU; on CPU use bf16 or no" in capsys.readouterr().err
    # refused before the rerun started: the completed run's record stands, as it still describes the folder
    assert (tmp_path / "run" / "summary.json").read_bytes() == before


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


def test_bundle_writes_into_a_new_folder_and_over_its_own_earlier_bundle_readable_by_any_uid(tmp_path, tiny_layout):
    """The stage holds its --out with a lock file and writes its summary there first: the bundle writer, which
    refuses a folder holding other files, took them for another folder's and refused every new --out."""
    out = tmp_path / "bundle"
    argv = ["bundle", "--base", tiny_layout.base, "--unet", tiny_layout.unet or str(Path(tiny_layout.base) / "unet"),
            "--lcm-lora", tiny_layout.lcm_lora, "--dtype", "float32", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(argv) == 0 and (out / "manifest.json").is_file()
    assert cli.main(argv) == 0 and (out / "manifest.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    weights = list(out.rglob("*.safetensors"))
    assert weights and {f.stat().st_mode & 0o777 for f in weights} == {0o666 & ~umask}, "the serving uid reads them"


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


def test_an_out_that_cannot_be_written_is_refused_before_the_stage_runs(tmp_path, monkeypatch, capsys):
    """It was noticed at the first checkpoint, after the training ran (a traceback). A folder under a file cannot
    be made even by root, whom a read-only mode does not stop."""
    ran = _runs(monkeypatch)
    (tmp_path / "file").write_text("")
    assert cli.main(["toy", "--out", str(tmp_path / "file" / "run")]) == 2
    assert f"--out {tmp_path / 'file' / 'run'}: cannot write there" in capsys.readouterr().err
    assert not ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_out_is_refused_before_the_stage_runs(tmp_path, monkeypatch, capsys):
    ran = _runs(monkeypatch)
    out = tmp_path / "run"
    out.mkdir(mode=0o500)
    assert cli.main(["toy", "--out", str(out)]) == 2
    assert f"--out {out}: cannot write there (Permission denied)" in capsys.readouterr().err
    assert not ran


def test_a_second_run_into_an_out_in_use_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Both ran, and the second moved the first's checkpoints aside and overwrote its outputs."""
    ran = _runs(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / ".lock")):
        assert cli.main(["toy", "--out", str(out)]) == 2
        assert f"--out {out} is in use by another run" in capsys.readouterr().err
        assert not ran and sorted(path.name for path in out.iterdir()) == [".lock"]
    assert cli.main(["toy", "--out", str(out)]) == 0  # the lock is the run's only while it runs
    assert cli.main(["toy", "--out", str(out)]) == 0 and ran == [out, out]


def test_an_out_holding_another_stage_s_run_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """A mistyped --out rewrote that run's summary as this stage's failed one: resolve_part then refused it."""
    ran = _runs(monkeypatch)
    out = tmp_path / "disc"
    _completed_before(out, "discriminator")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert cli.main(["toy", "--out", str(out)]) == 2
    assert f"--out {out} holds a discriminator run" in capsys.readouterr().err
    assert not ran and {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert resolve_part(str(out), "discriminator", "x")[1]["stage"] == "discriminator"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--adam-beta1", "1.5"), ("--adam-beta1", "-0.1"), ("--adam-beta2", "1"), ("--adam-epsilon", "0"),
     ("--adam-weight-decay", "-0.01")],
)  # fmt: skip
def test_adam_settings_out_of_range_are_refused_before_anything_loads(tmp_path, capsys, flag, value):
    """--adam-beta1 1.5 loaded the models, then torch raised a traceback."""
    argv = ["finetune", "--base", "tiny", "--data", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "run"),
            flag, value]  # fmt: skip
    assert cli.main(argv) == 2
    assert f"invalid settings: {flag[2:].replace('-', '_')}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("max_flip_share: [\n", "line 2, column 1: expected the node content, but found '<stream end>'"),
        ("steps: 10\n  lr: 1e-3: x\n", "line 2, column 5: mapping values are not allowed here"),
        ("- steps\n", "expected a mapping of settings, got list"),
    ],
)
@pytest.mark.parametrize("stage", ["finetune", "evaluate", "compare"])
def test_a_config_that_is_no_yaml_mapping_is_one_line_of_invalid_settings(tmp_path, capsys, stage, text, problem):
    """A malformed YAML printed some 45 lines of PyYAML traceback in every stage."""
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert cli.main([stage, "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m training {stage}: invalid settings: {config}: {problem}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda path: None, "cannot read it (No such file or directory)"),
        (lambda path: path.mkdir(), "cannot read it (Is a directory)"),
        (lambda path: path.write_text("applications: [\n"), "line 2, column 1: expected the node content"),
        (lambda path: path.write_text("- applications\n"), "expected a Serve config (a mapping: applications"),
    ],
)
def test_a_serve_config_that_cannot_be_read_is_invalid_settings_as_a_config_is(tmp_path, capsys, make, problem):
    """export-labels --serve-config nope.yaml exited 1 with Python's OSError line, after claiming and marking --out,
    where --config nope.yaml is invalid settings, exit 2, with nothing written."""
    config = tmp_path / "serve.yaml"
    make(config)
    assert cli.main(["export-labels", "--serve-config", str(config), "--out", str(tmp_path / "labels")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m training export-labels: invalid settings: serve_config: {config}: {problem}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "labels").exists()


def test_a_thresholds_file_that_is_no_yaml_is_named_in_one_line(tmp_path):
    from training.compare import load_thresholds

    bad = tmp_path / "thresholds.yaml"
    bad.write_text("max_flip_share: [\n")
    with pytest.raises(TrainingError) as refused:
        load_thresholds(bad)
    assert str(refused.value) == (
        f"thresholds file {bad}: line 2, column 1: expected the node content, but found '<stream end>'"
    )


def _finetune(tmp_path, data):
    return ["finetune", "--base", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--resolution", "64",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def test_a_truncated_image_is_refused_before_training_naming_entry_field_and_file(tmp_path, capsys):
    """Its header is intact: the header-only check passed it, and the run died at its first batch."""
    from training.synthetic import make_synthetic_triplets

    metadata = make_synthetic_triplets(tmp_path / "data", n=3, size=64)
    gt = sorted((tmp_path / "data" / "gt").iterdir())[1]
    gt.write_bytes(gt.read_bytes()[: gt.stat().st_size // 2])
    assert cli.main(_finetune(tmp_path, metadata)) == 1
    err = capsys.readouterr().err
    assert f"bad data: {metadata}: entry 1: field 'GT': {gt}:" in err and "truncated" in err
    assert not (tmp_path / "cache").exists()  # no model was made or loaded


def test_a_data_folder_is_named_a_folder_with_the_metadata_file_to_give(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    assert cli.main(_finetune(tmp_path, folder)) == 1
    assert f"{folder} is a folder, not a metadata file (--data {folder / 'metadata.json'}?)" in capsys.readouterr().err


def test_a_part_that_does_not_exist_is_named_once(tmp_path, capsys, tiny_layout):
    """`distill --unet runs/nonexist` said "runs/nonexist: runs/nonexist does not exist"."""
    from training.synthetic import make_synthetic_triplets

    metadata = make_synthetic_triplets(tmp_path / "data", n=1, size=64)
    missing = tmp_path / "nonexist"
    argv = ["distill", "--base", tiny_layout.base, "--unet", str(missing), "--data", str(metadata),
            "--out", str(tmp_path / "run"), "--resolution", "64"]  # fmt: skip
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == f"python -m training distill: {missing} does not exist\n"
    run = tmp_path / "moved-run"  # a finetune run whose unet/ is gone: both the run and the part are named
    run.mkdir()
    summary = {"stage": "finetune", "status": "completed", "outputs": {"unet": str(run / "unet")},
               "config": {"out": str(run)}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FileNotFoundError) as refused:
        resolve_part(str(run), "finetune", "unet")
    assert str(refused.value) == f"{run}: {run / 'unet'} does not exist"


def _argv(command, run, tmp_path, tiny_layout):
    """`command` given the run folder where it takes a finetune (bundle, distill) or evaluate (compare) run."""
    if command == "bundle":
        return ["bundle", "--base", tiny_layout.base, "--unet", str(run), "--lcm-lora", tiny_layout.lcm_lora,
                "--out", str(tmp_path / "bundle"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    if command == "distill":
        from training.synthetic import make_synthetic_triplets

        metadata = make_synthetic_triplets(tmp_path / "data", n=1, size=64)
        return ["distill", "--base", tiny_layout.base, "--unet", str(run), "--data", str(metadata),
                "--out", str(tmp_path / "distill"), "--resolution", "64"]  # fmt: skip
    return ["compare", "--a", str(run), "--b", str(run), "--out", str(tmp_path / "cmp")]


@pytest.mark.parametrize(
    ("command", "summary", "problem"),
    [
        *[(c, '{"stage": "finetune", "status": "comp', "summary.json: not valid JSON (")
          for c in ("bundle", "distill", "compare")],
        ("compare", "[]", "summary.json: not valid JSON (expected an object, got list)"),
        *[(c, {"stage": "finetune", "status": "completed", "outputs": {}}, "summary.json records no unet output")
          for c in ("bundle", "distill")],
        ("bundle", {"stage": "finetune", "status": "completed", "outputs": {"unet": ""}},
         "summary.json records no unet output"),  # "" was the current folder
        ("bundle", {"stage": "finetune", "status": "completed", "outputs": {"unet": "/u"}, "config": "x"},
         "summary.json records no config of its run"),
    ],
)  # fmt: skip
def test_a_run_whose_summary_is_broken_or_records_no_part_is_named_in_one_line(
    tmp_path, capsys, tiny_layout, command, summary, problem
):
    """A summary.json cut short (or edited by hand) was a JSONDecodeError traceback, and one without the unet a
    KeyError: 'unet' traceback."""
    run = tmp_path / "parts" / "x"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    assert cli.main(_argv(command, run, tmp_path, tiny_layout)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m training {command}: {run}{os.sep}{problem}"), err
    assert len(err.splitlines()) == 1


def test_a_distill_run_whose_summary_lacks_its_timesteps_is_named_in_one_line(tmp_path, capsys, tiny_layout):
    """bundle --lcm-lora RUN read the run's DDIM timesteps from its config: a summary without them (edited by hand)
    was a KeyError or TypeError traceback (review)."""
    run = tmp_path / "distill"
    run.mkdir()
    summary = {"stage": "distill", "status": "completed", "outputs": {"lora": str(tiny_layout.lcm_lora)}, "config": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    argv = ["bundle", "--base", tiny_layout.base, "--unet", tiny_layout.unet, "--lcm-lora", str(run),
            "--out", str(tmp_path / "bundle"), "--cache-dir", str(tmp_path / "cache"),
            "--allow-other-teacher"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "records no num_ddim_timesteps or timestep_scaling_factor in its summary" in err, err
    assert len(err.splitlines()) == 1


def test_an_out_whose_summary_is_broken_is_still_claimed_by_a_run(tmp_path, monkeypatch):
    """claim_out reads out/summary.json for the stage that wrote it: one cut short is no other stage's run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"stage": "dist')
    ran = _runs(monkeypatch)
    assert cli.main(["toy", "--out", str(out)]) == 0
    assert ran == [out] and read_summary(out)["status"] == "running"


def test_bundle_names_its_own_flags_when_the_unet_is_the_discriminator_s_trunk(tmp_path, capsys, tiny_layout):
    """It said "set discriminator_unet to hf:...", a setting the bundle command does not have."""
    base_unet = str(Path(tiny_layout.base) / "unet")
    argv = ["bundle", "--base", tiny_layout.base, "--unet", base_unet, "--lcm-lora", tiny_layout.lcm_lora,
            "--discriminator", tiny_layout.discriminator, "--out", str(tmp_path / "bundle"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"--unet {base_unet} has the weights of the UNet the discriminator was trained on" in err
    assert "give --unet a finetune run" in err and "leave out --discriminator" in err
    assert "discriminator_unet" not in err


def test_an_out_refusal_reads_as_english_and_names_a_folder_that_cannot_be_made(tmp_path):
    """"holds a evaluate run"; and --out /proc/x said only "No such file or directory", where /proc exists."""
    from training.common import claim_out

    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"stage": "evaluate", "status": "completed"}))
    with pytest.raises(SettingsError, match="holds an evaluate run"):
        claim_out(out, "finetune")
    with pytest.raises(SettingsError, match=r"cannot write there \(.*\); the folder could not be made in /proc$"):
        claim_out("/proc/rorem-out", "finetune")


def test_an_annotate_rerun_refused_for_its_data_leaves_a_finished_round_as_it_was(tmp_path, capsys):
    """The CLI marked a rerun running before annotate checked its inputs, so a mistyped --data turned a finished
    round's summary failed (as evaluate and compare did: the training trial)."""
    out = tmp_path / "round1"
    _completed_before(out, stage="annotate")
    before = (out / "summary.json").read_bytes()
    missing = tmp_path / "pairs.jsn"
    assert cli.main(["annotate", "--bundle", "tiny", "--data", str(missing), "--out", str(out)]) == 1
    assert f"bad data: {missing}: metadata file not found" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
