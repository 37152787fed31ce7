import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from serve.cli import DEFAULT_CONFIG, describe_bundle, fit_to_machine, load_serve_config, visible_gpus
from serve.config import AppSettings, ImagingSettings, live_serve_app, live_serve_config, validate_serve_config
from serve.grpc_servicer import SERVICER_FUNCTION
from tests.helpers import (
    RAYS_OWN_METRICS, REPO, check_rorem_selectors, database_driver, load_script, promql_selectors,
)  # fmt: skip


def test_the_shipped_serve_config_validates_with_ray_and_with_our_settings():
    config = load_serve_config(DEFAULT_CONFIG)
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Remover", "Scorer"}
    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]  # bytes that do not parse: 400
    assert config["http_options"]["host"] == "127.0.0.1"


def test_unknown_or_misspelt_settings_are_rejected(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"]["batching"]["max_batch"] = 4
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValidationError, match="max_batch"):
        load_serve_config(path)


def test_a_misspelt_ray_deployment_key_is_rejected_naming_it(tmp_path):
    """Ray's schema drops it silently: a review's max_queued_request left the Remover's queue unbounded."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    remover = _deployments(config)["Remover"]
    remover["max_queued_request"] = remover.pop("max_queued_requests")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"\['applications\[0\]\.deployments\[1\]\.max_queued_request'\]"):
        load_serve_config(path)


def test_conflicts_the_replica_would_find_are_refused_before_ray_starts(tmp_path):
    """A review found both only after Ray started: the deployment failed ("Deployment 'Scorer' does not exist",
    or the replica's "not both")."""
    authors = {"unet": "hf:LetsThink/RORem", "lcm_lora": "hf:latent-consistency/lcm-lora-sdxl"}
    with pytest.raises(ValidationError, match="either bundle.path or bundle.authors, not both"):
        AppSettings.model_validate({"bundle": {"path": "/models/x", "authors": authors}})
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"].update({"scorer": {"enabled": False}, "gate": {"mode": "off"}})
    path = tmp_path / "scorer_off.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="deployments lists the Scorer, but scorer.enabled is false"):
        load_serve_config(path)


def test_buckets_must_be_multiples_of_64():
    with pytest.raises(ValidationError, match="multiples of 64"):
        AppSettings.model_validate({"imaging": {"buckets": [500]}})


def _nvidia_driver_reports(monkeypatch, gpus: int) -> None:
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    monkeypatch.setattr(NvidiaGPUAcceleratorManager, "get_current_node_num_accelerators", staticmethod(lambda: gpus))


def test_without_cuda_the_remover_asks_for_no_gpu(monkeypatch):
    _nvidia_driver_reports(monkeypatch, 0)
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    notes = fit_to_machine(config, bundle="/models/b", host=None, port=8123)
    remover = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Remover")
    assert remover["ray_actor_options"]["num_gpus"] == 0 and notes
    assert config["http_options"]["port"] == 8123
    assert config["applications"][0]["args"]["bundle"]["path"] == "/models/b"


def test_relative_paths_are_taken_from_the_folder_the_cli_starts_in(monkeypatch, tmp_path):
    """Ray's processes run in the repository: a keys file given as keys.yaml from another folder was looked for
    there, and every key was refused (the docs' way to try keys locally); a SQLite database_url's relative file
    was made there."""
    _nvidia_driver_reports(monkeypatch, 0)
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    config["applications"][0]["args"]["auth"] = {"enabled": True, "keys_file": "keys.yaml"}
    config["applications"][0]["args"]["retention"] = {"enabled": True, "object_store": {"path": "results"}}
    database_driver(monkeypatch, "psycopg", installed=True)  # whether this machine has it: another test's
    fit_to_machine(config, bundle="bundles/mine", host=None, port=None)
    args = config["applications"][0]["args"]
    assert args["auth"]["keys_file"] == str(tmp_path / "keys.yaml")
    assert args["bundle"]["path"] == str(tmp_path / "bundles" / "mine")
    assert args["retention"]["object_store"]["path"] == str(tmp_path / "results")
    for given, taken in (
        ("sqlite:///meta/results.db?timeout=5", f"sqlite:///{tmp_path}/meta/results.db?timeout=5"),
        ("sqlite:////var/lib/results.db", "sqlite:////var/lib/results.db"),
        ("sqlite+pysqlite:///r.db", f"sqlite+pysqlite:///{tmp_path}/r.db"),
        ("sqlite:///~/r.db", f"sqlite:///{Path.home() / 'r.db'}"),  # SQLite itself does not expand ~
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite:///file:r.db?uri=true", "sqlite:///file:r.db?uri=true"),
        ("postgresql+psycopg://db/results", "postgresql+psycopg://db/results"),
    ):
        args["retention"]["database_url"] = given
        fit_to_machine(config, bundle=None, host=None, port=None)
        assert args["retention"]["database_url"] == taken
    authors = {"base": "hf:LetsThink/RORem", "lcm_lora": "weights/lcm", "discriminator": "~/d"}
    config["applications"][0]["args"]["bundle"] = {"authors": authors, "cache_dir": "cache"}
    fit_to_machine(config, bundle=None, host=None, port=None)
    bundle = config["applications"][0]["args"]["bundle"]
    assert bundle["cache_dir"] == str(tmp_path / "cache")
    assert bundle["authors"]["lcm_lora"] == str(tmp_path / "weights" / "lcm")
    assert bundle["authors"]["base"] == "hf:LetsThink/RORem" and bundle["authors"]["discriminator"] == "~/d", "as given"


@pytest.mark.parametrize(("driver", "cuda_visible", "expected"), [(4, None, 4), (4, "0,2", 2), (2, "", 0), (0, "0", 0)])
def test_the_cli_counts_the_gpus_ray_will_schedule(monkeypatch, driver, cuda_visible, expected):
    """The placement is sized from the count Ray's own detection resolves (driver count capped by
    CUDA_VISIBLE_DEVICES), so what the CLI plans is what Ray can place."""
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    _nvidia_driver_reports(monkeypatch, driver)
    if cuda_visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda_visible)
    assert visible_gpus() == expected
    assert ResourceAndLabelSpec._get_current_node_accelerator(None, {})[1] == expected


def test_the_cli_says_loudly_when_it_falls_back_to_the_tiny_bundle():
    assert describe_bundle({}).startswith("TINY bundle")
    assert describe_bundle({"bundle": {"path": "/models/b"}}) == "real bundle from /models/b"


