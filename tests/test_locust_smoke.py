"""The locust smoke profile against the local Serve: REST and gRPC users, bounded in time; any error fails."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_locust_smoke_profile_has_no_errors(service, tmp_path):
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        pytest.skip("locust is not installed (dev extra)")
    env = {**os.environ, "ROREM_MIX": "512:3,1024:1", "ROREM_USERS": "rest:2,grpc:1", "ROREM_GRPC": service.grpc_target}
    result = subprocess.run(
        [str(locust), "-f", "loadtests/locustfile.py", "--headless", "--host", service.url, "-u", "3", "-r", "3",
         "-t", "6s", "--stop-timeout", "60", "--csv", str(tmp_path / "smoke"), "--html", str(tmp_path / "smoke.html"),
         "--only-summary"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "smoke_stats.csv"))}
    assert result.returncode == 0, f"locust failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    total = rows["Aggregated"]
    assert int(total["Request Count"]) >= 3 and int(total["Failure Count"]) == 0
    assert any(name.startswith("/remove") for name in rows), "REST users ran"
    assert any(name.startswith("Remove ") for name in rows), "gRPC users ran"
    assert (tmp_path / "smoke.html").stat().st_size > 0
