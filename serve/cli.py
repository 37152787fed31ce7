"""`python -m serve run`: start a local Ray + Serve on loopback with the configured or tiny bundle.

It resolves the bundle (flag, ROREM_BUNDLE, the config file; else the tiny bundle, said loudly),
fits the config to this machine (no GPU: no deployment asks for one; fewer GPUs than GPU replicas:
they share; a placement that cannot fit is refused, saying what to change), writes the effective config,
starts Ray with a known metrics port and hands the config to Ray's own `serve run` (serve.launcher),
and prints what it loaded and where it listens (HTTP, gRPC where the config serves it, metrics) once ready.
A config may hold several applications (each its own name, route prefix and args: one Ray, one proxy for them
all, the proxy's body settings per route prefix, serve.proxy_limits); READY comes once every one is, a line each.

Start and stop as people expect: a busy HTTP, gRPC or metrics port fails the start at once, naming
the port and its holder; READY is printed only once *this* instance answers (/healthz returns the
instance id this start generated); SIGTERM or SIGINT stops the service and every Ray process it
started within STOP_BUDGET_S (Docker gives 10 s): new HTTP requests and gRPC calls get `stopping`, those in
flight finish or get it too (serve.proxy_middleware.Drain, serve.grpc_gate), then Serve shuts down, and whatever is left of the
launcher's session is killed. A second signal skips the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml
from pydantic import ValidationError

from engines.hub_refs import local_path
from serve.auth import DEFAULT_SCOPES, SCOPES, ApiKeys, KeysFile, new_key_entry
from serve.config import app_name, route_prefix
from serve.ports import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, REFUSED_BY_THE_SYSTEM, busy_ports, url_host
from serve.proxy_middleware import DRAIN_FLAG_ENV, DRAIN_GRACE_S, DRAIN_PATH

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
DEFAULT_METRICS_PORT = 9464
READY_TIMEOUT_S = 600.0
STOP_BUDGET_S = 9.0  # signal to every process gone, under Docker's 10 s grace before SIGKILL


def load_serve_config(path: Path) -> dict:
    """Read a Serve config and validate it with Ray's schema and ours, unknown keys rejected
    (serve.config.validate_serve_config), and as its live form is rendered (serve.config.live_serve_config)."""
    from serve.config import live_serve_config, validate_serve_config

    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"not a Serve config (a mapping: applications, http_options, ...) but {type(config).__name__}")
    validate_serve_config(config)
    live_serve_config(config)  # refuses a user_config or backpressure_config, which the args are the source of
    return config


# taken from the folder `python -m serve run` starts in (Ray's processes run in the repository)
LOCAL_PATHS = (
    ("bundle", "path"), ("bundle", "cache_dir"), ("auth", "keys_file"), ("engine", "runner_path"),
    ("retention", "object_store", "path"),
    *(("bundle", "authors", piece) for piece in ("base", "unet", "lcm_lora", "discriminator", "discriminator_unet")),
)  # fmt: skip


def fit_to_machine(
    config: dict,
    bundle: str | None,
    host: str | None,
    port: int | None,
    grpc_port: int | None = None,
    gpus: int | None = None,
) -> list[str]:
    """Apply command-line choices and this machine's facts (`gpus`: None counts them as Ray will);
    returns what was changed, to print. Raises PlacementError when the deployments cannot be placed."""
    notes = []
    choose_ports(config, host, port, grpc_port)
    applications = config["applications"]
    if bundle and len(applications) > 1:
        from serve.config import BUNDLE_ENV

        raise PlacementError(
            f"--bundle / ${BUNDLE_ENV} names one bundle, and this config has {len(applications)} applications: name "
            f"each one's bundle.path in the config (and unset {BUNDLE_ENV})"
        )
    for app in applications:
        args = app.setdefault("args", {})
        if bundle:
            args.setdefault("bundle", {})["path"] = bundle
        for keys in LOCAL_PATHS:
            holder = args
            for key in keys[:-1]:
                holder = holder.get(key) if isinstance(holder, dict) else None
            value = holder.get(keys[-1]) if isinstance(holder, dict) else None
            local = local_path(value)
            if local and not local.is_absolute():
                holder[keys[-1]] = str(local.resolve())
        retention = args.get("retention")
        if isinstance(retention, dict) and isinstance(retention.get("database_url"), str):
            retention["database_url"] = local_sqlite_url(retention["database_url"])
    if gpus is None:
        gpus = visible_gpus()
    several = len(applications) > 1
    deployments = [
        (f"{app_name(app)}/{d['name']}" if several else d["name"], d)
        for app in applications
        for d in app.get("deployments", [])
    ]
    notes += fit_gpus(deployments, gpus)
    for app in applications:
        check_this_machine_runs_it(app, gpus, f"application {app_name(app)}: " if several else "")
    notes += host_names_note(config)
    return notes


def check_this_machine_runs_it(app: dict, gpus: int, which: str = "") -> None:
    """What an application needs of this machine, where Ray will run it: a GPU for a model deployment set to device
    cuda (serve.config.cuda_without_a_gpu; without a GPU here fit_gpus gave it num_gpus 0), and the driver of its
    result store's database (the service started without it, and answered every result route 503 for ever). `app`:
    fitted (fit_gpus); args that do not validate are left to validate_serve_config."""
    from serve.config import AppSettings, cuda_without_a_gpu

    try:
        settings = AppSettings.model_validate(app.get("args") or {})
    except ValidationError:
        return
    why = "this machine has no CUDA GPU" if gpus <= 0 else "its ray_actor_options.num_gpus is 0 or unset"
    problem = cuda_without_a_gpu(settings, app.get("deployments", []), why)
    if problem:
        raise PlacementError(which + problem)
    refused = settings.retention.database_url_refused(driver=True)
    if refused:
        raise PlacementError(which + refused)


SQLITE_URL = re.compile(r"(sqlite(?:\+\w+)?:///)(.*)")  # SQLAlchemy: three slashes, then the file's path


def database_url_env() -> dict[str, str]:
    """$ROREM_RETENTION_DATABASE_URL for Ray's processes, a relative SQLite file made absolute from the folder the
    CLI starts in as retention.database_url is: they run in the repository, where it named another file."""
    from serve.config import DATABASE_URL_ENV

    url = os.environ.get(DATABASE_URL_ENV)
    return {DATABASE_URL_ENV: local_sqlite_url(url)} if url else {}


def local_sqlite_url(url: str) -> str:
    """A SQLite URL's file as an absolute path: a relative one taken from the folder the CLI starts in, as the other
    local paths are (Ray's processes run in the repository), `~` expanded (SQLite does not). An in-memory database,
    a `file:` URI and any other URL as given."""
    found = SQLITE_URL.fullmatch(url)
    if not found:
        return url
    path, mark, query = found[2].partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return found[1] + str(Path(path).expanduser().resolve()) + mark + query


def _listener(config: dict) -> tuple[str, bool]:
    """(the HTTP host, whether that host is loopback: serve.auth.is_loopback_host) of this config."""
    from serve.auth import is_loopback_host

    host = config.get("http_options", {}).get("host", "127.0.0.1")
    return host, is_loopback_host(host)


def _auth(app: dict) -> dict:
    return (app.get("args") or {}).get("auth") or {}


def grpc_access_env(config: dict) -> dict[str, str]:
    """Ray's gRPC proxy listens on every interface: while HTTP listens on loopback only, an application without
    keys answers gRPC from loopback peers only (serve.auth; one with keys lets its keys decide), so the two APIs
    are reachable alike."""
    from serve.auth import GRPC_LOOPBACK_ONLY_ENV

    return {GRPC_LOOPBACK_ONLY_ENV: "1" if _listener(config)[1] else "0"}


def ray_network_env(config: dict) -> dict[str, str]:
    """On a loopback host, Ray itself on loopback too (serve.local_ray: its ports take work from whoever reaches
    them); beyond it (a container's --host 0.0.0.0: Prometheus scrapes the metrics port from outside), Ray's own
    choice, the machine's network address. Either way with Ray's token authentication on whatever the environment
    says (Ray's own default, while RAY_AUTH_MODE is unset, logs an invitation to turn it off)."""
    from serve.local_ray import RAY_LOOPBACK_ENV, RAY_TOKEN_AUTH_ENV

    return {**(RAY_LOOPBACK_ENV if _listener(config)[1] else {}), **RAY_TOKEN_AUTH_ENV}


def host_names_note(config: dict) -> list[str]:
    """Listening without keys beyond loopback, or on a loopback address a client names otherwise (127.0.0.2): the
    keyed routes still answer only loopback Host names (serve.auth, DNS rebinding), which that client does not
    send; beyond loopback gRPC answers every machine. Said at the start, not as a 403 later."""
    from serve.auth import LOOPBACK_HOSTS

    host, loopback = _listener(config)
    named = url_host(host).lower().rstrip(".") in LOOPBACK_HOSTS
    notes = []
    for app in config["applications"]:
        auth = _auth(app)
        if auth.get("enabled"):
            continue
        said = []
        if auth.get("allowed_hosts") is None and not named:
            said.append(
                f"/remove and the other API routes answer only the Host names {', '.join(LOOPBACK_HOSTS)}; set "
                "auth.allowed_hosts in the config to the names clients use (or turn keys on: docs/api.md, Access "
                "control)"
            )
        if not loopback:
            said.append("gRPC answers every machine that reaches its port (turn keys on to choose who may call)")
        if said:
            which = f" (application {app_name(app)})" if len(config["applications"]) > 1 else ""
            notes.append(f"listening on {host} without API keys{which}: {'; '.join(said)}")
    return notes


def visible_gpus() -> int:
    """The GPUs Ray will give this node, by its own detection (the driver's count, capped by
    CUDA_VISIBLE_DEVICES; ray/_private/resource_and_label_spec.py): importing torch to count them cost
    the CLI 2-3 s of every start."""
    from ray._private import accelerators

    manager = accelerators.get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))


def serves_grpc(config: dict) -> bool:
    """Whether Ray starts a gRPC proxy for this config: only on a port above 0 with servicer functions to add to
    it (ray.serve._private.utils' own test)."""
    grpc = config.get("grpc_options") or {}
    return grpc.get("port", DEFAULT_GRPC_PORT) > 0 and bool(grpc.get("grpc_servicer_functions"))


def choose_ports(config: dict, host: str | None, port: int | None, grpc_port: int | None) -> None:
    """The command line's listen address and ports over the config's (--grpc-port over a grpc_options.port of 0 or
    below too, which alone serves no gRPC); a gRPC port for a config without servicer functions is an error
    (ValueError), not a port nothing listens on."""
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    if grpc_port:
        if not (config.get("grpc_options") or {}).get("grpc_servicer_functions"):
            from serve.grpc_servicer import SERVICER_FUNCTION

            raise ValueError(
                "--grpc-port: this config serves no gRPC (grpc_options.grpc_servicer_functions is empty; "
                f"serve/configs/local.yaml lists {SERVICER_FUNCTION}): add it, or leave out --grpc-port"
            )
        config.setdefault("grpc_options", {})["port"] = grpc_port


def listen_addresses(config: dict, metrics_port: int) -> dict[str, tuple[str, int]]:
    """Where the service will listen: HTTP on the config's host, gRPC (where it serves it) on all interfaces
    ([::], as Ray's gRPC proxy binds), Ray's metrics export on loopback (the launcher's node IP)."""
    http = config.get("http_options") or {}
    grpc = config.get("grpc_options") or {}
    return {
        "HTTP": (http.get("host", "127.0.0.1"), http.get("port", DEFAULT_HTTP_PORT)),
        **({"gRPC": ("::", grpc.get("port", DEFAULT_GRPC_PORT))} if serves_grpc(config) else {}),
        "metrics": ("127.0.0.1", metrics_port),
    }


def without_ray_address(environ: dict[str, str]) -> dict[str, str]:
    """The environment less $RAY_ADDRESS: the launcher starts a Ray of its own (serve.launcher), and Ray's `serve
    run` and its processes would otherwise reach the cluster it names."""
    from ray._private.ray_constants import RAY_ADDRESS_ENVIRONMENT_VARIABLE

    return {name: value for name, value in environ.items() if name != RAY_ADDRESS_ENVIRONMENT_VARIABLE}


# Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a replica given no GPU (ray-project/ray#54868), so a deployment
# at num_gpus 0 with device "auto" would still find the GPU and load there, outside Ray's accounting (and
# `--gpus 0` would say "runs on the CPU" and not mean it); this restores Ray's hiding of the GPUs from it
HIDE_GPUS_FROM_CPU_REPLICAS_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


class PlacementError(ValueError):
    """The deployments cannot all be placed on this machine: the message says what to change."""


RAY_RESOURCE_STEP = 1e-4  # Ray rounds fractional resources to this precision


def fit_gpus(deployments: list[tuple[str, dict]], gpus: int) -> list[str]:
    """Fit the deployments' GPU requests to this machine's `gpus`, or refuse with what to change. `deployments`:
    (the name to print, the config's deployment entry, fitted in place).

    No GPU: nothing asks for one. Requests that fit (whole GPUs, or fractions that pack): unchanged.
    Too many whole-GPU replicas for the GPUs (a one-GPU workstation where the Remover and the
    Scorer ask for one each): the GPU replicas share the GPUs evenly, 1 / ceil(replicas / gpus) of
    one each, so Ray can place every replica instead of leaving one pending forever. A replica
    that asks for more than one GPU is never split: refused when it cannot be placed. An autoscaling
    deployment is fitted at the replicas it starts with: splitting a GPU for every replica it may reach would
    give each a sliver (100 for "auto") and run out of GPU memory as it scales; replicas beyond what the GPUs
    hold wait for one, and the notes say so.
    """
    wanting = []
    for name, deployment in deployments:
        options = deployment.get("ray_actor_options") or {}
        if options.get("num_gpus"):
            wanting.append((name, options, *_replica_range(deployment)))
    if not wanting:
        return []
    if gpus <= 0:
        for _, options, _, _ in wanting:
            options["num_gpus"] = 0
        return [f"no CUDA GPU here: {name} runs on the CPU" for name, _, _, _ in wanting]
    requests = [options["num_gpus"] for _, options, replicas, _ in wanting for _ in range(replicas)]
    notes = []
    if not _packs(requests, gpus):
        notes.append(_shared(wanting, requests, gpus))
    most = [options["num_gpus"] for _, options, _, replicas in wanting for _ in range(replicas)]
    if not _packs(most, gpus):
        scaling = ", ".join(f"{name} up to {top}" for name, _, start, top in wanting if top > start)
        notes.append(f"autoscaling ({scaling}): replicas beyond what the {gpus} GPU(s) hold wait for one")
    return notes


def _shared(wanting: list[tuple[str, dict, int, int]], requests: list[float], gpus: int) -> str:
    """Share the GPUs evenly between the replicas `requests` stands for, or refuse; the note saying so."""
    whole = [(name, o["num_gpus"]) for name, o, _, _ in wanting if o["num_gpus"] > 1]
    if whole:
        too_big = [(name, asked) for name, asked in whole if asked > gpus]
        if too_big:
            name, asked = too_big[0]
            raise PlacementError(
                f"{name} asks for {asked:g} GPUs per replica and this machine has {gpus}: lower its "
                f"ray_actor_options.num_gpus (at most 1 lets replicas share a GPU) or its replica count"
            )
        asks = ", ".join(f"{name} {o['num_gpus']:g} x{r}" for name, o, r, _ in wanting)
        raise PlacementError(
            f"the GPU replicas ask for {sum(requests):g} GPUs in all ({asks} replicas) and this machine has {gpus}: "
            f"lower ray_actor_options.num_gpus of {', '.join(name for name, _ in whole)} (at most 1 lets "
            f"replicas share a GPU) or the replica counts"
        )
    share = math.floor(1 / math.ceil(len(requests) / gpus) / RAY_RESOURCE_STEP) * RAY_RESOURCE_STEP
    for _, options, _, _ in wanting:
        options["num_gpus"] = round(share, 4)
    names = ", ".join(f"{name} x{r}" for name, _, r, _ in wanting)
    return (
        f"{gpus} GPU(s) here, {len(requests)} GPU replicas ({names}) asked for {sum(requests):g}: they share, "
        f"num_gpus {share:g} each (set ray_actor_options.num_gpus in the config to size them yourself)"
    )


def _replica_range(deployment: dict) -> tuple[int, int]:
    """(the replicas a deployment starts with, the most it may run): num_replicas twice, or its autoscaling_config
    as Ray fills it in: initial_replicas (else min_replicas) and max_replicas; with num_replicas left out or null
    Ray's defaults are 1 and 1, with "auto" 1 and 100, under what the config gives."""
    replicas = deployment.get("num_replicas")
    if isinstance(replicas, int):
        return replicas, replicas
    from ray.serve.config import AutoscalingConfig

    defaults = AutoscalingConfig.default() if replicas == "auto" else AutoscalingConfig()
    autoscaling = deployment.get("autoscaling_config") or {}
    low = autoscaling.get("min_replicas", defaults.min_replicas)
    start = autoscaling.get("initial_replicas") or max(low, 1)
    return int(start), int(autoscaling.get("max_replicas", defaults.max_replicas))


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


def ray_cpus() -> int:
    """The logical CPUs Ray gives this node by its own detection: a container's CPU quota (docker run --cpus 2 on
    a 16-core host: 2), else the cores; not os.cpu_count(), which counts the host's cores in a container."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus(override_docker_cpu_warning=True)


def logical_cpus_needed(config: dict) -> int | None:
    """Ray schedules by logical CPUs: if the deployments ask for more than Ray would see here (ray_cpus: a 2-core
    laptop or CI runner, a container's CPU quota), start Ray with enough so every replica is placed (they share
    cores).
    `config`: the effective one (serve.config.live_serve_config), which lists every deployment an application
    builds but the ResultStore, whose options live in code; Ray gives a replica 1 CPU unless told otherwise (a
    config that listed no deployments was counted 0 and its replicas waited for CPUs forever)."""
    from serve.config import AppSettings
    from serve.retention_deployment import ResultStore

    wanted = 0.0
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            wanted += (deployment.get("ray_actor_options") or {}).get("num_cpus", 1) * _replica_range(deployment)[1]
        if AppSettings.model_validate(app.get("args") or {}).retention.enabled:
            wanted += ResultStore.ray_actor_options.get("num_cpus", 1) * ResultStore.num_replicas
    return math.ceil(wanted) if wanted > ray_cpus() else None


def describe_bundle(args: dict) -> str:
    from serve.config import BUNDLE_ENV, AppSettings

    settings = AppSettings.model_validate(args)
    if settings.bundle.path:
        return f"real bundle from {settings.bundle.path}"
    if settings.bundle.authors:
        return f"real RORem weights from the authors' layout {settings.bundle.authors.model_dump()}"
    return (
        "TINY bundle (random weights, removal quality is meaningless): no real bundle is configured. "
        f"Set {BUNDLE_ENV}=/path/to/bundle, pass --bundle, or set bundle.path / bundle.authors in the config."
    )


BUNDLE_MANIFEST = "manifest.json"  # engines.bundle.MANIFEST, not imported: torch and diffusers (a test: equal)


def missing_model_files(args: dict, config: Path, app: str | None = None, path_from: str | None = None) -> str | None:
    """Why bundle.path cannot be a bundle, a local piece of bundle.authors is not there, engine.runner_path is not a
    file, or the bundle (a path's or the tiny one) records no export of the runner, on this machine, before Ray starts
    (a replica would fail on it ~20 s later, after Ray's start); None where they may be. The authors' pieces are
    checked for existence only: the import names each missing file. `config`: the Serve config's file, and `app` the
    application's name where it has several, for the export command said. `path_from`: where bundle.path came from
    when not the config (--bundle, the environment)."""
    path = ((args.get("bundle") or {}).get("path")) or None
    if path and not (Path(path).expanduser() / BUNDLE_MANIFEST).is_file():
        where = "no such folder" if not Path(path).expanduser().exists() else f"no {BUNDLE_MANIFEST} in it"
        given = f" (from {path_from})" if path_from else ""
        return (
            f"bundle.path {path}{given} is not a bundle ({where}); docs/operations.md, Model bundles, says how to make"
            " one"
        )
    authors = (args.get("bundle") or {}).get("authors") or {}
    absent = [
        f"bundle.authors.{piece} {ref}" for piece, ref in authors.items()
        if (local := local_path(ref)) and not local.exists()
    ]  # fmt: skip
    if absent:
        return (
            f"{', '.join(absent)}: no such file or folder; docs/operations.md, Model bundles, says where the authors "
            "publish each piece"
        )
    engine = args.get("engine") or {}
    runner_path = engine.get("runner_path") or None
    if runner_path and not Path(runner_path).expanduser().is_file():
        return f"engine.runner_path {runner_path}: no such file"
    runner = engine.get("runner", "torch")
    if runner != "torch" and not runner_path and not (runner == "onnx" and engine.get("export_missing")):
        return _no_export_recorded(args, runner, config, app)
    return None


def _no_export_recorded(args: dict, runner: str, config: Path, app: str | None) -> str | None:
    """Why a bundle cannot serve the onnx or tensorrt runner: it records no export of that kind at all (every Remover
    replica failed on it inside Ray). Whether the one it records is current, of the dtype and GPU the replica uses,
    is the replica's check (engines.runners.current_export), which needs torch. The command said takes the config,
    so that what it records is checked at the buckets served (without it, 256 and 512 px only)."""
    from serve.config import BundleSettings

    settings = BundleSettings.model_validate(args.get("bundle") or {})
    bundle = settings.folder()
    if bundle is None:
        return None  # the authors' layout, imported at start
    try:
        exports = json.loads((bundle / BUNDLE_MANIFEST).read_text()).get("provenance", {}).get("exports") or {}
    except FileNotFoundError:
        exports = {} if settings.is_tiny() else None  # the tiny bundle is made at the first start, with none
    except (OSError, ValueError, AttributeError):
        exports = None
    if exports is None:
        return None  # the replica's Bundle.load says what is wrong with it
    if any(str(key).startswith(f"{runner}.") for key in exports):  # engines.runners.export_key (a test: equal)
        return None
    fix = "set engine.export_missing: true (exported at start), " if runner == "onnx" else ""
    named = "the tiny bundle" if settings.is_tiny() else "bundle.path"
    command = f"python -m export all --config {shlex.quote(str(config))}"
    if app is not None:
        command += f" --app {shlex.quote(app)}"  # export reads the first application otherwise
    if settings.path:
        command += f" --bundle {shlex.quote(str(bundle))}"  # --bundle or ROREM_BUNDLE may be the config's no more
    return (
        f"engine.runner {runner}: {named} {bundle} records no {runner} export: run `{command}` (docs/operations.md, "
        f"Exported UNet), {fix}or set engine.runner_path"
    )


def unreadable_keys(args: dict) -> str | None:
    """Why the keys file of an application with auth on cannot be read, on this machine, before Ray starts (the
    Ingress would fail its start on it inside Ray); None where it reads."""
    auth = args.get("auth") or {}
    if not auth.get("enabled"):
        return None
    try:
        ApiKeys(auth["keys_file"])
    except ValueError as exc:
        return f"auth.keys_file: {exc}; `python -m serve new-key` writes one"
    return None


def keys_state(args: dict) -> str:
    """For the READY line: whether API keys are on, and from which file."""
    auth = args.get("auth") or {}
    return f"API keys on ({auth.get('keys_file')})" if auth.get("enabled") else "API keys off"


def add_api_key(keys_file: Path, name: str, scopes: list[str], team: str | None = None, **quotas) -> int:
    """Append a new key's digest to the keys file; the key itself goes to stdout only."""
    from serve.config import invalid_because

    def refuse(reason: str) -> int:
        print(f"cannot add key {name!r} to {keys_file}: {reason}", file=sys.stderr)
        return 2

    if not scopes:
        return refuse(f"give it at least one scope (--scopes, of {', '.join(SCOPES)}): without one it can call nothing")
    if not keys_file.parent.is_dir():
        return refuse(f"the folder {keys_file.parent} does not exist")
    try:
        data = (yaml.safe_load(keys_file.read_text()) if keys_file.exists() else None) or {"keys": []}
        KeysFile.model_validate(data)  # its shape before it is added to (`keys: null` was a traceback)
        key, entry = new_key_entry(name, scopes, team, **quotas)  # quotas: requests_per_minute, max_concurrent
        data["keys"].append(entry)
        KeysFile.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        return refuse(invalid_because(exc, root="file") if not isinstance(exc, OSError) else str(exc))
    try:
        replace_file(keys_file, yaml.safe_dump(data, sort_keys=False))
    except OSError as exc:
        return refuse(f"{exc} (the file is as it was)")
    print(key)
    print(f"[rorem] stored the SHA-256 of key {name!r} ({', '.join(scopes)}) in {keys_file}", file=sys.stderr)
    return 0


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole: a temporary file in its folder, renamed over it, with its permissions and owner (a new
    file is the owner's only, 0600: it got 0666 less the umask, world-readable). A running service re-reads its keys file at any moment: it sees the old file or the
    new one. Where this user cannot give the new file the old one's owner and group (not root), or cannot
    create files in its folder, the file is rewritten in place instead, as the service can still read it; its
    reader retries a read that caught the file half-written (serve.auth)."""
    path = Path(os.path.realpath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except PermissionError:
        if old is None:
            raise
        _rewrite_in_place(path, text)
        return
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if old is None:
            os.chmod(tmp, 0o600)  # mkstemp's already; said here, as it is the keys' digests
        else:
            with contextlib.suppress(OSError):
                os.chown(tmp, old.st_uid, old.st_gid)
            with contextlib.suppress(OSError):
                os.chown(tmp, -1, old.st_gid)
            made = os.stat(tmp)
            if (made.st_uid, made.st_gid) != (old.st_uid, old.st_gid):
                Path(tmp).unlink()
                _rewrite_in_place(path, text)
                return
            os.chmod(tmp, old.st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rewrite_in_place(path: Path, text: str) -> None:
    """Overwrite the file's bytes, keeping its inode, owner and mode: the space is reserved first, so a full disk
    fails before the old contents are touched (a truncating write would leave a cut-off keys file)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, max(len(data), 1))
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


READY_POLL_S = 0.25  # READY within a quarter second of the service being up; two small GETs each time


def wait_until_ready(
    base_url: str, instance: str, child: subprocess.Popen, timeout_s: float, stop: StopRequest,
    application: str | None = None,
) -> dict | None:
    """/readyz's answer once every model deployment is up (not merely "degraded": READY means the whole
    service) and /healthz says it is this instance (and `application`: until an application's route is up, Ray
    routes its address to an application at a shorter prefix, "/"); None if the launcher exits, a stop is
    requested or time runs out. Another instance answering is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None and not stop.requested.is_set():
        try:
            ready = _get_json(base_url + "/readyz")
            health = _get_json(base_url + "/healthz")
            answering = health.get("instance")
        except (urllib.error.URLError, OSError, ValueError):
            stop.requested.wait(READY_POLL_S)
            continue
        except http.client.HTTPException as exc:
            raise ForeignInstance(
                f"{base_url} answers, but not in HTTP/1.1 ({type(exc).__name__}): something else, such as "
                "one of Ray's own gRPC servers, took the port; choose another with --port"
            ) from exc
        if answering != instance:
            raise ForeignInstance(
                f"{base_url} is answered by another instance ({answering!r}), not this one ({instance})"
            )
        if ready.get("status") == "ready" and application in (None, health.get("application")):
            return ready
        stop.requested.wait(READY_POLL_S)
    return None


class ForeignInstance(RuntimeError):
    """Something else answers on this instance's address."""


# the service's own address, never through $http_proxy: urlopen would send loopback polls to a proxy unless
# no_proxy names that exact host, and READY would never come
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str) -> dict:
    with _DIRECT.open(url, timeout=2) as response:
        return json.loads(response.read())


# SIGHUP too: a closed terminal or a dropped SSH session would otherwise end this process at once, and the
# launcher's session (Ray, its ports, the GPU) would live on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """A stop signal (STOP_SIGNALS): the first asks for a stop with drain, the second for a stop now."""

    def __init__(self):
        self.requested = threading.Event()
        self.signals = 0

    def __call__(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            _off_the_hung_up_terminal()
        self.signals += 1
        self.requested.set()

    def install(self) -> None:
        """On every STOP_SIGNALS but a SIGHUP the CLI was started to ignore (nohup)."""
        for signum in STOP_SIGNALS:
            if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self)

    def hurry_now(self) -> None:
        self.signals = max(self.signals, 2)
        self.requested.set()

    @property
    def hurry(self) -> bool:
        return self.signals > 1


def _off_the_hung_up_terminal() -> None:
    """After a hangup the terminal answers every write with EIO: the stop's first message would end the CLI before
    it stopped anything. Its output on that terminal goes to /dev/null instead (a pipe or a file stays)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # closed: nothing to move
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (isatty's ioctl fails on one hung up)
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stop_service(child: subprocess.Popen, root_url: str, drain_flag: Path, stop: StopRequest) -> int:
    """Drain (new requests and gRPC calls refused `stopping`, those in flight answered), stop Serve and Ray, then
    kill what is left of the launcher's session, all within STOP_BUDGET_S. Returns the launcher's exit status."""
    started = time.monotonic()
    deadline = started + STOP_BUDGET_S
    print(
        "[rorem] stopping: new requests and gRPC calls get `stopping`, those in flight are answered first",
        file=sys.stderr,
        flush=True,
    )
    if child.poll() is None and not stop.hurry:
        drain_flag.touch()
        _wait_drained(root_url + DRAIN_PATH, min(deadline, started + DRAIN_GRACE_S + 1), stop)
    if child.poll() is None:
        child.send_signal(signal.SIGINT)  # the launcher stops Ray
    while child.poll() is None and time.monotonic() < deadline and not stop.hurry:
        time.sleep(0.1)
    left = kill_session(child.pid)
    code = child.wait()
    print(
        f"[rorem] stopped in {time.monotonic() - started:.1f} s"
        + (f" ({left} leftover process(es) killed)" if left else ""),
        file=sys.stderr,
        flush=True,
    )
    return code


def _wait_drained(url: str, until: float, stop: StopRequest) -> None:
    """Until the proxy reports no request in flight (Drain answers the last ones 503 after its grace)."""
    while time.monotonic() < until and not stop.hurry:
        try:
            if _get_json(url)["in_flight"] == 0:
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass  # not up (yet, or any more): nothing to wait for that the deadline does not bound
        time.sleep(0.1)


def kill_session(sid: int) -> int:
    """SIGKILL every process of session `sid` (the launcher's: Ray's GCS, raylet, workers, replicas);
    the count killed. Linux: from /proc; elsewhere the launcher's process group."""
    pids = session_members(sid)
    if pids is None:
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)


def session_members(sid: int) -> list[int] | None:
    """The pids in session `sid` (alive, not zombies), or None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def port_number(text: str) -> int:
    """argparse type: a TCP port (a larger number failed deep in the port check with an OverflowError)."""
    port = _whole_number(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def gpu_count(text: str) -> int:
    """argparse type: GPUs Ray may schedule (a negative count reached Ray)."""
    count = _whole_number(text)
    if count < 0:
        raise argparse.ArgumentTypeError(f"{count}: a GPU count is 0 or more")
    return count


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line (`python -m serve ...`); the Dockerfile's CMD is checked against it."""
    from serve.grpc_client import deadline  # seconds above 0: a --ready-timeout of 0, less or NaN never waited

    parser = argparse.ArgumentParser(prog="python -m serve")
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="start a local Ray Serve and block")
    check_cmd = sub.add_parser(
        "check", help="check a config as `run` would start it here, without starting anything (exit 0: it would)"
    )
    shown = DEFAULT_CONFIG.relative_to(Path(__file__).parents[1])
    for command in (run_cmd, check_cmd):
        command.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"Serve config (default: {shown})")
        command.add_argument("--bundle", default=None, help="bundle folder (default: $ROREM_BUNDLE)")
        command.add_argument("--host", default=None, help="HTTP host (config default 127.0.0.1)")
        command.add_argument(
            "--port", type=port_number, default=None, help=f"HTTP port (config default {DEFAULT_HTTP_PORT})"
        )
        command.add_argument(
            "--grpc-port", type=port_number, default=None, help=f"gRPC port (config default {DEFAULT_GRPC_PORT})"
        )
        command.add_argument(
            "--metrics-port",
            type=port_number,
            default=DEFAULT_METRICS_PORT,
            help=f"Ray's Prometheus export port (GET /metrics; default {DEFAULT_METRICS_PORT})",
        )
        command.add_argument(
            "--gpus",
            type=gpu_count,
            default=None,
            help="GPUs Ray may schedule (default: the CUDA devices here; a count to simulate)",
        )
    run_cmd.add_argument(
        "--ready-timeout", type=deadline, default=READY_TIMEOUT_S,
        help=f"seconds to wait for READY (default {READY_TIMEOUT_S:g})",
    )  # fmt: skip
    check_cmd.add_argument(
        "--effective", type=Path, default=None, help="write the Serve config `run` would hand Ray to this file"
    )
    key_cmd = sub.add_parser("new-key", help="make an API key; print it once and store only its SHA-256")
    key_cmd.add_argument("--name", required=True, help="who holds the key (shown in 403 answers, never the key)")
    key_cmd.add_argument(
        "--scopes",
        default=",".join(DEFAULT_SCOPES),
        help=f"comma-separated, of {', '.join(SCOPES)} (default: {','.join(DEFAULT_SCOPES)})",
    )
    key_cmd.add_argument("--keys-file", type=Path, required=True, help="YAML keys file to add the entry to")
    key_cmd.add_argument("--team", default=None, help="keys of one team share their retained results (default: none)")
    key_cmd.add_argument(
        "--requests-per-minute", type=int, default=None, help="quota of /remove + /score (default: none)"
    )
    key_cmd.add_argument(
        "--max-concurrent", type=int, default=None, help="of those in progress at once (default: none)"
    )
    return parser


