"""Image references, parsed the way Docker parses them.

A reference names an image in a registry: `[host[:port]/]path[:tag][@sha256:hex]`. The first
path component is a registry host only when it looks like one (contains '.' or ':', or is
`localhost`); otherwise the operator's default registry (settings.registry) is used. Docker Hub's
rule that a one-component name lives under `library/` applies only when the registry is
docker.io, so `busybox` on a private default registry stays `busybox`.
"""

from __future__ import annotations

import re

import msgspec

from sandbox.errors import InvalidSpec

DOCKER_HUB = "docker.io"
"""Canonical name of Docker Hub; `index.docker.io` and `registry-1.docker.io` are aliases."""
DOCKER_HUB_API = "registry-1.docker.io"
"""Host that actually serves Docker Hub's distribution API."""
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
MAX_LENGTH = 255 + 128 + 80
"""Longest reference string accepted (repository + tag + digest, as Docker bounds them)."""


class Reference(msgspec.Struct, frozen=True):
    """A parsed image reference. `digest` wins over `tag` when fetching; both may be set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host:port to speak the distribution API to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def version(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """`registry/repository` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, check_digest(digest))

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def check_digest(digest: str, *, field: str = "digest") -> str:
    """Return `digest` if it is a well-formed sha256 digest; it is later used as a file name."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidSpec(f"unsupported or malformed digest {digest!r} (want sha256:<64 hex>)",
                          field=field)
    return digest


def _is_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or (
        component[:1] == "[")


def parse_reference(text: str, default_registry: str) -> Reference:
    """Parse `text` like `docker pull` would; raise InvalidSpec naming the reference if bad."""
    if not text or len(text) > MAX_LENGTH or text != text.strip():
        raise InvalidSpec(f"invalid image reference {text!r}", field="image")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidSpec(f"invalid digest in image reference {text!r}", field="image")
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidSpec(f"invalid tag {tag!r} in image reference {text!r}", field="image")
    parts = rest.split("/")
    if len(parts) > 1 and _is_host(parts[0]):
        registry, path = parts[0], parts[1:]
        if not _HOST.match(registry):
            raise InvalidSpec(f"invalid registry host in image reference {text!r}", field="image")
    else:
        registry, path = default_registry, parts
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if not path or not all(_COMPONENT.match(p) for p in path):
        raise InvalidSpec(f"invalid repository name in image reference {text!r} "
                          "(lower-case letters, digits and . _ - separators)", field="image")
    if registry == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    repository = "/".join(path)
    if len(repository) > 255:
        raise InvalidSpec(f"repository name too long in image reference {text!r}", field="image")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
