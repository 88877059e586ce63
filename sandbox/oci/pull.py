"""Moving images between a registry and the local store: pull (if missing) and push.

A pull resolves the reference to a platform manifest, then makes the config, every layer blob and
every unpacked layer present in the store (each under its own lock, so concurrent pulls share the
work), and only then records the reference: an interrupted pull leaves no reference behind.
Progress is reported as `ProgressEvent`s; the CLI turns them into bars or plain lines.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import msgspec

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError, ImageNotFound, ImageVerifyError
from sandbox.oci import model
from sandbox.oci.reference import Reference, parse_reference
from sandbox.oci.registry import RegistryClient
from sandbox.oci.store import ImageStore, RefRecord, ResolvedImage

PARALLEL_LAYERS = 3
"""Layers downloaded and unpacked at once during a pull."""


class ProgressEvent(msgspec.Struct, frozen=True):
    """`action` is resolve | download | unpack | exists | upload | skip | done."""

    action: str
    item: str
    done: int = 0
    total: int = 0


ProgressFn = Callable[[ProgressEvent], None]


def _quiet(_event: ProgressEvent) -> None:
    pass


class Puller:
    def __init__(self, settings: RuntimeSettings, store: ImageStore | None = None,
                 client: RegistryClient | None = None, progress: ProgressFn = _quiet) -> None:
        self.settings = settings
        self.store = store or ImageStore(settings)
        self.client = client or RegistryClient(settings)
        self.progress = progress

    def parse(self, text: str | Reference) -> Reference:
        return text if isinstance(text, Reference) else parse_reference(text, self.settings.registry)

    # -- pull -------------------------------------------------------------------------------

    def ensure(self, text: str | Reference) -> ResolvedImage:
        """The image from the store, pulled first if it is not there (no network when warm)."""
        ref = self.parse(text)
        with self.store.store_lock(shared=True):
            rec = self.store.get_ref(str(ref))
            if rec is not None:
                try:
                    return self.store.resolve(rec)
                except ImageError:
                    pass  # a layer went missing: pull again below
        return self.pull(ref)

    def pull(self, text: str | Reference) -> ResolvedImage:
        ref = self.parse(text)
        with self.store.store_lock(shared=True):
            self.progress(ProgressEvent("resolve", str(ref)))
            res = self.client.resolve(ref)
            self.store.put_blob(res.raw, res.digest)
            m = res.manifest
            if m.config.size > model.MAX_MANIFEST_SIZE:
                raise ImageVerifyError(f"image {ref}: config of {m.config.size} bytes is too big")
            self.store.ingest_blob(m.config.digest,
                                   lambda tmp: self.client.fetch_blob(ref, m.config, tmp))
            cfg = self.store.config_file(m.config.digest)
            if len(cfg.rootfs.diff_ids) != len(m.layers):
                raise ImageVerifyError(f"image {ref}: {len(m.layers)} layers but "
                                       f"{len(cfg.rootfs.diff_ids)} diff_ids in its config")
            for d in m.layers:
                if d.media_type not in model.LAYER_TYPES:
                    raise ImageError(f"image {ref}: unsupported layer type {d.media_type}")
            jobs = list(zip(m.layers, cfg.rootfs.diff_ids))
            if len(jobs) > 1:
                with ThreadPoolExecutor(min(PARALLEL_LAYERS, len(jobs))) as pool:
                    for f in [pool.submit(self._layer, ref, d, diff) for d, diff in jobs]:
                        f.result()
            else:
                for d, diff in jobs:
                    self._layer(ref, d, diff)
            record = RefRecord(str(ref), res.digest, m.config.digest, res.media_type,
                               res.index_digest, time.time())
            self.store.set_ref(record)
            self.progress(ProgressEvent("done", str(ref)))
            return self.store.resolve(record)

    def _layer(self, ref: Reference, desc: model.Descriptor, diff_id: str) -> None:
        short = desc.digest[7:19]
        if self.store.has_blob(desc.digest) and self.store.has_layer(diff_id):
            self.progress(ProgressEvent("exists", short, desc.size, desc.size))
            return

        def fetch(tmp: str) -> None:
            self.client.fetch_blob(ref, desc, tmp, progress=lambda n: self.progress(
                ProgressEvent("download", short, n, desc.size)))
        self.store.ingest_blob(desc.digest, fetch)
        self.progress(ProgressEvent("unpack", short, 0, desc.size))
        self.store.ensure_layer(diff_id, desc.digest, desc.media_type)
        self.progress(ProgressEvent("unpack", short, desc.size, desc.size))

    # -- push -------------------------------------------------------------------------------

    def push(self, local: str, dest: str | None = None) -> str:
        """Push a stored image to `dest` (default: its own reference); return manifest digest."""
        rec = self.store.lookup(local)
        if rec is None:
            raise ImageNotFound(f"image {local} is not in the local store", field="image")
        target = self.parse(dest or rec.reference)
        if target.digest and not target.tag:
            raise ImageError("push needs a tag, not a digest")
        manifest = self.store.manifest(rec.digest)
        for d in [*manifest.layers, manifest.config]:
            if not self.store.has_blob(d.digest):
                raise ImageError(f"blob {d.digest} of {rec.reference} is not in the store")
            short = d.digest[7:19]
            sent = self.client.push_blob(target, d.digest, self.store.blob_path(d.digest),
                                         progress=lambda n, s=short, t=d.size: self.progress(
                                             ProgressEvent("upload", s, n, t)))
            if not sent:
                self.progress(ProgressEvent("skip", short, d.size, d.size))
        raw = self.store.read_blob(rec.digest)
        digest = self.client.put_manifest(target, rec.media_type, raw)
        if str(target) != rec.reference:
            self.store.set_ref(RefRecord(str(target), rec.digest, rec.config, rec.media_type,
                                         None, time.time()))
        self.progress(ProgressEvent("done", str(target)))
        return digest
