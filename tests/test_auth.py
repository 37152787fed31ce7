"""API keys: hashed storage, 401 vs 403, scopes per route, rotation without restart."""

import os
import time

import pytest
import yaml

from serve.auth import AccessPolicy, ApiKeys, new_key_entry, presented_key, required_scope
from serve.config import AppSettings
from serve.problems import Problem


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
    policy = AccessPolicy(ApiKeys(str(path)), ["/healthz"])
    for headers in ({}, {"x-api-key": "rk_wrong"}, {"authorization": "Bearer rk_wrong"}, {"authorization": f"Basic {app_key}"}):
        with pytest.raises(Problem) as caught:
            policy.check_http("POST", "/remove", headers)
        assert caught.value.status == 401 and "WWW-Authenticate" in caught.value.headers
        assert app_key not in caught.value.detail


def test_a_valid_key_without_the_scope_is_403_and_named(keys):
    path, app_key, admin_key = keys
    policy = AccessPolicy(ApiKeys(str(path)), [])
    policy.check_http("POST", "/remove", {"authorization": f"Bearer {app_key}"})
    policy.check_http("POST", "/score", {"x-api-key": app_key})
    with pytest.raises(Problem) as caught:
        policy.check_http("DELETE", "/results/abc", {"x-api-key": app_key})
    assert caught.value.status == 403 and "app-team" in caught.value.detail and app_key not in caught.value.detail
    policy.check_http("DELETE", "/results/abc", {"x-api-key": admin_key})


def test_public_paths_and_disabled_auth_need_no_key(keys):
    path, _, _ = keys
    AccessPolicy(ApiKeys(str(path)), ["/healthz", "/readyz"]).check_http("GET", "/readyz", {})
    AccessPolicy.from_settings(AppSettings().auth).check_http("POST", "/remove", {})


def test_grpc_metadata_carries_the_key(keys):
    path, app_key, _ = keys
    policy = AccessPolicy(ApiKeys(str(path)), [])
    policy.check_grpc("/remove", [("authorization", f"Bearer {app_key}")])
    policy.check_grpc("/score", [("x-api-key", app_key)])
    with pytest.raises(Problem) as caught:
        policy.check_grpc("/remove", [("user-agent", "grpc-python")])
    assert caught.value.problem == "unauthorized"


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
    path.write_text("keys: [{name: broken")  # a half-written update keeps the last good keys
    os.utime(path, (later + 5, later + 5))
    assert keys.identify(new_key) is not None


def test_settings_refuse_auth_without_keys_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="keys_file"):
        AppSettings.model_validate({"auth": {"enabled": True}})
    with pytest.raises(ValueError, match="unknown scopes"):
        ApiKeys(str(_keys_file(tmp_path, {"name": "x", "sha256": "0" * 64, "scopes": ["root"]})))


def test_scopes_by_route_and_credential_parsing():
    assert required_scope("POST", "/remove") == "remove"
    assert required_scope("POST", "/score") == "score"
    assert required_scope("POST", "/feedback") == "feedback"
    assert required_scope("GET", "/results/abc/result") == "feedback"
    assert required_scope("DELETE", "/results/abc") == "admin"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "k"}) == "k"
    assert presented_key({}) is None
