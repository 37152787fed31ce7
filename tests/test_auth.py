"""API keys: hashed storage, 401 vs 403, scopes declared with the routes, rotation without restart, fail closed."""

import asyncio
import os
import re
import threading
import time

import pytest
import yaml

from serve.auth import (
    SCOPES, AccessPolicy, ApiKeys, api_routes, check_routes, declared_rule, new_key_entry, presented_key,
)
from serve.config import AppSettings
from serve.grpc_api import SHARED_ROUTE_SCOPES
from serve.problems import Problem
from tests.helpers import PAGE_ORIGIN, FakeGrpcContext, answer_offline


def _keys_file(tmp_path, *entries):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": list(entries)}))
    return path


@pytest.fixture
def keys(tmp_path):
    app_key, app_entry = new_key_entry("app-team", ["remove", "score"])
    admin_key, admin_entry = new_key_entry("ops", ["remove", "score", "feedback", "admin"])
    path = _keys_file(tmp_path, app_entry, admin_entry)
    return path, app_key, admin_key


def test_the_file_holds_digests_never_the_keys(keys):
    path, app_key, admin_key = keys
    text = path.read_text()
    assert app_key not in text and admin_key not in text
    assert len(yaml.safe_load(text)["keys"][0]["sha256"]) == 64


def test_missing_and_unknown_keys_are_401_with_a_challenge(keys):
    path, app_key, _ = keys
    policy = AccessPolicy(ApiKeys(str(path)))
    for headers in ({}, {"x-api-key": "rk_wrong"}, {"authorization": "Bearer rk_wrong"}, {"authorization": f"Basic {app_key}"}):
        with pytest.raises(Problem) as caught:
            policy.check(headers, "remove")
        assert caught.value.status == 401 and "WWW-Authenticate" in caught.value.headers
        assert app_key not in caught.value.detail


def test_a_valid_key_without_the_scope_is_403_and_named(keys):
    path, app_key, admin_key = keys
    policy = AccessPolicy(ApiKeys(str(path)))
    assert policy.check({"authorization": f"Bearer {app_key}"}, "remove").name == "app-team"
    policy.check({"x-api-key": app_key}, "score")
    with pytest.raises(Problem) as caught:
        policy.check({"x-api-key": app_key}, "admin")
    assert caught.value.status == 403 and "app-team" in caught.value.detail and app_key not in caught.value.detail
    assert policy.check({"x-api-key": admin_key}, "admin").name == "ops"


def test_disabled_auth_needs_no_key():
    assert AccessPolicy.from_settings(AppSettings().auth).check({}, "remove") is None


def test_grpc_metadata_carries_the_key(keys):
    path, app_key, _ = keys
    policy = AccessPolicy(ApiKeys(str(path)))
    asyncio.run(policy.check_grpc("remove", [("authorization", f"Bearer {app_key}")]))
    asyncio.run(policy.check_grpc("score", [("x-api-key", app_key)]))
    first = asyncio.run(policy.check_grpc("score", [("x-api-key", app_key), ("X-Api-Key", "rk_bogus")]))
    assert first is not None and first.name == "app-team", "the first counts"
    with pytest.raises(Problem):
        asyncio.run(policy.check_grpc("score", [("x-api-key", "rk_bogus"), ("x-api-key", app_key)]))
    with pytest.raises(Problem) as caught:
        asyncio.run(policy.check_grpc("remove", [("user-agent", "grpc-python")]))
    assert caught.value.problem == "unauthorized"


def test_a_due_look_at_the_keys_file_runs_off_the_event_loop(keys):
    """Re-reading a changed keys file parses YAML (milliseconds for many keys): never on the loop that serves
    every other request; between looks the check stays inline."""
    path, app_key, _ = keys
    policy = AccessPolicy(ApiKeys(str(path), reload_interval_s=3600))
    threads: list[int] = []
    check = policy.check

    def recording_check(headers, scope):
        threads.append(threading.get_ident())
        return check(headers, scope)

    policy.check = recording_check

    async def main():
        await policy.check_async({"x-api-key": app_key}, "remove")
        policy.keys._checked -= 3600
        assert policy.keys.reload_due()
        await policy.check_async({"x-api-key": app_key}, "remove")
        assert not policy.keys.reload_due()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_a_rotated_keys_file_takes_effect_without_restart(tmp_path):
    old_key, old_entry = new_key_entry("app", ["remove"])
    path = _keys_file(tmp_path, old_entry)
    keys = ApiKeys(str(path), reload_interval_s=0.0)
    assert keys.identify(old_key) is not None
    new_key, new_entry = new_key_entry("app", ["remove"])
    path.write_text(yaml.safe_dump({"keys": [new_entry]}))
    later = time.time() + 5
    os.utime(path, (later, later))
    assert keys.identify(new_key) is not None and keys.identify(old_key) is None



