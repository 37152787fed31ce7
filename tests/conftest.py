"""Shared fixtures: one tiny model (authors' layout + imported bundle) and one local Serve per session."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # tests talk to loopback only; set before huggingface_hub is imported


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory):
    from engines.tiny import write_tiny_authors_layout

    return write_tiny_authors_layout(tmp_path_factory.mktemp("authors"), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_layout, tmp_path_factory):
    from engines.authors_layout import import_authors_layout

    return import_authors_layout(tiny_layout, tmp_path_factory.mktemp("bundles") / "tiny", dtype="float32", name="tiny")


def photo(height: int = 256, width: int = 320) -> np.ndarray:
    """A real photograph (scikit-image's bundled astronaut), cropped to the requested size."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))[:height, 100 : 100 + width].copy()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Service:
    def __init__(self, url: str, config: dict, grpc_target: str, metrics_url: str, log_path: Path):
        self.url = url
        self.config = config
        self.grpc_target = grpc_target
        self.metrics_url = metrics_url
        self.log_path = log_path
        self.client = httpx.Client(base_url=url, timeout=120)


def serve_test_config(work: Path) -> dict:
    """The shipped local.yaml with small buckets, a short batch window and a private bundle cache."""
    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    args.setdefault("bundle", {})["cache_dir"] = str(work / "cache")
    args["batching"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.25}
    args.setdefault("imaging", {}).update(
        {"buckets": [256, 512], "crop_margin": 32, "max_upload_bytes": 6 * 1024 * 1024}
    )
    # results are kept only for requests that ask (retain=true): tests that don't ask see no difference
    args["retention"] = {"enabled": True, "default_retain": False, "object_store": {"path": str(work / "results")}}
    # admission by expected wait is tested with a fake clock (tests/test_admission.py); on a busy 2-core
    # runner the tiny model's rate swings, so the service tests admit by count only
    args["overload"] = {**args.get("overload", {}), "max_queue_wait_s": None}
    return config


@contextmanager
def running_service(work: Path, config: dict):
    """`python -m serve run` (the README's way) on loopback ports, stopped with everything it started."""
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log_path = work / "serve.log"
    log = open(log_path, "w")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("ROREM_BUNDLE", None)
    child = subprocess.Popen(
        [
            sys.executable, "-m", "serve", "run", "--config", str(config_path), "--port", str(port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        ],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "[rorem] READY" not in log_path.read_text():
            if child.poll() is not None:
                pytest.fail(f"serve exited early; see {log_path}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve not ready after 300 s; see {log_path}")
            time.sleep(1)
        from serve.config import AppSettings

        settings = AppSettings.model_validate(config["applications"][0]["args"]).model_dump()  # defaults filled in
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Service(f"http://127.0.0.1:{port}", settings, f"127.0.0.1:{grpc_port}", metrics_url, log_path)
    finally:
        _stop(child)
        log.close()


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """One local Serve for the service tests: tiny bundle, Remover + Scorer, gate annotate."""
    work = tmp_path_factory.mktemp("serve")
    with running_service(work, serve_test_config(work)) as running:
        yield running


def _stop(child: subprocess.Popen) -> None:
    """Stop the CLI and everything it started (Ray included): they share its process group."""
    try:
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
