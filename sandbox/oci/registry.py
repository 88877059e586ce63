"""OCI distribution client: ping, manifests and indexes, verified blob downloads, push.

Speaks /v2/ over HTTPS, or plain HTTP to registries listed in settings.insecure_registries.
Manifests are asked for with an Accept header naming the OCI and Docker schema 2 manifest and
index types (Debian's docker-registry 2.8 hides OCI manifests from clients that do not accept
them); an index is narrowed to linux/amd64. Every byte that comes back is checked: manifests
against the digest they were asked by (and Docker-Content-Digest), blobs against their
descriptor's size and sha256 while they stream to disk. Nothing unverified is returned.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.parse
from typing import BinaryIO, Callable

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError, ImageNotFound, ImageVerifyError, RegistryAuthError
from sandbox.oci import model
from sandbox.oci.auth import Authenticator, load_credentials
from sandbox.oci.reference import Reference
from sandbox.oci.transport import Response, Transport

ACCEPT_MANIFESTS = ", ".join((model.OCI_MANIFEST, model.DOCKER_MANIFEST, model.OCI_INDEX,
                              model.DOCKER_LIST))
DEFAULT_PLATFORM = ("linux", "amd64")
MAX_BLOB_SIZE = 16 * 1024 * 1024 * 1024
"""Bytes: largest blob sbx will download, whatever its descriptor says."""
BLOB_RETRIES = 4
"""Extra attempts at a blob download whose connection dropped mid-body."""

Progress = Callable[[int], None]
"""Called with the number of bytes transferred so far for one blob."""

_BODY_ERRORS = (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError)


class ResolvedManifest:
    """A platform manifest, its verified raw bytes and digest, and the index it came from."""

    def __init__(self, digest: str, media_type: str, raw: bytes, manifest: model.Manifest,
                 index_digest: str | None) -> None:
        self.digest = digest
        self.media_type = media_type
        self.raw = raw
        self.manifest = manifest
        self.index_digest = index_digest


class RegistryClient:
    """One client per process or thread pool; connections and tokens are shared and reused."""

    def __init__(self, settings: RuntimeSettings, transport: Transport | None = None) -> None:
        self.settings = settings
        self.transport = transport or Transport()
        self._auth: dict[str, Authenticator] = {}
        self._lock = threading.Lock()
        self.sleep = time.sleep

    # -- plumbing ---------------------------------------------------------------------------

    def base_url(self, ref: Reference) -> str:
        insecure = ref.registry in self.settings.insecure_registries or (
            ref.api_host in self.settings.insecure_registries)
        return f"{'http' if insecure else 'https'}://{ref.api_host}"

    def _authenticator(self, ref: Reference) -> Authenticator:
        with self._lock:
            auth = self._auth.get(ref.registry)
            if auth is None:
                creds = load_credentials(ref.registry, self.settings.docker_config)
                auth = self._auth[ref.registry] = Authenticator(ref.registry, creds, self.transport)
            return auth

    def _request(self, method: str, ref: Reference, url: str, *, push: bool = False,
                 headers: dict[str, str] | None = None, body: bytes | BinaryIO | None = None,
                 body_length: int | None = None) -> Response:
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        auth = self._authenticator(ref)
        h = dict(headers or {})
        sent = auth.header_for(scope)
        if sent:
            h["Authorization"] = sent
        resp = self.transport.request(method, url, h, body, body_length=body_length)
        if resp.status == 401:
            challenge = resp.header("WWW-Authenticate")
            resp.close()
            if not challenge:
                raise RegistryAuthError(f"registry {ref.registry} answered 401 without a challenge")
            h["Authorization"] = auth.answer(challenge, scope)
            resp = self.transport.request(method, url, h, body, body_length=body_length)
            if resp.status == 401:
                resp.close()
                raise RegistryAuthError(f"registry {ref.registry} refused our credentials for "
                                        f"{ref.repository}")
        if resp.status == 403:
            resp.close()
            raise RegistryAuthError(f"registry {ref.registry} denied access to {ref.repository}")
        return resp

    def _url(self, ref: Reference, tail: str) -> str:
        return f"{self.base_url(ref)}/v2/{ref.repository}/{tail}"

    @staticmethod
    def _fail(resp: Response, what: str) -> ImageError:
        try:
            detail = resp.read(4096).decode("utf-8", "replace").strip()
        except ImageError:
            detail = ""
        resp.close(reuse=False)
        return ImageError(f"{what}: HTTP {resp.status} {detail[:300]}".rstrip())

    # -- reading ----------------------------------------------------------------------------

    def ping(self, ref: Reference) -> None:
        """Check that the registry speaks /v2/ (a 401 still proves that)."""
        resp = self.transport.request("GET", f"{self.base_url(ref)}/v2/")
        resp.close()
        if resp.status not in (200, 401):
            raise ImageError(f"registry {ref.registry} does not speak the v2 API "
                             f"(HTTP {resp.status})")

    def get_manifest(self, ref: Reference, version: str | None = None) -> tuple[str, str, bytes]:
        """Fetch a manifest or index by tag or digest: (media type, digest, verified bytes)."""
        version = version or ref.version
        url = self._url(ref, f"manifests/{urllib.parse.quote(version, safe=':')}")
        resp = self._request("GET", ref, url, headers={"Accept": ACCEPT_MANIFESTS})
        if resp.status == 404:
            resp.close()
            raise ImageNotFound(f"image {ref} not found in registry {ref.registry}",
                                field="image")
        if resp.status != 200:
            raise self._fail(resp, f"fetching manifest of {ref}")
        with resp:
            raw = resp.read(model.MAX_MANIFEST_SIZE)
        digest = model.sha256_digest(raw)
        if version.startswith("sha256:") and digest != version:
            raise ImageVerifyError(f"manifest of {ref} does not match its digest {version} "
                                   f"(got {digest})")
        claimed = resp.header("Docker-Content-Digest")
        if claimed.startswith("sha256:") and claimed != digest:
            raise ImageVerifyError(f"manifest of {ref}: registry claims {claimed}, content is "
                                   f"{digest}")
        return model.sniff_media_type(raw, resp.header("Content-Type")), digest, raw

    def resolve(self, ref: Reference, platform: tuple[str, str] = DEFAULT_PLATFORM
                ) -> ResolvedManifest:
        """The image manifest for `ref`, following an index to the platform's manifest."""
        media_type, digest, raw = self.get_manifest(ref)
        index_digest = None
        if media_type in model.INDEX_TYPES:
            index = model.decode_index(raw)
            index_digest = digest
            choice = pick_platform(index, platform)
            if choice is None:
                raise ImageNotFound(f"image {ref} has no {platform[0]}/{platform[1]} variant",
                                    field="image")
            media_type, digest, raw = self.get_manifest(ref, choice.digest)
            if media_type in model.INDEX_TYPES:
                raise ImageVerifyError(f"image {ref}: nested index for {choice.digest}")
        if media_type not in model.MANIFEST_TYPES:
            raise ImageError(f"image {ref}: unsupported manifest type {media_type}")
        return ResolvedManifest(digest, media_type, raw, model.decode_manifest(raw), index_digest)

    def fetch_blob(self, ref: Reference, desc: model.Descriptor, dest: str, *,
                   max_size: int = MAX_BLOB_SIZE, progress: Progress | None = None) -> None:
        """Stream blob `desc` into the file `dest`, checking size and sha256; retry drops.

        On any failure `dest` is left truncated or partial: the caller must not trust it.
        """
        if desc.size > max_size:
            raise ImageVerifyError(f"blob {desc.digest} of {ref} declares {desc.size} bytes, "
                                   f"over the cap of {max_size}")
        url = self._url(ref, f"blobs/{desc.digest}")
        expected = desc.digest.split(":", 1)[1]
        last_error = ""
        for attempt in range(BLOB_RETRIES + 1):
            if attempt:
                self.sleep(0.2 * (2 ** (attempt - 1)))
            resp = self._request("GET", ref, url)
            if resp.status == 404:
                resp.close()
                raise ImageNotFound(f"blob {desc.digest} of image {ref} not found", field="image")
            if resp.status != 200:
                raise self._fail(resp, f"fetching blob {desc.digest} of {ref}")
            h = hashlib.sha256()
            done = 0
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_chunks():
                        done += len(chunk)
                        if done > desc.size:
                            resp.close(reuse=False)
                            raise ImageVerifyError(f"blob {desc.digest} of {ref} is larger than "
                                                   f"its declared {desc.size} bytes")
                        h.update(chunk)
                        f.write(chunk)
                        if progress:
                            progress(done)
            except _BODY_ERRORS as exc:
                resp.close(reuse=False)
                last_error = f"connection dropped after {done} bytes ({exc.__class__.__name__})"
                continue
            resp.close()
            if done < desc.size:
                last_error = f"truncated: {done} of {desc.size} bytes"
                continue
            if h.hexdigest() != expected:
                raise ImageVerifyError(f"blob of {ref} does not match its digest {desc.digest} "
                                       f"(got sha256:{h.hexdigest()})")
            return
        raise ImageVerifyError(f"blob {desc.digest} of {ref}: {last_error}")

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        resp = self._request("HEAD", ref, self._url(ref, f"blobs/{digest}"))
        resp.close()
        if resp.status in (200, 307, 302):
            return True
        if resp.status == 404:
            return False
        raise ImageError(f"HEAD blob {digest} of {ref}: HTTP {resp.status}")

    # -- writing ----------------------------------------------------------------------------

    def push_blob(self, ref: Reference, digest: str, path: str, *,
                  progress: Progress | None = None) -> bool:
        """Upload the file `path` as blob `digest` unless the registry has it. True if sent."""
        if self.blob_exists(ref, digest):
            return False
        size = os.path.getsize(path)
        resp = self._request("POST", ref, self._url(ref, "blobs/uploads/"), push=True)
        location = resp.header("Location")
        if resp.status != 202 or not location:
            raise self._fail(resp, f"starting blob upload to {ref}")
        resp.close()
        upload = urllib.parse.urljoin(self._url(ref, "blobs/uploads/"), location)
        upload += ("&" if "?" in upload else "?") + "digest=" + urllib.parse.quote(digest)
        with open(path, "rb") as f:
            resp = self._request("PUT", ref, upload, push=True, body=f, body_length=size,
                                 headers={"Content-Type": "application/octet-stream"})
        if resp.status not in (201, 204):
            raise self._fail(resp, f"uploading blob {digest} to {ref}")
        resp.close()
        if progress:
            progress(size)
        return True

    def put_manifest(self, ref: Reference, media_type: str, raw: bytes) -> str:
        """PUT a manifest under `ref`'s tag (or digest); return its digest."""
        digest = model.sha256_digest(raw)
        version = ref.tag or digest
        resp = self._request("PUT", ref, self._url(ref, f"manifests/{version}"), push=True,
                             headers={"Content-Type": media_type}, body=raw,
                             body_length=len(raw))
        if resp.status not in (200, 201, 202):
            raise self._fail(resp, f"pushing manifest to {ref}")
        resp.close()
        return digest


def pick_platform(index: model.Index, platform: tuple[str, str]) -> model.Descriptor | None:
    """The first manifest for os/architecture in an index (an index without platforms: the
    only image manifest in it)."""
    os_name, arch = platform
    candidates = [d for d in index.manifests if d.media_type in model.MANIFEST_TYPES]
    for d in candidates:
        if d.platform and d.platform.os == os_name and d.platform.architecture == arch:
            return d
    unlabeled = [d for d in candidates if d.platform is None]
    return unlabeled[0] if len(unlabeled) == 1 and len(candidates) == 1 else None