def test_grafana_dashboard_charts_every_metric_and_only_ours():
    """The dashboard in docs/grafana queries each metric serve/metrics.py defines, by its exported name."""
    import json
    import re

    from serve import metrics

    dashboard = json.loads((REPO / "docs" / "grafana" / "rorem-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids), f"a panel id used twice opens the wrong panel from a link: {ids}"
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana's variables as Grafana fills them in; then the query must parse, its metrics and values be ours
            query = target["expr"].replace("$__rate_interval", "1m").replace("$application", ".*")
            check_rorem_selectors(query, others=RAYS_OWN_METRICS)
    used = set(re.findall(r"ray_(rorem_[a-z_]+?)(?:_bucket|_sum|_count)?\{", exprs))
    defined = {metrics.REQUESTS, metrics.REQUEST_LATENCY, metrics.STAGE_LATENCY, metrics.BATCH_SIZE,
               metrics.GATE_OUTCOMES, metrics.GATE_ATTEMPTS, metrics.SCORES,
               metrics.RETAINED, metrics.FEEDBACK, metrics.LOOP_LAG, metrics.PROXY_REFUSALS,
               metrics.PROXY_ANSWERS_FOR_RAY}  # fmt: skip
    assert used == defined


def _numerator(expr: str) -> str:
    """What a ratio's top-level `/` divides (the whole expression when it has none)."""
    depth, quoted = 0, False
    for at, char in enumerate(expr):
        quoted ^= char == '"'
        depth += 0 if quoted else (char in "({[") - (char in ")}]")
        if char == "/" and depth == 0 and not quoted:
            return expr[:at]
    return expr


def test_the_dashboards_grpc_error_share_counts_the_ingress_errors_that_ray_records_as_ok():
    """Ray's gRPC proxy records a call its Ingress answered with INVALID_ARGUMENT or RESOURCE_EXHAUSTED as
    status_code="OK": the error share's gRPC line read ray_serve_num_grpc_error_requests_total alone (with the key
    gate's refusals), so every call failing in the Ingress showed a gRPC error share of 0 (platform trial). A line
    reading Ray's gRPC error count must count the Ingress's own non-OK gRPC answers in its numerator too."""
    import json

    dashboard = json.loads((REPO / "docs" / "grafana" / "rorem-dashboard.json").read_text())
    grpc_lines = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            query = target["expr"].replace("$__rate_interval", "1m").replace("$application", ".*")
            numerator = dict(promql_selectors(_numerator(query)))
            if "ray_serve_num_grpc_error_requests_total" not in numerator:
                continue
            grpc_lines.append(panel["title"])
            ingress = numerator.get("ray_rorem_requests_total", {})
            assert ingress.get("protocol") == ("Equal", "grpc"), f"{panel['title']}: {target['expr']}"
            # a call its client cancelled is Ray's error already (CANCELLED, is_error): counted once, not twice
            assert ingress.get("status") == ("NotRe", "OK|CANCELLED"), f"{panel['title']}: {target['expr']}"
            gate = numerator.get("ray_rorem_proxy_refusals_total", {})
            assert gate.get("protocol") == ("Equal", "grpc"), f"the key gate's refusals: {target['expr']}"
    assert any(title.startswith("Error share") for title in grpc_lines), grpc_lines


def test_the_metrics_of_rays_that_the_dashboard_and_alerts_read_are_ones_ray_defines():
    """A Ray upgrade that renames one leaves a panel or an alert reading nothing: Ray's Serve sources name each (a
    counter's `_total` is added on export)."""
    import re

    import ray

    defined = set()
    for source in (Path(ray.__file__).parent / "serve").rglob("*.py"):
        for name in re.findall(r'"(serve_[a-z_{}]+)"', source.read_text()):  # f"serve_num_{protocol_name}_..."
            defined |= {re.sub(r"\{[a-z_]+\}", protocol, name) for protocol in ("http", "grpc")}
    assert {name.removeprefix("ray_").removesuffix("_total") for name in RAYS_OWN_METRICS} <= defined


def test_a_gate_without_a_scorer_is_a_config_error():
    with pytest.raises(ValidationError, match="needs the Scorer"):
        AppSettings.model_validate({"scorer": {"enabled": False}, "gate": {"mode": "retry"}})
    AppSettings.model_validate({"scorer": {"enabled": False}, "gate": {"mode": "off"}})
    # deployed, the gate is the Ingress's user_config: the args left without it still build the app
    app = {"args": {"scorer": {"enabled": False}, "gate": {"mode": "off"}}, "deployments": [{"name": "Ingress"}]}
    deployed = live_serve_app(app)
    assert "gate" not in deployed["args"] and deployed["deployments"][0]["user_config"]["gate"]["mode"] == "off"
    AppSettings.model_validate(deployed["args"])
    with pytest.raises(ValidationError, match="needs the Scorer"):  # the default gate (annotate) checked at deploy
        live_serve_app({"args": {"scorer": {"enabled": False}}, "deployments": [{"name": "Ingress"}]})


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



def test_listening_beyond_loopback_without_keys_says_which_host_names_are_answered():
    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert fit_to_machine(config, bundle=None, host=None, port=None, gpus=2) == []
    (note,) = fit_to_machine(config, bundle=None, host="0.0.0.0", port=None, gpus=2)
    assert "0.0.0.0 without API keys" in note and "auth.allowed_hosts" in note and "gRPC answers every" in note
    config["applications"][0]["args"]["auth"] = {"allowed_hosts": ["gpu-box.lan"]}
    (note,) = fit_to_machine(config, bundle=None, host="0.0.0.0", port=None, gpus=2)
    assert "allowed_hosts" not in note and "gRPC answers every machine" in note
    config["applications"][0]["args"]["auth"] = {"enabled": True, "keys_file": "keys.yaml"}
    assert fit_to_machine(config, bundle=None, host="0.0.0.0", port=None, gpus=2) == []


@pytest.mark.parametrize("host", ["127.0.0.2", "127.255.0.1", "LOCALHOST.", "localhost", "::1", "[::1]"])
def test_any_loopback_address_keeps_ray_and_grpc_on_loopback(host):
    """Loopback was a list of names: --host 127.0.0.2 (or 'localhost.') put Ray's ports on the network and had
    keyless gRPC answer every peer, for an HTTP API only this machine reaches."""
    from serve.auth import GRPC_LOOPBACK_ONLY_ENV
    from serve.cli import grpc_access_env, host_names_note, ray_network_env
    from serve.local_ray import RAY_LOOPBACK_ENV, RAY_TOKEN_AUTH_ENV

    config = {"http_options": {"host": host}, "applications": [{"name": "rorem", "args": {}}]}
    assert ray_network_env(config) == {**RAY_LOOPBACK_ENV, **RAY_TOKEN_AUTH_ENV}
    assert grpc_access_env(config) == {GRPC_LOOPBACK_ONLY_ENV: "1"}
    notes = host_names_note(config)
    assert not any("gRPC answers every machine" in note for note in notes), notes
    assert bool(notes) == (host in ("127.0.0.2", "127.255.0.1")), "not a Host name the API routes answer: said"
    for outside in ("0.0.0.0", "::", "192.0.2.1", "localhost.example"):
        config["http_options"]["host"] = outside
        assert ray_network_env(config) == RAY_TOKEN_AUTH_ENV, outside
        assert grpc_access_env(config) == {GRPC_LOOPBACK_ONLY_ENV: "0"}, outside


def test_grpc_answers_loopback_peers_only_where_http_listens_on_loopback_without_keys(monkeypatch, tmp_path):
    """Ray's gRPC proxy binds every interface: `make serve` (HTTP on 127.0.0.1, no keys) must not hand the
    network a keyless gRPC port (two reviews reached Remove from another address)."""
    import asyncio

    from serve.auth import GRPC_LOOPBACK_ONLY_ENV, AccessPolicy, is_loopback_peer
    from serve.cli import grpc_access_env
    from serve.config import AuthSettings
    from serve.problems import Problem

    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert grpc_access_env(config) == {GRPC_LOOPBACK_ONLY_ENV: "1"}
    config["http_options"]["host"] = "0.0.0.0"
    assert grpc_access_env(config) == {GRPC_LOOPBACK_ONLY_ENV: "0"}, "as reachable as HTTP, which the note says"
    config["http_options"]["host"] = "::1"
    config["applications"][0]["args"]["auth"] = {"enabled": True, "keys_file": "keys.yaml"}
    assert grpc_access_env(config) == {GRPC_LOOPBACK_ONLY_ENV: "1"}, "for any application of the cluster without keys"
    monkeypatch.setenv(GRPC_LOOPBACK_ONLY_ENV, "1")
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    keyed = AccessPolicy.from_settings(AuthSettings(enabled=True, keys_file=str(tmp_path / "keys.yaml")))
    assert not keyed.grpc_loopback_only, "where keys are on, they decide who may call"

    for peer in ("ipv4:127.0.0.1:5000", "ipv4:127.3.4.5:1", "ipv6:[::1]:5000", "ipv6:[::ffff:127.0.0.1]:80", "unix:/s"):
        assert is_loopback_peer(peer), peer
    for peer in ("ipv4:192.0.2.2:5000", "ipv6:[2001:db8::1]:5000", "ipv6:[::ffff:192.0.2.2]:80", "", "ipv4:junk"):
        assert not is_loopback_peer(peer), peer

    monkeypatch.setenv(GRPC_LOOPBACK_ONLY_ENV, "1")
    policy = AccessPolicy.from_settings(AuthSettings())
    monkeypatch.delenv(GRPC_LOOPBACK_ONLY_ENV)
    assert asyncio.run(policy.check_grpc("remove", [], "ipv4:127.0.0.1:5000")) is None
    try:
        asyncio.run(policy.check_grpc("remove", [], "ipv4:192.0.2.2:5000"))
    except Problem as problem:
        assert problem.problem == "host-not-allowed" and problem.kind.grpc_code == "PERMISSION_DENIED"
    else:
        raise AssertionError("a keyless gRPC call from another machine was answered")
    assert asyncio.run(AccessPolicy.from_settings(AuthSettings()).check_grpc("remove", [], "ipv4:192.0.2.2:1")) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_keyless_grpc_port_answers_loopback_callers_whatever_address_family_they_use(host):
    """The peer strings come from a real gRPC server, listening on every interface as Ray's proxy does:
    `localhost` resolves to ::1 on many machines, and gRPC percent-encodes an IPv6 peer's brackets."""
    import socket
    from concurrent import futures

    import grpc

    from serve.auth import is_loopback_peer

    peers = []

    def answer(request, context):
        peers.append(context.peer())
        return b""

    handler = grpc.method_handlers_generic_handler("t", {"m": grpc.unary_unary_rpc_method_handler(answer)})
    server = grpc.server(futures.ThreadPoolExecutor(1), handlers=[handler])
    port = server.add_insecure_port("[::]:0")
    server.start()
    try:
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError as exc:
            pytest.skip(f"this machine has no {host} loopback to call from: {exc}")
        with grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") as channel:
            channel.unary_unary("/t/m")(b"", timeout=10)
    finally:
        server.stop(None)
    assert len(peers) == 1 and is_loopback_peer(peers[0]), peers


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


def test_a_placement_over_the_gpus_in_all_names_the_total_not_a_replica_that_fits():
    from serve.cli import PlacementError

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = 2
    with pytest.raises(PlacementError) as refused:
        fit_to_machine(config, bundle=None, host=None, port=None, gpus=2)
    assert "ask for 3 GPUs in all" in str(refused.value) and "this machine has 2" in str(refused.value)
    assert "per replica" not in str(refused.value)


@pytest.mark.parametrize("replicas", [{}, {"num_replicas": None}, {"num_replicas": "auto"}])
def test_an_autoscaling_deployment_is_fitted_for_the_replicas_it_starts_with_however_they_are_left_open(replicas):
    """Ray's schema takes autoscaling_config with num_replicas left out: counted as one replica, a Remover starting
    at two took whole GPUs and the Scorer waited for one forever (READY never came). Fitted for its ceiling
    instead, "auto" (up to 100) split one GPU into slivers of 0.0099."""
    from serve.cli import logical_cpus_needed

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    remover = _deployments(config)["Remover"]
    remover.pop("num_replicas", None)
    remover.update(replicas, autoscaling_config={"min_replicas": 2, "max_replicas": 4})
    notes = fit_to_machine(config, bundle=None, host=None, port=None, gpus=1)
    shares = [d["ray_actor_options"]["num_gpus"] for d in _deployments(config).values() if d["name"] != "Ingress"]
    assert shares == [0.3333, 0.3333] and "3 GPU replicas" in notes[0]
    assert notes[1] == "autoscaling (Remover up to 4): replicas beyond what the 1 GPU(s) hold wait for one"
    ingress = _deployments(config)["Ingress"]
    ingress.pop("num_replicas", None)
    ingress.update(replicas, autoscaling_config={"min_replicas": 1, "max_replicas": 40})
    assert logical_cpus_needed(config) >= 40, "CPUs are logical: every replica it may reach is placed"


def test_num_replicas_auto_is_fitted_at_its_start_not_at_ray_s_ceiling_of_100():
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    _deployments(config)["Remover"]["num_replicas"] = "auto"
    notes = fit_to_machine(config, bundle=None, host=None, port=None, gpus=1)
    shares = [d["ray_actor_options"]["num_gpus"] for d in _deployments(config).values() if d["name"] != "Ingress"]
    assert shares == [0.5, 0.5] and "Remover up to 100" in notes[1]


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


def _narrowed(tmp_path, deployment: str, max_ongoing_requests: int, args: dict, refused: str) -> None:
    """The shipped config with one deployment's max_ongoing_requests lowered is refused (`refused`), and passes
    once `args` lower what it must hold."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    _deployments(config)[deployment]["max_ongoing_requests"] = max_ongoing_requests
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=refused):
        load_serve_config(path)
    config["applications"][0]["args"].update(args)
    path.write_text(yaml.safe_dump(config))
    load_serve_config(path)


def test_the_scorer_must_accept_a_full_batch_at_once(tmp_path):
    _narrowed(
        tmp_path, "Scorer", 5, {"scorer": {"max_batch_size": 4}},
        r"Scorer's max_ongoing_requests is 5, below scorer.max_batch_size \(8\)",
    )  # fmt: skip


def test_the_ingress_holds_more_requests_than_the_removals_it_admits(tmp_path):
    """With max_in_flight removals in progress the Ingress still has a slot: the probes and the requests its
    admission refuses are answered, not queued in Ray's queue in front of it (docs/reliability.md measured
    /healthz waiting 3.5 s there, and a 503 once that queue was full)."""
    _narrowed(
        tmp_path, "Ingress", 48, {"overload": {"max_in_flight": 47}},
        r"Ingress's max_ongoing_requests is 48, below overload.max_in_flight \+ 1 \(49\)",
    )  # fmt: skip


def _two_applications_keeping_results(tmp_path, first: dict, second: dict) -> Path:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    keyless = config["applications"][0]
    keyed = copy.deepcopy(keyless) | {"name": "keyed", "route_prefix": "/v2"}
    keyed["args"]["auth"] = {"enabled": True, "keys_file": str(tmp_path / "keys.yaml")}
    config["applications"].append(keyed)
    for app, retention in ((keyless, first), (keyed, second)):
        app["args"]["retention"] = {"enabled": True, **retention}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_applications_cannot_keep_results_in_one_store(tmp_path, monkeypatch):
    """A keyless application shares its results with every caller: in a store it shared with a keyed one, anyone
    would read and delete the keyed tenants' results, and each application's sweeper would apply its limits to
    the other's."""
    from serve.config import DATABASE_URL_ENV

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    same = _two_applications_keeping_results(tmp_path, {}, {})  # both at the default ~/.cache/rorem/results
    with pytest.raises(ValueError, match=r"applications rorem and keyed keep results in one database"):
        load_serve_config(same)
    objects = {"object_store": {"path": str(tmp_path / "shared")}}
    one_folder = _two_applications_keeping_results(
        tmp_path, {**objects, "database_url": "sqlite:///" + str(tmp_path / "a.db")},
        {**objects, "database_url": "sqlite:///" + str(tmp_path / "b.db")},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"keep results in one object store \(.*shared/objects\)"):
        load_serve_config(one_folder)
    apart = _two_applications_keeping_results(
        tmp_path, {"object_store": {"path": str(tmp_path / "a")}}, {"object_store": {"path": str(tmp_path / "b")}}
    )
    load_serve_config(apart)
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://rorem:s3cret@db/results")
    with pytest.raises(ValueError, match=r"one database \(postgresql.*applies to every application") as refused:
        load_serve_config(apart)
    assert "s3cret" not in str(refused.value), "the variable keeps the password out of the config and the logs"
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://db/results?user=rorem&password=s3cret")
    with pytest.raises(ValueError, match=r"one database") as refused:
        load_serve_config(apart)
    assert "s3cret" not in str(refused.value), "nor one given in the query"
    monkeypatch.delenv(DATABASE_URL_ENV)
    bucket = {"bucket": "b", "endpoint_url": "http://minio:9000"}
    for first, second in (("rorem/results", "/rorem/results/"), ("rorem", "rorem/results"), ("", "keyed")):
        nested = _two_applications_keeping_results(
            tmp_path, {"object_store": {"s3": {**bucket, "prefix": first}}, "database_url": "sqlite:///" + str(tmp_path / "a.db")},
            {"object_store": {"s3": {**bucket, "prefix": second}}, "database_url": "sqlite:///" + str(tmp_path / "b.db")},
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"keep results in one object store \(s3://b/"):
            load_serve_config(nested)
    side_by_side = _two_applications_keeping_results(
        tmp_path, {"object_store": {"s3": {**bucket, "prefix": "rorem/a"}}, "database_url": "sqlite:///" + str(tmp_path / "a.db")},
        {"object_store": {"s3": {**bucket, "prefix": "rorem/ab"}}, "database_url": "sqlite:///" + str(tmp_path / "b.db")},
    )  # fmt: skip
    load_serve_config(side_by_side)
    inside = _two_applications_keeping_results(
        tmp_path, {"object_store": {"path": str(tmp_path / "a")}},
        {"object_store": {"path": str(tmp_path / "a" / "objects" / "b")}},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"keep results in one object store \(.*a/objects/b/objects\)"):
        load_serve_config(inside)


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


def test_the_committed_settings_table_is_the_generated_one_and_every_key_has_a_meaning():
    from serve.config import TABLE_BEGIN, TABLE_END, fields_without_description, settings_table

    text = (REPO / "docs" / "configuration.md").read_text()
    committed = text[text.index(TABLE_BEGIN) : text.index(TABLE_END) + len(TABLE_END)] + "\n"
    assert committed == settings_table(), "docs/configuration.md is stale: paste `python -m serve.config` into it"
    assert fields_without_description() == []
    assert "| `gate.threshold` | `0.5` | Ingress |" in settings_table()
    assert "| `batching.max_batch_size` | `8` |  |" in settings_table(), "batch sizes are not live"


def test_each_deployment_is_bound_with_its_own_slice():
    """The slices are the AppSettings' own fields: a gate or ingress knob is in neither model deployment's, the
    Remover's engine and batching are not in the Ingress's."""
    from serve.config import IngressArgs, RemoverArgs, ScorerArgs

    settings = AppSettings.model_validate({"gate": {"threshold": 0.9}, "overload": {"max_in_flight": 7}})
    remover, scorer = settings.args_for(RemoverArgs), settings.args_for(ScorerArgs)
    ingress = settings.args_for(IngressArgs)
    assert set(remover) == {"bundle", "engine", "batching", "imaging"} and set(scorer) == {"bundle", "scorer"}
    assert set(ingress) == set(AppSettings.model_fields) - {"engine", "batching"}
    assert remover == AppSettings().args_for(RemoverArgs) and scorer == AppSettings().args_for(ScorerArgs)
    assert ingress["overload"]["max_in_flight"] == 7 and ingress["gate"]["threshold"] == 0.9
    for model, sliced in ((RemoverArgs, remover), (ScorerArgs, scorer), (IngressArgs, ingress)):
        assert model.model_validate(sliced).model_dump(mode="json") == sliced
        assert all(
            AppSettings.model_fields[name].annotation is field.annotation for name, field in model.model_fields.items()
        )


def test_the_built_application_binds_each_deployment_with_its_slice_and_the_gate_only_where_the_args_give_it():
    """The Ingress got the whole settings: an engine or batching change altered its constructor arguments."""
    from ray.serve.deployment import Application

    from serve.app import build_app

    def bound_args(args: dict) -> dict[str, dict]:
        found, pending = {}, [build_app(args)]
        while pending:
            deployment = pending.pop()._bound_deployment
            bound = (*deployment.init_args, *deployment.init_kwargs.values())
            found.update({deployment.name: arg for arg in bound if isinstance(arg, dict)})
            pending += [arg for arg in bound if isinstance(arg, Application)]
        return found

    plain = bound_args({"scorer": {"enabled": True}})
    assert set(plain["Ingress"]) == set(AppSettings.model_fields) - {"engine", "batching", "gate"}
    assert set(plain["Remover"]) == {"bundle", "engine", "batching", "imaging"}
    assert set(plain["Scorer"]) == {"bundle", "scorer"}
    engine_changed = bound_args(
        {"scorer": {"enabled": True}, "engine": {"steps": 2}, "batching": {"max_batch_size": 2}}
    )
    assert engine_changed["Ingress"] == plain["Ingress"] and engine_changed["Remover"] != plain["Remover"]
    gated = bound_args({"scorer": {"enabled": True}, "gate": {"mode": "retry"}})
    assert gated["Ingress"]["gate"]["mode"] == "retry"


def test_live_knobs_move_from_the_args_into_the_user_config_and_back():
    """Rendering splits the args (static) from the user_configs (live); applying the user_configs to the
    static args gives back the settings the args say."""
    from serve.config import live_configs, live_serve_app, static_args, with_live

    args = {
        "gate": {"mode": "retry", "threshold": 0.7},
        "batching": {
            "batch_wait_timeout_s": 0.05,
            "per_bucket": {1024: {"max_batch_size": 4, "batch_wait_timeout_s": 0.2}},
        },
        "scorer": {"batch_wait_timeout_s": 0.03, "device": "cpu"},
    }
    app = {"name": "rorem", "args": args, "deployments": [{"name": "Ingress"}, {"name": "Remover"}, {"name": "Scorer"}]}
    rendered = live_serve_app(app)
    assert rendered["args"] == {"batching": {"per_bucket": {1024: {"max_batch_size": 4}}}, "scorer": {"device": "cpu"}}
    assert static_args(args) == rendered["args"] and args["gate"]["threshold"] == 0.7, "the source is not modified"
    user = {d["name"]: d["user_config"] for d in rendered["deployments"]}
    assert user["Ingress"]["gate"]["threshold"] == 0.7
    assert user["Remover"] == {"batch_wait_timeout_s": {"512": 0.05, "1024": 0.2}}
    assert user["Scorer"] == {"batch_wait_timeout_s": 0.03}
    settings = AppSettings.model_validate(rendered["args"])
    for name, config in user.items():
        settings = with_live(settings, name, config)
    wanted = AppSettings.model_validate(args)
    assert live_configs(settings) == live_configs(wanted) and settings.batch_sizes() == wanted.batch_sizes()
    assert settings.model_dump(exclude={"batching"}) == wanted.model_dump(exclude={"batching"})
    with pytest.raises(ValueError, match="not in user_config"):
        live_serve_app({**app, "deployments": [{"name": "Ingress", "user_config": {"gate": {}}}]})
    # a deployment the config does not list still gets its live settings: a gate in the args is never lost
    unlisted = {d["name"]: d for d in live_serve_app({**app, "deployments": [{"name": "Remover"}]})["deployments"]}
    assert unlisted["Ingress"]["user_config"]["gate"] == user["Ingress"]["gate"]
    assert unlisted["Scorer"]["user_config"] == user["Scorer"] and set(unlisted) == {"Ingress", "Remover", "Scorer"}
    assert live_serve_app({"args": {"gate": {"mode": "reject"}}})["deployments"][0]["user_config"]["gate"]["mode"] == (
        "reject"
    )
    with pytest.raises(ValidationError, match="needs the Scorer"):
        with_live(AppSettings.model_validate({"scorer": {"enabled": False}, "gate": {"mode": "off"}}), "Ingress",
                  {"gate": {"mode": "retry"}})  # fmt: skip


def test_the_ingress_full_queue_503_says_the_configured_retry_after():
    """Ray answers a request past the Ingress's max_queued_requests itself (backpressure_config); the config
    restated Retry-After 2 there, so overload.retry_after_s: 10 left that 503 saying 2. It is derived now; the
    Remover's and Scorer's entries were inert (their refusals reach the Ingress, which answers them)."""
    app = {"args": {"overload": {"retry_after_s": 10}}, "deployments": [{"name": "Ingress"}, {"name": "Remover"}]}
    deployed = {d["name"]: d for d in live_serve_app(app)["deployments"]}
    assert deployed["Ingress"]["backpressure_config"] == {"status_code": 503, "retry_after_s": 10}
    assert "backpressure_config" not in deployed["Remover"]
    assert live_serve_app({"args": {}})["deployments"][0]["backpressure_config"]["retry_after_s"] == 2
    restated = {"args": {}, "deployments": [{"name": "Remover", "backpressure_config": {"retry_after_s": 2}}]}
    with pytest.raises(ValueError, match="set overload.retry_after_s in the application args"):
        live_serve_app(restated)


def test_the_rendered_serve_configs_carry_the_live_knobs_in_user_config():
    """What `python -m serve run` deploys and what k8s/render.py writes: no live knob left in the args."""
    render = load_script("k8s/render.py")
    from serve.config import live_serve_app

    for config in (render.render_config("gpu"), render.render_config("cpu")):
        app = config["applications"][0]
        assert "gate" not in app["args"] and all(d.get("user_config") for d in app["deployments"])
    local = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]
    assert live_serve_app(local)["deployments"][1]["user_config"] == {
        "batch_wait_timeout_s": {"512": 0.01, "1024": 0.01}
    }


