"""Abandoned work is cancelled: requests that time out leave nothing in the Remover's queue."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from serve.metrics import BATCH_SIZE
from tests.helpers import METRICS_EXPORT_S
from tests.helpers import metric_total as _total
from tests.helpers import photo, png_bytes
from tests.helpers import scrape_metrics as _scrape

ABANDONED = 64


def _upload(size: int = 256) -> dict:
    mask = np.zeros((size, size), np.uint8)
    mask[90:150, 100:160] = 255
    return {"image": png_bytes(photo(size, size)), "mask": png_bytes(mask)}


def _timed_removal(service, upload) -> float:
    started = time.perf_counter()
    response = httpx.post(service.url + "/remove", files=upload, data={"gate": "off", "seed": "1"}, timeout=120)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def _jobs_run(service) -> float:
    """Crops the Remover has run (the sum of its batch sizes), as its metrics export says."""
    return _total(_scrape(service.metrics_url, service.app_name), BATCH_SIZE, "_sum", model="remover")


def _settled_jobs_run(service, timeout_s: float = 30.0) -> float:
    """The Remover's count once two scrapes two export intervals apart agree."""
    deadline = time.monotonic() + timeout_s
    last = _jobs_run(service)
    while time.monotonic() < deadline:
        time.sleep(2 * METRICS_EXPORT_S)
        now = _jobs_run(service)
        if now == last:
            return now
        last = now
    return last


def test_requests_that_time_out_leave_no_work_behind(service):
    upload = _upload()
    baseline = statistics.median(_timed_removal(service, upload) for _ in range(3))
    before = _settled_jobs_run(service)

    def abandoned(i: int) -> int:
        data = {"gate": "off", "seed": str(i), "timeout_s": "0.01"}
        return httpx.post(service.url + "/remove", files=upload, data=data, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(abandoned, range(ABANDONED)))
    assert set(statuses) <= {504, 429}, statuses
    assert statuses.count(504) >= ABANDONED // 2, "most requests reached the model queue and timed out there"

    after_burst = _timed_removal(service, upload)
    assert after_burst < 3 * baseline + 3.0, f"{after_burst:.2f} s after the burst vs {baseline:.2f} s before"
    run = _settled_jobs_run(service) - before
    assert run <= 1 + ABANDONED / 4, f"the Remover ran {run:g} crops for {ABANDONED} abandoned requests"
