"""Live settings on a running local Serve: a changed gate and batch waits reach the replicas through
Serve's user_config (`reconfigure`), and no replica is restarted for it. Without Ray: an invalid live value
after the first is refused, and the deployment keeps its previous settings (serve.live)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve import metrics
from serve.app import Ingress
from serve.batcher import Batcher
from serve.config import AppSettings, RemoverArgs
from serve.local_ray import RAY_LOOPBACK_ENV
from serve.remover_deployment import Remover
from serve.scorer_deployment import Scorer
from tests import helpers

# e2e (starts a local Ray Serve): marked through the `starts_serve` fixture, tests/conftest.py

# A driver in its own process, connected to the cluster `python -m serve run` started: one application's replica
# ids from the controller, each model deployment's live(), every application's status and replica ids, and (given
# a config file, which holds every application of the session's Serve) a redeploy first.
_DRIVER = """
import json, sys, time, yaml, ray
from ray.serve.context import _connect
from ray.serve.schema import ServeDeploySchema
from ray import serve

ray.init(address=sys.argv[1], namespace="serve", _node_ip_address="127.0.0.1", log_to_driver=False)
client = _connect()
if len(sys.argv) > 3:
    config = yaml.safe_load(open(sys.argv[3]))
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
details = ray.get(client._controller.get_serve_instance_details.remote())
def replica_ids(app):
    return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in app["deployments"].items()}
everyone = {name: [app["status"], replica_ids(app)] for name, app in details["applications"].items()}
app = details["applications"][sys.argv[2]]
replicas = replica_ids(app)
live = {name: serve.get_deployment_handle(name, sys.argv[2]).live.remote().result() for name in ("Remover", "Scorer")}
print("RESULT " + json.dumps({"status": app["status"], "replicas": replicas, "live": live, "applications": everyone}))
"""


def _cluster(instance: str) -> tuple[str, dict]:
    """The GCS address of the Ray cluster whose processes carry this CLI instance's id (serve.config.INSTANCE_ENV),
    and the environment a driver needs to join it: its token-auth mode (a new local Ray turns token auth on by
    default) and its node address on loopback (serve.local_ray: without it, a driver's 127.0.0.1 becomes the
    machine's network address and it waits for a raylet there)."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        if f"ROREM_INSTANCE_ID={instance}".encode() not in env:
            continue
        for arg in args:
            found = re.fullmatch(r"--gcs[-_]address=(\S+)", arg)
            if found:
                mode = next((e for e in env if e.startswith(b"RAY_AUTH_MODE=")), b"RAY_AUTH_MODE=token")
                joined = {"RAY_AUTH_MODE": mode.decode().split("=", 1)[1]}
                for name in RAY_LOOPBACK_ENV:
                    given = next((e for e in env if e.startswith(f"{name}=".encode())), None)
                    if given is not None:
                        joined[name] = given.decode().split("=", 1)[1]
                return found[1], joined
    raise AssertionError(f"no Ray process of instance {instance} names its GCS address")


def _driver(cluster: tuple[str, dict], config: Path | None = None, app: str = "rorem") -> dict:
    """`app`: the application to report on (the session's Serve has several; `service` is "rorem")."""
    address, env = cluster
    command = [sys.executable, "-c", _DRIVER, address, app] + ([str(config)] if config else [])
    env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(command, cwd=helpers.REPO, capture_output=True, text=True, timeout=180, env=env, check=False)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"driver failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def live_service(cluster, service):
    """The session's Serve, every application ready (a redeploy waits for all, and the test compares every
    application's replicas before and after): the test changes only live settings, and puts them back (a live
    change restarts nothing, so the other tests find the replicas they had)."""
    assert service.app_name == "rorem", "_driver reports on rorem"
    effective = Path(re.search(r"effective Serve config: (\S+)", service.log_path.read_text())[1])
    yield service
    restored = _driver(_cluster(service.client.get("/healthz").json()["instance"]), effective)
    assert restored["status"] == "RUNNING"
    assert restored["live"]["Remover"]["batch_wait_timeout_s"] == {"256": 0.25, "512": 0.25}
    deadline = time.monotonic() + 30
    while service.client.get("/readyz").json()["gate"]["threshold"] != 0.5:
        assert time.monotonic() < deadline, "the Ingress never took the gate threshold back"
        time.sleep(0.5)


def test_the_start_prints_the_address_a_driver_joins_its_ray_at(live_service):
    """docs/configuration.md's driver took address="auto", the newest Ray on the machine: a trial's live settings
    went to another session's service. The start now prints its own Ray's address."""
    printed = re.search(r"\[rorem\] Ray: (\S+) ", live_service.log_path.read_text())
    assert printed, "no '[rorem] Ray: ADDRESS' line in the start's output"
    address, _ = _cluster(live_service.client.get("/healthz").json()["instance"])
    assert printed[1] == address


def test_changing_live_settings_reconfigures_without_restarting_a_replica(live_service, tmp_path):
    instance = live_service.client.get("/healthz").json()["instance"]
    address = _cluster(instance)
    effective = Path(re.search(r"effective Serve config: (\S+)", live_service.log_path.read_text())[1])
    before = _driver(address)
    assert before["status"] == "RUNNING" and all(before["replicas"].values())
    assert before["live"]["Remover"]["batch_wait_timeout_s"] == {"256": 0.25, "512": 0.25}
    assert live_service.client.get("/readyz").json()["gate"]["threshold"] == 0.5

    config = yaml.safe_load(effective.read_text())
    (app,) = [app for app in config["applications"] if app["name"] == live_service.app_name]
    deployments = {d["name"]: d for d in app["deployments"]}
    args_before = json.dumps(app["args"], sort_keys=True)
    deployments["Ingress"]["user_config"]["gate"]["threshold"] = 0.8
    deployments["Remover"]["user_config"]["batch_wait_timeout_s"]["512"] = 0.05
    deployments["Scorer"]["user_config"]["batch_wait_timeout_s"] = 0.02
    assert json.dumps(app["args"], sort_keys=True) == args_before, "only user_config changed"
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config, sort_keys=False))

    after = _driver(address, edited)
    assert after["status"] == "RUNNING"
    assert after["replicas"] == before["replicas"], "a live setting must not restart a replica"
    assert after["applications"] == before["applications"], "the session's other applications: untouched"
    for name in ("Remover", "Scorer"):
        assert after["live"][name]["replica"] == before["live"][name]["replica"]
    assert after["live"]["Remover"]["batch_wait_timeout_s"] == {"256": 0.25, "512": 0.05}
    assert after["live"]["Scorer"]["batch_wait_timeout_s"] == 0.02
    deadline = time.monotonic() + 30
    while live_service.client.get("/readyz").json()["gate"]["threshold"] != 0.8:
        assert time.monotonic() < deadline, "the Ingress never took the new gate threshold"
        time.sleep(0.5)
    response = helpers.post_remove(
        live_service, helpers.png_bytes(helpers.photo()), helpers.png_bytes(helpers.box_mask()), seed=1
    )
    assert response.status_code == 200, response.text