def test_a_json_true_or_false_is_not_taken_for_a_number():
    """pydantic's lax mode (multipart fields are all text) reads true as 1: `"quality": true` asks for quality 1."""
    from serve.problems import Problem
    from serve.protocol import JSONRemoveBody, validate

    for field in ("seed", "quality", "dilate", "gate_threshold", "max_attempts", "timeout_s"):
        with pytest.raises(Problem, match=f"{field}: .*a number, not true / false"):
            validate(JSONRemoveBody, {"image": "x", field: True})
    fields = {"seed": "7", "quality": "90", "dilate": "4", "gate_threshold": "0.5", "max_attempts": "2", "timeout_s": "5"}
    assert validate(JSONRemoveBody, {"image": "x", **fields}).quality == 90, "numbers as text, as multipart sends them"
    documented = validate(JSONRemoveBody, {"image": "x", "seed": "7.0", "retain": "yes"})  # docs/api.md
    assert (documented.seed, documented.retain) == (7, True)
    with pytest.raises(Problem, match="seed: .*fractional part"):
        validate(JSONRemoveBody, {"image": "x", "seed": 7.5})


def test_request_options_and_settings_share_their_bounds():
    """One declaration per bound (serve.config): the settings' defaults and the per-request options agree."""
    from serve.protocol import RemoveOptions, ScoreOptions

    for options, field, setting in (
        (RemoveOptions, "dilate", AppSettings.model_fields["imaging"].annotation.model_fields["dilate"]),
        (ScoreOptions, "gate_threshold", AppSettings.model_fields["gate"].annotation.model_fields["threshold"]),
        (RemoveOptions, "max_attempts", AppSettings.model_fields["gate"].annotation.model_fields["max_attempts"]),
        (RemoveOptions, "quality", AppSettings.model_fields["imaging"].annotation.model_fields["jpeg_quality"]),
    ):
        schema = options.model_json_schema()["properties"][field]["anyOf"][0]
        bounds = {k: v for k, v in schema.items() if k in ("minimum", "maximum")}
        assert bounds == {"minimum": next(m.ge for m in setting.metadata if hasattr(m, "ge")),
                          "maximum": next(m.le for m in setting.metadata if hasattr(m, "le"))}, field  # fmt: skip
        with pytest.raises(ValidationError):
            options.model_validate({field: bounds["maximum"] + 1})


