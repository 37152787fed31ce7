"""Optional API keys: who may call what, over REST and gRPC.

Keys are stored only as SHA-256 digests in a YAML file (a mounted Kubernetes Secret in production;
`python -m serve new-key` writes an entry). A presented key is hashed and its digest looked up among the
stored ones (a dict: comparing with each took ms per check at 10,000 keys; the lookup's timing tells nothing
about a stored key, only about a SHA-256 the caller chose the input of). The file is re-read when it
changes, so a rotated Secret takes effect without a restart; a file that becomes unreadable or
invalid fails closed (every key refused until a valid file is back), logged and counted. Keys are
never logged or echoed; a problem names the key's `name` at most.

Each route declares its access with the route (`dependencies=[auth.requires("remove")]`,
`auth.PUBLIC`): FastAPI runs the check after routing, so a non-root `route_prefix` cannot change
which rule applies, and before the endpoint reads the body. `check_routes` refuses to start an app
with a route that declares nothing.

Credentials: `Authorization: Bearer <key>` or `X-API-Key: <key>` (REST), metadata `authorization`
or `x-api-key` (gRPC). Missing or unknown key: 401 `unauthorized`; a known key without the route's
scope: 403 `forbidden`. A key's optional quotas (`requests_per_minute`, `max_concurrent`) are enforced
by serve/quotas.py.

Without keys, a browser is the risk: any website the user visits can send requests to a service on the
user's loopback, and, by DNS rebinding (its own name resolving to 127.0.0.1), read the answers. So while
auth is off, the routes that declare a scope answer only Host names in `auth.allowed_hosts` (loopback names
by default: 403 `host-not-allowed`), and a request with a body only from the service's own origin (403
`cross-site-request`). Keyed requests need neither: a key is not sent by the browser on its own.

gRPC has no browser risk but another: Ray's gRPC proxy listens on every interface whatever the HTTP host is.
So while auth is off and the service was started to listen on loopback only (`python -m serve run` without
`--host`: the CLI sets GRPC_LOOPBACK_ONLY_ENV), gRPC answers loopback peers only (403 `host-not-allowed`,
PERMISSION_DENIED): a keyless service on a laptop is not the whole network's.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve.config import NumbersNotBools, invalid_because
from serve.problems import Problem

SCOPES = ("remove", "score", "feedback", "review", "admin")
SEES_EVERY_RESULT = ("review", "admin")
DEFAULT_SCOPES = ["remove", "score", "feedback"]
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rorem"'}
logger = logging.getLogger("ray.serve")


class StoredKey(NumbersNotBools):
    """One key's entry; its quotas refuse true / false (NumbersNotBools: `requests_per_minute: true` was 1)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    team: str | None = Field(
        None, min_length=1, max_length=128, description="keys of one team share their retained results"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    requests_per_minute: int | None = Field(
        None, ge=1, description="work requests (/remove, /score, gRPC) per auth.quota_window_s; absent: unlimited"
    )
    max_concurrent: int | None = Field(None, ge=1, description="work requests in progress at once; absent: unlimited")

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = set(scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; known: {list(SCOPES)}")
        return scopes


class KeysFile(BaseModel):
    """Names and keys are unique (quotas are kept per name; one key under two names would get whichever entry's
    scopes and quotas comes last), and a key without a team is not named like a team: its results would be that
    team's (result_owner), and the team's its."""

    model_config = ConfigDict(extra="forbid")
    keys: list[StoredKey]

    @model_validator(mode="after")
    def _owners_are_distinct(self) -> KeysFile:
        repeated = sorted(name for name, count in Counter(key.name for key in self.keys).items() if count > 1)
        if repeated:
            raise ValueError(f"key names must be unique: {repeated} appear more than once")
        by_digest: dict[str, list[str]] = {}
        for key in self.keys:
            by_digest.setdefault(key.sha256, []).append(key.name)
        shared = sorted(names for names in by_digest.values() if len(names) > 1)
        if shared:
            raise ValueError(f"one key may have one entry: the keys named {shared} have the same sha256")
        teams = {key.team for key in self.keys if key.team}
        clashing = sorted(key.name for key in self.keys if not key.team and key.name in teams)
        if clashing:
            raise ValueError(
                f"keys {clashing} have no team but are named like a team: they would share that team's results;"
                " rename them or give them that team"
            )
        return self


def result_owner(key: StoredKey | None) -> str | None:
    """Whose a retained result is: the creating key's team, else its name; None while auth is off."""
    return None if key is None else key.team or key.name


def visible_owner(key: StoredKey | None) -> str | None:
    """Whose results a caller may see and label: only its own (team's), unless it holds a reviewing or
    admin scope; None: every result (also while auth is off)."""
    if key is None or any(scope in key.scopes for scope in SEES_EVERY_RESULT):
        return None
    return result_owner(key)


def verdict_principal(key: StoredKey | None) -> str | None:
    """Who a verdict (POST /feedback) is recorded as given by: the key's name (not its team: a team's keys are
    told apart); None while auth is off, where no caller is known."""
    return None if key is None else key.name


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_entry(
    name: str,
    scopes: Iterable[str],
    team: str | None = None,
    requests_per_minute: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[str, dict]:
    """A fresh random key and the entry that stores its digest (the key itself is shown once)."""
    key = "rk_" + secrets.token_urlsafe(32)
    entry = StoredKey(
        name=name, team=team, sha256=digest(key), scopes=list(scopes),
        requests_per_minute=requests_per_minute, max_concurrent=max_concurrent,
    ).model_dump(exclude_none=True)  # fmt: skip
    return key, entry


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # LibYAML: ~10x faster on a file of many keys


Fingerprint = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


@dataclass
class _Loaded:
    keys: list[StoredKey]
    fingerprint: Fingerprint | None  # None: read it again at the next check
    by_digest: dict[str, StoredKey] = field(init=False)

    def __post_init__(self):
        """identify's index: one lookup where comparing with every stored digest took ms at 10,000 keys, on the
        event loop. A lookup by a SHA-256 of the key tells a timing observer nothing about any stored key."""
        self.by_digest = {key.sha256: key for key in self.keys}  # unique (KeysFile)


class ApiKeys:
    """The keys file, looked at at most every `reload_interval_s` and re-read when its fingerprint (modification
    time, size, inode) changed since the last good read, or that read failed.

    The fingerprint, not the modification time alone: a writer that truncates and rewrites the file within one
    tick of a coarse file clock leaves the time as it was, and a read in between (an empty file, or a prefix that
    parses: an entry cut before its `scopes`) would stay. A failed read is retried at every check for the same
    reason; a read during which the file changed is kept until the next check only.

    A file that cannot be read at start stops the start (with `must_exist`; else it leaves no valid key
    until the file can be read); one that becomes unreadable or invalid later leaves no valid key (fail
    closed). Each failure seen (per fingerprint), at start or later, gets one log line and one `on_error` call."""

    def __init__(
        self,
        path: str,
        reload_interval_s: float = 10.0,
        on_error: Callable[[], None] | None = None,
        must_exist: bool = True,
    ):
        self.path = Path(path).expanduser()
        self.reload_interval_s = reload_interval_s
        self.on_error = on_error or (lambda: None)
        self._lock = threading.Lock()
        self._failed: Fingerprint | None | bool = False  # the failure last logged (False: none since a good read)
        try:
            self._loaded = self._load()
        except ValueError as exc:
            if must_exist:
                raise
            logger.error("API keys: %s; every key is refused until the file can be read", exc)
            self.on_error()
            self._loaded, self._failed = _Loaded([], None), _fingerprint(self.path)
        self._checked = time.monotonic()

    def _load(self) -> _Loaded:
        before = _fingerprint(self.path)
        try:
            data = yaml.load(self.path.read_text(), Loader=_YAML_LOADER) or {}
            keys = KeysFile.model_validate(data).keys
        except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
            raise ValueError(f"cannot read API keys from {self.path}: {invalid_because(exc, root='file')}") from exc
        return _Loaded(keys, before if _fingerprint(self.path) == before else None)

    def reload_due(self) -> bool:
        """Whether the next check looks at the file again (and, if it changed, parses it: milliseconds)."""
        return time.monotonic() - self._checked >= self.reload_interval_s

    def _current(self) -> _Loaded:
        if self.reload_due():
            with self._lock:
                self._checked = time.monotonic()
                seen = _fingerprint(self.path)
                if seen is None or seen != self._loaded.fingerprint:
                    try:
                        self._loaded, self._failed = self._load(), False
                    except ValueError as exc:
                        if self._loaded.keys or self._failed != seen:
                            logger.error("API keys: %s; every key is refused until the file is valid again", exc)
                            self.on_error()
                        self._loaded, self._failed = _Loaded([], None), seen
        return self._loaded

    def identify(self, presented: str) -> StoredKey | None:
        return self._current().by_digest.get(digest(presented))

    def check(self, presented: str | None, scope: str | None) -> StoredKey:
        if not presented:
            raise Problem("unauthorized", "send an API key: Authorization: Bearer <key> or X-API-Key", headers=_CHALLENGE)
        key = self.identify(presented)
        if key is None:
            raise Problem("unauthorized", "the API key is not valid", headers=_CHALLENGE)
        if not key.scopes:  # taken out of service (docs/api.md): refused before any body is buffered for it
            raise Problem("forbidden", f"the key {key.name!r} grants no scope")
        if scope is not None and scope not in key.scopes:
            raise Problem("forbidden", f"the key {key.name!r} does not grant the {scope!r} scope")
        return key


def presented_key(headers) -> str | None:
    """The key from HTTP headers or gRPC metadata (any mapping with lower-case names): a Bearer credential, else
    X-API-Key. An Authorization of another scheme is not ours (a front proxy's Basic auth, say): it hides
    nothing."""
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (headers.get("x-api-key") or "").strip() or None


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
GRPC_LOOPBACK_ONLY_ENV = "ROREM_GRPC_LOOPBACK_ONLY"  # "1": set by the CLI for the Ray processes it starts


def is_loopback_peer(peer: str) -> bool:
    """A gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "unix:/path") names this machine.

    gRPC writes a peer as a URI: an IPv6 address's brackets come percent-encoded.
    """
    kind, _, address = urllib.parse.unquote(peer or "").partition(":")
    if kind == "unix":
        return True
    if kind == "ipv6" and address.startswith("["):
        address = address[1 : address.find("]")]
    elif kind == "ipv4":
        address = address.rpartition(":")[0]
    else:
        return False
    return _loopback_ip(address)


def is_loopback_host(host: str) -> bool:
    """A listen address that only this machine reaches: localhost (any case, with the DNS root's dot or not) or a
    loopback IP (127.0.0.0/8, ::1; IPv6 bracketed or bare, as Ray's config names it). Not the Host header check,
    which takes the names a browser sends (LOOPBACK_HOSTS)."""
    name = host.strip().lower().removesuffix(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name == "localhost" or _loopback_ip(name)


def _loopback_ip(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


class AccessPolicy:
    """What the ingress enforces: a key with the declared scope while auth is on; a Host and an origin that are
    not another website's while it is off."""

    def __init__(
        self, keys: ApiKeys | None, allowed_hosts: Iterable[str] | None = None, grpc_loopback_only: bool = False
    ):
        self.keys = keys
        hosts = allowed_hosts if allowed_hosts is not None or keys is not None else LOOPBACK_HOSTS
        self.allowed_hosts = None if hosts is None or "*" in hosts else frozenset(h.lower() for h in hosts)
        self.grpc_loopback_only = grpc_loopback_only and keys is None

    @classmethod
    def from_settings(cls, auth, on_error: Callable[[], None] | None = None) -> AccessPolicy:
        if not auth.enabled:
            return cls(None, auth.allowed_hosts, os.environ.get(GRPC_LOOPBACK_ONLY_ENV) == "1")
        return cls(ApiKeys(auth.keys_file, auth.reload_interval_s, on_error), auth.allowed_hosts)

    def check_browser(self, headers, method: str) -> None:
        """Refuse what only a browser on another website would send (the module's docstring says why). No Host at
        all (HTTP/1.0 may leave it out; the proxy refuses an HTTP/1.1 request without one) is no browser's."""
        host = headers.get("host")
        if host is not None and self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            raise Problem(
                "host-not-allowed",
                f"the Host {host[:100]!r} is not one this service answers (auth.allowed_hosts: "
                f"{', '.join(sorted(self.allowed_hosts))})",
            )
        if self.keys is None and method not in BODILESS_METHODS and not _same_origin(headers, host or ""):
            raise Problem("cross-site-request", "a request with a body is taken from this service's own pages only")

    def check(self, headers, scope: str | None) -> StoredKey | None:
        """The caller's key (None while auth is off); `headers`: HTTP headers or a dict of gRPC metadata."""
        if self.keys is None:
            return None
        return self.keys.check(presented_key(headers), scope)

    async def check_async(self, headers, scope: str | None) -> StoredKey | None:
        """check() from an event loop: in a thread when the keys file is due a look, so a re-read stalls no
        other request."""
        if self.keys is not None and self.keys.reload_due():
            return await asyncio.to_thread(self.check, headers, scope)
        return self.check(headers, scope)

    async def check_grpc(
        self, scope: str | None, metadata: Iterable[tuple[str, str]], peer: str = ""
    ) -> StoredKey | None:
        if self.grpc_loopback_only and not is_loopback_peer(peer):
            raise Problem(
                "host-not-allowed",
                "without API keys this service answers gRPC from this machine only (it was started to listen on "
                "loopback): start it with --host 0.0.0.0 to serve other machines, or turn keys on",
            )
        headers: dict[str, str] = {}
        for name, value in metadata or ():
            headers.setdefault(name.lower(), value)  # the first of repeated entries, as HTTP headers are read
        return await self.check_async(headers, scope)


_policy = AccessPolicy(None)


def install(auth_settings, on_error: Callable[[], None] | None = None) -> AccessPolicy:
    """Set the policy of this ingress process (the route dependencies read it)."""
    global _policy
    _policy = AccessPolicy.from_settings(auth_settings, on_error)
    return _policy


def policy() -> AccessPolicy:
    return _policy


class _Rule:
    """A route's declared access: a scope, any valid key (scope None), or public."""

    def __init__(self, scope: str | None, public: bool = False):
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; known: {list(SCOPES)}")
        self.scope, self.public = scope, public

    async def __call__(self, request: Request) -> None:
        if self.public:
            request.state.principal = None
            return
        policy().check_browser(request.headers, request.method)
        request.state.principal = await policy().check_async(request.headers, self.scope)


_HOST_VALUE = re.compile(r"(\[[^\[\]]*\]|[^:\[\]]*)(?::[0-9]*)?")  # RFC 9110's host [ ":" port ]


def _host_name(host: str) -> str:
    """The name of a Host header's value, without its port or a trailing dot: "[::1]:8000" -> "[::1]"; "" (no
    name allowed) for a value that is no host[:port] ("[::1]evil" and "localhost:junk" were read as allowed)."""
    found = _HOST_VALUE.fullmatch(host.strip().lower())
    return found[1].rstrip(".") if found else ""


def _origin_host(origin: str) -> str:
    """An Origin's host[:port], as a Host header names it: "http://localhost:8000" -> "localhost:8000"."""
    return origin.strip().lower().partition("://")[2]


def _same_origin(headers, host: str) -> bool:
    """Not sent by another site's page, as far as the browser tells: its Sec-Fetch-Site (which no page can set)
    where it sends one, since a reverse proxy may rewrite Host (the page's Origin then differs from it); else
    an Origin naming this Host, or none (not a browser)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("origin")
    return origin is None or _origin_host(origin) == host.strip().lower()


def requires(scope: str | None) -> Depends:
    """Declare a route's scope with the route: `@api.post("/remove", dependencies=[auth.requires("remove")])`;
    None: any valid key."""
    return Depends(_Rule(scope))


PUBLIC = Depends(_Rule(None, public=True))
"""Declare a route public (probes, pages whose API calls carry the key)."""


def declared_rule(route: APIRoute) -> _Rule | None:
    rules = [d.dependency for d in route.dependencies if isinstance(d.dependency, _Rule)]
    return rules[0] if len(rules) == 1 else None


def api_routes(router) -> Iterable[APIRoute]:
    """The app's API routes, also those FastAPI >= 0.137 keeps under an included router (as Serve's ingress does)."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router)


def _other_routes(router) -> Iterable:
    """What api_routes leaves out: Starlette routes and mounts (static files, a sub-app), served with no rule."""
    for route in router.routes:
        if hasattr(route, "original_router"):
            yield from _other_routes(route.original_router)
        elif not isinstance(route, APIRoute):
            yield route


BODILESS_METHODS = frozenset({"GET", "HEAD"})


def check_routes(app: FastAPI) -> None:
    """Every API route declares exactly one access rule; FastAPI's own /docs and /openapi.json stay public.

    A public route takes no body: with keys on, the proxy refuses a body without a valid key before reading
    it (serve.proxy_middleware.BodyBuffer), whatever the route."""
    fastapi_own = {app.openapi_url, app.docs_url, app.redoc_url, app.docs_url and app.swagger_ui_oauth2_redirect_url}
    unruled = [getattr(r, "path", repr(r)) for r in _other_routes(app) if getattr(r, "path", None) not in fastapi_own]
    if unruled:
        raise RuntimeError(f"routes or mounts that cannot declare an access rule (not FastAPI routes): {unruled}")
    missing = [f"{sorted(r.methods)} {r.path}" for r in api_routes(app) if declared_rule(r) is None]
    if missing:
        raise RuntimeError(f"routes without a declared access rule (auth.requires / auth.PUBLIC): {missing}")
    public_with_body = [
        f"{sorted(r.methods)} {r.path}"
        for r in api_routes(app)
        if declared_rule(r).public and r.methods - BODILESS_METHODS
    ]
    if public_with_body:
        raise RuntimeError(f"public routes may only be {sorted(BODILESS_METHODS)}: {public_with_body}")
