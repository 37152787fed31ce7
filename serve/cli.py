"""`python -m serve run`: start a local Ray + Serve on loopback with the configured or tiny bundle.

It resolves the bundle (flag, ROREM_BUNDLE, the config file; else the tiny bundle, said loudly),
fits the config to this machine (no GPU: no deployment asks for one; fewer GPUs than GPU replicas:
they share; a placement that cannot fit is refused, saying what to change), writes the effective config,
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
from serve.config import BUNDLE_ENV, AppSettings, check_deployments

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
DEFAULT_METRICS_PORT = 9464


def load_serve_config(path: Path) -> dict:
    """Read a Serve config and validate it with Ray's schema and ours (unknown keys rejected)."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        check_deployments(AppSettings.model_validate(app.get("args") or {}), app.get("deployments", []))
    return config


def fit_to_machine(
    config: dict,
    bundle: str | None,
    host: str | None,
    port: int | None,
    grpc_port: int | None = None,
    gpus: int | None = None,
) -> list[str]:
    """Apply command-line choices and this machine's facts (`gpus`: None counts the CUDA devices);
    returns what was changed, to print. Raises PlacementError when the deployments cannot be placed."""
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
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    notes += fit_gpus(app.get("deployments", []), gpus)
    return notes


class PlacementError(ValueError):
    """The deployments cannot all be placed on this machine: the message says what to change."""


RAY_RESOURCE_STEP = 1e-4  # Ray rounds fractional resources to this precision


def fit_gpus(deployments: list[dict], gpus: int) -> list[str]:
    """Fit the deployments' GPU requests to this machine's `gpus`, or refuse with what to change.

    No GPU: nothing asks for one. Requests that fit (whole GPUs, or fractions that pack): unchanged.
    Too many whole-GPU replicas for the GPUs (a one-GPU workstation where the Remover and the
    Scorer ask for one each): the GPU replicas share the GPUs evenly, 1 / ceil(replicas / gpus) of
    one each, so Ray can place every replica instead of leaving one pending forever. A replica
    that asks for more than one GPU is never split: refused when it cannot be placed.
    """
    wanting = []
    for deployment in deployments:
        options = deployment.get("ray_actor_options") or {}
        if options.get("num_gpus"):
            wanting.append((deployment, options, _max_replicas(deployment)))
    if not wanting:
        return []
    if gpus <= 0:
        for _, options, _ in wanting:
            options["num_gpus"] = 0
        return [f"no CUDA GPU here: {d['name']} runs on the CPU" for d, _, _ in wanting]
    requests = [options["num_gpus"] for _, options, replicas in wanting for _ in range(replicas)]
    if _packs(requests, gpus):
        return []
    whole = [(d["name"], o["num_gpus"]) for d, o, _ in wanting if o["num_gpus"] > 1]
    if whole:
        name, asked = whole[0]
        raise PlacementError(
            f"{name} asks for {asked:g} GPUs per replica and this machine has {gpus}: lower its "
            f"ray_actor_options.num_gpus (at most 1 lets replicas share a GPU) or its replica count"
        )
    share = math.floor(1 / math.ceil(len(requests) / gpus) / RAY_RESOURCE_STEP) * RAY_RESOURCE_STEP
    for _, options, _ in wanting:
        options["num_gpus"] = round(share, 4)
    names = ", ".join(f"{d['name']} x{r}" for d, _, r in wanting)
    return [
        f"{gpus} GPU(s) here, {len(requests)} GPU replicas ({names}) asked for {sum(requests):g}: they share, "
        f"num_gpus {share:g} each (set ray_actor_options.num_gpus in the config to size them yourself)"
    ]


def _max_replicas(deployment: dict) -> int:
    """Replicas a deployment may run: num_replicas, or its autoscaling ceiling."""
    autoscaling = deployment.get("autoscaling_config") or {}
    replicas = deployment.get("num_replicas", 1)
    if isinstance(replicas, int):
        return replicas
    return int(autoscaling.get("max_replicas", 1))


def _packs(requests: list[float], gpus: int) -> bool:
    """Whether Ray can place these per-replica GPU requests: whole GPUs for requests >= 1, the
    fractions first-fit (largest first) into what is left."""
    whole = sum(math.ceil(r) for r in requests if r >= 1)
    if whole > gpus:
        return False
    free = [1.0] * (gpus - whole)
    for request in sorted((r for r in requests if r < 1), reverse=True):
        for i, left in enumerate(free):
            if request <= left + 1e-9:
                free[i] = left - request
                break
        else:
            return False
    return True


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
    run_cmd.add_argument(
        "--gpus", type=int, default=None, help="GPUs Ray may schedule (default: the CUDA devices here; a count to simulate)"
    )
    key_cmd = sub.add_parser("new-key", help="make an API key; print it once and store only its SHA-256")
    key_cmd.add_argument("--name", required=True, help="who holds the key (shown in 403 answers, never the key)")
    key_cmd.add_argument("--scopes", default=",".join(DEFAULT_SCOPES), help=f"comma-separated, of {', '.join(SCOPES)}")
    key_cmd.add_argument("--keys-file", type=Path, required=True, help="YAML keys file to add the entry to")
    options = parser.parse_args(argv)
    if options.command == "new-key":
        return add_api_key(options.keys_file, options.name, [s for s in options.scopes.split(",") if s])

    config = load_serve_config(options.config)
    try:
        notes = fit_to_machine(config, options.bundle, options.host, options.port, options.grpc_port, options.gpus)
    except PlacementError as exc:
        print(f"[rorem] cannot start: {exc}", file=sys.stderr, flush=True)
        return 2
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
    if options.gpus is not None:
        command += ["--num-gpus", str(options.gpus)]
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