def test_a_crop_margin_of_0_is_refused_since_it_would_lose_the_feathered_edge():
    """With no margin, a region larger than the largest bucket gets a window that is exactly its mask's box: no
    unmasked pixel inside it, so every mask pixel weighs 1 and the seam is hard (a review: edge pixel 255 where
    the ramp gives ~32 with a margin of 4)."""
    from pydantic import ValidationError

    from serve.config import AppSettings

    with pytest.raises(ValidationError, match="crop_margin"):
        AppSettings.model_validate({"imaging": {"crop_margin": 0}})
    assert AppSettings.model_validate({"imaging": {"crop_margin": 1}}).imaging.crop_margin == 1


def test_the_documented_config_of_two_applications_is_valid_and_gives_each_its_proxy_limits(tmp_path, monkeypatch):
    """docs/configuration.md's example of several applications: a config `python -m serve run` takes, whose
    proxies hold each application's limits and keys."""
    import json
    import re

    from serve.config import validate_serve_config
    from serve.proxy_limits import http_max_body_bytes, proxy_env
    from serve.proxy_middleware import ROUTES_ENV

    text = (REPO / "docs" / "configuration.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "applications:" in b]
    config = yaml.safe_load(block)
    monkeypatch.chdir(tmp_path)
    fit_to_machine(config, bundle=None, host=None, port=None, gpus=0)
    validate_serve_config(config)
    routes = json.loads(proxy_env(config)[ROUTES_ENV])
    assert routes["/v2"]["keys_file"] == str(tmp_path / "keys.yaml") and "keys_file" not in routes["/"]
    assert routes["/v2"]["limit"] == http_max_body_bytes(ImagingSettings(max_upload_bytes=8388608)) < routes["/"]["limit"]
    assert "--application keyed" in text and "/v2/remove" in text


def test_a_deployment_the_config_does_not_list_is_checked_with_the_options_it_runs_with():
    """An unlisted deployment runs with its decorator's options (Ray's defaults: 5 requests at once); the check
    skipped it, and docs/configuration.md's two applications ran an Ingress of 5 slots under max_in_flight 48."""
    from serve.config import validate_serve_config

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    del config["applications"][0]["deployments"]
    with pytest.raises(ValueError, match=r"the Ingress's max_ongoing_requests is 5, below overload.max_in_flight \+ "
                       r"1 \(49\).*list Ingress under the application's deployments"):  # fmt: skip
        validate_serve_config(config)
    config["applications"][0]["deployments"] = [
        {"name": "Ingress", "max_ongoing_requests": 64}, {"name": "Scorer", "max_ongoing_requests": 16}
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"the Remover's max_ongoing_requests is 5, below the buckets' batch sizes"):
        validate_serve_config(config)
    from serve.config import built_deployments
    from serve.remover_deployment import Remover

    built = built_deployments(AppSettings(scorer={"enabled": False}, gate={"mode": "off"}))
    assert set(built) == {"Ingress", "Remover"}
    assert built["Remover"] == Remover.max_ongoing_requests


@pytest.mark.parametrize("section", ["http_options", "grpc_options"])
@pytest.mark.parametrize("proxy_s", [30, 120])
def test_the_proxy_s_timeout_must_come_after_every_application_s_deadline(section, proxy_s):
    """At or below the app's request_timeout_s, Ray's proxy answered 408 proxy-timeout first while the model work
    went on."""
    from serve.config import validate_serve_config

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config[section]["request_timeout_s"] = proxy_s
    with pytest.raises(ValueError, match=rf"{section}.request_timeout_s \({proxy_s} s\) is not above application "
                       r"rorem's request_timeout_s \(120 s\)"):  # fmt: skip
        validate_serve_config(config)
    config["applications"][0]["args"]["request_timeout_s"] = proxy_s - 1
    validate_serve_config(config)


def test_a_proxy_buffer_below_the_largest_body_is_refused_by_the_validator():
    """It passed, and the CLI's proxy_env raised later, outside its "cannot start": a traceback and exit 1."""
    from serve.config import validate_serve_config

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"]["overload"] = {"proxy_buffer_bytes": 1_000_000}
    with pytest.raises(ValueError, match=r"application 'rorem': overload.proxy_buffer_bytes \(1000000\) is below"):
        validate_serve_config(config)


def test_a_model_deployment_set_to_cuda_that_would_get_no_gpu_is_refused_at_start(tmp_path, capsys, monkeypatch):
    """It got num_gpus 0 and a note that it runs on the CPU, then failed inside Ray; `device: auto` does run there."""
    from serve import cli
    from serve.cli import PlacementError
    from serve.ports import free_port

    def launch(*args, **kwargs):
        raise AssertionError("the CLI launched Ray")

    monkeypatch.setattr(cli, "subprocess", SimpleNamespace(Popen=launch))
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"]["scorer"] = {"device": "cuda"}
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(config))
    ports = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    assert cli.run(["run", "--config", str(path), "--gpus", "0", *ports]) == 2
    err = capsys.readouterr().err
    assert "cannot start: Scorer is set to scorer.device: cuda and gets no GPU (this machine has no CUDA GPU)" in err
    assert "set scorer.device to auto" in err and "Traceback" not in err
    config["applications"][0]["args"]["scorer"] = {"device": "auto"}
    config["applications"][0]["args"]["engine"] = {"device": "cuda"}
    _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = 0
    with pytest.raises(PlacementError, match=r"Remover is set to engine.device: cuda and gets no GPU \(its "):
        fit_to_machine(config, bundle=None, host=None, port=None, gpus=1)
    _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = 1
    assert fit_to_machine(config, bundle=None, host=None, port=None, gpus=1)  # shared with the Scorer


