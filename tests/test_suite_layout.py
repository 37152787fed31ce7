"""The suite's own rules, checked statically: whatever starts a local Serve or the CLI requests the
`starts_serve` fixture (so its tests are marked e2e and `make test-fast` never starts Ray), and test
modules share helpers through tests/helpers.py only, never by importing each other or conftest."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODULES = sorted(TESTS.glob("test_*.py"))
# runs the CLI only to see it refused before Ray starts (and is e2e through the `running` fixture)
REFUSED_STARTS = {"test_a_second_start_on_the_busy_http_port_fails_fast_naming_it"}


def _starts_serve(function: ast.FunctionDef) -> bool:
    """Calls running_cluster, or runs `python -m serve run` itself."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "running_cluster":
                return True
        if isinstance(node, ast.List):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if any(words[i : i + 3] == ["-m", "serve", "run"] for i in range(len(words))):
                return True
    return False


def test_one_serve_per_session_serves_every_application():
    """Only the session-scoped `serve_started` fixture starts the tests' Serve (each Ray start costs ~10 s of a 2-core
    machine); a test that needs other settings adds an application to it (helpers.Keyed, Metered, Trained)."""
    starters = []
    for module in [*MODULES, TESTS / "conftest.py"]:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.FunctionDef) and _starts_serve(node) and node.name not in REFUSED_STARTS:
                starters.append((module.name, node))
    assert [(name, node.name) for name, node in starters if name != Path(__file__).name] == [("conftest.py", "serve_started")]
    (fixture,) = [node for name, node in starters if name == "conftest.py"]
    (decorator,) = fixture.decorator_list
    assert ast.unparse(decorator) == "pytest.fixture(scope='session')"


def _requests_starts_serve(function: ast.FunctionDef) -> bool:
    return "starts_serve" in [arg.arg for arg in function.args.args]


@pytest.mark.parametrize(
    "module", [m for m in MODULES if m.name != Path(__file__).name] + [TESTS / "conftest.py"], ids=lambda path: path.name
)
def test_what_starts_a_serve_requests_starts_serve(module):
    tree = ast.parse(module.read_text())
    offenders = [
        f"{module.name}:{node.lineno} {node.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and _starts_serve(node) and not _requests_starts_serve(node)
    ]
    offenders = [o for o in offenders if o.split()[-1] not in REFUSED_STARTS]
    assert not offenders, "request the `starts_serve` fixture (marks the tests e2e): " + ", ".join(offenders)


def _cross_imports(tree: ast.Module) -> list[str]:
    """Test modules or conftest imported by a test module, in any spelling (relative imports count too)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                imported.update(f".{node.module or ''}.{alias.name}" for alias in node.names)
            elif node.module == "tests":
                imported.update(f"tests.{alias.name}" for alias in node.names)
            elif node.module:
                imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return sorted(
        name
        for name in imported
        if name.startswith(".") or name == "tests.conftest" or name.startswith("tests.test_")
    )


@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.name)
def test_test_modules_import_helpers_not_each_other(module):
    wrong = _cross_imports(ast.parse(module.read_text()))
    assert not wrong, f"{module.name} imports {wrong}: move what it needs to tests/helpers.py"


def test_the_checks_see_a_serve_start_and_a_cross_import():
    """Guard against checks that cannot fail."""
    source = (
        "def fixture(tmp_path):\n    with running_cluster(tmp_path, []):\n        pass\n"
        "def other(starts_serve):\n    subprocess.run([sys.executable, '-m', 'serve', 'run'])\n"
    )
    first, second = ast.parse(source).body
    assert _starts_serve(first) and not _requests_starts_serve(first)
    assert _starts_serve(second) and _requests_starts_serve(second)
    imports = (
        "from tests import helpers, conftest, test_imaging\nimport tests.test_grpc\nfrom tests.test_k8s import x\n"
        "from .test_scorer import y\nfrom tests.helpers import photo\n"
    )
    assert _cross_imports(ast.parse(imports)) == [
        ".test_scorer.y", "tests.conftest", "tests.test_grpc", "tests.test_imaging", "tests.test_k8s"
    ]  # fmt: skip


def test_a_serve_started_for_a_test_not_marked_e2e_fails_it(request):
    from tests import helpers

    assert helpers.current_test is request.node, "tests/conftest.py keeps helpers.current_test current"
    with pytest.raises(pytest.fail.Exception, match="is not marked e2e"):
        helpers.check_e2e("starts a local Ray Serve")  # this test is not e2e
    with pytest.raises(pytest.fail.Exception, match="is not marked e2e"):  # the check guards the real start
        with helpers.running_cluster(request.config.rootpath / "unused", []):
            pass
    request.node.add_marker(pytest.mark.e2e)
    helpers.check_e2e("starts a local Ray Serve")


def test_the_cost_summary_ranks_modules_and_tests_by_cpu_subprocesses_included(tmp_path):
    import json

    from tests.costs import summarize

    def row(test, wall, cpu, subprocess=0.0):
        return {"test": test, "wall_s": wall, "cpu_s": cpu, "subprocess_cpu_s": subprocess}

    first = [row("tests/test_a.py::one", 3.0, 0.5), row("tests/test_b.py::x", 1.0, 1.0)]
    (tmp_path / "gw0.json").write_text(json.dumps(first))
    (tmp_path / "gw1.json").write_text(json.dumps([row("tests/test_a.py::two", 2.0, 0.1, 2.4)]))
    lines = summarize(tmp_path, top=2).splitlines()
    assert lines[0] == "3 tests: 6 s of wall, 4 s of CPU"
    assert [line.split()[-1] for line in lines[2:4]] == ["tests/test_a.py", "tests/test_b.py"]
    assert lines[2].split()[:3] == ["5.0", "3.0", "2"]
    assert [line.split()[-1] for line in lines[5:]] == ["tests/test_a.py::two", "tests/test_b.py::x"]


def test_a_descendants_cpu_counts_each_second_once_whoever_reaps_it():
    """Chromium reaping a renderer took the renderer's CPU out of the living processes' sum (the test that ran it
    got 0) and this process reaping a long-lived child charged its whole life to the test it ended in."""
    from tests.costs import _descendants_cpu

    before = {10: 5.0, 11: 2.0}  # 11: a renderer of 10
    reaped_by_10 = {10: 5.0 + 0.5 + 3.0}  # 10 spent 0.5 more and reaped 11, which had spent 3.0 in all
    assert _descendants_cpu(0.0, before, reaped_by_10) == pytest.approx(0.5 + 1.0)
    assert _descendants_cpu(9.0, {12: 8.0}, {}) == pytest.approx(1.0), "reaped here after 8 s spent before the test"
    assert _descendants_cpu(0.4, {}, {13: 0.2}) == pytest.approx(0.6), "a child waited for and one still living"
