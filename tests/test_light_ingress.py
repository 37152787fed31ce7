"""The processes that never run a model (the CLI, Serve's app build, the Ingress and ResultStore replicas)
import without torch, diffusers or transformers: on a 2-core machine that took a Serve start from ~80 s to
~46 s, and an Ingress replica's import footprint from ~530 MB to ~160 MB (docs/benchmarks.md). And the engines
never import the service."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")
LIGHT_MODULES = ("serve.cli", "serve.app", "serve.retention_deployment", "engines.pipeline")

# In a fresh interpreter: an import of a model library fails, naming the first-party chain that asked for it.
_PROBE = """
import builtins, sys, traceback
HEAVY = {heavy!r}
real_import = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in HEAVY:
        chain = [f"{{f.filename.removeprefix(sys.argv[1] + '/')}}:{{f.lineno}}" for f in traceback.extract_stack()[:-1]
                 if f.filename.startswith(sys.argv[1]) and "<" not in f.filename]
        raise ImportError(f"{{name}} via " + " <- ".join(reversed(chain)))
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
for module in {modules!r}:
    try:
        __import__(module)
    except ImportError as exc:
        print(f"{{module}}: {{exc}}")
try:
    {then}
except ImportError as exc:
    print(f"{then}: {{exc}}")
"""


def _imports_of_model_libraries(modules: tuple[str, ...], then: str = "pass", heavy=MODEL_LIBRARIES) -> str:
    """One line per module whose import (or the statement `then`, run after them) reached a model library (one
    of `heavy`), with the chain that asked for it."""
    probe = _PROBE.format(heavy=heavy, modules=modules, then=then)
    run = subprocess.run(
        [sys.executable, "-c", probe, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return run.stdout


def test_modules_outside_the_model_replicas_do_not_load_the_model_libraries():
    """Nor does the CLI's GPU count for a start: it asks Ray's detection, not torch."""
    found = _imports_of_model_libraries(LIGHT_MODULES, then="from serve.cli import visible_gpus; visible_gpus()")
    assert found == "", f"import the model libraries where a model is built:\n{found}"


def test_a_program_that_calls_the_service_over_grpc_imports_grpc_and_the_stubs_only():
    """An app, or locust's gRPC user, that opens a channel and calls: not the service's schemas (pydantic, fastapi)
    or its imaging (numpy, scipy, PIL), which the command line's checks import when it parses (3.8 s vs 0.9 s to
    import on this machine)."""
    found = _imports_of_model_libraries(
        ("serve.grpc_client",), then="from serve.grpc_client import open_channel, stub; stub(open_channel())",
        heavy=(*MODEL_LIBRARIES, "pydantic", "fastapi", "numpy", "scipy", "PIL"),
    )  # fmt: skip
    assert found == "", found


def test_the_probe_sees_a_model_library_import():
    found = _imports_of_model_libraries(("engines.remover",))
    assert found.startswith("engines.remover: ") and " via engines/remover.py:" in found, found


def test_the_engines_never_import_the_service():
    """serve/ depends on engines/, never the other way (not even for type hints): the engine core and the
    pipeline run in-process for evaluation and benchmarks without the service's settings or Ray."""
    offenders = []
    for path in sorted((REPO / "engines").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"engines/{path.name}:{node.lineno} imports {name}" for name in names if name.split(".")[0] == "serve"]
    assert not offenders, offenders
