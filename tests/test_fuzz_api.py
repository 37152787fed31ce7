"""Schemathesis against the running service's own OpenAPI: generated bodies, options and paths
must never get a 5xx or hang, and the service must stay ready afterwards."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ST = Path(sys.executable).parent / "st"


@pytest.mark.skipif(not ST.exists() and not shutil.which("st"), reason="schemathesis is not installed")
def test_generated_requests_never_get_a_server_error(service, tmp_path):
    command = [
        str(ST if ST.exists() else shutil.which("st")), "--no-color", "run", f"{service.url}/openapi.json",
        "--checks", "not_a_server_error_but_the_asked_deadline", "--max-examples", "12", "--workers", "1", "--phases", "examples,coverage,fuzzing",
        "--max-response-time", "60", "--request-timeout", "90", "--generation-deterministic",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_checks"}  # importable from the repo root
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).parent.parent)
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, summary
    assert "/remove" in run.stdout and "/score" in run.stdout, summary
    assert httpx.get(service.url + "/readyz", timeout=30).status_code == 200