def test_a_scorer_off_config_in_its_live_form_is_valid():
    """In the live form (what k8s/render.py writes and the CLI runs) the gate is the Ingress's user_config, not an
    arg: the check of the deployments the app builds once built it from every default, the gate's annotate among
    them, and refused a valid scorer-off config as "gate.mode 'annotate' needs the Scorer"."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    app["args"].update(scorer={"enabled": False}, gate={"mode": "off"})
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Scorer"]
    validate_serve_config(copy.deepcopy(config))
    validate_serve_config(live_serve_config(config))


@pytest.mark.parametrize("days", [1e6, float("inf"), float("nan")])
def test_a_retention_age_past_any_date_is_refused_at_startup(days):
    """max_age_days 1e6 ("keep for ever") passed validation, then every read, the queue, the sweeper and each save's
    limits raised OverflowError (date out of range): results that could never be read back."""
    from serve.config import MAX_AGE_DAYS, RetentionSettings

    with pytest.raises(ValidationError, match="max_age_days") as raised:
        RetentionSettings(enabled=True, max_age_days=days)
    assert f"less than or equal to {MAX_AGE_DAYS}" in str(raised.value) or "finite number" in str(raised.value)
    assert RetentionSettings(max_age_days=MAX_AGE_DAYS).max_age_days == MAX_AGE_DAYS


@pytest.mark.parametrize(("steps", "strength"), [(1, 0.99), (4, 0.2), (2, 0.4)])
def test_a_strength_that_leaves_no_step_is_refused_before_ray(steps, strength):
    """It was taken, then every Remover replica failed after loading the bundle (engines.lcm: "leaves no step") and
    Serve retried it until DEPLOY_FAILED. Either one left to the bundle is the bundle's (any of 1-50 steps): taken."""
    from engines.sampling import steps_run

    with pytest.raises(ValidationError, match=f"engine.strength {strength:g} leaves no step of engine.steps"):
        AppSettings.model_validate({"engine": {"steps": steps, "strength": strength}})
    assert steps_run(steps, strength) == 0
    AppSettings.model_validate({"engine": {"steps": steps, "strength": 1.0}})
    AppSettings.model_validate({"engine": {"steps": 4, "strength": 0.25}})
    AppSettings.model_validate({"engine": {"strength": strength}})  # an 8-step bundle runs 1 at 0.2


