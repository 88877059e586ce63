"""OCI image-spec documents as msgspec Structs: descriptors, manifests, indexes, image configs.

Covers both the OCI media types and Docker's v2 schema 2 equivalents (same JSON shape). Foreign
documents are decoded leniently (unknown fields ignored); documents sbx writes are encoded with
fields in a fixed order and defaults omitted, so the same image always gives the same bytes.
`ImageConfig` is the small, frozen runtime view of a config (Env, Cmd, Entrypoint, ...).
"""

from __future__ import annotations

import hashlib

import msgspec

from sandbox.errors import ImageVerifyError
from sandbox.oci.reference import check_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER_GZIP, OCI_LAYER_TAR, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR)
"""Layer media types sbx unpacks (zstd is refused with a clear error: no stdlib decoder)."""

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
"""Bytes: largest manifest, index or config document accepted."""


class Platform(msgspec.Struct, frozen=True, omit_defaults=True):
    architecture: str = ""
    os: str = ""
    variant: str | None = None


class Descriptor(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] | None = None


class Manifest(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    schema_version: int
    config: Descriptor
    layers: list[Descriptor]
    media_type: str | None = None
    annotations: dict[str, str] | None = None


class Index(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    schema_version: int
    manifests: list[Descriptor]
    media_type: str | None = None


class ContainerConfig(msgspec.Struct, frozen=True, omit_defaults=True, rename="pascal"):
    """The `config` object of an image config blob (Docker's capitalised names)."""

    user: str | None = None
    env: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str | None = None
    labels: dict[str, str] | None = None


class RootFS(msgspec.Struct, frozen=True):
    type: str
    diff_ids: list[str]


class History(msgspec.Struct, frozen=True, omit_defaults=True):
    created: str | None = None
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool = False


class ConfigFile(msgspec.Struct, frozen=True, omit_defaults=True):
    """The image config blob (application/vnd.oci.image.config.v1+json)."""

    architecture: str
    os: str
    rootfs: RootFS
    config: ContainerConfig = ContainerConfig()
    created: str | None = None
    history: list[History] | None = None


class ImageConfig(msgspec.Struct, frozen=True):
    """What the runtime needs from an image's config: the process defaults."""

    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    @classmethod
    def from_config(cls, cfg: ConfigFile) -> "ImageConfig":
        c = cfg.config
        return cls(tuple(c.env or ()), tuple(c.cmd or ()), tuple(c.entrypoint or ()),
                   c.working_dir or "", c.user or "")

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def encode(doc: msgspec.Struct) -> bytes:
    """Canonical JSON for a document sbx writes (fixed field order, no defaults)."""
    return msgspec.json.encode(doc)


def _decode(data: bytes, type_, what: str):
    if len(data) > MAX_MANIFEST_SIZE:
        raise ImageVerifyError(f"{what} is larger than {MAX_MANIFEST_SIZE} bytes")
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise ImageVerifyError(f"malformed {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ImageVerifyError(f"{what} is not valid JSON: {exc}") from None


def _check_descriptors(descs: list[Descriptor], what: str) -> None:
    for d in descs:
        try:
            check_digest(d.digest)
        except Exception:
            raise ImageVerifyError(f"{what} names a malformed digest {d.digest!r}") from None
        if d.size < 0:
            raise ImageVerifyError(f"{what} names a negative size for {d.digest}")


def decode_manifest(data: bytes) -> Manifest:
    m = _decode(data, Manifest, "manifest")
    if m.schema_version != 2:
        raise ImageVerifyError(f"unsupported manifest schemaVersion {m.schema_version}")
    _check_descriptors([m.config, *m.layers], "manifest")
    return m


def decode_index(data: bytes) -> Index:
    idx = _decode(data, Index, "image index")
    _check_descriptors(idx.manifests, "image index")
    return idx


def decode_config(data: bytes) -> ConfigFile:
    cfg = _decode(data, ConfigFile, "image config")
    for d in cfg.rootfs.diff_ids:
        try:
            check_digest(d)
        except Exception:
            raise ImageVerifyError(f"image config names a malformed diff_id {d!r}") from None
    return cfg


def sniff_media_type(data: bytes, declared: str | None) -> str:
    """The document's media type: its own `mediaType` field, else the declared Content-Type."""
    try:
        probe = msgspec.json.decode(data, type=dict)
    except msgspec.DecodeError:
        raise ImageVerifyError("manifest is not valid JSON") from None
    own = probe.get("mediaType") if isinstance(probe, dict) else None
    if isinstance(own, str) and own:
        return own
    if declared and declared.split(";")[0].strip() in (*MANIFEST_TYPES, *INDEX_TYPES):
        return declared.split(";")[0].strip()
    if isinstance(probe, dict) and "manifests" in probe:
        return OCI_INDEX
    return OCI_MANIFEST
