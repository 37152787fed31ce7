"""Fixtures and hooks only (shared helpers live in tests/helpers.py): one tiny model (authors' layout +
imported bundle), one local Serve per session serving every application the tests need, and the markers that say what a test needs."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests talk to loopback only; set before huggingface_hub is imported

from tests import helpers  # noqa: E402


# the fixture that gives a test one application of the session's cluster -> that application's name
APPLICATION_FIXTURES = {
    "service": "rorem",
    "keyed_service": helpers.Keyed.NAME,
    "metered": helpers.Metered.NAME,
    "trained_onnx_service": helpers.Trained.NAME,
}
_NEEDED = pytest.StashKey[list]()
_USES_CLUSTER = pytest.StashKey[bool]()
_NICE_BEFORE = pytest.StashKey[int]()  # the session's autogroup nice, kept while the tests before the e2e ones run
# their autogroup nice meanwhile, ahead of the cluster's start: at an equal share with it, 5 of the 41 `timing` tests
# failed their bounds
AHEAD_OF_THE_START_NICE = -10


def pytest_collection_modifyitems(items):
    """Every test that (through any fixture) starts a local Ray Serve or the CLI is marked e2e, so
    `-m "not e2e"` runs without Ray and a new test cannot forget the marker; one that drives Chromium, browser.
    The tests without Ray run first (in file order): `make test`'s `timing` tests run while the cluster starts."""
    for item in items:
        if "starts_serve" in item.fixturenames:
            item.add_marker(pytest.mark.e2e)
        if "browser" in item.fixturenames:
            item.add_marker(pytest.mark.browser)
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def pytest_collection_finish(session):
    """Once every plugin has selected and ordered the tests (-k, -m, --deselect, --ff): the session's one cluster
    serves the applications the tests that run use (no more), and a test that stops the cluster runs right after
    the last other test that uses it, whatever the order the files were given in (the cluster stops there, not at
    the session's end)."""
    items = session.items
    session.config.stash[_NEEDED] = [
        name for fixture, name in APPLICATION_FIXTURES.items() if any(fixture in item.fixturenames for item in items)
    ] or ["rorem"]  # a test that asks for the cluster itself
    session.config.stash[_USES_CLUSTER] = any("serve_started" in item.fixturenames for item in items)
    stoppers = [item for item in items if item.get_closest_marker("stops_cluster")]
    users = [item for item in items if "serve_started" in item.fixturenames and item not in stoppers]
    if stoppers and users:
        for item in stoppers:
            items.remove(item)
        at = items.index(users[-1]) + 1
        items[at:at] = stoppers


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A `gpu` test skips without CUDA, here only (before its fixtures build anything for the device). The first
    e2e test runs at the session's own priority again."""
    if item.get_closest_marker("e2e"):
        _back_to_the_nice_before(item.config)
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (marked gpu)")


def pytest_sessionfinish(session):
    _back_to_the_nice_before(session.config)


def _back_to_the_nice_before(config) -> None:
    if (nice := config.stash.get(_NICE_BEFORE, None)) is not None:
        helpers.set_autogroup_nice(nice)
        del config.stash[_NICE_BEFORE]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    helpers.current_test = item
    try:
        yield
    finally:
        helpers.current_test = None


@pytest.fixture(scope="session")
def starts_serve():
    """Requested by every fixture that starts a local Ray Serve or the CLI: marks its tests e2e."""


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory):
    from engines.tiny import write_tiny_authors_layout

    return write_tiny_authors_layout(tmp_path_factory.mktemp("authors"), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_layout, tmp_path_factory):
    from engines.authors_layout import import_authors_layout

    return import_authors_layout(tiny_layout, tmp_path_factory.mktemp("bundles") / "tiny", dtype="float32", name="tiny")


@pytest.fixture(scope="session")
def trained_bundle(trained_onnx_service):
    """The bundle the `trained` application serves (trained when the cluster starts)."""
    return trained_onnx_service.bundle


@pytest.fixture(scope="session")
def serve_started(starts_serve, request, tmp_path_factory):
    """One local Serve for the session (`python -m serve run`, one Ray), serving each application the selected
    tests use: `rorem` (tiny bundle, Remover + Scorer, gate annotate), `keyed` (helpers.Keyed), `metered`
    (helpers.Metered) and `trained` (helpers.Trained). Its Services by application name, as soon as it is
    started: a test waits for the application it uses (`service`, ...) or for all (`cluster`). The `trained`
    application is ready last (its UNet is exported to ONNX at start, ~30 s on one core after the others are
    ready), and the other applications' tests run meanwhile; tests with tight timing bounds among the first to run
    (test_cost_bombs, test_event_loop, test_health) ask for `cluster` too."""
    work = tmp_path_factory.mktemp("serve")
    needed = request.config.stash[_NEEDED]
    applications, extras = [], {}
    for name in needed:
        folder = work / name
        folder.mkdir()
        if name == "rorem":
            app, extra = helpers.named_app(folder, "rorem", "/"), {}
        elif name == helpers.Trained.NAME:
            app, extra = helpers.Trained.app(folder, helpers.train_tiny_bundle(tmp_path_factory.mktemp("trained")))
        else:
            app, extra = {helpers.Keyed.NAME: helpers.Keyed, helpers.Metered.NAME: helpers.Metered}[name].app(folder)
        applications.append(app)
        extras[name] = extra
    with helpers.running_cluster(work, applications) as services:
        for name, service in services.items():
            for attribute, value in extras[name].items():
                setattr(service, attribute, value)
        yield services


