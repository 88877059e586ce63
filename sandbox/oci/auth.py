"""Registry authentication: docker config.json credentials, Basic, and the Bearer token flow.

The distribution protocol's challenge is a `WWW-Authenticate` header on a 401. `Basic` means send
the stored username/password; `Bearer realm=..,service=..,scope=..` means ask the realm for a
token (with Basic credentials if we have some, anonymously otherwise) and send that. Credentials
come from the `auths` map of a docker config.json (base64 `auth`, or `username`/`password`), at
settings.docker_config or ~/.docker/config.json. Tokens are cached per (realm, service, scope).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import urllib.parse
from typing import TYPE_CHECKING

import msgspec

from sandbox.errors import RegistryAuthError

if TYPE_CHECKING:
    from sandbox.oci.transport import Transport

MAX_TOKEN_RESPONSE = 1024 * 1024
"""Bytes: largest token-server answer accepted."""

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                    "registry-1.docker.io")
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


class Credentials(msgspec.Struct, frozen=True):
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _host_of(key: str) -> str:
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def load_credentials(registry: str, config_path: str = "") -> Credentials | None:
    """Credentials for `registry` from a docker config.json, or None (anonymous)."""
    path = config_path or os.path.join(os.path.expanduser("~"), ".docker", "config.json")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4 * 1024 * 1024))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryAuthError(f"cannot read docker config {path}: {exc}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {registry.lower()}
    if registry in ("docker.io", "registry-1.docker.io"):
        wanted.update(_DOCKER_HUB_KEYS)
    for key, entry in auths.items():
        if not isinstance(entry, dict) or (_host_of(key) not in wanted and key not in wanted):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise RegistryAuthError(f"malformed auth for {key} in {path}") from None
            return Credentials(user, password)
        if entry.get("username") is not None:
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split `Bearer realm="x",service="y"` into ("bearer", {"realm": "x", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


class Authenticator:
    """Answers 401 challenges for one registry; safe to share between threads."""

    def __init__(self, registry: str, credentials: Credentials | None, transport: "Transport"):
        self.registry = registry
        self.credentials = credentials
        self.transport = transport
        self._tokens: dict[str, str] = {}
        self._scheme: dict[str, tuple[str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def header_for(self, scope: str) -> str | None:
        """An Authorization header to send up front, if a challenge was already answered."""
        with self._lock:
            if scope in self._tokens:
                return self._tokens[scope]
            known = self._scheme.get("any")
        if known and known[0] == "basic" and self.credentials:
            return self.credentials.basic_header()
        return None

    def answer(self, challenge: str, scope: str) -> str:
        """Return an Authorization header that answers `challenge` for `scope`."""
        scheme, params = parse_challenge(challenge)
        with self._lock:
            self._scheme["any"] = (scheme, params)
        if scheme == "basic":
            if not self.credentials:
                raise RegistryAuthError(f"registry {self.registry} wants a login; no credentials "
                                        "for it in the docker config")
            return self.credentials.basic_header()
        if scheme != "bearer":
            raise RegistryAuthError(f"registry {self.registry}: unsupported auth scheme {scheme!r}")
        realm = params.get("realm")
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryAuthError(f"registry {self.registry}: bearer challenge without a realm")
        query = {"service": params.get("service", "")} if params.get("service") else {}
        scopes = [scope] if scope else []
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(
            [*query.items(), *(("scope", s) for s in scopes)])
        headers = {"Accept": "application/json"}
        if self.credentials:
            headers["Authorization"] = self.credentials.basic_header()
        with self.transport.request("GET", url, headers) as resp:
            body = resp.read(MAX_TOKEN_RESPONSE)
            if resp.status in (401, 403):
                raise RegistryAuthError(f"registry {self.registry}: token server refused "
                                        f"{'our credentials' if self.credentials else 'anonymous access'}"
                                        f" (HTTP {resp.status})")
            if resp.status != 200:
                raise RegistryAuthError(f"registry {self.registry}: token server answered "
                                        f"HTTP {resp.status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"registry {self.registry}: token server sent no token")
        header = f"Bearer {token}"
        with self._lock:
            self._tokens[scope] = header
        return header
