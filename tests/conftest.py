"""Fixtures and hooks only (shared helpers live in tests/helpers.py): one tiny model (authors' layout +
imported bundle), one local Serve per session, and the markers that say what a test needs."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests talk to loopback only; set before huggingface_hub is imported

from tests import helpers  # noqa: E402


def pytest_collection_modifyitems(items):
    """Every test that (through any fixture) starts a local Ray Serve or the CLI is marked e2e, so
    `-m "not e2e"` runs without Ray and a new test cannot forget the marker."""
    for item in items:
        if "starts_serve" in item.fixturenames:
            item.add_marker(pytest.mark.e2e)


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