def app_url(root_url: str, app: dict) -> str:
    """An application's base URL: the HTTP address and its route prefix."""
    return root_url + route_prefix(app).rstrip("/")


def ready_line(
    app: dict, root_url: str, ready: dict, grpc: str | None, metrics_port: int, instance: str, applications: int
) -> str:
    """What an application serves, from its /readyz answer (`grpc`: the gRPC address, None without gRPC); with
    several applications, each gRPC call names its own in the `application` metadata (Ray's gRPC proxy routes by
    it)."""
    url = app_url(root_url, app)
    model = ready["model"]
    name = app_name(app)
    grpc_note = f" (metadata application={name})" if applications > 1 else ""
    grpc_part = f" | gRPC {grpc}{grpc_note}" if grpc else ""
    return (
        f"[rorem] READY on {url} : POST {url}/remove{grpc_part}"
        f" | metrics http://127.0.0.1:{metrics_port}/metrics | bundle {model['bundle']['name']}"
        f" ({'tiny' if model['tiny'] else 'real'}) on {model['device']} {model['dtype']},"
        f"{' ' + model['runner'] + ' runner,' if model.get('runner') else ''}"
        f" {model['steps']} steps, buckets {model['buckets']}, gate {ready['gate']['mode']}"
        f" | {keys_state(app.get('args') or {})} | instance {instance}"
    )


