"""Adapter from the image store (sandbox.oci) to what workers.images needs.

Kept apart so workers.images stays importable (and testable with local images) without the
store, and so the store's API is used in exactly one place on the worker side.
"""

from __future__ import annotations

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError
from sandbox.oci.pull import Puller
from sandbox.spec import Rootfs


class StoreAdapter:
    """`rootfs_for(ref, refresh)` -> (Rootfs, manifest digest, image environment)."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self._puller = Puller(settings)

    def rootfs_for(self, ref: str, *, refresh: bool) -> tuple[Rootfs, str, dict[str, str]]:
        try:
            image = self._puller.pull(ref) if refresh else self._puller.ensure(ref)
        except OSError as exc:
            raise ImageError(f"image {ref!r}: registry unreachable ({exc})", field="image") from exc
        return image.rootfs, image.digest, image.config.env_dict()
