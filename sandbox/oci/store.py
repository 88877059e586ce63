"""The local content-addressed image store under settings.images_dir.

Layout (everything below `images_dir`):
  blobs/sha256/<hex>          verified blobs: manifests, configs, compressed layers
  layers/sha256/<hex>/        a layer unpacked once, named by its diff_id, shared by all images
                              and used directly as an overlay lower directory
  refs/<hash>.json            reference -> manifest digest (the image index)
  locks/                      fcntl.flock files: one per blob/layer, plus the store lock
  tmp/                        work in progress; never trusted, emptied by prune

Anything becomes visible under blobs/ or layers/ only by an atomic rename after it was verified,
so a crash half way leaves nothing a later pull would trust. A blob or layer is produced under an
exclusive per-digest lock and re-checked after the lock is taken, so concurrent pulls (threads or
processes) download and unpack it once. Pulls and builds hold the store lock shared; `rm` of the
last reference leaves its content for `prune`, which holds it exclusive.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from typing import Callable, Iterator

import msgspec

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError, ImageNotFound, ImageVerifyError
from sandbox.oci import model
from sandbox.oci.extract import ExtractLimits, unpack_layer
from sandbox.oci.reference import check_digest, parse_reference
from sandbox.spec import Rootfs


class RefRecord(msgspec.Struct, frozen=True):
    """One entry of the image index: a reference and what it points at."""

    reference: str
    digest: str
    config: str
    media_type: str
    index_digest: str | None = None
    created: float = 0.0


class ResolvedImage(msgspec.Struct, frozen=True):
    """An image ready to run: its layer directories (bottom first) and process defaults."""

    reference: str
    digest: str
    rootfs: Rootfs
    config: model.ImageConfig


class PruneReport(msgspec.Struct):
    blobs: int = 0
    layers: int = 0
    tmp: int = 0
    bytes: int = 0


def _hex(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


def _rmtree(path: str) -> None:
    """Remove a tree that may contain read-only directories."""
    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700) if os.path.isdir(p) and not os.path.islink(p) else None
            func(p)
        except FileNotFoundError:
            pass
    shutil.rmtree(path, onerror=onerror)


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


class ImageStore:
    def __init__(self, settings: RuntimeSettings, *,
                 limits: ExtractLimits = ExtractLimits()) -> None:
        self.settings = settings
        self.root = settings.images_dir
        self.limits = limits
        for sub in ("blobs/sha256", "layers/sha256", "refs", "locks", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    # -- locks and paths --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "locks", name + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def store_lock(self, *, shared: bool = True):
        """Shared by pulls and builds; exclusive for prune."""
        return self.lock("store", shared=shared)

    def tmp_path(self, hint: str) -> str:
        return os.path.join(self.root, "tmp", f"{hint[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", _hex(digest))

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", "sha256", _hex(diff_id))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isdir(self.layer_path(diff_id))

    # -- blobs ------------------------------------------------------------------------------

    def ingest_blob(self, digest: str, fetch: Callable[[str], None]) -> bool:
        """Make blob `digest` present, calling `fetch(tmp_path)` (which must verify the digest)
        at most once across all processes. True if this call fetched it."""
        final = self.blob_path(digest)
        if os.path.isfile(final):
            return False
        with self.lock("blob-" + _hex(digest)):
            if os.path.isfile(final):
                return False
            tmp = self.tmp_path(_hex(digest))
            try:
                fetch(tmp)
                os.chmod(tmp, 0o444)
                os.rename(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return True

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        """Store small bytes (a manifest or config); check them against `expected` if given."""
        digest = model.sha256_digest(data)
        if expected is not None and digest != expected:
            raise ImageVerifyError(f"content does not match its digest {expected} (got {digest})")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
        self.ingest_blob(digest, write)
        return digest

    def add_blob_file(self, path: str) -> str:
        """Move a finished file into the store (builder output); return its digest."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        self.ingest_blob(digest, lambda tmp: os.rename(path, tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return digest

    def read_blob(self, digest: str, limit: int = model.MAX_MANIFEST_SIZE) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is not in the local store") from None
        if len(data) > limit:
            raise ImageVerifyError(f"blob {digest} is larger than {limit} bytes")
        return data

    # -- layers -----------------------------------------------------------------------------

    def ensure_layer(self, diff_id: str, blob_digest: str, media_type: str) -> bool:
        """Unpack blob into layers/<diff_id> once (verifying the diff_id). True if unpacked."""
        final = self.layer_path(diff_id)
        if os.path.isdir(final):
            return False
        with self.lock("layer-" + _hex(diff_id)):
            if os.path.isdir(final):
                return False
            tmp = self.tmp_path("layer-" + _hex(diff_id))
            os.mkdir(tmp, 0o755)
            try:
                unpack_layer(self.blob_path(blob_digest), media_type, tmp, diff_id=diff_id,
                             limits=self.limits)
                os.rename(tmp, final)
            except BaseException:
                _rmtree(tmp)
                raise
            return True

    def add_layer_dir(self, diff_id: str, src_dir: str) -> None:
        """Adopt an already unpacked directory (the builder's) as layer `diff_id`."""
        final = self.layer_path(diff_id)
        with self.lock("layer-" + _hex(diff_id)):
            if os.path.isdir(final):
                _rmtree(src_dir)
                return
            os.rename(src_dir, final)

    def empty_layer(self) -> str:
        path = os.path.join(self.root, "layers", "empty")
        os.makedirs(path, exist_ok=True)
        return path

    # -- references -------------------------------------------------------------------------

    def _ref_file(self, reference: str) -> str:
        return os.path.join(self.root, "refs",
                            hashlib.sha256(reference.encode()).hexdigest()[:40] + ".json")

    def set_ref(self, record: RefRecord) -> None:
        tmp = self.tmp_path("ref")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(record))
        os.rename(tmp, self._ref_file(record.reference))

    def get_ref(self, reference: str) -> RefRecord | None:
        try:
            with open(self._ref_file(reference), "rb") as f:
                return msgspec.json.decode(f.read(), type=RefRecord)
        except FileNotFoundError:
            return None

    def list_refs(self) -> list[RefRecord]:
        out = []
        refs_dir = os.path.join(self.root, "refs")
        for name in sorted(os.listdir(refs_dir)):
            if name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                    with open(os.path.join(refs_dir, name), "rb") as f:
                        out.append(msgspec.json.decode(f.read(), type=RefRecord))
        return sorted(out, key=lambda r: r.reference)

    def remove_ref(self, reference: str) -> None:
        try:
            os.unlink(self._ref_file(reference))
        except FileNotFoundError:
            raise ImageNotFound(f"image {reference} is not in the local store",
                                field="image") from None

    def lookup(self, text: str) -> RefRecord | None:
        """Find a local image by reference text (parsed with the default registry)."""
        ref = parse_reference(text, self.settings.registry)
        rec = self.get_ref(str(ref))
        if rec is None and ref.digest:
            for r in self.list_refs():
                if r.digest == ref.digest and r.reference.startswith(ref.name):
                    return r
        return rec

    # -- images -----------------------------------------------------------------------------

    def manifest(self, digest: str) -> model.Manifest:
        return model.decode_manifest(self.read_blob(digest))

    def config_file(self, digest: str) -> model.ConfigFile:
        return model.decode_config(self.read_blob(digest))

    def resolve(self, record: RefRecord) -> ResolvedImage:
        """The runnable view of a stored image; every layer must already be unpacked."""
        manifest = self.manifest(record.digest)
        cfg = self.config_file(manifest.config.digest)
        layers = []
        for diff_id in cfg.rootfs.diff_ids:
            path = self.layer_path(diff_id)
            if not os.path.isdir(path):
                raise ImageError(f"image {record.reference}: layer {diff_id} is missing from the "
                                 "store; pull it again")
            layers.append(path)
        return ResolvedImage(record.reference, record.digest,
                             Rootfs(tuple(layers) or (self.empty_layer(),)),
                             model.ImageConfig.from_config(cfg))

    def inspect(self, record: RefRecord) -> dict:
        manifest = self.manifest(record.digest)
        cfg = self.config_file(manifest.config.digest)
        return {
            "reference": record.reference, "digest": record.digest,
            "media_type": record.media_type, "index_digest": record.index_digest,
            "config_digest": manifest.config.digest,
            "architecture": cfg.architecture, "os": cfg.os,
            "config": msgspec.to_builtins(cfg.config),
            "history": msgspec.to_builtins(cfg.history or []),
            "layers": [
                {"digest": d.digest, "media_type": d.media_type, "size": d.size,
                 "diff_id": diff_id, "path": self.layer_path(diff_id)}
                for d, diff_id in zip(manifest.layers, cfg.rootfs.diff_ids)
            ],
        }

    def image_size(self, record: RefRecord) -> int:
        with contextlib.suppress(ImageError, OSError):
            return sum(d.size for d in self.manifest(record.digest).layers)
        return 0

    # -- garbage collection -----------------------------------------------------------------

    def _roots(self) -> tuple[set[str], set[str]]:
        """Blob digests and diff_ids still used by a reference or the build cache."""
        blobs: set[str] = set()
        diff_ids: set[str] = set()
        for rec in self.list_refs():
            blobs.update({rec.digest, rec.config})
            if rec.index_digest:
                blobs.add(rec.index_digest)
            with contextlib.suppress(ImageError):
                m = self.manifest(rec.digest)
                blobs.update(d.digest for d in m.layers)
                diff_ids.update(self.config_file(m.config.digest).rootfs.diff_ids)
        cache = os.path.join(self.root, "build-cache")
        if os.path.isdir(cache):
            for name in os.listdir(cache):
                if name.endswith(".json"):
                    with contextlib.suppress(OSError, msgspec.DecodeError):
                        with open(os.path.join(cache, name), "rb") as f:
                            entry = msgspec.json.decode(f.read())
                        blobs.update(entry.get("blobs", []))
                        diff_ids.update(entry.get("diff_ids", []))
        return blobs, diff_ids

    def prune(self, *, keep_build_cache: bool = True) -> PruneReport:
        """Delete blobs and layers no reference uses, and leftovers of interrupted work."""
        report = PruneReport()
        with self.store_lock(shared=False):
            if not keep_build_cache:
                _rmtree_if(os.path.join(self.root, "build-cache"))
            blobs, diff_ids = self._roots()
            keep_blob = {d.split(":", 1)[1] for d in blobs}
            keep_layer = {d.split(":", 1)[1] for d in diff_ids}
            bdir = os.path.join(self.root, "blobs", "sha256")
            for name in os.listdir(bdir):
                if name not in keep_blob:
                    report.bytes += _du(os.path.join(bdir, name))
                    os.unlink(os.path.join(bdir, name))
                    report.blobs += 1
            ldir = os.path.join(self.root, "layers", "sha256")
            for name in os.listdir(ldir):
                if name not in keep_layer:
                    doomed = self.tmp_path("gc-" + name)
                    os.rename(os.path.join(ldir, name), doomed)  # untrusted from here on
                    report.bytes += _du(doomed)
                    _rmtree(doomed)
                    report.layers += 1
            tdir = os.path.join(self.root, "tmp")
            for name in os.listdir(tdir):
                p = os.path.join(tdir, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    _rmtree(p)
                else:
                    os.unlink(p)
                report.tmp += 1
        return report


def _rmtree_if(path: str) -> None:
    if os.path.isdir(path):
        _rmtree(path)