class CannotStart(Exception):
    """Why a config cannot start here, a line each (`[rorem] cannot start: ...`), and what to do (`hint`)."""

    def __init__(self, *lines: str, hint: str = ""):
        super().__init__(*lines)
        self.hint = hint


def startable_config(options: argparse.Namespace, ports_free: bool) -> tuple[dict, list[str]]:
    """The config as `run` starts it, with what it fitted to this machine (notes): validated with Ray's schema and
    ours, the command line's choices applied, every model file and keys file there, its addresses ones this machine
    can listen on; with `ports_free`, its ports free here too. Raises CannotStart."""
    from serve.config import BUNDLE_ENV, invalid_because, validate_serve_config

    try:
        config = load_serve_config(options.config)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise CannotStart(f"{options.config}: {invalid_because(exc)}") from None
    # the ports before anything else: a busy port fails the start in a second, before the model libraries load
    try:
        choose_ports(config, options.host, options.port, options.grpc_port)
    except ValueError as exc:
        raise CannotStart(str(exc)) from None
    busy = busy_ports(listen_addresses(config, options.metrics_port), in_use_too=ports_free)
    if busy:
        hints = []
        if any(not line.startswith(REFUSED_BY_THE_SYSTEM) for line in busy):
            hints.append("stop the process that holds a port, or choose others (--port, --grpc-port, --metrics-port)")
        if any(line.startswith(REFUSED_BY_THE_SYSTEM) for line in busy):
            hints.append("listen on an address of this machine (--host 127.0.0.1, or 0.0.0.0 for all), ports over 1023")
        raise CannotStart(*busy, hint="; ".join(hints))

    bundle = options.bundle or os.environ.get(BUNDLE_ENV)
    try:
        notes = fit_to_machine(config, bundle, options.host, options.port, options.grpc_port, options.gpus)
        validate_serve_config(config)  # with the command line's choices: --bundle over bundle.authors
    except PlacementError as exc:
        raise CannotStart(str(exc)) from None
    except ValueError as exc:
        raise CannotStart(f"{options.config} with the command line: {invalid_because(exc)}") from None
    applications = config["applications"]
    over_http = "python -m serve run checks readiness and drains over HTTP"
    if config.get("proxy_location") == "Disabled":
        raise CannotStart(f"proxy_location is Disabled (no HTTP proxy): {over_http}; set EveryNode or HeadOnly")
    for app in applications:
        if route_prefix(app) is None:
            raise CannotStart(f"application {app_name(app)} has no route_prefix: {over_http}; give it one")
    for app in applications:
        args = app.get("args") or {}
        several = app_name(app) if len(applications) > 1 else None
        path_from = "--bundle" if options.bundle else BUNDLE_ENV if bundle else None
        missing = missing_model_files(args, options.config, several, path_from) or unreadable_keys(args)
        if missing:
            raise CannotStart(missing if len(applications) == 1 else f"application {app_name(app)}: {missing}")
    return config, notes


