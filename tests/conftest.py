"""Fixtures and hooks only (shared helpers live in tests/helpers.py): one tiny model (authors' layout +
imported bundle), one local Serve per session, and the markers that say what a test needs."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests talk to loopback only; set before huggingface_hub is imported

from tests import helpers  # noqa: E402


def pytest_collection_modifyitems(items):
    """Every test that (through any fixture) starts a local Ray Serve or the CLI is marked e2e, so
    `-m "not e2e"` runs without Ray and a new test cannot forget the marker. A test that stops the shared keyed
    Serve runs right after the last other test that uses it, whatever the order the files were given in (and
    the Serve stops there, not at the session's end)."""
    for item in items:
        if "starts_serve" in item.fixturenames:
            item.add_marker(pytest.mark.e2e)
    stoppers = [item for item in items if item.get_closest_marker("stops_keyed_service")]
    users = [item for item in items if "keyed_service" in item.fixturenames and item not in stoppers]
    if stoppers and users:
        for item in stoppers:
            items.remove(item)
        at = items.index(users[-1]) + 1
        items[at:at] = stoppers


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
def service(starts_serve, tmp_path_factory):
    """One local Serve for the service tests: tiny bundle, Remover + Scorer, gate annotate."""
    work = tmp_path_factory.mktemp("serve")
    with helpers.running_service(work, helpers.serve_test_config(work)) as running:
        yield running


@pytest.fixture(scope="session")
def keyed_service(starts_serve, tmp_path_factory):
    """One local Serve with API keys on (helpers.Keyed), for the hardening tests and then the lifecycle tests,
    whose last one stops it with SIGTERM."""
    import yaml

    from serve.auth import new_key_entry

    work = tmp_path_factory.mktemp("keyed")
    app_key, app_entry = new_key_entry("app-team", ["remove", "score"])
    ops_key, ops_entry = new_key_entry("ops", ["remove", "score", "feedback", "admin"])
    people = {name: new_key_entry(name, ["remove", "feedback"], team=team) for name, team in helpers.Keyed.OWNERS.items()}
    reviewer_key, reviewer_entry = new_key_entry("reviewer", ["feedback", "review"])
    entries = [app_entry, ops_entry, reviewer_entry, *(entry for _, entry in people.values())]
    (work / "keys.yaml").write_text(yaml.safe_dump({"keys": entries}))
    config = helpers.serve_test_config(work)
    args = config["applications"][0]["args"]
    args["auth"] = {"enabled": True, "keys_file": str(work / "keys.yaml")}
    args["overload"] = {
        "max_in_flight": helpers.Keyed.MAX_IN_FLIGHT, "retry_after_s": 3, "max_queue_wait_s": None,
        "body_timeout_s": helpers.Keyed.BODY_TIMEOUT_S,
    }  # fmt: skip
    args.setdefault("gate", {})["on_scorer_error"] = "fail_closed"
    args.setdefault("scorer", {})["timeout_s"] = 2.0
    args["request_timeout_s"] = helpers.Keyed.REQUEST_TIMEOUT_S
    args["imaging"]["max_megapixels"] = helpers.Keyed.MAX_MEGAPIXELS
    config["applications"][0]["route_prefix"] = helpers.Keyed.ROUTE_PREFIX
    with helpers.running_service(work, config) as service:
        service.url += helpers.Keyed.ROUTE_PREFIX
        service.client.base_url = service.url
        service.app_key, service.ops_key = app_key, ops_key
        service.people = {name: key for name, (key, _) in people.items()}
        service.reviewer_key = reviewer_key
        yield service


@pytest.fixture
def keyed(keyed_service):
    """The keyed Serve, still running (a test marked stops_keyed_service stops it, and runs last)."""
    if keyed_service.child.poll() is not None:
        pytest.fail("the keyed Serve was stopped before this test (by a test marked stops_keyed_service?)")
    return keyed_service
