"""The problem table is the one home of each kind's status, title and gRPC code; the views and adapters agree."""

from __future__ import annotations

import ast
import json
import re

import grpc
import pytest

from serve.grpc_api import status_code
from serve.problems import (
    EXTENSIONS,
    KIND_BY_SLUG,
    KINDS,
    LOAD_REFUSALS,
    STATUS_BY_PROBLEM,
    TITLES,
    TYPE_BASE,
    Problem,
    invalid_request,
)
from tests.helpers import REPO


def test_every_slug_is_listed_once():
    slugs = [kind.slug for kind in KINDS]
    assert len(slugs) == len(set(slugs)), sorted(slug for slug in slugs if slugs.count(slug) > 1)


def test_the_load_refusals_are_kinds_that_tell_a_client_to_come_back():
    """The load tests count LOAD_REFUSALS apart from failures: a kind named there that is not a 429 / 503 (or not a
    kind) would pass a failure off as the service being busy."""
    assert LOAD_REFUSALS <= set(KIND_BY_SLUG)
    assert {KIND_BY_SLUG[slug].status for slug in LOAD_REFUSALS} <= {429, 503}
    assert LOAD_REFUSALS == {"too-many-requests", "overloaded"}
    assert {kind.refusal for kind in KINDS} == {"", "load", "pause"}


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.slug)
def test_every_slug_has_a_status_a_title_and_a_grpc_code(kind):
    assert 400 <= kind.status < 600
    assert kind.title.strip()
    code = grpc.StatusCode[kind.grpc_code]
    assert code is not grpc.StatusCode.OK
    if kind.status >= 500:  # the server's fault: never blamed on the caller's input
        assert code is not grpc.StatusCode.INVALID_ARGUMENT, kind.slug


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.slug)
def test_rest_and_grpc_read_the_table(kind):
    problem = Problem(kind.slug, "detail")
    body = problem.body()
    assert (body["type"], body["title"], body["status"]) == (TYPE_BASE + kind.slug, kind.title, kind.status)
    assert problem.response().status_code == kind.status
    assert status_code(problem) is grpc.StatusCode[kind.grpc_code]


def test_the_views_are_derived_and_read_only():
    assert list(KIND_BY_SLUG) == list(STATUS_BY_PROBLEM) == list(TITLES) == [kind.slug for kind in KINDS]
    assert dict(STATUS_BY_PROBLEM) == {kind.slug: kind.status for kind in KINDS}
    assert dict(TITLES) == {kind.slug: kind.title for kind in KINDS}
    with pytest.raises(TypeError):
        STATUS_BY_PROBLEM["new-kind"] = 400  # type: ignore[index]


def test_an_unknown_slug_is_refused():
    with pytest.raises(KeyError):
        Problem("no-such-kind", "detail").body()


def grpc_code_table() -> str:
    """The gRPC section's table in docs/api.md: each status code and the problems answered with it, from KINDS."""
    slugs_by_code: dict[str, list[str]] = {}
    for kind in KINDS:
        slugs_by_code.setdefault(kind.grpc_code, []).append(f"`{kind.slug}`")
    rows = ["| gRPC status code | problems |", "|---|---|"]
    rows += [f"| `{code}` | {', '.join(slugs)} |" for code, slugs in slugs_by_code.items()]
    return "\n".join(rows) + "\n"


def test_the_api_doc_shows_each_problems_grpc_code():
    grpc_section = (REPO / "docs" / "api.md").read_text().split("\n## gRPC\n", 1)[1].split("\n## ", 1)[0]
    assert grpc_code_table() in grpc_section, "regenerate it: python -m tests.test_problems"


if __name__ == "__main__":
    print(grpc_code_table(), end="")


def test_the_readmes_error_statuses_are_the_tables_client_errors():
    """The README's one-line summary of the error statuses lists every 4xx a problem has, and claims no 5xx for a
    client's mistake: the 4xx statuses are read from the table, not restated."""
    summary = (REPO / "README.md").read_text().split("Errors are RFC 9457", 1)[1].split("5xx.", 1)[0]
    listed = {int(status) for status in re.findall(r"\b([45]\d\d)\b", summary)}
    client_errors = {kind.status for kind in KINDS if kind.status < 500}
    assert client_errors <= listed, f"add {sorted(client_errors - listed)} to the README's error statuses"
    assert {kind.status for kind in KINDS} >= listed, f"{sorted(listed - {k.status for k in KINDS})} is no problem's"
    assert {status for status in listed if status >= 500} <= {503, 504}, "a client's mistake is never a 500"


def test_a_problem_answer_is_never_sniffed_as_a_page():
    """A problem quotes what it refused (a result id, a field's value): a browser must read it as JSON."""
    answer = Problem("not-found", "<script>alert(1)</script>", headers={"Retry-After": "2"}).response()
    assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["retry-after"] == "2"
    assert answer.headers["cache-control"] == "no-store", "one request's answer at one moment"
    assert answer.headers["content-type"] == "application/problem+json"


def test_every_member_a_problem_is_raised_with_is_declared():
    """The OpenAPI Problem component lists EXTENSIONS: a 429's `quota` was raised but never declared there."""
    used = set()
    for path in sorted((REPO / "serve").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Problem":
                used |= {keyword.arg for keyword in node.keywords if keyword.arg not in (None, "headers")}
    assert "quota" in used and used <= set(EXTENSIONS), used - set(EXTENSIONS)


def test_a_field_name_with_a_lone_surrogate_is_named_in_a_422_not_a_500():
    """`{"image": "QUJD", "\\udc80": 1}` was a 500 internal-error (with a traceback logged each time): the 422's
    `errors` held the key as it came, which UTF-8 cannot encode."""
    problem = invalid_request([], ["\udc80"])
    response = problem.response("rid")
    body = json.loads(response.body)
    assert response.status_code == 422 and body["errors"] == [{"field": "\\udc80", "message": "unknown field"}]
    assert "\\udc80" in body["detail"]
    accented = Problem("invalid-request", "plain", errors=[{"field": "é", "message": "x"}])
    assert accented.body()["errors"][0]["field"] == "é"