@pytest.mark.timing
def test_a_key_is_found_by_its_digest_not_by_comparing_with_every_stored_one(tmp_path):
    """identify compared the presented key's digest with each stored one: 3-4 ms per refused check at 10,000 keys,
    on the event loop (the proxy's, for every application). Now one lookup: 500 refused checks at 10,000 keys take
    what a few took (the old loop: about 1.7 s)."""
    import hashlib

    from serve import auth

    key, entry = new_key_entry("app", ["remove"])
    keys = ApiKeys(str(_keys_file(tmp_path, entry)), reload_interval_s=1e9)
    many = [auth.StoredKey.model_construct(name=f"k{i}", sha256=hashlib.sha256(b"%d" % i).hexdigest(), scopes=["remove"])
            for i in range(10_000)]  # fmt: skip
    keys._loaded = auth._Loaded([*many, keys.identify(key)], keys._loaded.fingerprint)
    assert keys.identify(key).name == "app" and keys.identify("7").name == "k7"
    assert keys.identify("rk_made_up") is None and keys.identify(auth.digest(key)) is None, "the key, not its digest"
    started = time.perf_counter()
    for _ in range(500):
        assert keys.identify("rk_made_up") is None
    assert time.perf_counter() - started < 0.25


def test_settings_refuse_auth_without_keys_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="keys_file"):
        AppSettings.model_validate({"auth": {"enabled": True}})
    with pytest.raises(ValueError, match="unknown scopes"):
        ApiKeys(str(_keys_file(tmp_path, {"name": "x", "sha256": "0" * 64, "scopes": ["root"]})))


def test_two_keys_never_share_an_owner_or_a_quota_by_accident(tmp_path):
    """A teamless key named like a team would own that team's retained results (result_owner is the team, else
    the name); two keys of one name would share one quota; one key under two names would get whichever entry comes
    last. Such files are refused, at start and on reload."""
    from serve.auth import result_owner

    intern_key, intern = new_key_entry("intern", ["remove"], team="acme")
    _, acme = new_key_entry("acme", ["remove"])
    _, again = new_key_entry("intern", ["remove"])
    with pytest.raises(ValueError, match=r"\['acme'\] have no team but are named like a team"):
        ApiKeys(str(_keys_file(tmp_path, intern, acme)))
    with pytest.raises(ValueError, match=r"unique: \['intern'\]"):
        ApiKeys(str(_keys_file(tmp_path, intern, again)))
    tenant = {**intern, "name": "tenant", "team": None}  # the intern's key pasted under a second name, more scopes
    with pytest.raises(ValueError, match=r"the keys named \[\['intern', 'tenant'\]\] have the same sha256"):
        ApiKeys(str(_keys_file(tmp_path, intern, tenant | {"scopes": ["remove", "admin"]})))
    lead_key, lead = new_key_entry("acme", ["remove"], team="acme")  # named like its own team: one owner, as meant
    keys = ApiKeys(str(_keys_file(tmp_path, intern, lead)))
    assert result_owner(keys.identify(intern_key)) == result_owner(keys.identify(lead_key)) == "acme"


def test_new_key_refuses_a_clashing_name_and_leaves_the_file_as_it_was(tmp_path, capsys):
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    assert run(["new-key", "--name", "intern", "--team", "acme", "--keys-file", str(path)]) == 0
    before = path.read_text()
    assert run(["new-key", "--name", "acme", "--keys-file", str(path)]) == 2
    assert "cannot add key 'acme'" in capsys.readouterr().err and path.read_text() == before
    assert run(["new-key", "--name", "intern", "--keys-file", str(path)]) == 2
    assert "must be unique" in capsys.readouterr().err and path.read_text() == before
    assert run(["new-key", "--name", "acme", "--team", "acme", "--keys-file", str(path)]) == 0


def test_a_key_taken_out_of_service_keeps_its_name_from_a_new_key(tmp_path, capsys):
    """Results, quotas and trusted verdicts are kept by a key's name: a key is retired by emptying its scopes
    (docs/api.md), which refuses it everywhere while its name stays taken."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    key, entry = new_key_entry("reviewer-ana", ["feedback", "review"])
    path.write_text(yaml.safe_dump({"keys": [entry | {"scopes": []}]}))
    keys = ApiKeys(str(path))
    for scope in (*SCOPES, None):  # None: the proxy's check, before it buffers a body for the key
        with pytest.raises(Problem) as refused:
            keys.check(key, scope)
        assert refused.value.problem == "forbidden" and "grants no scope" in refused.value.detail
    before = path.read_text()
    assert run(["new-key", "--name", "reviewer-ana", "--scopes", "remove", "--keys-file", str(path)]) == 2
    assert "must be unique" in capsys.readouterr().err and path.read_text() == before


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--scopes", "remov"], "unknown scopes ['remov']"),
        (["--scopes", ""], "at least one scope"),
        (["--requests-per-minute", "-1"], "requests_per_minute: Input should be greater than or equal to 1"),
        (["--max-concurrent", "0"], "max_concurrent: Input should be greater than or equal to 1"),
        (["--keys-file", "/nonexistent-folder/keys.yaml"], "the folder /nonexistent-folder does not exist"),
    ],
    ids=["unknown-scope", "no-scope", "negative-rate", "zero-concurrency", "missing-folder"],
)
def test_new_key_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, args, said):
    """A new user got a pydantic traceback for a misspelt scope or a quota below 1, a stored key without any scope
    for --scopes '', and a missing folder named as a temporary file's."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    assert run(["new-key", "--name", "x", "--keys-file", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not path.exists()


