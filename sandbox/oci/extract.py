"""Safe, unprivileged unpacking of one OCI layer tar into a directory usable as an overlay lower.

Every path is resolved component by component from a directory fd with O_NOFOLLOW, so nothing
is ever written through a symlink, whatever the tar says; absolute names and '..' are refused;
hardlinks may only point at regular files unpacked earlier from the same layer; device nodes and
fifos are skipped; setuid/setgid bits are dropped (policy) and directories keep owner rwx so the
store can delete them (the container's root owns them anyway); owners are not kept (all files belong
to the unpacking user, which is root inside the container); entry and layer sizes are capped.

OCI whiteouts become overlayfs whiteouts that an unprivileged user can create and that the kernel
honours in a lower layer mounted with `userxattr` (Linux >= 6.7; checked on 6.18):
  `.wh.NAME`      -> empty regular file NAME with xattr user.overlay.whiteout, its directory
                     marked user.overlay.opaque=x ("contains xattr whiteouts")
  `.wh..wh..opq`  -> user.overlay.opaque=y on the directory
A whiteout for a name the same layer also creates is satisfied by that entry (a directory is made
opaque instead). Whiteouts inside an opaque directory are dropped (the directory hides all below).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from typing import BinaryIO

import msgspec

from sandbox.errors import ImageError, ImageVerifyError
from sandbox.oci import model

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_WHITEOUT = "user.overlay.whiteout"
XATTR_OPAQUE = "user.overlay.opaque"
OPAQUE_ALL = b"y"
"""user.overlay.opaque value: hide everything below this directory."""
OPAQUE_HAS_WHITEOUTS = b"x"
"""user.overlay.opaque value: not opaque, but holds xattr whiteouts the kernel must look at."""
COPY_CHUNK = 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ExtractLimits(msgspec.Struct, frozen=True):
    max_entry_size: int = 4 * 1024**3
    """Bytes: largest single file in a layer."""
    max_layer_size: int = 16 * 1024**3
    """Bytes: all file contents of a layer together (also bounds the decompressed stream)."""
    max_entries: int = 1_000_000
    """Tar members in one layer."""
    max_name: int = 4096
    """Bytes: longest member or link name."""


class ExtractStats(msgspec.Struct):
    entries: int = 0
    bytes: int = 0
    skipped: list[str] = []
    whiteouts: int = 0
    opaque_dirs: int = 0


class _HashingReader:
    """Read-through wrapper computing the diff_id (sha256 of the uncompressed tar)."""

    def __init__(self, raw: BinaryIO, cap: int) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.cap = cap

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.cap:
            raise ImageVerifyError(f"layer decompresses to more than {self.cap} bytes")
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass


def split_name(name: str, limits: ExtractLimits) -> tuple[str, ...]:
    """Tar member name -> path components; refuse absolute paths, '..', NUL and overlong names."""
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name or "\0" in name:
        raise ImageVerifyError(f"layer entry name too long or with NUL: {name[:80]!r}")
    if name.startswith("/"):
        raise ImageVerifyError(f"layer entry with absolute path {name[:200]!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageVerifyError(f"layer entry escapes the layer: {name[:200]!r}")
    return parts


class _Unpacker:
    def __init__(self, root: str, limits: ExtractLimits) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.limits = limits
        self.stats = ExtractStats()
        self.dir_fds: dict[tuple[str, ...], int] = {(): self.root_fd}
        self.dir_meta: dict[tuple[str, ...], tuple[int, int]] = {}
        self.regular: set[tuple[str, ...]] = set()
        self.whiteouts: set[tuple[str, ...]] = set()
        self.opaque: set[tuple[str, ...]] = set()

    def evict(self) -> None:
        """Bound the fd cache; only called between entries, when no fd is in use."""
        if len(self.dir_fds) > 256:
            for key in [k for k in self.dir_fds if k]:
                os.close(self.dir_fds.pop(key))

    def close(self) -> None:
        for fd in self.dir_fds.values():
            os.close(fd)
        self.dir_fds.clear()

    # -- walking ----------------------------------------------------------------------------

    def _forget_under(self, path: tuple[str, ...]) -> None:
        for key in [k for k in self.dir_fds if k[: len(path)] == path and k]:
            os.close(self.dir_fds.pop(key))
        self.regular = {p for p in self.regular if p[: len(path)] != path}

    def dir_fd(self, parts: tuple[str, ...], create: bool = True) -> int:
        """An fd for directory `parts` under the root, never following a symlink."""
        fd = self.dir_fds.get(parts)
        if fd is not None:
            return fd
        parent = self.dir_fd(parts[:-1], create)
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise ImageVerifyError(f"layer refers to missing directory {'/'.join(parts)}")
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            kind = "symlink" if stat.S_ISLNK(os.stat(name, dir_fd=parent,
                                                      follow_symlinks=False).st_mode) else "file"
            raise ImageVerifyError(f"layer writes through a {kind} at {'/'.join(parts)}; "
                                   "refused") from None
        self.dir_fds[parts] = fd
        return fd

    def _clear(self, parent: int, parts: tuple[str, ...], keep_dir: bool) -> bool:
        """Remove whatever is at `parts` (no following). Return True if a dir was kept."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget_under(parts)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
            self.regular.discard(parts)
        return False

    # -- entries ----------------------------------------------------------------------------

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.evict()
        st = self.stats
        st.entries += 1
        if st.entries > self.limits.max_entries:
            raise ImageVerifyError(f"layer has more than {self.limits.max_entries} entries")
        parts = split_name(m.name, self.limits)
        mode = m.mode & 0o1777  # setuid/setgid dropped by policy
        if not parts:
            if m.isdir():
                self.dir_meta[()] = (mode, int(m.mtime))
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self.dir_fd(parts[:-1])
            if base == OPAQUE_MARKER:
                self.opaque.add(parts[:-1])
            else:
                target = base[len(WHITEOUT_PREFIX):]
                if not target or target in (".", ".."):
                    raise ImageVerifyError(f"malformed whiteout {m.name[:200]!r}")
                self.whiteouts.add((*parts[:-1], target))
            return
        if m.isdir():
            parent = self.dir_fd(parts[:-1])
            self._clear(parent, parts, keep_dir=True)
            self.dir_fd(parts)
            self.dir_meta[parts] = (mode, int(m.mtime))
            return
        if m.isreg():
            if m.size > self.limits.max_entry_size:
                raise ImageVerifyError(f"layer entry {m.name[:200]!r} declares {m.size} bytes, "
                                       f"over the cap of {self.limits.max_entry_size}")
            if st.bytes + m.size > self.limits.max_layer_size:
                raise ImageVerifyError(f"layer contents exceed {self.limits.max_layer_size} bytes")
            parent = self.dir_fd(parts[:-1])
            self._clear(parent, parts, keep_dir=False)
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent)
            try:
                src = tar.extractfile(m)
                remaining = m.size
                while remaining:
                    chunk = src.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise ImageVerifyError(f"layer truncated inside {m.name[:200]!r}")
                    _write_all(fd, chunk)
                    remaining -= len(chunk)
                os.fchmod(fd, mode)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
            st.bytes += m.size
            self.regular.add(parts)
            return
        if m.issym():
            if len(m.linkname) > self.limits.max_name or "\0" in m.linkname:
                raise ImageVerifyError(f"symlink target too long: {m.name[:200]!r}")
            parent = self.dir_fd(parts[:-1])
            self._clear(parent, parts, keep_dir=False)
            os.symlink(m.linkname, base, dir_fd=parent)
            try:
                os.utime(base, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
            except OSError:
                pass
            return
        if m.islnk():
            target = split_name(m.linkname, self.limits)
            if target not in self.regular:
                raise ImageVerifyError(f"hardlink {m.name[:200]!r} points outside this layer's "
                                       f"regular files ({m.linkname[:200]!r}); refused")
            if target == parts:
                return
            tparent = self.dir_fd(target[:-1], create=False)
            parent = self.dir_fd(parts[:-1])
            self._clear(parent, parts, keep_dir=False)
            os.link(target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent,
                    follow_symlinks=False)
            self.regular.add(parts)
            return
        # character/block devices, fifos, sockets, unknown types: not created (policy)
        st.skipped.append(m.name[:200])

    # -- finishing --------------------------------------------------------------------------

    def finish(self) -> None:
        for parts in sorted(self.opaque):
            self.evict()
            fd = self.dir_fd(parts)
            os.setxattr(fd, XATTR_OPAQUE, OPAQUE_ALL)
            self.stats.opaque_dirs += 1
        marked: set[tuple[str, ...]] = set()
        for parts in sorted(self.whiteouts):
            self.evict()
            parent_parts = parts[:-1]
            if any(parent_parts[: i] in self.opaque for i in range(len(parent_parts) + 1)):
                continue
            parent = self.dir_fd(parent_parts)
            try:
                existing = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode):  # deleted, then re-created in this layer
                    os.setxattr(self.dir_fd(parts), XATTR_OPAQUE, OPAQUE_ALL)
                continue
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
            try:
                os.setxattr(fd, XATTR_WHITEOUT, b"y")
            finally:
                os.close(fd)
            if parent_parts not in marked and parent_parts not in self.opaque:
                os.setxattr(parent, XATTR_OPAQUE, OPAQUE_HAS_WHITEOUTS)
                marked.add(parent_parts)
            self.stats.whiteouts += 1
        # directory modes and times last (deepest first), so read-only dirs were writable above
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            self.evict()
            mode, mtime = self.dir_meta[parts]
            fd = self.dir_fd(parts, create=False)
            os.fchmod(fd, mode | 0o700)
            os.utime(fd, (mtime, mtime))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_layer(path: str, media_type: str) -> BinaryIO:
    """Open a verified blob as an uncompressed tar stream according to its media type."""
    if media_type in (model.OCI_LAYER_TAR, model.DOCKER_LAYER_TAR):
        return open(path, "rb")
    if media_type in (model.OCI_LAYER_GZIP, model.DOCKER_LAYER_GZIP):
        return gzip.GzipFile(fileobj=open(path, "rb"), mode="rb")  # noqa: SIM115
    if media_type == model.OCI_LAYER_ZSTD:
        raise ImageError("zstd-compressed layers are not supported (no stdlib decoder); "
                         "push the image with gzip layers")
    raise ImageError(f"unsupported layer media type {media_type}")


def unpack_layer(blob_path: str, media_type: str, dest: str, *, diff_id: str | None = None,
                 limits: ExtractLimits = ExtractLimits()) -> tuple[str, ExtractStats]:
    """Unpack the layer blob into the existing empty directory `dest`; return (diff_id, stats).

    If `diff_id` is given, the uncompressed stream must hash to it. On any error the caller must
    discard `dest` (it holds a partial layer).
    """
    stream = open_layer(blob_path, media_type)
    reader = _HashingReader(stream, limits.max_layer_size + 64 * 1024 * 1024)
    unpacker = _Unpacker(dest, limits)
    try:
        with tarfile.open(fileobj=reader, mode="r|", errorlevel=2) as tar:
            for member in tar:
                unpacker.add(tar, member)
        reader.drain()
        unpacker.finish()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageVerifyError(f"corrupt layer {os.path.basename(blob_path)}: {exc}") from None
    finally:
        unpacker.close()
        stream.close()
    got = "sha256:" + reader.hash.hexdigest()
    if diff_id is not None and got != diff_id:
        raise ImageVerifyError(f"layer {os.path.basename(blob_path)} unpacks to {got}, but the "
                               f"image config says {diff_id}")
    return got, unpacker.stats