def test_a_deployment_on_cuda_given_no_gpu_is_refused_by_the_validator_on_any_machine():
    """The CLI refused it on its machine; k8s/render.py, which validates with validate_serve_config alone, rendered
    it, and the replicas failed in the cluster."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["args"]["engine"] = {"device": "cuda"}
    validate_serve_config(copy.deepcopy(config))
    _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = 0
    with pytest.raises(ValueError, match=r"Remover is set to engine.device: cuda and gets no GPU \(its ray_actor"):
        validate_serve_config(config)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda deps: deps.__setitem__(1, {**deps[1], "name": "Removr"}),
         r"deployments names \['Removr'\], which the application does not build .*\['Ingress', 'Remover', 'Scorer'\]"),
        (lambda deps: deps.append(copy.deepcopy(deps[1])), r"deployments lists \['Remover'\] more than once"),
    ],
    ids=["misspelt", "twice"],
)  # fmt: skip
def test_a_deployment_entry_must_name_a_built_deployment_once(edit, said):
    """A misspelt name passed, then Ray failed the deploy; a repeated entry passed, and fit_gpus counted its GPU
    twice."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    edit(config["applications"][0]["deployments"])
    with pytest.raises(ValueError, match=said):
        validate_serve_config(config)


@pytest.mark.parametrize(
    ("section", "port", "refused"),
    [("http_options", 70000, True), ("http_options", 0, True), ("http_options", -1, True),
     ("grpc_options", 70000, True), ("grpc_options", 0, False), ("grpc_options", -1, False),
     ("http_options", 65535, False), ("grpc_options", 65535, False),
     ("http_options", "70000", True), ("grpc_options", "9000", False)],  # Ray's schema takes a number as a string
)  # fmt: skip
def test_a_config_port_outside_tcp_s_range_is_refused(section, port, refused):
    """Only the --port flag was bounded: a config's 70000 ended in a traceback where the CLI checked the port. A gRPC
    port of 0 or below serves no gRPC (serve.cli.serves_grpc), as Ray takes it."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config[section]["port"] = port
    if not refused:
        validate_serve_config(config)
        return
    with pytest.raises(ValueError, match=rf"^{section}.port {port} is not a TCP port: give one "):
        validate_serve_config(config)


def _floats(annotation) -> bool:
    import typing

    return annotation is float or any(_floats(arg) for arg in typing.get_args(annotation))


def test_no_float_setting_takes_infinity_or_nan():
    """An infinite imaging.max_megapixels passed, then the CLI's proxy_env raised OverflowError outside any check
    (and k8s/render.py with it); infinite timeouts passed alike."""
    from serve.config import _leaves

    keys = [key for key, field in _leaves(AppSettings) if _floats(field.annotation)]
    assert {"imaging.max_megapixels", "request_timeout_s", "engine.hung_after_s", "scorer.timeout_s",
            "overload.max_queue_wait_s", "retention.save_timeout_s", "auth.reload_interval_s"} <= set(keys)  # fmt: skip
    for key in keys:
        for value in (float("inf"), float("nan")):
            args = value
            for part in reversed(key.replace("<side>", "512").split(".")):
                args = {part: args}
            with pytest.raises(ValidationError, match="finite number"):
                AppSettings.model_validate(args)


def test_a_fraction_of_gpus_above_one_is_refused():
    """1.5 fitted the machine (fit_gpus rounds it up), then Ray refused the deploy: above 1 it takes whole GPUs."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for gpus in (0.5, 2):
        _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = gpus
        validate_serve_config(config)
    for gpus in (1.5, "1.5"):  # Ray's schema takes the string as its number
        _deployments(config)["Remover"]["ray_actor_options"]["num_gpus"] = gpus
        with pytest.raises(ValueError, match=r"^Remover: ray_actor_options.num_gpus 1.5: Ray takes a fraction of one"):
            validate_serve_config(config)


