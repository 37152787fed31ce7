"""Live settings on a running local Serve: a changed gate and batch waits reach the replicas through
Serve's user_config (`reconfigure`), and no replica is restarted for it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import helpers

# e2e (starts a local Ray Serve): marked through the `starts_serve` fixture, tests/conftest.py

# A driver in its own process, connected to the cluster `python -m serve run` started: the replica ids
# from the controller, each model deployment's live(), and (given a config file) a redeploy first.
_DRIVER = """
import json, sys, time, yaml, ray
from ray.serve.context import _connect
from ray.serve.schema import ServeDeploySchema
from ray import serve

ray.init(address=sys.argv[1], namespace="serve", _node_ip_address="127.0.0.1", log_to_driver=False)
client = _connect()
if len(sys.argv) > 2:
    config = yaml.safe_load(open(sys.argv[2]))
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
details = ray.get(client._controller.get_serve_instance_details.remote())
app = details["applications"]["rorem"]
replicas = {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in app["deployments"].items()}
live = {name: serve.get_deployment_handle(name, "rorem").live.remote().result() for name in ("Remover", "Scorer")}
print("RESULT " + json.dumps({"status": app["status"], "replicas": replicas, "live": live}))
"""


def _cluster(instance: str) -> tuple[str, dict]:
    """The GCS address of the Ray cluster whose processes carry this CLI instance's id (serve.cli.INSTANCE_ENV),
    and its token-auth mode (a new local Ray turns token auth on by default), for a driver to join it."""
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
                return found[1], {"RAY_AUTH_MODE": mode.decode().split("=", 1)[1]}
    raise AssertionError(f"no Ray process of instance {instance} names its GCS address")


def _driver(cluster: tuple[str, dict], config: Path | None = None) -> dict:
    address, env = cluster
    command = [sys.executable, "-c", _DRIVER, address] + ([str(config)] if config else [])
    env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(command, cwd=helpers.REPO, capture_output=True, text=True, timeout=180, env=env, check=False)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"driver failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def live_service(service):
    """The session's Serve: the test changes only live settings, and puts them back (a live change restarts
    nothing, so the other tests find the replicas they had)."""
    effective = Path(re.search(r"effective Serve config: (\S+)", service.log_path.read_text())[1])
    yield service
    restored = _driver(_cluster(service.client.get("/healthz").json()["instance"]), effective)
    assert restored["status"] == "RUNNING"
    assert restored["live"]["Remover"]["batch_wait_timeout_s"] == {"256": 0.25, "512": 0.25}
    deadline = time.monotonic() + 30
    while service.client.get("/readyz").json()["gate"]["threshold"] != 0.5:
        assert time.monotonic() < deadline, "the Ingress never took the gate threshold back"
        time.sleep(0.5)


def test_changing_live_settings_reconfigures_without_restarting_a_replica(live_service, tmp_path):
    instance = live_service.client.get("/healthz").json()["instance"]
    address = _cluster(instance)
    effective = Path(re.search(r"effective Serve config: (\S+)", live_service.log_path.read_text())[1])
    before = _driver(address)
    assert before["status"] == "RUNNING" and all(before["replicas"].values())
    assert before["live"]["Remover"]["batch_wait_timeout_s"] == {"256": 0.25, "512": 0.25}
    assert live_service.client.get("/readyz").json()["gate"]["threshold"] == 0.5

    config = yaml.safe_load(effective.read_text())
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    args_before = json.dumps(config["applications"][0]["args"], sort_keys=True)
    deployments["Ingress"]["user_config"]["gate"]["threshold"] = 0.8
    deployments["Remover"]["user_config"]["batch_wait_timeout_s"]["512"] = 0.05
    deployments["Scorer"]["user_config"]["batch_wait_timeout_s"] = 0.02
    assert json.dumps(config["applications"][0]["args"], sort_keys=True) == args_before, "only user_config changed"
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config, sort_keys=False))

    after = _driver(address, edited)
    assert after["status"] == "RUNNING"
    assert after["replicas"] == before["replicas"], "a live setting must not restart a replica"
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