@pytest.mark.parametrize("text", ["keys: null\n", "keys: {}\n", "- a\n", "other: 1\n"])
def test_new_key_refuses_a_file_that_is_not_a_keys_file_in_one_line_and_leaves_it(tmp_path, capsys, text):
    """These gave an AttributeError, TypeError or KeyError traceback."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    path.write_text(text)
    assert run(["new-key", "--name", "x", "--keys-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cannot add key 'x'") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert path.read_text() == text


def test_credential_parsing():
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "k"}) == "k"
    assert presented_key({"authorization": "Basic abc", "x-api-key": "k"}) == "k", "a front proxy's Basic auth"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({"authorization": "Bearer b", "x-api-key": "k"}) == "b"
    assert presented_key({}) is None


def _touch(path, moment):
    os.utime(path, (moment, moment))


@pytest.mark.parametrize("breakage", ["invalid yaml", "invalid entry", "deleted", "unreadable"])
def test_a_keys_file_that_breaks_fails_closed_logged_and_counted(tmp_path, breakage, caplog):
    key, entry = new_key_entry("app", ["remove"])
    path = _keys_file(tmp_path, entry)
    errors = []
    keys = ApiKeys(str(path), reload_interval_s=0.0, on_error=lambda: errors.append(1))
    policy = AccessPolicy(keys)
    assert policy.check({"x-api-key": key}, "remove").name == "app"
    if breakage == "invalid yaml":
        path.write_text("keys: [{name: broken")
    elif breakage == "invalid entry":
        path.write_text(yaml.safe_dump({"keys": [{**entry, "scopes": ["root"]}]}))
    elif breakage == "deleted":
        path.unlink()
    else:
        path.chmod(0o000)
        if os.access(path, os.R_OK):  # root reads anything: make it unreadable another way
            path.chmod(0o644)
            path.unlink()
            path.mkdir()
    if path.exists():
        _touch(path, time.time() + 5)
    for _ in range(3):
        with pytest.raises(Problem) as caught:
            policy.check({"x-api-key": key}, "remove")
        assert caught.value.problem == "unauthorized"
    assert len(errors) == 1, "counted once per failure, not per request"
    assert "every key is refused" in caplog.text and key not in caplog.text
    if path.is_dir():
        path.rmdir()
    path.chmod(0o644) if path.exists() else None
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    _touch(path, time.time() + 10)
    assert policy.check({"x-api-key": key}, "remove").name == "app", "a valid file again restores the keys"


def test_every_route_declares_its_access_and_the_scopes_are_the_documented_ones():
    from serve.app import api

    check_routes(api)
    rules = {
        (method, route.path): (declared_rule(route).scope, declared_rule(route).public)
        for route in api_routes(api)
        for method in route.methods
    }
    assert SHARED_ROUTE_SCOPES == {"/remove": "remove", "/score": "score"}  # a feedback key must not remove
    assert all(rules[("POST", route)] == (scope, False) for route, scope in SHARED_ROUTE_SCOPES.items())
    assert rules[("POST", "/feedback")] == ("feedback", False)
    assert rules[("GET", "/results/{id}/{kind}")] == ("feedback", False)
    assert rules[("DELETE", "/results/{id}")] == ("admin", False)
    assert rules[("GET", "/healthz")] == (None, True) and rules[("GET", "/readyz")] == (None, True)
    assert rules[("GET", "/docs")] == (None, True)


class _RecordingIngress:
    """The parts of an Ingress that a gRPC call refused at the key check uses: its scope and route are kept."""

    def __init__(self):
        self.scopes, self.routes = [], []

    async def check_grpc(self, scope, metadata, peer):
        self.scopes.append(scope)
        raise Problem("unauthorized", "no key")

    def release(self, decision):
        pass

    def answered(self, route, protocol, status, seconds, http_status, problem=None, over_quota=False):
        self.routes.append(route)


def _grpc_route_and_scope(method: str) -> tuple[str, str | None]:
    """The REST route a gRPC method is counted under, and the scope it asks the key for."""
    from serve.grpc_api import GrpcMethods

    parts, ingress = _RecordingIngress(), GrpcMethods()
    ingress.access = ingress.quotas = ingress.metrics = parts
    asyncio.run(getattr(ingress, method)(None, FakeGrpcContext()))
    [route], [scope] = parts.routes, parts.scopes
    return route, scope


def test_each_grpc_method_needs_the_scope_its_rest_route_declares():
    """A key allowed POST /remove is allowed Remove, and no more: a method asks for its REST route's scope."""
    from serve import rorem_pb2 as pb
    from serve.app import api

    declared = {route.path: declared_rule(route) for route in api_routes(api) if "POST" in route.methods}
    for method in pb.DESCRIPTOR.services_by_name["ObjectRemoval"].methods:
        route, scope = _grpc_route_and_scope(method.name)
        assert not declared[route].public and scope == declared[route].scope, method.name


