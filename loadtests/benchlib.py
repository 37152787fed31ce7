"""Shared by the benchmark scripts (run as `python loadtests/<script>.py`, so this imports as `benchlib`)."""

from __future__ import annotations

import io
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from serve.ports import free_port  # noqa: F401 (the benchmark scripts import it from here)

REPO = Path(__file__).resolve().parent.parent


def photo(side: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut) resized to side x side."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB").resize((side, side)))


def center_mask(side: int) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    mask[side // 3 : 2 * side // 3, side // 3 : 2 * side // 3] = True
    return mask


def summarize(samples_ms: list[float]) -> dict:
    """Percentiles interpolated between the closest ranks (numpy's default), so p50 is the median and never
    exceeds p90."""
    ordered = sorted(samples_ms)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {
        "runs": len(ordered),
        **{f"p{q}_ms": round(cuts[q - 1], 1) for q in (50, 90, 95, 99)},
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


def encode(array: np.ndarray, fmt: str = "png") -> bytes:
    """PNG, or JPEG at quality 95 (how phones save photos)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    return encode(array, "png")


def start_service(work: Path, name: str, adjust: Callable[[dict], None]) -> tuple[subprocess.Popen, str]:
    """`python -m serve run` on free loopback ports with the shipped config changed by `adjust(config)`;
    returns the process (its own session, for stop_service) and the base URL once READY."""
    config = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    adjust(config)
    path = work / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work / f"serve-{name}.log"
    log = open(log_path, "w")
    child = subprocess.Popen(
        [sys.executable, "-m", "serve", "run", "--config", str(path), "--port", str(port),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while "[rorem] READY" not in log_path.read_text(errors="replace"):
        if child.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service did not start; see {log_path}")
        time.sleep(1)
    return child, f"http://127.0.0.1:{port}"


def stop_service(child: subprocess.Popen) -> None:
    os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)


def remover_only(config: dict) -> None:
    """The Remover alone: gate off, no Scorer deployment."""
    app = config["applications"][0]
    app["args"]["scorer"] = {"enabled": False}
    app["args"]["gate"] = {"mode": "off"}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Scorer"]
