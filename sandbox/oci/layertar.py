"""Reproducible layer tarballs: the bytes of a layer depend only on its content.

Entries are sorted, owned by 0:0 with empty user/group names, stamped with a fixed mtime, and
written in GNU format; the gzip stream carries no file name and mtime 0. `compress_layer` also
yields the diff_id (sha256 of the uncompressed tar) that the image config lists.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile

FIXED_MTIME = 0
"""Seconds since the epoch stamped on every entry sbx writes."""
GZIP_LEVEL = 6
CHUNK = 1024 * 1024


class CopyEntry:
    """One file, directory or symlink to put at `dest` (a relative path inside the layer)."""

    __slots__ = ("dest", "source", "kind", "mode", "target")

    def __init__(self, dest: str, kind: str, mode: int, source: str | None = None,
                 target: str | None = None) -> None:
        self.dest, self.kind, self.mode, self.source, self.target = dest, kind, mode, source, target


def _info(name: str, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = FIXED_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mode = mode & 0o7777
    return ti


def write_tar(entries: list[CopyEntry], out_path: str) -> None:
    """Write `entries` (plus their missing parent directories) as a sorted, stable tar."""
    by_dest: dict[str, CopyEntry] = {}
    for e in entries:
        parts = e.dest.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            by_dest.setdefault(parent, CopyEntry(parent, "dir", 0o755))
        by_dest[e.dest] = e
    with open(out_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                   format=tarfile.GNU_FORMAT) as tar:
        for dest in sorted(by_dest):
            e = by_dest[dest]
            ti = _info(dest, e.mode)
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target or ""
                tar.addfile(ti)
            else:
                with open(e.source, "rb") as f:
                    ti.size = os.fstat(f.fileno()).st_size
                    tar.addfile(ti, f)


def compress_layer(tar_path: str, out_path: str) -> tuple[str, int]:
    """gzip `tar_path` into `out_path` without timestamps; return (diff_id, compressed size)."""
    h = hashlib.sha256()
    with open(tar_path, "rb") as src, open(out_path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL,
                           mtime=0) as gz:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                h.update(chunk)
                gz.write(chunk)
        size = raw.tell()
    return "sha256:" + h.hexdigest(), size


def tree_entries(src: str, dest: str, *, chmod: int | None = None) -> list[CopyEntry]:
    """Entries for copying host path `src` to layer path `dest` (a dir's contents go under it).
    Symlinks are copied as symlinks, never followed; other special files are refused."""
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        return [CopyEntry(dest, "file", chmod if chmod is not None else st.st_mode, source=src)]
    if stat.S_ISLNK(st.st_mode):
        return [CopyEntry(dest, "symlink", 0o777, target=os.readlink(src))]
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"cannot COPY special file {src}")
    out = [CopyEntry(dest, "dir", st.st_mode)] if dest else []
    for name in sorted(os.listdir(src)):
        child = os.path.join(src, name)
        out.extend(tree_entries(child, f"{dest}/{name}" if dest else name, chmod=chmod))
    return out


def content_hash(entries: list[CopyEntry]) -> str:
    """A digest of what `entries` would write: paths, kinds, modes, targets and file bytes."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.dest):
        h.update(f"{e.dest}\0{e.kind}\0{e.mode & 0o7777:o}\0{e.target or ''}\0".encode())
        if e.kind == "file":
            with open(e.source, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
        h.update(b"\n")
    return h.hexdigest()