def test_the_quota_window_is_whole_seconds():
    """The RateLimit fields name it in whole seconds (serve.quotas): 1.5 was advertised as 2."""
    assert AppSettings.model_validate({"auth": {"quota_window_s": 5.0}}).auth.quota_window_s == 5
    with pytest.raises(ValidationError, match="auth.quota_window_s"):
        AppSettings.model_validate({"auth": {"quota_window_s": True}})
    with pytest.raises(ValidationError, match="auth.quota_window_s"):
        AppSettings.model_validate({"auth": {"quota_window_s": 1.5}})


@pytest.mark.parametrize(
    "args",
    [{"batching": {"batch_wait_timeout_s": True}}, {"batching": {"per_bucket": {512: {"batch_wait_timeout_s": True}}}},
     {"scorer": {"batch_wait_timeout_s": True}}, {"overload": {"retry_after_s": True}}, {"request_timeout_s": True}],
)  # fmt: skip
def test_a_true_is_not_taken_for_a_wait_or_a_timeout(args):
    """`true` was 1: a batch wait of 1 s, a Retry-After of 1 s, a request deadline of 1 s."""
    with pytest.raises(ValidationError, match="a number, not true / false"):
        AppSettings.model_validate(args)


def test_the_imaging_limits_default_to_the_decoders_and_map_field_by_field():
    """Their defaults live once, in engines.imaging.DecodeLimits; serve.config restated 30 MiB and 40 megapixels.
    Each setting reaches its own bound (the service and the release gate read them through decode_limits)."""
    import dataclasses

    from engines.imaging import DecodeLimits

    assert ImagingSettings().decode_limits() == DecodeLimits()
    names = {"max_bytes": "max_upload_bytes"}
    for bound in dataclasses.fields(DecodeLimits):
        setting = names.get(bound.name, bound.name)
        changed = ImagingSettings(**{setting: getattr(DecodeLimits(), bound.name) + 1}).decode_limits()
        assert changed == dataclasses.replace(DecodeLimits(), **{bound.name: getattr(DecodeLimits(), bound.name) + 1})


def _a_number_field(annotation) -> bool:
    """int or float, alone or optional (not a mapping or list of them: their entries are checked by their own type)."""
    import typing

    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (list, dict, set, tuple):
        return False
    return any(_a_number_field(arg) for arg in typing.get_args(annotation))