def _documented_routes() -> list[tuple[str, str]]:
    """docs/api.md's Routes table: each row's route column and scope column."""
    from tests.helpers import REPO

    table = (REPO / "docs" / "api.md").read_text().split("## Routes\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in table.splitlines()[2:]]
    return [(routes.strip(), scope.strip()) for routes, _what, scope in rows]


def _expand(path: str) -> list[str]:
    """"/results/{id}/{source,mask,result}" -> a path per listed value; "{id}" (no comma) stays a parameter."""
    choice = re.search(r"\{(\w+(?:,\w+)+)\}", path)
    if not choice:
        return [path]
    return [p for value in choice[1].split(",") for p in _expand(path[: choice.start()] + value + path[choice.end() :])]


def test_the_documented_scope_of_each_route_is_the_one_it_declares():
    """docs/api.md's Routes table says who may call what: each row's scope column starts with the scope its routes
    declare (a word in backquotes, or "public"), the gRPC row names its methods' scopes in order, and the table
    lists every route (HEAD aside)."""
    from starlette.routing import Match

    from serve.app import api

    routes = list(api_routes(api))
    listed = set()
    for route_column, scope_column in _documented_routes():
        if route_column.startswith("gRPC"):
            methods = re.findall(r"`[^`]*/(\w+)`", route_column)
            assert re.findall(r"`(\w+)`", scope_column) == [_grpc_route_and_scope(m)[1] for m in methods]
            continue
        first = re.match(r"`(\w+)`|(public)", scope_column)
        assert first and re.findall(r"`([A-Z]+ /[^`]*)`", route_column), route_column
        documented = (first[1], first[2] is not None)
        for method, path in re.findall(r"`([A-Z]+) (/[^`]*)`", route_column):
            for concrete in _expand(path):
                request = {"type": "http", "method": method, "path": concrete}
                matched = [r for r in routes if r.matches(request)[0] == Match.FULL]
                if not matched:
                    assert (concrete, documented) == (api.openapi_url, (None, True)), f"{method} {concrete}"
                    continue
                [route] = matched
                listed.add((method, route.path))
                assert (declared_rule(route).scope, declared_rule(route).public) == documented, f"{method} {path}"
    unlisted = {(method, r.path) for r in routes for method in r.methods - {"HEAD"}} - listed
    assert not unlisted, f"routes missing from docs/api.md's Routes table: {sorted(unlisted)}"


def test_the_docs_page_loads_a_pinned_swagger_ui_under_subresource_integrity():
    """The pages keep an API key in the browser's storage, readable by any script of the origin: /docs loads
    its scripts only as the pinned bytes; FastAPI's own /docs and /redoc (floating versions, no integrity) are
    off."""
    from starlette.requests import Request

    from serve.app import api
    from serve.rest_api import SWAGGER_UI, SWAGGER_UI_FILES, docs_page

    assert api.docs_url is None and api.redoc_url is None
    assert "@5.35.0" in SWAGGER_UI and not any(c in SWAGGER_UI.rsplit("@", 1)[1] for c in "^~*")
    page = docs_page(Request({"type": "http", "root_path": "/api/v1", "headers": []})).body.decode()
    tags = re.findall(r"<(?:script|link)[^>]*>", page)
    external = [tag for tag in tags if "https://" in tag]
    assert len(external) == len(SWAGGER_UI_FILES) == 2
    for name, digest in SWAGGER_UI_FILES.items():
        (tag,) = [t for t in external if f"{SWAGGER_UI}/{name}" in t]
        assert f'integrity="{digest}"' in tag and 'crossorigin="anonymous"' in tag
        assert re.fullmatch(r"sha384-[A-Za-z0-9+/]{64}", digest)
    assert 'data-openapi="/api/v1/openapi.json"' in page, "the OpenAPI under the app's route_prefix"
    headers = docs_page(Request({"type": "http", "root_path": "", "headers": []})).headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"


def test_a_trailing_slash_is_not_redirected_to_the_host_the_client_named():
    """Starlette redirected GET /playground/ to http://<the request's Host>/playground before any route ran:
    a 307 to evil.example for a keyless, loopback-only service too."""
    from fastapi.testclient import TestClient

    import serve.app  # noqa: F401  (binds the routes to the app)
    from serve.rest_api import api

    client = TestClient(api, base_url="http://127.0.0.1:8000")
    try:
        for path in ("/playground/", "/annotation/queue/", "/results/abc/source/"):
            answer = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
            assert answer.status_code == 404 and "location" not in answer.headers, (path, answer.headers)
            assert answer.headers["content-type"] == "application/problem+json"
    finally:
        api.middleware_stack = None  # built by the first request: other tests add their own middleware to `api`


def test_head_on_the_public_pages_and_probes_answers_as_their_get_and_adds_no_operation(monkeypatch):
    """Uptime checks and `curl -I` send HEAD: every public page and probe answered 405. Outside a replica, the
    Ingress is a stand-in."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient
    from ray import serve as ray_serve

    import serve.app  # noqa: F401  (binds the routes to the app)
    from serve.rest_api import api

    async def ready() -> dict:
        return {"ready": True}

    service = SimpleNamespace(ready=ready, retention=SimpleNamespace(require_enabled=lambda: None))
    ingress = SimpleNamespace(settings=AppSettings(), refused_live=None, service=service)
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress, app_name="a"))
    client = TestClient(api, base_url="http://127.0.0.1:8000")
    try:
        for path, status in [("/", 307), ("/playground", 200), ("/annotate", 200), ("/docs", 200), ("/healthz", 200),
                             ("/readyz", 200)]:  # fmt: skip
            got, head = client.get(path, follow_redirects=False), client.head(path, follow_redirects=False)
            assert (got.status_code, head.status_code) == (status, status), path
            assert dict(head.headers) == dict(got.headers) and head.content == b"", path
        # a 405 names every method of the path: it named the first route's only (HEAD for a page, GET for a result)
        for method, path, allowed in [("DELETE", "/healthz", "GET, HEAD"), ("POST", "/playground", "GET, HEAD"),
                                      ("PUT", "/results/abc", "DELETE, GET, HEAD"),
                                      ("GET", "/remove", "POST")]:  # fmt: skip
            refused = client.request(method, path)
            assert (refused.status_code, refused.headers["allow"]) == (405, allowed), (method, path)
    finally:
        api.middleware_stack = None  # built by the first request: other tests add their own middleware to `api`
    assert not [path for path, operations in api.openapi()["paths"].items() if "head" in operations]


def test_the_docs_page_runs_only_the_pinned_swagger_ui_and_its_own_line_whatever_the_route_prefix():
    """Its policy named no script-src: any script injected into /docs could read the key the other pages keep
    in the browser's storage. Now exactly the pinned bundle and the page's inline line (one hash under every
    route_prefix), the pinned stylesheet, and requests to this origin only."""
    from starlette.requests import Request

    from serve.page_headers import sha256_source
    from serve.rest_api import SWAGGER_UI, docs_page

    policies = set()
    for prefix in ("", "/api/v1"):
        answer = docs_page(Request({"type": "http", "root_path": prefix, "headers": []}))
        (inline,) = re.findall(r"<script>(.*?)</script>", answer.body.decode(), re.S)
        policy = dict(rule.split(" ", 1) for rule in answer.headers["content-security-policy"].split("; "))
        assert policy["script-src"] == f"{sha256_source(inline)} {SWAGGER_UI}/swagger-ui-bundle.js"
        assert policy["style-src"] == f"{SWAGGER_UI}/swagger-ui.css" and policy["connect-src"] == "'self'"
        assert policy["default-src"] == "'none'" and "unsafe" not in answer.headers["content-security-policy"]
        policies.add(answer.headers["content-security-policy"])
    assert len(policies) == 1


def test_the_docs_page_without_the_cdn_says_where_the_api_is_described(browser):
    from starlette.requests import Request

    from serve.rest_api import DOCS_PAGE_HEADERS, SWAGGER_UI, docs_page

    answer = docs_page(Request({"type": "http", "root_path": "/api/v1", "headers": []}))
    page = browser.new_page()
    page.route(SWAGGER_UI + "/**", lambda route: route.abort("internetdisconnected"))
    html = (answer.body.decode(), DOCS_PAGE_HEADERS)
    answer_offline(page, {"/api/v1/docs": html}, lambda route, path: route.abort())
    refused = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(PAGE_ORIGIN + "/api/v1/docs")
    said = page.inner_text("#swagger-ui")
    assert "loads from cdn.jsdelivr.net" in said and "docs/api.md" in said, said
    assert page.get_attribute("#swagger-ui a", "href") == "/api/v1/openapi.json"
    assert refused == [], "the page's own inline script runs under its policy"


def test_the_docs_page_can_send_a_key_to_every_route_that_needs_one():
    """Swagger UI shows an Authorize box only for declared security schemes: without them, "Try it out" with
    keys on is a 401 every time."""
    from serve.app import api
    from serve.openapi import SECURITY_SCHEMES

    schema = api.openapi()
    assert schema["components"]["securitySchemes"] == SECURITY_SCHEMES
    assert {(s["type"], s.get("scheme"), s.get("name")) for s in SECURITY_SCHEMES.values()} == {
        ("http", "bearer", None), ("apiKey", None, "X-API-Key")
    }, "the two ways serve.auth.presented_key reads a key"
    for route in api_routes(api.router):
        if not route.include_in_schema:
            continue
        for method in route.methods:
            operation = schema["paths"][route.path][method.lower()]
            expected = [] if declared_rule(route).public else [{name: []} for name in SECURITY_SCHEMES]
            assert operation["security"] == expected, (method, route.path)


def test_an_app_with_an_undeclared_route_does_not_start():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/secret")
    async def secret() -> dict:
        return {}

    with pytest.raises(RuntimeError, match="/secret"):
        check_routes(app)


def test_an_app_with_a_mount_or_a_starlette_route_does_not_start(tmp_path):
    """Neither can declare an access rule: a static folder mounted later would have been served to anyone."""
    from fastapi import FastAPI
    from starlette.staticfiles import StaticFiles

    mounted = FastAPI()
    mounted.mount("/static", StaticFiles(directory=tmp_path))
    with pytest.raises(RuntimeError, match="/static"):
        check_routes(mounted)
    plain = FastAPI()
    plain.add_route("/plain", lambda request: None)
    with pytest.raises(RuntimeError, match="/plain"):
        check_routes(plain)
    check_routes(FastAPI())  # FastAPI's own /openapi.json, /docs and its OAuth2 redirect pass


def test_a_public_route_that_takes_a_body_does_not_start():
    """With keys on, the proxy refuses a body without a valid key before reading it, whatever the route."""
    from fastapi import FastAPI

    from serve import auth

    app = FastAPI()

    @app.post("/open-upload", dependencies=[auth.PUBLIC])
    async def open_upload() -> dict:
        return {}

    with pytest.raises(RuntimeError, match="/open-upload"):
        check_routes(app)


def _browser_app(monkeypatch, auth_settings: dict):
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from serve import auth

    monkeypatch.setattr(auth, "_policy", AccessPolicy.from_settings(AppSettings.model_validate({"auth": auth_settings}).auth))
    app = FastAPI()

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return exc.response("test")

    @app.get("/results", dependencies=[auth.requires("feedback")])
    async def results() -> dict:
        return {"private": True}

    @app.post("/remove", dependencies=[auth.requires("remove")])
    async def remove() -> dict:
        return {"removed": True}

    @app.get("/healthz", dependencies=[auth.PUBLIC])
    async def healthz() -> dict:
        return {"status": "ok"}

    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_without_keys_a_rebound_host_name_gets_nothing_and_probes_still_answer(monkeypatch):
    # DNS rebinding: attacker.example resolves to 127.0.0.1, so the user's browser reads this loopback service
    # as attacker.example's own origin; only the Host header tells
    client = _browser_app(monkeypatch, {})
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert client.get("/results", headers={"host": host}).json() == {"private": True}
    # (the last three: an allowed name with junk after it, which no browser sends, was read as allowed)
    for host in ("attacker.example:8000", "127.0.0.1.attacker.example", "localhost.attacker.example:8000",
                 "[::1]evil", "localhost:junk", "[::1]:8000x"):  # fmt: skip
        refused = client.get("/results", headers={"host": host})
        assert refused.status_code == 403 and refused.json()["type"].endswith("host-not-allowed")
        assert client.get("/healthz", headers={"host": host}).status_code == 200, "a probe names the pod's IP"
    opened = _browser_app(monkeypatch, {"allowed_hosts": ["rorem.internal"]})
    assert opened.get("/results", headers={"host": "rorem.internal:8000"}).status_code == 200
    assert opened.get("/results", headers={"host": "localhost:8000"}).status_code == 403
    assert _browser_app(monkeypatch, {"allowed_hosts": ["*"]}).get("/results", headers={"host": "a.b"}).status_code == 200
    assert _browser_app(monkeypatch, {"allowed_hosts": ["Rorem.Internal."]}).get(
        "/results", headers={"host": "rorem.internal.:8000"}
    ).status_code == 200, "case and a trailing dot do not matter"
    from serve.auth import AccessPolicy

    policy = AccessPolicy(None, ["localhost", "127.0.0.1"])
    policy.check_browser({}, "POST")  # HTTP/1.0 without a Host: no browser's (it was refused: a contract trial)
    with pytest.raises(Problem, match="the Host '' is not one this service answers"):
        policy.check_browser({"host": ""}, "POST")


@pytest.mark.parametrize("hosts", [[], ["rorem.internal:8000"], ["::1"], ["http://rorem.internal"], ["a b"]])
def test_allowed_host_names_that_could_never_match_are_refused_at_start(hosts):
    with pytest.raises(ValueError, match="allowed_hosts"):
        AppSettings.model_validate({"auth": {"allowed_hosts": hosts}})


def test_without_keys_another_website_cannot_post_through_the_users_browser(monkeypatch):
    client = _browser_app(monkeypatch, {})
    own = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert client.post("/remove", headers=own).status_code == 200
    assert client.post("/remove").status_code == 200, "curl, SDKs and gRPC send no Origin"
    behind_a_proxy = {"host": "127.0.0.1:8000", "origin": "https://rorem.example.com", "sec-fetch-site": "same-origin"}
    assert client.post("/remove", headers=behind_a_proxy).status_code == 200, "a proxy that rewrites Host (nginx)"
    assert client.post("/remove", headers={"origin": "http://127.0.0.1:8000"}).status_code == 200, "no Sec-Fetch-*"
    for other in (
        {"origin": "http://localhost:3000", "sec-fetch-site": "cross-site"},
        {"origin": "http://127.0.0.1:3000", "sec-fetch-site": "same-site"},  # another port of the same machine
        {"origin": "null"},  # a sandboxed frame
        {"sec-fetch-site": "cross-site"},
    ):
        refused = client.post("/remove", headers=other)
        assert refused.status_code == 403 and refused.json()["type"].endswith("cross-site-request"), other
    assert client.get("/results", headers={"origin": "http://localhost:3000"}).status_code == 200, "a read"


def test_with_keys_any_host_and_origin_may_call_with_a_key(monkeypatch, keys):
    path, app_key, _ = keys
    client = _browser_app(monkeypatch, {"enabled": True, "keys_file": str(path)})
    headers = {"host": "rorem.example.com", "origin": "https://app.example.com", "x-api-key": app_key}
    assert client.post("/remove", headers=headers).status_code == 200
    assert client.post("/remove", headers={**headers, "x-api-key": "wrong"}).status_code == 401


@pytest.mark.parametrize("pasted", ["as a field", "as the digest", "in broken YAML"])
def test_a_key_pasted_into_the_keys_file_never_reaches_the_log(tmp_path, pasted, caplog):
    """pydantic's and YAML's own messages quote the input they refused: here, the key itself."""
    key, entry = new_key_entry("app", ["remove"])
    path = _keys_file(tmp_path, entry)
    keys = ApiKeys(str(path), reload_interval_s=0.0)
    pasted_key, pasted_entry = new_key_entry("new", ["remove"])
    if pasted == "as a field":
        path.write_text(yaml.safe_dump({"keys": [entry, {**pasted_entry, "key": pasted_key}]}))
    elif pasted == "as the digest":
        path.write_text(yaml.safe_dump({"keys": [entry, {**pasted_entry, "sha256": pasted_key}]}))
    else:
        path.write_text(yaml.safe_dump({"keys": [entry]}) + f"- name: new\n  sha256: {pasted_key}: [\n")
    _touch(path, time.time() + 5)
    assert keys.identify(key) is None
    with pytest.raises(ValueError) as at_start:
        ApiKeys(str(path))
    assert "every key is refused" in caplog.text and "keys" in str(at_start.value)
    assert pasted_key not in caplog.text and pasted_key not in str(at_start.value)
    if pasted == "in broken YAML":
        assert re.search(r"keys\.yaml: line \d+, column \d+: mapping values", str(at_start.value))  # where to look


def _rewrite_in_one_tick(path, text, moment_ns):
    """What a truncating writer leaves on a coarse file clock: a new content with the modification time as it was."""
    path.write_text(text)
    os.utime(path, ns=(moment_ns, moment_ns))


def test_a_read_that_caught_the_file_half_written_does_not_stick(tmp_path):
    """Truncated then rewritten within one tick of the file clock: the read that saw the empty file, or a prefix
    that parses (an entry cut before its scopes and quota: defaults), is not kept once the writer is done."""
    key, entry = new_key_entry("app", ["remove"])
    path = _keys_file(tmp_path, entry)
    keys = ApiKeys(str(path), reload_interval_s=0.0)
    tick = time.time_ns() + 5_000_000_000
    _rewrite_in_one_tick(path, "", tick)
    assert keys.identify(key) is None, "the empty file fails closed"
    new_key, new_entry = new_key_entry("new", ["remove"])
    _rewrite_in_one_tick(path, yaml.safe_dump({"keys": [entry, new_entry]}), tick)
    assert keys.identify(key) is not None and keys.identify(new_key) is not None

    scorer_key, scorer = new_key_entry("scorer", ["score"], requests_per_minute=10, max_concurrent=1)
    full = yaml.safe_dump({"keys": [scorer]}, sort_keys=False)
    _rewrite_in_one_tick(path, full.split("  scopes:")[0], tick + 1)
    assert keys.identify(scorer_key).requests_per_minute is None, "the prefix parses: the defaults, for now"
    _rewrite_in_one_tick(path, full, tick + 1)
    stored = keys.identify(scorer_key)
    assert stored.scopes == ["score"] and (stored.requests_per_minute, stored.max_concurrent) == (10, 1)


def test_new_key_that_cannot_keep_the_files_owner_and_group_rewrites_it_in_place(tmp_path, monkeypatch):
    """An operator who is not root cannot give a new file the old one's group (say the service's): renaming it
    over the keys file would leave a file the service cannot read, and every key refused."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    assert run(["new-key", "--name", "first", "--keys-file", str(path)]) == 0
    other_group = os.getgid() + 4242
    try:
        os.chown(path, -1, other_group)
    except PermissionError:
        pytest.skip("needs a user that may hand a file to another group (root)")
    before = os.stat(path)
    monkeypatch.setattr(os, "chown", lambda *args: (_ for _ in ()).throw(PermissionError("not root")))
    assert run(["new-key", "--name", "second", "--keys-file", str(path)]) == 0
    after = os.stat(path)
    assert (after.st_ino, after.st_uid, after.st_gid) == (before.st_ino, before.st_uid, before.st_gid)
    assert os.listdir(tmp_path) == ["keys.yaml"], "no temporary file left"
    assert [entry["name"] for entry in yaml.safe_load(path.read_text())["keys"]] == ["first", "second"]


