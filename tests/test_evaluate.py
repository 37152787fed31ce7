"""The evaluation harness on the tiny bundle with synthetic triplets, on CPU: `evaluate` writes every
artifact through the service's imaging path; `compare` of a run with itself shows zero deltas and
passes the shipped gate; a deliberately degraded engine fails it with exit code 1 and names the measure.

The CLIP and DINOv2 folders here are tiny models with RANDOM weights, saved with save_pretrained: they
prove the local loading and the plumbing of those measures, not what their numbers mean."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.pipeline import PIPELINE_VERSION
from tests import helpers
from training.data import Triplet, load_metadata, save_image, write_metadata
from training.synthetic import make_synthetic_triplets

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = REPO / "training" / "configs" / "eval_thresholds.yaml"
SIDE = 128
IMAGING = {"buckets": [128], "crop_margin": 16, "dilate": 4}  # one small bucket: the tiny UNet is quick at 128


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread, and on a shared 2-core machine a second
    thread waiting at every barrier made this file 12x slower (170 s against 14 s)."""
    with helpers.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def triplets(work):
    return make_synthetic_triplets(work / "data", n=4, size=SIDE, seed=0)


@pytest.fixture(scope="module")
def embedding_models(work):
    """Settings naming tiny CLIP and DINOv2 folders with random weights (see the module docstring)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = dict(small, image_size=32, patch_size=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folders = {"clip_model": work / "clip-random", "dino_model": work / "dinov2-random"}
    text = dict(small, vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(
        folders["clip_model"]
    )
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(folders["dino_model"])
    for folder in folders.values():
        processor.save_pretrained(folder)
    return folders


def _evaluate(tiny_bundle, data, out, **overrides):
    from training.evaluate import EvaluateSettings, evaluate

    settings = EvaluateSettings(bundle=str(tiny_bundle.path), data=data, out=out, **{**IMAGING, **overrides})
    return evaluate(settings)


@pytest.fixture(scope="module")
def baseline(tiny_bundle, triplets, work, embedding_models):
    return _evaluate(tiny_bundle, triplets, work / "baseline", **embedding_models)


@pytest.fixture(scope="module")
def degraded(tiny_bundle, triplets, work, embedding_models):
    """The same engine and seeds, its results spoiled with noise inside the dilated mask."""
    return _evaluate(tiny_bundle, triplets, work / "degraded", degrade="noise", **embedding_models)


def _rows(run_folder: Path) -> list[dict]:
    with open(run_folder / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- evaluate


def test_evaluate_writes_every_artifact_through_the_service_path(baseline, tiny_bundle, triplets, work):
    from engines.imaging import dilate_mask

    folder = work / "baseline"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stage"] == "evaluate" and summary["status"] == "completed"
    assert summary["engine"]["runner"] == "torch" and summary["engine"]["steps"] == 4
    assert summary["engine"]["unet_file"] is None  # the bundle's own weights, no exported file
    rows = _rows(folder)
    records = load_metadata(triplets)
    assert [row["id"] for row in rows] == ["00000", "00001", "00002", "00003"]
    assert all(row["status"] == "ok" for row in rows)
    for row, record in zip(rows, records):
        assert int(row["seed"]) == int(row["index"])  # seed + index, --seed 0
        for kind in ("source", "mask", "gt"):
            assert row[f"{kind}_sha256"] == hashlib.sha256(getattr(record, kind).read_bytes()).hexdigest()
        source = np.asarray(Image.open(record.source).convert("RGB"))
        output = np.asarray(Image.open(folder / row["output"]).convert("RGB"))
        assert output.shape == source.shape
        outside = ~dilate_mask(np.asarray(Image.open(record.mask).convert("L")) > 127, IMAGING["dilate"])
        assert np.array_equal(output[outside], source[outside])  # pasted back inside the dilated mask only
        assert not np.array_equal(output, source)

    from engines.bundle import DISCRIMINATOR_WEIGHTS, VAE_WEIGHTS

    judge = summary["discriminator"]  # what `compare` tells judges apart by: what the Scorer reads and runs at
    for name in (DISCRIMINATOR_WEIGHTS, VAE_WEIGHTS):
        assert judge["files"][name] == tiny_bundle.manifest.files[name].sha256, name
    assert judge["dtype"] == "float32"  # on the CPU; bf16 on CUDA scores otherwise
    metrics = summary["metrics"]
    assert metrics["evaluated"] == metrics["with_gt"] == 4
    for name in ("success_rate", "score", "psnr", "ssim", "psnr_masked", "ssim_masked", "psnr_outside", "dino", "clip"):
        assert metrics[name]["n"] == 4 and math.isfinite(metrics[name]["mean"]), name
    assert metrics["success_rate"]["mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert metrics["psnr_masked"]["mean"] < metrics["psnr"]["mean"]  # the repainted region holds all the error
    assert -1 <= metrics["clip"]["mean"] <= 1 and -1 <= metrics["dino"]["mean"] <= 1
    time = metrics["time"]
    assert time["images_per_second"] > 0 and time["wall_seconds"] > sum(float(r["seconds"]) for r in rows)


def test_a_rerun_into_the_same_out_holds_only_its_own_results(baseline, tiny_bundle, triplets, work, capsys):
    """A rerun with --limit 2 left the first run's outputs/00002-00003.png beside its 2 rows, and a compare rerun
    with --sheet-rows 0 the previous contact sheet beside its `contact_sheet: null`."""
    import shutil

    from training.cli import main
    from training.evaluate import OUTPUT_NAME, entry_id

    assert OUTPUT_NAME.fullmatch(f"{entry_id(0)}.png") and OUTPUT_NAME.fullmatch(f"{entry_id(123456)}.png")
    rerun = work / "rerun"
    shutil.copytree(work / "baseline", rerun)
    (rerun / "notes.txt").write_text("mine")
    (rerun / "outputs" / "keep.png").write_bytes(b"not evaluate's")
    args = ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(triplets), "--out", str(rerun)]
    imaging = ["--buckets", "128", "--crop-margin", "16", "--dilate", "4"]
    assert main([*args, *imaging, "--limit", "2"]) == 0
    assert [row["id"] for row in _rows(rerun)] == ["00000", "00001"]
    assert sorted(p.name for p in (rerun / "outputs").iterdir()) == ["00000.png", "00001.png", "keep.png"]
    assert (rerun / "notes.txt").read_text() == "mine"

    from training.evaluate import clear_previous_results

    users = work / "users-folder"  # no per_image.csv: no evaluate ran there, whatever its files are called
    (users / "outputs").mkdir(parents=True)
    for name in ("20240101.png", "00042.png"):
        (users / "outputs" / name).write_bytes(b"a photo of mine")
    clear_previous_results(users)
    assert sorted(p.name for p in (users / "outputs").iterdir()) == ["00042.png", "20240101.png"]

    out = work / "compare-rerun"
    args = ["compare", "--a", str(work / "baseline"), "--b", str(work / "baseline"), "--out", str(out)]
    assert main(args) == 0 and (out / "contact_sheet.png").is_file()
    assert main([*args, "--sheet-rows", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"]["contact_sheet"] is None and not (out / "contact_sheet.png").exists()
    assert (out / "paired.csv").is_file()
    mine = work / "my-sheets"
    mine.mkdir()
    (mine / "contact_sheet.png").write_bytes(b"my own sheet")  # no paired.csv: no compare ran there
    assert main(["compare", "--a", str(work / "baseline"), "--b", str(work / "baseline"), "--out", str(mine),
                 "--sheet-rows", "0"]) == 0  # fmt: skip
    assert (mine / "contact_sheet.png").read_bytes() == b"my own sheet"
    capsys.readouterr()


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under folder by its relative path (the run lock, which every run holds, left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and p.name != ".lock"}  # fmt: skip


@pytest.mark.parametrize("mistake", ["data-typo", "data-folder", "bundle-typo", "runner-without-export"])
def test_a_rerun_refused_for_its_inputs_leaves_a_finished_evaluation_as_it_was(
    baseline, tiny_bundle, triplets, work, capsys, mistake
):
    """A rerun into a finished evaluation's folder (a release baseline) with a mistyped --data or --bundle deleted
    its per_image.csv and outputs/*.png and marked its summary failed, then found the file missing; --data FOLDER
    printed an IsADirectoryError traceback and a missing file a bare "[Errno 2]"."""
    import shutil

    from training.cli import main

    folder = work / f"finished-{mistake}"
    shutil.copytree(work / "baseline", folder)
    before = _contents(folder)
    given = {"--bundle": str(tiny_bundle.path), "--data": str(triplets)}
    typo, data_folder = Path(triplets).with_name("metadat.json"), Path(triplets).parent
    changed, expected = {
        "data-typo": ({"--data": str(typo)}, f"bad data: {typo}: metadata file not found"),
        "data-folder": (
            {"--data": str(data_folder)},
            f"bad data: {data_folder} is a folder, not a metadata file (--data {data_folder / 'metadata.json'}?)",
        ),
        "bundle-typo": ({"--bundle": str(work / "bundel")}, f"{work / 'bundel'} is not a bundle"),
        "runner-without-export": ({"--runner": "onnx"}, "no onnx.float32 export recorded in its manifest"),
    }[mistake]
    argv = [x for flag, value in {**given, **changed}.items() for x in (flag, value)]
    assert main(["evaluate", *argv, "--out", str(folder), "--buckets", "128", "--lpips-net", "off"]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert _contents(folder) == before


def test_a_ctrl_c_line_starts_a_line_of_its_own_after_the_progress_bar(
    tiny_bundle, triplets, tmp_path, monkeypatch, capsys
):
    """It was printed at the end of the progress bar's line, which was still open."""
    import training.evaluate
    from training.cli import main

    entry, calls = training.evaluate._evaluate_entry, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return entry(*args, **kwargs)

    monkeypatch.setattr(training.evaluate, "_evaluate_entry", interrupted)
    argv = ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(triplets), "--out", str(tmp_path / "run"),
            "--buckets", "128", "--crop-margin", "16", "--dilate", "4", "--lpips-net", "off"]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "evaluate:" in err.split("\n")[0]  # the bar
    assert err.split("\n")[-2].startswith("python -m training evaluate: interrupted"), err


@pytest.mark.parametrize("mistake", ["a-typo", "thresholds-typo"])
def test_a_rerun_refused_for_its_inputs_leaves_a_finished_comparison_as_it_was(baseline, work, capsys, mistake):
    """compare deleted a finished comparison's paired.csv and contact sheet, and the CLI marked its summary failed,
    before it found --a or --thresholds missing (as evaluate did, the training trial)."""
    from training.cli import main

    out = work / f"compared-{mistake}"
    args = {"--a": str(work / "baseline"), "--b": str(work / "baseline"), "--out": str(out)}
    assert main(["compare", *[x for pair in args.items() for x in pair]]) == 0
    before = _contents(out)
    assert {"paired.csv", "contact_sheet.png", "summary.json"} <= set(before)
    wrong = {"a-typo": {"--a": str(work / "baselin")}, "thresholds-typo": {"--thresholds": str(work / "gate.yml")}}
    assert main(["compare", *[x for pair in {**args, **wrong[mistake]}.items() for x in pair]]) != 0
    capsys.readouterr()
    assert _contents(out) == before


def test_evaluate_prints_its_headline_numbers_from_its_summary(tiny_bundle, triplets, work, capsys):
    """It printed only its output paths: the means had to be dug out of summary.json."""
    from training.cli import main

    out = work / "headline"
    argv = ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(triplets), "--out", str(out), "--limit", "2",
            "--buckets", "128", "--crop-margin", "16", "--dilate", "4", "--lpips-net", "off"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    for name in ("success_rate", "score", "psnr", "ssim_masked", "psnr_outside", "seconds_per_image"):
        row = next(line.split() for line in printed if line.startswith(f"{name} "))
        assert float(row[1]) == pytest.approx(metrics[name]["mean"], rel=1e-3) and row[3] == "2", row
    assert "skipped (summary.json says why): lpips, dino, clip" in printed
    assert any(line.startswith("2 of 2 entries evaluated (2 with GT;") for line in printed)
    assert "report" not in metrics and "report" not in json.loads((out / "summary.json").read_text())


def test_evaluate_records_whether_the_exported_unet_it_ran_is_the_bundles(tiny_bundle, tmp_path):
    """`--runner onnx --runner-path OTHER.onnx` (a graph exported from another bundle's UNet) ran unchecked, and
    summary.json said only the path given."""
    import shutil

    import torch

    from engines.bundle import UNET_WEIGHTS, Bundle
    from engines.runners import export_filename
    from export.manifest import record_export
    from training.evaluate import exported_unet_file

    shutil.copytree(tiny_bundle.path, tmp_path / "bundle")
    graph = tmp_path / "bundle" / export_filename("onnx", "float32")
    graph.parent.mkdir()
    graph.write_bytes(b"a graph")
    made_from = tiny_bundle.manifest.files[UNET_WEIGHTS].sha256
    record = {"kind": "onnx", "dtype": "float32", "path": graph.relative_to(tmp_path / "bundle").as_posix()}
    bundle = record_export(tmp_path / "bundle", "onnx.float32", [graph], record, made_from=made_from)
    assert isinstance(bundle, Bundle)
    other = tmp_path / "OTHER.onnx"
    ran = {given: exported_unet_file(bundle, "onnx", torch.float32, given) for given in (None, graph, other)}
    assert ran[None] == ran[graph] == {"path": str(graph.resolve()), "bundle_export": True}
    assert ran[other] == {"path": str(other.resolve()), "bundle_export": False}
    assert exported_unet_file(tiny_bundle, "onnx", torch.float32, other)["bundle_export"] is False  # none recorded
    assert exported_unet_file(bundle, "torch", torch.float32, None) is None  # the bundle's own weights


def test_unavailable_measures_are_reported_as_skipped_never_faked(baseline, tiny_bundle, triplets, work):
    import importlib.util

    lpips = baseline["metrics"]["lpips"]
    if importlib.util.find_spec("torchvision") is None:
        assert lpips == {
            "skipped": "torchvision is not installed: torchmetrics' LPIPS builds its alex backbone with it"
        }
    if "skipped" in lpips:
        assert all(row["lpips"] == "" for row in _rows(work / "baseline"))

    from training.quality import load_embedder, load_lpips

    assert load_lpips("off", "cpu") == (None, "turned off (lpips_net: off)")
    assert load_embedder("clip", None, "cpu")[1] == "no --clip-model given (a local transformers CLIP folder)"
    assert "is not a folder" in load_embedder("dino", work / "nowhere", "cpu")[1]
    wrong = load_embedder("clip", work / "dinov2-random", "cpu")[1]  # would load with random CLIP weights
    assert "holds a 'dinov2' model, not CLIP" in wrong


def test_a_pair_set_measures_fidelity_outside_the_mask_and_skips_the_rest(tiny_bundle, triplets, work):
    records = load_metadata(triplets)[:2]
    empty = save_image(np.zeros((SIDE, SIDE), dtype=bool), work / "pairs" / "empty.png")
    pairs = [Triplet(r.source, r.mask) for r in records] + [Triplet(records[0].source, empty)]
    data = write_metadata(work / "pairs" / "metadata.json", pairs)
    summary = _evaluate(tiny_bundle, data, work / "pair-run", lpips_net="off")
    metrics = summary["metrics"]
    assert (metrics["entries"], metrics["evaluated"], metrics["empty_mask"], metrics["with_gt"]) == (3, 2, 1, 0)
    assert metrics["psnr_outside"]["n"] == metrics["ssim_outside"]["n"] == metrics["score"]["n"] == 2
    for name in ("psnr", "ssim", "psnr_masked", "ssim_masked"):
        assert "no entry of the set has a GT" in metrics[name]["skipped"], name
    assert [row["status"] for row in _rows(work / "pair-run")] == ["ok", "ok", "empty-mask"]


def test_a_discriminator_that_fails_stops_the_run_instead_of_leaving_rows_unscored(
    tiny_bundle, triplets, work, monkeypatch
):
    from engines.pipeline import LocalModels
    from training.common import TrainingError

    async def broken(self, job):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(LocalModels, "score", broken)
    with pytest.raises(TrainingError, match="the discriminator failed to score"):
        _evaluate(tiny_bundle, triplets, work / "broken-scorer", lpips_net="off", limit=1)


def test_the_release_gate_starts_its_engine_as_the_remover_does(tiny_bundle, triplets, work, monkeypatch):
    """evaluate built its engine its own way: it never warmed it up (so --cuda-graph captured no graph: every call
    ran eager) and refused --cuda-graph on the CPU, where the Remover runs (engine.cuda_graph: no effect there)."""
    import serve.remover_deployment as deployment
    from engines.remover import RemovalEngine

    warmed = []
    warm_up = RemovalEngine.warm_up

    def recorded(self, max_batch_sizes):
        warmed.append(dict(max_batch_sizes))
        return warm_up(self, max_batch_sizes)

    monkeypatch.setattr(RemovalEngine, "warm_up", recorded)
    monkeypatch.setattr(deployment, "keep_replica_grpc_on_loopback", lambda: True)  # no Ray here
    remover = deployment.Remover.func_or_class(
        {
            "bundle": {"path": str(tiny_bundle.path)},
            "engine": {"device": "cpu", "cuda_graph": True},
            "imaging": {"buckets": [128]},
            "batching": {"max_batch_size": 2},
        }
    )
    summary = _evaluate(tiny_bundle, triplets, work / "cuda-graph-on-cpu", cuda_graph=True, lpips_net="off", limit=1)
    assert warmed == [{128: 2}, {128: 1}]  # the Remover's buckets at their batch sizes; evaluate's at batch 1
    assert remover.describe()["cuda_graphs"] is False and summary["engine"]["cuda_graphs"] is False
    assert summary["metrics"]["evaluated"] == 1


def test_the_release_gate_gives_the_pixels_the_service_answers_for_the_same_upload_and_seed(
    baseline, tiny_bundle, triplets, work, monkeypatch
):
    """The service's request path in this process (RemovalService over ServeModels, whose handle calls the Remover
    deployment's own object: its batch queues and engine, no Ray) answers each test image with evaluate's
    output, bit for bit. One crop per engine call, as evaluate runs (batching another size may move a pixel by 1,
    engines.remover says)."""
    import asyncio
    import io
    from types import SimpleNamespace

    import serve.remover_deployment as deployment
    from serve.config import AppSettings
    from serve.protocol import RemovalRequest, RemoveOptions
    from serve.service import RemovalService

    monkeypatch.setattr(deployment, "keep_replica_grpc_on_loopback", lambda: True)  # no Ray here
    remover_args = {
        "bundle": {"path": str(tiny_bundle.path)},
        "engine": {"device": "cpu"},
        "imaging": IMAGING,
        "batching": {"max_batch_size": 1},
    }
    remover = deployment.Remover.func_or_class(remover_args)

    class RemoverHandle:  # what ServeModels calls: handle.remove.remote(job, submitted_at)
        def __init__(self):
            self.remove = self

        def remote(self, job, submitted_at):
            return asyncio.ensure_future(remover.remove(job, submitted_at))

    settings = AppSettings.model_validate({**remover_args, "scorer": {"enabled": False}, "gate": {"mode": "off"}})
    ignored = SimpleNamespace(inc=lambda *a, **k: None, observe=lambda *a, **k: None)
    metrics = SimpleNamespace(gate_outcomes=ignored, gate_attempts=ignored, scores=ignored)
    service = RemovalService(settings, remover=RemoverHandle(), scorer=None, metrics=metrics)

    rows, records = _rows(work / "baseline"), load_metadata(triplets)

    async def answers() -> list[bytes]:  # one event loop, as in a replica: the Remover's queues live in it
        options = [RemoveOptions(seed=int(row["seed"]), output_format="png") for row in rows]
        uploads = [RemovalRequest(r.source.read_bytes(), r.mask.read_bytes(), o) for r, o in zip(records, options)]
        return [(await service.remove(upload)).body for upload in uploads]

    served = asyncio.run(answers())
    assert len(served) == len(rows) == 4
    for row, body in zip(rows, served):
        evaluated = np.asarray(Image.open(work / "baseline" / row["output"]).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), evaluated), row["id"]


def test_the_release_gate_decodes_within_the_configured_limits_as_the_service_does(tiny_bundle, triplets, work):
    """evaluate decoded with engines.imaging's defaults whatever the service's imaging limits: an image the
    service refuses (413 image-too-large) was evaluated and gated."""
    from engines.errors import InputError
    from engines.pipeline import CropSettings, RemovalPipeline
    from serve.config import ImagingSettings

    imaging = ImagingSettings(max_megapixels=0.01, **IMAGING)  # below the 128 x 128 test images
    record = load_metadata(triplets)[0]
    service = RemovalPipeline(None, CropSettings.from_imaging(imaging), imaging.decode_limits())
    with pytest.raises(InputError) as refused:
        service.prepare(record.source.read_bytes(), record.mask.read_bytes(), max_crops=1)
    summary = _evaluate(tiny_bundle, triplets, work / "small-limit", max_megapixels=0.01, lpips_net="off", limit=1)
    assert summary["metrics"]["invalid_input"] == 1 and summary["metrics"]["evaluated"] == 0
    [row] = _rows(work / "small-limit")
    assert (row["status"], row["error"]) == ("invalid-input", str(refused.value))


def test_imaging_defaults_are_the_services_and_degrade_kinds_the_negatives():
    from typing import get_args

    from serve.config import ImagingSettings
    from training.evaluate import DegradeKind, EvaluateSettings
    from training.synthetic import NEGATIVE_KINDS

    service = ImagingSettings()
    fields = EvaluateSettings.model_fields
    decode = ("max_upload_bytes", "max_megapixels", "max_side", "max_chunks", "max_jpeg_scans", "max_exif_bytes")
    for name in ("buckets", "crop_margin", "dilate", "feather", *decode, "max_rle_bytes"):
        assert fields[name].default == getattr(service, name), name
    settings = EvaluateSettings(bundle="tiny", data=Path("d"), out=Path("o"))
    assert settings.imaging() == service and settings.imaging().decode_limits() == service.decode_limits()
    with pytest.raises(ValueError, match="multiples of 64"):  # the service's bucket validator too
        EvaluateSettings(bundle="tiny", data=Path("d"), out=Path("o"), buckets=[100])
    assert get_args(DegradeKind) == ("none", *NEGATIVE_KINDS)


def test_engine_defaults_are_the_services():
    """evaluate's cuda_graph defaulted to false where the Remover's is true: the release gate timed eager calls on
    CUDA while the service replays graphs."""
    from serve.config import EngineSettings
    from training.evaluate import EvaluateSettings

    fields = EvaluateSettings.model_fields
    for name in ("runner", "dtype", "compile", "cuda_graph", "export_missing", "torch_threads", "steps", "strength"):
        assert fields[name].default == EngineSettings.model_fields[name].default, name
    for name in ("steps", "strength", "torch_threads"):
        assert fields[name].metadata == EngineSettings.model_fields[name].metadata, name
    with pytest.raises(ValueError, match="the runner is torch"):  # it would have gated the bundle's own UNet
        EvaluateSettings(bundle="tiny", data=Path("d"), out=Path("o"), runner_path=Path("unet.onnx"))
    assert EvaluateSettings(bundle="tiny", data=Path("d"), out=Path("o"), runner="onnx", runner_path=Path("u.onnx"))


def test_masked_measures_use_only_the_region():
    from training.quality import psnr, ssim

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    edited = reference.copy()
    region = np.zeros((48, 48), dtype=bool)
    region[10:30, 10:30] = True
    edited[region] = 255 - edited[region]
    assert psnr(edited, reference, ~region) == math.inf  # identical pixels
    assert psnr(edited, reference, region) < psnr(edited, reference)  # the error diluted over the whole image
    assert ssim(edited, reference, region) < ssim(edited, reference) < 1
    assert (
        psnr(edited, reference, np.zeros_like(region)) is None
        and ssim(edited, reference, ~np.ones_like(region)) is None
    )


# ---------------------------------------------------------------- compare and the gate


def test_compare_of_a_run_with_itself_shows_zero_deltas_and_passes(baseline, work, capsys):
    from training.cli import main

    out = work / "compare-self"
    args = ["compare", "--a", str(work / "baseline"), "--b", str(work / "baseline"), "--out", str(out)]
    assert main([*args, "--thresholds", str(THRESHOLDS)]) == 0
    printed = capsys.readouterr().out
    assert "gate: PASSED" in printed and "verdict flips (score >= 0.5): 0 of 4 (0.0%)" in printed
    summary = json.loads((out / "summary.json").read_text())
    deltas = summary["metrics"]["deltas"]
    measured = {name: d for name, d in deltas.items() if "skipped" not in d}
    assert {"success_rate", "score", "psnr", "psnr_masked", "ssim_masked", "dino", "clip"} <= set(measured)
    for name, delta in measured.items():
        assert delta["delta"] == delta["ci_low"] == delta["ci_high"] == 0.0, name
        assert delta["n"] == 4
    assert summary["metrics"]["identical_outputs"] == 4 and summary["metrics"]["output_mean_abs_diff"] == 0.0
    assert summary["gate"]["passed"] and summary["gate"]["failures"] == []
    assert summary["a"]["cuda_graphs"] is False and summary["a"]["runner"] == "torch", "what its timings ran with"
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 4 * 192 + 5 * 4 and sheet.height > 4 * 192
    with open(out / "paired.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_degraded_engine_fails_the_gate_and_names_the_measure(baseline, degraded, work, capsys):
    from training.cli import main

    out = work / "compare-degraded"
    args = ["compare", "--a", str(work / "baseline"), "--b", str(work / "degraded"), "--out", str(out)]
    assert main([*args, "--thresholds", str(THRESHOLDS)]) == 1
    captured = capsys.readouterr()
    assert "gate: FAILED" in captured.out
    assert "gate failed: psnr_masked: mean delta B - A" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["deltas"]["psnr_masked"]["delta"] < -0.5
    assert summary["metrics"]["identical_outputs"] == 0
    # without a thresholds file compare only reports
    assert main([*args[:-1], str(work / "compare-report-only")]) == 0


def test_gate_rules_directions_missing_measures_and_bad_files(tmp_path):
    from training.common import TrainingError
    from training.compare import Delta, Thresholds, check_gate, load_thresholds
    from training.evaluate import EvaluationRun

    def run(skipped: dict[str, str]) -> EvaluationRun:
        return EvaluationRun(tmp_path, {"metrics": {k: {"skipped": v} for k, v in skipped.items()}}, [])

    thresholds = Thresholds(allowed_deltas={"lpips": 0.01, "psnr": -0.5, "clip": -0.01, "dino": -0.01})
    deltas = {
        "lpips": Delta(4, 0.2, 0.25, 0.05, None, None),  # lower is better: +0.05 is past +0.01
        "psnr": Delta(4, 20.0, 19.8, -0.2, None, None),
        "clip": {"skipped": "B: no --clip-model given"},
        "dino": {"skipped": "in both runs: no --dino-model given"},
    }
    a, b = run({"dino": "x"}), run({"dino": "x", "clip": "no --clip-model given"})
    gate = check_gate(thresholds, deltas, None, a, b)
    assert gate["verdicts"] == {"lpips": "FAIL", "psnr": "ok", "clip": "FAIL", "dino": "not checked"}
    assert not gate["passed"] and len(gate["failures"]) == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text("allowed_deltas:\n  psnr_maskd: -0.5\n")
    with pytest.raises(TrainingError, match="unknown measures \\['psnr_maskd'\\]"):
        load_thresholds(bad)
    assert load_thresholds(THRESHOLDS).max_flip_share == 0.05


def _altered_copy(run: Path, to: Path, keep_rows: int | None = None, drop: tuple[str, ...] = (), **config) -> Path:
    """A copy of an evaluate run with some rows left out and some settings changed, as another run would have;
    `drop`: what a run from before it was recorded lacks."""
    import shutil

    from training.compare import RECORDED

    shutil.copytree(run, to)
    summary = json.loads((to / "summary.json").read_text())
    summary.update({k: v for k, v in config.items() if k in RECORDED})
    for key in drop:
        del summary[key]
    summary["config"].update({k: v for k, v in config.items() if k not in RECORDED})
    (to / "summary.json").write_text(json.dumps(summary))
    if keep_rows is not None:
        lines = (to / "per_image.csv").read_text().splitlines(keepends=True)
        (to / "per_image.csv").write_text("".join(lines[: 1 + keep_rows]))
    return to


def test_the_same_limit_on_both_sides_is_a_subset_not_a_pass(baseline, work, capsys):
    """Two runs with the same --limit pair every image they have, and passed the gate on a subset."""
    from training.cli import main

    base = work / "baseline"
    a, b = (_altered_copy(base, work / f"same-limit-{side}", keep_rows=2, limit=2) for side in "ab")
    args = ["compare", "--thresholds", str(THRESHOLDS), "--a", str(a), "--b", str(b)]
    assert main([*args, "--out", str(work / "cmp-same-limit")]) == 1
    assert "both runs evaluated only the first 2 entries of the test set (--limit)" in capsys.readouterr().err
    assert main([*args, "--out", str(work / "cmp-same-limit-partial"), "--allow-partial"]) == 0


def test_compare_names_the_unet_file_each_run_ran_and_says_when_they_differ(baseline, work, capsys):
    """A run of another bundle's graph (--runner-path) was labelled only "onnx float32 on cpu, 4 steps"."""
    from training.cli import main

    def exported(name: str, **engine) -> Path:
        """The baseline as an onnx run; without unet_file: a run from before evaluate recorded it."""
        run = _altered_copy(work / "baseline", work / name)
        summary = json.loads((run / "summary.json").read_text())
        summary["engine"].update(runner="onnx", **engine)
        if "unet_file" not in engine:
            del summary["engine"]["unet_file"]
        (run / "summary.json").write_text(json.dumps(summary))
        return run

    own = exported("unet-own", unet_file={"path": "/b/exports/unet.fp32.onnx", "bundle_export": True})
    elsewhere = {"path": "/x/OTHER.onnx", "bundle_export": False}
    other = exported("unet-other", unet_file=elsewhere, runner_path="/x/OTHER.onnx")
    older = exported("unet-older", runner_path="/x/OTHER.onnx")

    def report(a: Path, b: Path, out: str) -> tuple[str, dict]:
        args = ["compare", "--thresholds", str(THRESHOLDS), "--a", str(a), "--b", str(b), "--out", str(work / out)]
        assert main(args) == 0, "reported, not gated"
        return capsys.readouterr().out, json.loads((work / out / "summary.json").read_text())

    printed, summary = report(work / "baseline", other, "cmp-unet-other")
    assert "; UNet: the bundle's UNet weights)" in printed
    assert "; UNet: /x/OTHER.onnx (not the bundle's recorded export))" in printed
    assert summary["b"]["runner_path"] == "/x/OTHER.onnx"
    assert summary["metrics"]["differences"]["engine"] == [
        "the UNets differ: A ran the bundle's UNet weights, B /x/OTHER.onnx (not the bundle's recorded export)"
    ]
    assert "  the UNets differ: A ran the bundle's UNet weights, B /x/OTHER.onnx (not the bundle's recorded " \
        "export) (reported, not gated)" in printed
    printed, summary = report(own, other, "cmp-unet-own-other")
    assert "UNet: /b/exports/unet.fp32.onnx (the bundle's recorded export)" in printed
    assert len(summary["metrics"]["differences"]["engine"]) == 1
    for a, b in ((work / "baseline", own), (other, older)):  # the bundle's UNet either way; the same file
        printed, summary = report(a, b, f"cmp-unet-{a.name}-{b.name}")
        assert summary["metrics"]["differences"]["engine"] == [] and "runs differ" not in printed
    assert "UNet: /x/OTHER.onnx (not recorded whether it is the bundle export)" in printed


def test_compare_says_a_missing_run_does_not_exist_and_never_rounds_a_difference_to_zero(baseline, work, capsys):
    """`--a /nonexistent` was "not an evaluate run (no summary.json ...)"; outputs one pixel apart were reported as
    "mean |B - A| 0.000 (0-255), identical in 0 of 4"."""
    from training.cli import main

    missing = work / "no-such-run"
    assert main(["compare", "--a", str(missing), "--b", str(work / "baseline"), "--out", str(work / "cmp-x")]) == 1
    assert f"compare: {missing} does not exist" in capsys.readouterr().err

    nudged = _altered_copy(work / "baseline", work / "one-pixel-apart")
    for row in _rows(nudged):
        image = np.asarray(Image.open(nudged / row["output"]).convert("RGB")).copy()
        image[0, 0, 0] ^= 1
        Image.fromarray(image).save(nudged / row["output"])
    out = work / "cmp-one-pixel"
    assert main(["compare", "--a", str(work / "baseline"), "--b", str(nudged), "--out", str(out)]) == 0
    assert "outputs: mean |B - A| < 0.0005 (0-255), identical in 0 of 4" in capsys.readouterr().out
    assert 0 < json.loads((out / "summary.json").read_text())["metrics"]["output_mean_abs_diff"] < 0.0005


def test_bundle_help_says_what_its_out_and_base_take(capsys):
    """bundle --help said its --out held "results, checkpoints/, summary.json" (it writes no checkpoints and
    replaces the folder whole) and its --base only 'tiny', not 'tiny:SEED'."""
    from training.cli import main

    with pytest.raises(SystemExit):
        main(["bundle", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    out_help = printed.split("--out OUT ", 1)[1].split(" --seed SEED", 1)[0]
    assert "checkpoints" not in out_help and "replaced whole" in out_help
    assert "'tiny:SEED'" in printed.split("--base BASE ", 1)[1].split(" --unet UNET", 1)[0]


def test_a_baseline_spoiled_with_degrade_never_gates(baseline, degraded, work, capsys):
    """It made any candidate look better and passed it."""
    from training.cli import main

    base = work / "baseline"
    spoiled = ["--a", str(work / "degraded"), "--b", str(base), "--out", str(work / "cmp-degraded-baseline")]
    assert main(["compare", "--thresholds", str(THRESHOLDS), *spoiled]) == 1
    assert "A (the baseline) was evaluated with --degrade noise" in capsys.readouterr().err
    assert main(["compare", "--thresholds", str(THRESHOLDS), *spoiled, "--allow-partial"]) == 1


def test_the_gate_fails_on_a_subset_or_other_settings_unless_partial_is_allowed(baseline, work, capsys):
    from training.cli import main

    base = work / "baseline"
    judge = json.loads((base / "summary.json").read_text())["discriminator"]
    lenient = {**judge, "files": {name: "f" * 64 for name in judge["files"]}}
    one = _altered_copy(base, work / "limit-1", keep_rows=1, limit=1)
    args = ["compare", "--a", str(base), "--thresholds", str(THRESHOLDS)]
    assert main([*args, "--b", str(one), "--out", str(work / "cmp-limit")]) == 1
    err = capsys.readouterr().err
    assert "3 image(s) not evaluated in both runs (3 only in a)" in err and "limit differs: A None, B 1" in err
    summary = json.loads((work / "cmp-limit" / "summary.json").read_text())
    assert not summary["gate"]["passed"] and summary["metrics"]["paired"] == 1

    assert main([*args, "--b", str(one), "--out", str(work / "cmp-partial"), "--allow-partial"]) == 0
    printed = capsys.readouterr().out
    assert "runs differ:" in printed and "3 image(s) not evaluated in both runs" in printed

    for name, change, said in [
        ("dilate-8", {"dilate": 8}, "not comparable: dilate differs: A 4, B 8"),
        ("buckets", {"buckets": [128, 256]}, "not comparable: buckets differs"),
        ("seed-1", {"seed": 1}, "not comparable: seed differs"),
        ("calls", {"max_model_calls": 2}, "not comparable: max_model_calls differs"),
        ("feather", {"feather": 0}, "not comparable: feather differs"),
        ("other-data", {"data_sha256": "0" * 64}, "not comparable: the data files differ"),
        ("no-hash", {"drop": ("data_sha256",)}, "B does not record its data file's sha256"),
        ("other-judge", {"discriminator": lenient}, "not comparable: the discriminators differ: A "),
        ("no-judge", {"discriminator": None}, "not comparable: the discriminators differ: A "),
        ("judge-unrecorded", {"drop": ("discriminator",)}, "B does not record which discriminator scored it"),
        ("old-pipeline", {"pipeline_version": 1}, f"not comparable: the pipelines differ: A {PIPELINE_VERSION}, B 1"),
    ]:
        other = _altered_copy(base, work / f"changed-{name}", **change)
        for extra in ([], ["--allow-partial"]):
            assert main([*args, "--b", str(other), "--out", str(work / f"cmp-{name}"), *extra]) == 1, name
            assert said in capsys.readouterr().err, name


def test_a_test_set_regenerated_in_place_is_another_test_set(tiny_bundle, work, capsys):
    """Same paths and the same metadata file, other images: compare stops; a run without the images' sha256
    cannot be gated."""
    from training.cli import main

    runs = []
    for seed in (0, 1):
        data = make_synthetic_triplets(work / "regenerated", n=2, size=SIDE, seed=seed)
        _evaluate(tiny_bundle, data, work / f"regenerated-{seed}", lpips_net="off")
        runs.append(work / f"regenerated-{seed}")
    args = ["compare", "--a", str(runs[0]), "--thresholds", str(THRESHOLDS)]
    assert main([*args, "--b", str(runs[1]), "--out", str(work / "cmp-regenerated")]) == 1
    err = capsys.readouterr().err
    assert "its source file" in err and "the runs are over different test sets" in err

    old = _altered_copy(runs[0], work / "regenerated-unhashed")
    rows = _rows(old)
    kept = [column for column in rows[0] if not column.endswith("_sha256")]
    with open(old / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=kept, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main([*args, "--b", str(old), "--out", str(work / "cmp-unhashed")]) == 1
    assert "not comparable: B does not record its images' sha256 (evaluate it again)" in capsys.readouterr().err


def test_a_measure_taken_by_another_model_is_not_compared(baseline, work, embedding_models, capsys, tmp_path):
    """Another CLIP folder gives other similarities: the measure is skipped as not comparable, and fails a
    gate that names it; a run that does not record its models cannot have them compared."""
    import shutil

    from training.cli import main
    from training.evaluate import folder_sha256

    base = work / "baseline"
    models = json.loads((base / "summary.json").read_text())["measuring_models"]
    clip = embedding_models["clip_model"]
    assert models["clip"] == {"path": str(clip), "sha256": folder_sha256(clip)}
    assert models["lpips"] in (None, {"net": "alex"})  # None: skipped (no torchvision here)
    copy = tmp_path / "clip-copy"
    shutil.copytree(clip, copy)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.metadata").write_text("when")
    assert folder_sha256(copy) == folder_sha256(clip) != folder_sha256(embedding_models["dino_model"])

    clip_gate = tmp_path / "clip.yaml"
    clip_gate.write_text("allowed_deltas:\n  clip: -0.01\n  psnr_masked: -0.5\n")
    for name, change, said, dino_compared in [
        ("other-clip", {**models, "clip": {"path": "/x", "sha256": "f" * 64}}, "another model measured it (A ", True),
        ("unrecorded-models", None, "B does not record which model measured it (evaluate it again)", False),
    ]:
        other = _altered_copy(base, work / f"models-{name}")
        summary = json.loads((other / "summary.json").read_text())
        summary["measuring_models"] = change
        if change is None:
            del summary["measuring_models"]
        (other / "summary.json").write_text(json.dumps(summary))
        args = ["compare", "--a", str(base), "--b", str(other), "--out", str(work / f"cmp-{name}")]
        assert main([*args, "--thresholds", str(clip_gate)]) == 1, name
        assert f"gate failed: clip: not comparable: {said}" in capsys.readouterr().err, name
        deltas = json.loads((work / f"cmp-{name}" / "summary.json").read_text())["metrics"]["deltas"]
        assert "skipped" in deltas["clip"] and ("skipped" not in deltas["dino"]) == dino_compared, name
        assert deltas["psnr_masked"]["delta"] == 0.0
    moved = _altered_copy(base, work / "models-moved")  # the same CLIP in another folder (another machine)
    summary = json.loads((moved / "summary.json").read_text())
    summary["measuring_models"] = {**models, "clip": {"path": str(copy), "sha256": folder_sha256(copy)}}
    (moved / "summary.json").write_text(json.dumps(summary))
    args = ["compare", "--a", str(base), "--b", str(moved), "--out", str(work / "cmp-models-moved")]
    assert main([*args, "--thresholds", str(clip_gate)]) == 0, capsys.readouterr().err


def test_identical_pixels_compare_equal_and_losing_them_is_a_regression(tiny_bundle, triplets, work, capsys, tmp_path):
    """At --dilate 0 nothing outside the mask changes: psnr_outside is infinite in every image, and a run
    compared with itself passes the shipped gate (an infinite pair was dropped, then the measure failed)."""
    from training.cli import main
    from training.compare import Thresholds, check_gate, paired_delta
    from training.evaluate import EvaluationRun

    run = work / "dilate-0"
    _evaluate(tiny_bundle, triplets, run, dilate=0, lpips_net="off")
    out = work / "cmp-dilate-0"
    assert main(["compare", "--a", str(run), "--b", str(run), "--out", str(out), "--thresholds", str(THRESHOLDS)]) == 0
    outside = json.loads((out / "summary.json").read_text())["metrics"]["deltas"]["psnr_outside"]
    assert outside["delta"] == 0.0 and outside["n"] == outside["infinite_equal"] == 4 and outside["mean_a"] is None
    assert "psnr_outside: infinite (identical pixels) in both: 4 (delta 0)" in capsys.readouterr().out

    inf = math.inf
    lost = paired_delta([(inf, inf), (inf, 30.0), (20.0, 21.0)], 0.95)
    assert (lost.n, lost.mean_a, lost.mean_b, lost.delta) == (2, 20.0, 21.0, 0.5)
    assert (lost.infinite_equal, lost.infinite_worse, lost.infinite_better) == (1, 1, 0)
    gained = paired_delta([(30.0, inf)], 0.95)
    assert (gained.n, gained.delta, gained.infinite_worse, gained.infinite_better) == (0, None, 0, 1)
    nothing = EvaluationRun(tmp_path, {"metrics": {}}, [])
    outside_gate = Thresholds(allowed_deltas={"psnr_outside": -0.5})
    for delta, verdict, failures in (
        (lost, "FAIL", ["psnr_outside: 1 image(s) infinite (identical pixels) in A and not in B"]),
        (gained, "ok", []),
    ):
        checked = check_gate(outside_gate, {"psnr_outside": delta}, None, nothing, nothing)
        assert checked["verdicts"] == {"psnr_outside": verdict} and checked["failures"] == failures


def test_a_thresholds_file_that_checks_nothing_is_refused_and_an_unchecked_gate_fails(tmp_path):
    from training.common import TrainingError
    from training.compare import Thresholds, check_gate, load_thresholds
    from training.evaluate import EvaluationRun

    empty = tmp_path / "empty.yaml"
    for text in ("", "allowed_deltas: {}\n"):
        empty.write_text(text)
        with pytest.raises(TrainingError, match="checks nothing"):
            load_thresholds(empty)
    neither = EvaluationRun(tmp_path, {"metrics": {"dino": {"skipped": "no --dino-model given"}}}, [])
    gate = check_gate(
        Thresholds(allowed_deltas={"dino": -0.01}), {"dino": {"skipped": "in both runs"}}, None, neither, neither
    )
    assert gate["verdicts"] == {"dino": "not checked"}
    assert not gate["passed"] and gate["failures"][0].startswith("nothing checked")