def test_every_number_setting_refuses_true_and_false():
    """YAML's true / false was read as 1 / 0 by most number settings: `imaging.max_exif_bytes: false` answered every
    photo with EXIF 413, `batching.max_batch_size: true` batched one at a time. Walks every field, so a new one is
    checked too."""
    from serve.config import _leaves

    keys = [key for key, field in _leaves(AppSettings) if _a_number_field(field.annotation)]
    assert len(keys) >= 35 and {"imaging.max_exif_bytes", "batching.max_batch_size", "scorer.max_batch_size",
                                "retention.max_results", "bundle.tiny_seed", "overload.max_in_flight"} <= set(keys)
    for key in keys:
        for value in (True, False):
            args = value
            for part in reversed(key.replace("<side>", "512").split(".")):
                args = {part: args}
            with pytest.raises(ValidationError, match="a number, not true / false") as refused:
                AppSettings.model_validate(args)
            assert key.replace("<side>", "512") in str(refused.value), key
    assert AppSettings.model_validate({"imaging": {"max_exif_bytes": 0}}).imaging.max_exif_bytes == 0


def _start_refused(tmp_path, capsys, monkeypatch, config: dict) -> str:
    """What `python -m serve run` says refusing this config before Ray starts (exit 2, one line, no traceback)."""
    from serve.cli import run
    from serve.ports import free_port

    monkeypatch.setattr("serve.cli.subprocess", SimpleNamespace(Popen=_no_launch))

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(["run", "--config", str(path), "--gpus", "0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[rorem] cannot start: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_database_url_that_cannot_work_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """notaurl, mysql:// or postgresql+psycopg:// without their driver all started: the service said ready, answered
    every retained removal without X-Result-Id and /results, /feedback and /annotation/queue 503 for ever (only an
    ERROR in Ray's log said why). The URL is never quoted: it may hold a password."""
    from serve.config import DATABASE_URL_ENV

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    database_driver(monkeypatch, "MySQLdb", installed=False)
    database_driver(monkeypatch, "psycopg", installed=False)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    retention = config["applications"][0]["args"]["retention"] = {"enabled": True}
    for url, said in (
        ("notaurl", "retention.database_url: not a URL SQLAlchemy can read: give dialect[+driver]://"),
        ("postgresql://rorem:s3cret@db:port/results", "retention.database_url: not a URL SQLAlchemy can read"),
        ("nosuchdb://rorem:s3cret@db/results", "retention.database_url: SQLAlchemy has no database 'nosuchdb'"),
        ("mysql://rorem:s3cret@db/results", "retention.database_url: mysql's driver, the Python module MySQLdb, is "
         "not installed here"),
        ("postgresql+psycopg://rorem:s3cret@db/results", "retention.database_url: postgresql+psycopg's driver, the "
         "Python module psycopg, is not installed here"),
    ):  # fmt: skip
        retention["database_url"] = url
        err = _start_refused(tmp_path, capsys, monkeypatch, config)
        assert said in err and "s3cret" not in err, err
    del retention["database_url"]
    monkeypatch.setenv(DATABASE_URL_ENV, "mysql://rorem:s3cret@db/results")
    err = _start_refused(tmp_path, capsys, monkeypatch, config)
    assert f"${DATABASE_URL_ENV} (retention.database_url unset): mysql's driver" in err and "s3cret" not in err
    retention["enabled"] = False  # the variable, unused, is not refused; a URL in the config is
    fit_to_machine(load_serve_config(_written(tmp_path, config)), bundle=None, host=None, port=None, gpus=0)
    retention["database_url"] = "notaurl"
    with pytest.raises(ValueError, match="^retention.database_url: not a URL"):
        validate_serve_config(config)
    database_driver(monkeypatch, "psycopg", installed=True)
    retention.update(enabled=True, database_url="postgresql+psycopg://rorem:s3cret@db/results")
    fit_to_machine(load_serve_config(_written(tmp_path, config)), bundle=None, host=None, port=None, gpus=0)


def _no_launch(*args, **kwargs):
    raise AssertionError("the CLI launched Ray")


def _written(tmp_path, config: dict) -> Path:
    path = tmp_path / "written.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("prefix", "said"),
    [("v2", "must start with a forward slash ('/')"), ("/v2/", "may not end with a trailing '/'"),
     ("/v2/{id}", "may not contain wildcards")],
)  # fmt: skip
def test_a_route_prefix_ray_would_refuse_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, prefix, said):
    """`v2` and `/v2/` passed the checks, then Ray refused them inside its deploy, after starting."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["applications"][0]["route_prefix"] = prefix
    err = _start_refused(tmp_path, capsys, monkeypatch, config)
    assert f"application rorem: route_prefix {prefix!r} {said} (Ray's rule: /, or a path such as /v2)" in err
    for fine in ("/", "/v2", "/v2/remove"):
        config["applications"][0]["route_prefix"] = fine
        validate_serve_config(config)


def _two_applications() -> dict:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    keyed = copy.deepcopy(config["applications"][0])
    keyed.update(name="keyed", route_prefix="/v2")
    config["applications"].append(keyed)
    return config


def test_an_error_in_one_application_of_several_names_it_and_no_error_is_put_at_a_bare_value(
    tmp_path, capsys, monkeypatch
):
    """`gate.thresold: Extra inputs are not permitted` said not which application; a check of the whole args
    said `value: gate.mode 'retry' needs the Scorer...`."""
    config = _two_applications()
    keyed = config["applications"][1]["args"]
    keyed["gate"] = {"thresold": 0.4}
    assert ".yaml: application keyed: gate.thresold: Extra inputs are not permitted\n" in _start_refused(
        tmp_path, capsys, monkeypatch, config
    )
    keyed.update(gate={"mode": "retry"}, scorer={"enabled": False})
    err = _start_refused(tmp_path, capsys, monkeypatch, config)
    assert "application keyed: gate.mode 'retry' needs the Scorer: set scorer.enabled" in err and "value:" not in err
    one = yaml.safe_load(DEFAULT_CONFIG.read_text())
    one["applications"][0]["args"].update(gate={"mode": "retry"}, scorer={"enabled": False})
    err = _start_refused(tmp_path, capsys, monkeypatch, one)
    assert ".yaml: gate.mode 'retry' needs the Scorer" in err and "value:" not in err and "application" not in err
    config = _two_applications()
    _deployments({"applications": config["applications"][1:]})["Remover"]["max_ongoing_requests"] = 1
    err = _start_refused(tmp_path, capsys, monkeypatch, config)
    assert "application keyed: the Remover's max_ongoing_requests is 1" in err


def test_a_grpc_port_flag_serves_grpc_where_the_config_s_port_alone_would_not(monkeypatch):
    """`grpc_options.port: -5` (or 0) with servicer functions listed, plus `--grpc-port 29000`, was refused as "this
    config serves no gRPC (grpc_options.grpc_servicer_functions is empty ...)" while they were listed: the flag's
    port replaces the config's, as --port does."""
    from serve.cli import choose_ports, listen_addresses, serves_grpc

    for config_port in (-5, 0):
        config = yaml.safe_load(DEFAULT_CONFIG.read_text())
        config["grpc_options"]["port"] = config_port
        assert not serves_grpc(config)
        choose_ports(config, None, None, 29000)
        assert serves_grpc(config) and listen_addresses(config, 9464)["gRPC"] == ("::", 29000)
    config["grpc_options"]["grpc_servicer_functions"] = []
    with pytest.raises(ValueError, match=r"^--grpc-port: this config serves no gRPC \(grpc_options.grpc_servicer_fun"):
        choose_ports(config, None, None, 29001)
