import copy

import pytest
import yaml
from pydantic import ValidationError

from serve.cli import DEFAULT_CONFIG, describe_bundle, fit_to_machine, load_serve_config
from serve.config import AppSettings

REPO = DEFAULT_CONFIG.parent.parent.parent


def test_the_shipped_serve_config_validates_with_ray_and_with_our_settings():
    config = load_serve_config(DEFAULT_CONFIG)
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Remover", "Scorer"}
    assert config["grpc_options"]["grpc_servicer_functions"] == ["serve.rorem_pb2_grpc.add_ObjectRemovalServicer_to_server"]
    assert config["http_options"]["host"] == "127.0.0.1"


def test_unknown_or_misspelt_settings_are_rejected(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"]["batching"]["max_batch"] = 4
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValidationError, match="max_batch"):
        load_serve_config(path)


def test_buckets_must_be_multiples_of_64():
    with pytest.raises(ValidationError, match="multiples of 64"):
        AppSettings.model_validate({"imaging": {"buckets": [500]}})


def test_without_cuda_the_remover_asks_for_no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    notes = fit_to_machine(config, bundle="/models/b", host=None, port=8123)
    remover = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Remover")
    assert remover["ray_actor_options"]["num_gpus"] == 0 and notes
    assert config["http_options"]["port"] == 8123
    assert config["applications"][0]["args"]["bundle"]["path"] == "/models/b"


def test_the_cli_says_loudly_when_it_falls_back_to_the_tiny_bundle():
    assert describe_bundle({}).startswith("TINY bundle")
    assert describe_bundle({"bundle": {"path": "/models/b"}}) == "real bundle from /models/b"


def test_grafana_dashboard_charts_every_metric_and_only_ours():
    """The dashboard in docs/grafana queries each metric serve/metrics.py defines, by its exported name."""
    import json
    import re

    from serve import metrics

    dashboard = json.loads((REPO / "docs" / "grafana" / "rorem-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"ray_(rorem_[a-z_]+?)(?:_bucket|_sum|_count)?\{", exprs))
    defined = {metrics.REQUESTS, metrics.REQUEST_LATENCY, metrics.STAGE_LATENCY, metrics.BATCH_SIZE,
               metrics.GATE_OUTCOMES, metrics.GATE_ATTEMPTS, metrics.SCORES,
               metrics.RETAINED, metrics.FEEDBACK}  # fmt: skip
    assert used == defined


def test_a_gate_without_a_scorer_is_a_config_error():
    with pytest.raises(ValidationError, match="needs the Scorer"):
        AppSettings.model_validate({"scorer": {"enabled": False}, "gate": {"mode": "retry"}})
    AppSettings.model_validate({"scorer": {"enabled": False}, "gate": {"mode": "off"}})


def _deployments(config: dict) -> dict:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_on_one_gpu_the_remover_and_the_scorer_share_it():
    """The shipped config asks a whole GPU for each; on a one-GPU machine both get half, so both are placed."""
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    notes = fit_to_machine(config, bundle=None, host=None, port=None, gpus=1)
    deployments = _deployments(config)
    assert deployments["Remover"]["ray_actor_options"]["num_gpus"] == 0.5
    assert deployments["Scorer"]["ray_actor_options"]["num_gpus"] == 0.5
    assert "Ingress" not in str(notes) and "share" in notes[0]


def test_gpu_requests_that_fit_are_left_as_configured():
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert fit_to_machine(config, bundle=None, host=None, port=None, gpus=2) == []
    assert {d["ray_actor_options"]["num_gpus"] for d in _deployments(config).values() if d["name"] != "Ingress"} == {1}
    deployments = _deployments(config)
    deployments["Remover"]["ray_actor_options"]["num_gpus"] = 0.6
    deployments["Scorer"]["ray_actor_options"]["num_gpus"] = 0.3
    assert fit_to_machine(config, bundle=None, host=None, port=None, gpus=1) == []
    assert deployments["Remover"]["ray_actor_options"]["num_gpus"] == 0.6


def test_more_gpu_replicas_than_gpus_pack_evenly():
    from serve.cli import _packs

    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    _deployments(config)["Remover"]["num_replicas"] = 3
    fit_to_machine(config, bundle=None, host=None, port=None, gpus=2)
    shares = [d["ray_actor_options"]["num_gpus"] for d in _deployments(config).values() if d["name"] != "Ingress"]
    assert shares == [0.5, 0.5]
    assert _packs([0.5] * 4, 2) and not _packs([0.6] * 4, 2) and not _packs([1, 1, 1], 2)


def test_a_placement_that_cannot_fit_is_refused_at_start_saying_what_to_change(tmp_path, capsys):
    from serve.cli import run

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = 2
    path = tmp_path / "two-gpu-remover.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(["run", "--config", str(path), "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert "Remover asks for 2 GPUs per replica and this machine has 1" in err and "num_gpus" in err


def test_each_bucket_has_its_own_batch_size_and_wait():
    settings = AppSettings.model_validate(
        {"batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01,
                      "per_bucket": {1024: {"max_batch_size": 4}, "512": {"batch_wait_timeout_s": 0.05}}}}
    )  # fmt: skip
    assert settings.batching.for_bucket(512) == (8, 0.05)
    assert settings.batching.for_bucket(1024) == (4, 0.01)
    assert settings.batch_sizes() == {512: 8, 1024: 4}
    with pytest.raises(ValidationError, match=r"names sides \[1000\]"):
        AppSettings.model_validate({"batching": {"per_bucket": {1000: {"max_batch_size": 4}}}})


def test_the_remover_must_accept_every_buckets_full_batch_at_once(tmp_path):
    """Ray only warns when max_ongoing_requests is below the batch size: batches then never fill."""
    from serve.config import check_deployments

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    settings = AppSettings.model_validate(app["args"])
    check_deployments(settings, app["deployments"])  # the shipped config: 16 >= 8 + 4
    _deployments(config)["Remover"]["max_ongoing_requests"] = 10
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"max_ongoing_requests is 10, below the buckets' batch sizes together \(12"):
        load_serve_config(path)


def _restated(args: dict, settings: dict, defaults: dict, where: str = "") -> list[str]:
    """The keys of `args` whose validated value (in `settings`) is the default: restatements."""
    found = []
    for key, value in args.items():
        path = f"{where}.{key}" if where else str(key)
        key = next((k for k in settings if str(k) == str(key)), key)  # a YAML key may be validated to an int
        if key not in defaults:
            continue  # an entry with no default (per_bucket's sides): a difference
        if isinstance(value, dict) and value:
            found += _restated(value, settings[key], defaults[key], path)
        elif settings[key] == defaults[key]:
            found.append(path)
    return found


def test_the_shipped_args_hold_only_what_differs_from_the_defaults():
    """serve/config.py is the one home of each default: local.yaml (and so the Kubernetes renderings)
    must not restate one, or changing it there silently changes nothing."""
    defaults = AppSettings().model_dump()
    args = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]
    assert _restated(args, AppSettings.model_validate(args).model_dump(), defaults) == []
    restating = {"imaging": {"dilate": 20, "feather": 3}, "bundle": {}, "batching": {"per_bucket": {"512": {}}}}
    settings = AppSettings.model_validate(restating).model_dump()
    assert _restated(restating, settings, defaults) == ["imaging.dilate", "bundle"]