@pytest.fixture(scope="session", autouse=True)
def _serve_starts_with_the_session(request):
    """Where tests without Ray run before the tests of the cluster (`make test`'s `timing` tests), the cluster starts
    with the first of them: its minute of start goes on beside them, which run ahead of it (AHEAD_OF_THE_START_NICE)
    until the first e2e test. Without the right to raise a priority (not root), the cluster starts with its first
    test, as before."""
    first = helpers.current_test
    if not request.config.stash.get(_USES_CLUSTER, False) or first is None or first.get_closest_marker("e2e"):
        return
    before = helpers.autogroup_nice()
    if before is None or not helpers.set_autogroup_nice(AHEAD_OF_THE_START_NICE):
        return
    request.config.stash[_NICE_BEFORE] = before
    helpers.current_test = None  # started for the e2e tests, not for this one
    try:
        request.getfixturevalue("serve_started")
    except (Exception, pytest.fail.Exception):
        pass  # pytest keeps the error: each test of the cluster reports it, the others run
    finally:
        helpers.current_test = first


@pytest.fixture(scope="session")
def cluster(serve_started):
    """The session's Serve with every application ready (the CLI's READY lines printed)."""
    return helpers.every_application_ready(serve_started)


@pytest.fixture(autouse=True)
def _cluster_still_running(request):
    """A test of the cluster finds it running (a test marked stops_cluster stops it, and runs last)."""
    if "serve_started" in request.fixturenames:
        some = next(iter(request.getfixturevalue("serve_started").values()))
        if some.child.poll() is not None:
            pytest.fail(
                "the session's Serve was stopped before this test (by a test marked stops_cluster?); the end of "
                f"{some.log_path}:\n{some.log_path.read_text()[-3000:]}"
            )


@pytest.fixture(scope="session")
def service(serve_started):
    """The tiny bundle with its Scorer, gate annotate, at the route prefix /."""
    return serve_started["rorem"].wait_ready()


@pytest.fixture(scope="session")
def keyed_service(serve_started):
    """API keys on (helpers.Keyed), for the hardening and the lifecycle tests."""
    return serve_started[helpers.Keyed.NAME].wait_ready()


@pytest.fixture(scope="session")
def metered(serve_started):
    """Quotas over two Ingress replicas (helpers.Metered)."""
    return serve_started[helpers.Metered.NAME].wait_ready()


@pytest.fixture(scope="session")
def trained_onnx_service(serve_started):
    """The trained bundle served through ONNX Runtime (helpers.Trained)."""
    return serve_started[helpers.Trained.NAME].wait_ready()


@pytest.fixture(scope="session")
def _chromium_of_this_process():
    """One headless Chromium per test process (a launch costs ~0.5-1 s); tests get it through `browser`.

    Playwright's sync API runs its event loop in a greenlet of this thread, which leaves that loop marked as the
    thread's running loop between its calls: every later `asyncio.run` in the process would refuse to start. The
    mark is set only while a test holds the browser (asyncio's own _set_running_loop, as Playwright uses it)."""
    if helpers.chromium_missing():
        pytest.skip(f"the page test needs playwright and Chromium at {helpers.CHROMIUM}")
    from playwright.sync_api import sync_playwright

    manager = sync_playwright()
    playwright = manager.__enter__()
    loop = asyncio._get_running_loop()
    try:
        held = [helpers.launch_chromium(playwright)]  # a Chromium that crashes at launch: the page tests fail
    except BaseException:
        manager.__exit__(None, None, None)
        raise
    finally:
        asyncio._set_running_loop(None)
    yield playwright, held, loop
    asyncio._set_running_loop(loop)
    held[0].close()
    manager.__exit__(None, None, None)


@pytest.fixture
def browser(_chromium_of_this_process):
    """Headless Chromium for one test: pages it opens get their own context (nothing shared between tests), and
    whatever it leaves open is closed after it; a browser that a test crashed is launched again."""
    playwright, held, loop = _chromium_of_this_process
    asyncio._set_running_loop(loop)
    try:
        if not held[0].is_connected():
            held[0] = helpers.launch_chromium(playwright)
        yield held[0]
        for context in held[0].contexts:
            context.close()
    finally:
        asyncio._set_running_loop(None)
