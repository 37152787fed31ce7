"""Optional API keys: who may call what, over REST and gRPC.

Keys are stored only as SHA-256 digests in a YAML file (a mounted Kubernetes Secret in production;
`python -m serve hash-key` writes an entry). A presented key is hashed and compared with every stored
digest by `hmac.compare_digest`, without stopping at the first match. The file is re-read when it
changes, so a rotated Secret takes effect without a restart. Keys are never logged or echoed; a
problem names the key's `name` at most.

Credentials: `Authorization: Bearer <key>` or `X-API-Key: <key>` (REST), metadata `authorization`
or `x-api-key` (gRPC). Missing or unknown key: 401 `unauthorized`; a known key without the route's
scope: 403 `forbidden`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.problems import Problem

SCOPES = ("remove", "score", "feedback", "admin")
DEFAULT_SCOPES = ["remove", "score", "feedback"]
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rorem"'}


class StoredKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES))

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = set(scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; known: {list(SCOPES)}")
        return scopes


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[StoredKey]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_entry(name: str, scopes: Iterable[str]) -> tuple[str, dict]:
    """A fresh random key and the entry that stores its digest (the key itself is shown once)."""
    key = "rk_" + secrets.token_urlsafe(32)
    entry = StoredKey(name=name, sha256=digest(key), scopes=list(scopes)).model_dump()
    return key, entry


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs; None: any valid key."""
    if path == "/remove":
        return "remove"
    if path == "/score":
        return "score"
    if method == "DELETE" and path.startswith("/results/"):
        return "admin"
    if path in ("/feedback", "/annotation/queue") or path.startswith("/results/"):
        return "feedback"
    return None


@dataclass
class _Loaded:
    keys: list[StoredKey]
    mtime: float


class ApiKeys:
    """The keys file, re-read at most every `reload_interval_s` when its modification time changes."""

    def __init__(self, path: str, reload_interval_s: float = 10.0):
        self.path = Path(path).expanduser()
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._loaded = self._load()
        self._checked = time.monotonic()

    def _load(self) -> _Loaded:
        try:
            mtime = os.stat(self.path).st_mtime
            data = yaml.safe_load(self.path.read_text()) or {}
            return _Loaded(KeysFile.model_validate(data).keys, mtime)
        except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
            raise ValueError(f"cannot read API keys from {self.path}: {exc}") from exc

    def _current(self) -> list[StoredKey]:
        now = time.monotonic()
        if now - self._checked >= self.reload_interval_s:
            with self._lock:
                self._checked = now
                try:
                    if os.stat(self.path).st_mtime != self._loaded.mtime:
                        self._loaded = self._load()
                except (OSError, ValueError):
                    pass  # keep the last good keys while a Secret update is half-written
        return self._loaded.keys

    def identify(self, presented: str) -> StoredKey | None:
        presented_digest = digest(presented).encode()
        match = None
        for key in self._current():
            if hmac.compare_digest(presented_digest, key.sha256.encode()):
                match = key
        return match

    def check(self, presented: str | None, scope: str | None) -> StoredKey:
        if not presented:
            raise Problem("unauthorized", "send an API key: Authorization: Bearer <key> or X-API-Key", headers=_CHALLENGE)
        key = self.identify(presented)
        if key is None:
            raise Problem("unauthorized", "the API key is not valid", headers=_CHALLENGE)
        if scope is not None and scope not in key.scopes:
            raise Problem("forbidden", f"the key {key.name!r} does not grant the {scope!r} scope")
        return key


def presented_key(headers) -> str | None:
    """The key from HTTP headers or gRPC metadata (any mapping with lower-case names)."""
    authorization = (headers.get("authorization") or "").strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return (headers.get("x-api-key") or "").strip() or None


class AccessPolicy:
    """What the ingress enforces: nothing when auth is off; else keys on every non-public path."""

    def __init__(self, keys: ApiKeys | None, public_paths: Iterable[str]):
        self.keys = keys
        self.public_paths = set(public_paths)

    @classmethod
    def from_settings(cls, auth) -> AccessPolicy:
        if not auth.enabled:
            return cls(None, ())
        return cls(ApiKeys(auth.keys_file, auth.reload_interval_s), auth.public_paths)

    def check_http(self, method: str, path: str, headers) -> None:
        if self.keys is None or path in self.public_paths:
            return
        self.keys.check(presented_key(headers), required_scope(method, path))

    def check_grpc(self, method: str, metadata: Iterable[tuple[str, str]]) -> None:
        if self.keys is None:
            return
        headers = {name.lower(): value for name, value in metadata or ()}
        self.keys.check(presented_key(headers), required_scope("POST", method))


_policy = AccessPolicy(None, ())


def install(auth_settings) -> AccessPolicy:
    """Set the policy of this ingress process (the HTTP middleware reads it)."""
    global _policy
    _policy = AccessPolicy.from_settings(auth_settings)
    return _policy


def policy() -> AccessPolicy:
    return _policy
