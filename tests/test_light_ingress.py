"""The processes that never run a model (the CLI, Serve's app build, the Ingress and ResultStore replicas)
import without torch, diffusers or transformers: on a 2-core machine that took a Serve start from ~80 s to
~46 s, and an Ingress replica's import footprint from ~530 MB to ~160 MB (docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")


@pytest.mark.parametrize("module", ["serve.cli", "serve.app", "serve.retention_deployment", "engines.pipeline"])
def test_modules_outside_the_model_replicas_do_not_load_the_model_libraries(module):
    probe = f"import sys, {module}; print(' '.join(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}: import them where a model is built"
