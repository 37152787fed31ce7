"""`python -m serve run`: start a local Ray + Serve on loopback with the configured or tiny bundle.

It resolves the bundle (flag, ROREM_BUNDLE, the config file; else the tiny bundle, said loudly),
fits the config to this machine (no GPU: no deployment asks for one), writes the effective config,
starts Ray with a known metrics port and hands the config to Ray's own `serve run` (serve.launcher),
and prints what it loaded and where it listens (HTTP, gRPC, metrics) once ready.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from serve.auth import DEFAULT_SCOPES, SCOPES, KeysFile, new_key_entry
from serve.config import BUNDLE_ENV, AppSettings

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
DEFAULT_METRICS_PORT = 9464


def load_serve_config(path: Path) -> dict:
    """Read a Serve config and validate it with Ray's schema and ours (unknown keys rejected)."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        AppSettings.model_validate(app.get("args") or {})
    return config


def fit_to_machine(
    config: dict, bundle: str | None, host: str | None, port: int | None, grpc_port: int | None = None
) -> list[str]:
    """Apply command-line choices and this machine's facts; returns what was changed, to print."""
    notes = []
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    if grpc_port:
        config.setdefault("grpc_options", {})["port"] = grpc_port
    app = config["applications"][0]
    args = app.setdefault("args", {})
    if bundle:
        args.setdefault("bundle", {})["path"] = bundle
    import torch

    if not torch.cuda.is_available():
        for deployment in app.get("deployments", []):
            options = deployment.get("ray_actor_options") or {}
            if options.get("num_gpus"):
                options["num_gpus"] = 0
                notes.append(f"no CUDA GPU here: {deployment['name']} runs on the CPU")
    return notes


def logical_cpus_needed(config: dict) -> int | None:
    """Ray schedules by logical CPUs: if the deployments ask for more than this machine's cores (a
    2-core laptop or CI runner), start Ray with enough so every replica is placed (they share cores)."""
    wanted = 0.0
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            replicas = deployment.get("num_replicas", 1)
            replicas = replicas if isinstance(replicas, int) else 1
            wanted += (deployment.get("ray_actor_options") or {}).get("num_cpus", 1) * replicas
    cores = os.cpu_count() or 1
    return math.ceil(wanted) if wanted > cores else None


def describe_bundle(args: dict) -> str:
    settings = AppSettings.model_validate(args)
    if settings.bundle.path:
        return f"real bundle from {settings.bundle.path}"
    if settings.bundle.authors:
        return f"real RORem weights from the authors' layout {settings.bundle.authors.model_dump()}"
    return (
        "TINY bundle (random weights, removal quality is meaningless): no real bundle is configured. "
        f"Set {BUNDLE_ENV}=/path/to/bundle, pass --bundle, or set bundle.path / bundle.authors in the config."
    )


def add_api_key(keys_file: Path, name: str, scopes: list[str]) -> int:
    """Append a new key's digest to the keys file; the key itself goes to stdout only."""
    data = yaml.safe_load(keys_file.read_text()) if keys_file.exists() else None
    data = data or {"keys": []}
    if any(entry.get("name") == name for entry in data["keys"]):
        print(f"a key named {name!r} is already in {keys_file}", file=sys.stderr)
        return 2
    key, entry = new_key_entry(name, scopes)
    data["keys"].append(entry)
    KeysFile.model_validate(data)
    keys_file.write_text(yaml.safe_dump(data, sort_keys=False))
    print(key)
    print(f"[rorem] stored the SHA-256 of key {name!r} ({', '.join(scopes)}) in {keys_file}", file=sys.stderr)
    return 0


def wait_until_ready(url: str, child: subprocess.Popen, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(1)
    return None


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve")
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="start a local Ray Serve and block")
    run_cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    run_cmd.add_argument("--bundle", default=os.environ.get(BUNDLE_ENV), help=f"bundle folder (default: ${BUNDLE_ENV})")
    run_cmd.add_argument("--host", default=None, help="HTTP host (config default 127.0.0.1)")
    run_cmd.add_argument("--port", type=int, default=None)
    run_cmd.add_argument("--grpc-port", type=int, default=None, help="gRPC port (config default 9000)")
    run_cmd.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Ray's Prometheus export port (GET /metrics)"
    )
    run_cmd.add_argument("--ready-timeout", type=float, default=600.0)
    key_cmd = sub.add_parser("new-key", help="make an API key; print it once and store only its SHA-256")
    key_cmd.add_argument("--name", required=True, help="who holds the key (shown in 403 answers, never the key)")
    key_cmd.add_argument("--scopes", default=",".join(DEFAULT_SCOPES), help=f"comma-separated, of {', '.join(SCOPES)}")
    key_cmd.add_argument("--keys-file", type=Path, required=True, help="YAML keys file to add the entry to")
    options = parser.parse_args(argv)
    if options.command == "new-key":
        return add_api_key(options.keys_file, options.name, [s for s in options.scopes.split(",") if s])

    config = load_serve_config(options.config)
    notes = fit_to_machine(config, options.bundle, options.host, options.port, options.grpc_port)
    app = config["applications"][0]
    http = config["http_options"]
    base_url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{app.get('route_prefix', '/').rstrip('/')}"
    print(f"[rorem] model: {describe_bundle(app.get('args') or {})}", flush=True)
    for note in notes:
        print(f"[rorem] {note}", flush=True)

    effective = Path(tempfile.mkdtemp(prefix="rorem-serve-")) / "serve-config.yaml"
    effective.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"[rorem] effective Serve config: {effective}", flush=True)
    command = [sys.executable, "-m", "serve.launcher", str(effective), "--metrics-port", str(options.metrics_port)]
    num_cpus = logical_cpus_needed(config)
    if num_cpus:
        print(f"[rorem] the deployments ask for {num_cpus} CPUs, this machine has {os.cpu_count()}: they share cores", flush=True)
        command += ["--num-cpus", str(num_cpus)]
    child = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)

    def stop(signum, _frame):
        child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    ready = wait_until_ready(base_url + "/readyz", child, options.ready_timeout)
    if ready is None:
        print("[rorem] the service did not become ready; stopping", file=sys.stderr, flush=True)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        child.wait()
        return 1
    model = ready["model"]
    grpc_port = config.get("grpc_options", {}).get("port", 9000)
    print(
        f"[rorem] READY on {base_url} : POST {base_url}/remove | gRPC {http.get('host', '127.0.0.1')}:{grpc_port}"
        f" | metrics http://127.0.0.1:{options.metrics_port}/metrics | bundle {model['bundle']['name']}"
        f" ({'tiny' if model['tiny'] else 'real'}) on {model['device']} {model['dtype']},"
        f" {model['steps']} steps, buckets {model['buckets']}, gate {ready['gate']['mode']}",
        flush=True,
    )
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()
