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