def _cannot_start(reason: str) -> int:
    print(f"[rorem] cannot start: {reason}", file=sys.stderr, flush=True)
    return 2


def run(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.command == "new-key":
        scopes = [s for s in options.scopes.split(",") if s]
        limits = {"requests_per_minute": options.requests_per_minute, "max_concurrent": options.max_concurrent}
        return add_api_key(options.keys_file, options.name, scopes, options.team, **limits)

    from serve.config import INSTANCE_ENV, live_serve_config

    try:
        config, notes = startable_config(options, ports_free=options.command == "run")
    except CannotStart as exc:
        for line in exc.args:
            _cannot_start(line)
        if exc.hint:
            print(f"[rorem] {exc.hint}", file=sys.stderr, flush=True)
        return 2
    applications = config["applications"]
    addresses = listen_addresses(config, options.metrics_port)
    host, port = addresses["HTTP"]
    root_url = f"http://{url_host(host)}:{port}"
    for app in applications:
        named = f" (application {app_name(app)})" if len(applications) > 1 else ""
        print(f"[rorem] model{named}: {describe_bundle(app.get('args') or {})}", flush=True)
    for note in notes:
        print(f"[rorem] {note}", flush=True)
    # the live knobs go into the deployments' user_config: edited there, `serve deploy` reconfigures, not restarts
    live = live_serve_config(config)
    if options.command == "check":
        listens = ", ".join(f"{kind} {url_host(where[0])}:{where[1]}" for kind, where in addresses.items())
        if options.effective is not None:
            try:
                options.effective.write_text(yaml.safe_dump(live, sort_keys=False))
            except OSError as exc:
                return _cannot_start(f"--effective {options.effective}: {exc.strerror or exc}")
            print(f"[rorem] effective Serve config: {options.effective}", flush=True)
        print(f"[rorem] {options.config}: would start {len(applications)} application(s); {listens}", flush=True)
        return 0

    from serve.proxy_limits import proxy_env

    # the effective config and the drain flag: kept while the service runs, removed when it stops
    with tempfile.TemporaryDirectory(prefix="rorem-serve-", ignore_cleanup_errors=True) as work_dir:
        work = Path(work_dir)
        effective = work / "serve-config.yaml"
        effective.write_text(yaml.safe_dump(live, sort_keys=False))
        print(f"[rorem] effective Serve config: {effective}", flush=True)
        command = [
            sys.executable, "-m", "serve.launcher", str(effective),
            "--metrics-port", str(options.metrics_port), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        num_cpus = logical_cpus_needed(live)
        if num_cpus:
            print(
                f"[rorem] the deployments ask for {num_cpus} CPUs, Ray sees {ray_cpus()} here: they share cores",
                flush=True,
            )
            command += ["--num-cpus", str(num_cpus)]
        if options.gpus is not None:
            command += ["--num-gpus", str(options.gpus)]
        instance = uuid.uuid4().hex
        drain_flag = work / "draining"
        # Ray's processes inherit the launcher's environment: the proxies' limits and drain flag, the instance id
        env = {
            **without_ray_address(os.environ), **proxy_env(config), **grpc_access_env(config),
            **ray_network_env(config), **HIDE_GPUS_FROM_CPU_REPLICAS_ENV, **database_url_env(),
            INSTANCE_ENV: instance,
            DRAIN_FLAG_ENV: str(drain_flag),
        }  # fmt: skip
        stop = StopRequest()
        stop.install()
        # its own session: a terminal's Ctrl-C reaches this process only, which stops everything in order
        child = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + options.ready_timeout
            answers = []  # each application's /readyz, once every one is ready
            try:
                for app in applications:
                    answer = wait_until_ready(
                        app_url(root_url, app), instance, child, deadline - time.monotonic(), stop, app_name(app)
                    )
                    if answer is None:
                        break
                    answers.append(answer)
            except ForeignInstance as exc:
                print(f"[rorem] cannot start: {exc}", file=sys.stderr, flush=True)
                stop_service(child, root_url, drain_flag, stop)
                return 2
            if len(answers) < len(applications):
                if not stop.requested.is_set():
                    print("[rorem] the service did not become ready; stopping", file=sys.stderr, flush=True)
                code = stop_service(child, root_url, drain_flag, stop)
                return code if stop.requested.is_set() else 1
            grpc = f"{url_host(host)}:{addresses['gRPC'][1]}" if "gRPC" in addresses else None
            for app, answer in zip(applications, answers):
                line = ready_line(app, root_url, answer, grpc, options.metrics_port, instance, len(applications))
                print(line, flush=True)
            while child.poll() is None and not stop.requested.wait(0.5):
                pass
            if child.poll() is not None and not stop.requested.is_set():
                print(
                    f"[rorem] the launcher exited ({child.returncode}); stopping what is left", file=sys.stderr, flush=True
                )
            return stop_service(child, root_url, drain_flag, stop)
        except BaseException:  # a bug here must not leave Ray and its ports behind: no drain, stop now
            stop.hurry_now()
            stop_service(child, root_url, drain_flag, stop)
            raise
