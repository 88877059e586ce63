"""Image references -> root filesystems for the runtime, on the worker side.

Two sources, tried in order: "local images" (a name -> host directory map from the worker
settings: an unpacked root filesystem the operator or a test provides), then the image store
(sandbox.oci.store), which pulls from the registry when the image is missing. A reference is
resolved once per worker process and cached: the store's unpacked layers are immutable.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from sandbox.errors import ImageError, ImageNotFound
from sandbox.spec import Rootfs
from workers.protocol import ImageInfo


@dataclass(frozen=True)
class Resolved:
    """An image ready to run: its layers, what to report about it, its default environment."""

    rootfs: Rootfs
    info: ImageInfo
    env: dict[str, str] = field(default_factory=dict)


class ImageResolver:
    """Resolves and pulls images for one worker process."""

    def __init__(self, local_images: dict[str, str], store=None) -> None:
        self._local = {name: os.path.abspath(path) for name, path in local_images.items()}
        self._store = store
        self._cache: dict[str, Resolved] = {}
        self._lock = threading.Lock()

    def local_images(self) -> list[ImageInfo]:
        return [ImageInfo(name=name, source="local") for name in sorted(self._local)]

    def resolve(self, ref: str) -> Resolved:
        """The layers to run `ref` from; pulls through the store when it is not here yet."""
        cached = self._cache.get(ref)
        if cached is not None:
            return cached
        with self._lock:
            found = self._resolve_uncached(ref)
            self._cache[ref] = found
            return found

    def pull(self, ref: str) -> ImageInfo:
        """Fetch `ref` again from the registry (or confirm a local image exists)."""
        if ref in self._local:
            return self._resolve_uncached(ref).info
        with self._lock:
            self._cache.pop(ref, None)
        found = self._from_store(ref, refresh=True)
        with self._lock:
            self._cache[ref] = found
        return found.info

    def _resolve_uncached(self, ref: str) -> Resolved:
        path = self._local.get(ref)
        if path is not None:
            if not os.path.isdir(path):
                raise ImageNotFound(f"image {ref!r}: local root filesystem {path} is missing", field="image")
            return Resolved(Rootfs(layers=(path,)), ImageInfo(name=ref, source="local"))
        return self._from_store(ref, refresh=False)

    def _from_store(self, ref: str, *, refresh: bool) -> Resolved:
        if self._store is None:
            raise ImageNotFound(f"image {ref!r} is not known to this worker", field="image")
        try:
            rootfs, digest, env = self._store.rootfs_for(ref, refresh=refresh)
        except ImageNotFound as exc:
            raise ImageNotFound(f"image {ref!r}: {exc.message}", field="image") from exc
        except ImageError:
            raise
        return Resolved(rootfs, ImageInfo(name=ref, digest=digest, source="registry"), env)