def test_an_invalid_live_value_is_refused_by_the_running_replicas_which_keep_serving(live_service, tmp_path):
    """A review's gate.threshold 20 ended the app DEPLOY_FAILED with no replica (the whole API 503), and a batch
    wait of 2 s restarted the Remover (its model reloaded) before failing it too."""
    address = _cluster(live_service.client.get("/healthz").json()["instance"])
    effective = Path(re.search(r"effective Serve config: (\S+)", live_service.log_path.read_text())[1])
    before = _driver(address)
    threshold = live_service.client.get("/readyz").json()["gate"]["threshold"]
    config = yaml.safe_load(effective.read_text())
    (app,) = [app for app in config["applications"] if app["name"] == live_service.app_name]
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Ingress"]["user_config"]["gate"]["threshold"] = 20
    deployments["Remover"]["user_config"]["batch_wait_timeout_s"]["512"] = 2.0
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(config, sort_keys=False))

    after = _driver(address, invalid)
    assert after["status"] == "RUNNING" and after["replicas"] == before["replicas"]
    assert after["applications"] == before["applications"], "the session's other applications: untouched"
    assert after["live"]["Remover"]["batch_wait_timeout_s"] == before["live"]["Remover"]["batch_wait_timeout_s"]
    assert "less than or equal to 1" in after["live"]["Remover"]["refused_live"]["error"]
    deadline = time.monotonic() + 30
    while not (ready := live_service.client.get("/readyz")).json().get("refused_live"):
        assert ready.status_code == 200 and time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    assert ready.status_code == 200 and ready.json()["gate"]["threshold"] == threshold
    assert ready.json()["refused_live"][0]["error"].startswith("gate.threshold: Input should be less than or equal to 10")
    response = helpers.post_remove(
        live_service, helpers.png_bytes(helpers.photo()), helpers.png_bytes(helpers.box_mask()), seed=1
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def refusals(monkeypatch, caplog) -> list:
    """The refusal counter's increments (the real counter: Ray refuses some names and tags), and the ERROR log
    on Ray's `ray.serve` logger (which does not propagate)."""
    counted = []
    monkeypatch.setattr(metrics.live_refusals(), "inc", lambda *args, **kwargs: counted.append(args or kwargs))
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    yield counted
    logger.removeHandler(caplog.handler)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def test_an_invalid_live_value_keeps_the_removers_waits_and_is_reported(refusals, caplog):
    remover = object.__new__(Remover.func_or_class)  # no model, no Ray: the live settings only
    remover.settings = RemoverArgs.model_validate({"imaging": {"buckets": [256, 512]}})
    remover.engine_turn = asyncio.Lock()
    remover.queues = {side: remover._bucket_queue(side) for side in remover.settings.imaging.buckets}
    with pytest.raises(ValidationError):  # the first reconfigure: a bad config must not start
        remover.reconfigure({"batch_wait_timeout_s": {"512": 2.0}})
    remover.reconfigure({"batch_wait_timeout_s": {"256": 0.1, "512": 0.2}})

    remover.reconfigure({"batch_wait_timeout_s": {"512": 2.0}})
    remover.reconfigure({"batch_wait_timeout_s": {"1024": 0.1}})  # not a bucket
    assert remover.live()["batch_wait_timeout_s"] == {256: 0.1, 512: 0.2}
    refused = remover.live()["refused_live"]
    assert refused["user_config"] == {"batch_wait_timeout_s": {"1024": 0.1}} and "[1024]" in refused["error"]
    assert len(refusals) == 2
    assert "batch_wait_timeout_s.512: Input should be less than or equal to 1" in _errors(caplog)[0]

    for partial in ({"512": 0.3}, {}):  # a review's {} was taken and changed nothing
        remover.reconfigure({"batch_wait_timeout_s": partial})
        assert "no wait for sides [256" in remover.live()["refused_live"]["error"]
    remover.reconfigure({"batch_wait_timeout_s": {"256": 0.1, "512": 0.3}})
    assert remover.live()["batch_wait_timeout_s"] == {256: 0.1, 512: 0.3} and remover.live()["refused_live"] is None


def test_an_invalid_live_value_keeps_the_scorers_wait(refusals, caplog):
    scorer = object.__new__(Scorer.func_or_class)
    scorer.queue = Batcher(scorer._score_batch, 8, 0.01)
    scorer.reconfigure({"batch_wait_timeout_s": 0.02})
    scorer.reconfigure({"batch_wait_timeout_s": -1})
    assert scorer.queue.wait_s == 0.02 and "greater than or equal to 0" in scorer.refused_live["error"]
    assert len(refusals) == 1 and len(_errors(caplog)) == 1


def test_an_invalid_gate_keeps_the_ingress_serving_with_the_previous_one_and_readyz_says_so(refusals, caplog):
    """A review's gate.threshold 20 took every Ingress replica down (DEPLOY_FAILED, the whole API 503)."""
    import asyncio
    import json
    from types import SimpleNamespace

    async def ready():
        return {"status": "ready"}

    ingress = object.__new__(Ingress.func_or_class.__bases__[0])  # not @serve.ingress's wrapper: its __del__ is async
    ingress.settings = AppSettings()
    ingress.service = SimpleNamespace(settings=ingress.settings, ready=ready)
    with pytest.raises(ValidationError):
        ingress.reconfigure({"gate": {"threshold": 20}})
    ingress.reconfigure({"gate": {"threshold": 0.7}})

    ingress.reconfigure({"gate": {"threshold": 20}})
    assert ingress.service.settings.gate.threshold == 0.7 == ingress.settings.gate.threshold
    body = json.loads(asyncio.run(ingress.readyz()).body)
    assert body["status"] == "ready"
    [refused] = body["refused_live"]
    assert refused["deployment"] == "Ingress" and refused["user_config"] == {"gate": {"threshold": 20}}
    assert refused["error"].startswith("gate.threshold: Input should be less than or equal to 10")
    assert len(refusals) == 1 and "Ingress: refused" in _errors(caplog)[0]