def test_new_key_rewriting_in_place_on_a_full_disk_leaves_the_keys_file_as_it_was(tmp_path, monkeypatch, capsys):
    """A truncating write that then fails (disk full) would leave a cut-off keys file: every key refused."""
    import errno
    import tempfile

    from serve.cli import run

    path = tmp_path / "keys.yaml"
    assert run(["new-key", "--name", "first", "--keys-file", str(path)]) == 0
    before = path.read_bytes()

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", lambda *args, **kwargs: (_ for _ in ()).throw(PermissionError("folder")))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    assert run(["new-key", "--name", "second", "--keys-file", str(path)]) == 2
    assert path.read_bytes() == before
    assert "No space left" in capsys.readouterr().err


def test_new_key_creates_a_keys_file_only_its_owner_can_read(tmp_path):
    """A new keys file got 0666 less the umask (0644 under the usual 022): anyone on the machine could read the
    digests (and try keys against them offline). An existing file keeps its mode (below)."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    umask = os.umask(0o002)
    try:
        assert run(["new-key", "--name", "first", "--keys-file", str(path)]) == 0
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o600


def test_new_key_replaces_the_keys_file_whole_and_keeps_its_permissions(tmp_path):
    """A reader sees the old file or the new one, never a part (a temporary file renamed over it)."""
    from serve.cli import run

    path = tmp_path / "keys.yaml"
    assert run(["new-key", "--name", "first", "--keys-file", str(path)]) == 0
    path.chmod(0o640)
    before = os.stat(path)
    assert run(["new-key", "--name", "second", "--keys-file", str(path)]) == 0
    after = os.stat(path)
    assert after.st_ino != before.st_ino, "written in place: a reader could see it truncated"
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert os.listdir(tmp_path) == ["keys.yaml"], "no temporary file left"
    assert [entry["name"] for entry in yaml.safe_load(path.read_text())["keys"]] == ["first", "second"]


def test_a_keys_file_quota_of_true_or_false_is_refused_not_taken_for_1_or_0(tmp_path):
    """`requests_per_minute: true` was a quota of 1 request a minute. Walks every number field of an entry."""
    from serve.auth import StoredKey

    numbers = [name for name, field in StoredKey.model_fields.items() if "int" in str(field.annotation)]
    assert {"requests_per_minute", "max_concurrent"} <= set(numbers)
    _, entry = new_key_entry("app", ["remove"])
    for name in numbers:
        for value in (True, False):
            with pytest.raises(ValueError, match=rf"{name}: a number, not true / false"):
                ApiKeys(str(_keys_file(tmp_path, {**entry, name: value})))
    assert ApiKeys(str(_keys_file(tmp_path, {**entry, "requests_per_minute": 5}))) is not None
