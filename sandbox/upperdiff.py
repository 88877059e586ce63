"""An overlay upper directory as an OCI layer tar (the image builder's RUN steps).

Overlayfs records a deletion as a whiteout (a 0/0 character device, or in userxattr mode a
file carrying `user.overlay.whiteout`) and a replaced directory as `user.overlay.opaque=y`.
OCI layers say the same with `.wh.NAME` entries and `.wh..wh..opq`. Entries are sorted and
get mtime 0 so the same upper directory always gives the same bytes. The walk never follows
links: symlinks are stored as symlinks.
"""

from __future__ import annotations

import os
import stat
import tarfile

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _is_whiteout(path: str, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return stat.S_ISREG(st.st_mode) and _xattr(path, "user.overlay.whiteout") is not None


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = 0
    return info


class LayerTooLarge(ValueError):
    """The upper directory holds a file larger than the run could have written."""


def write_layer(upper: str, out_path: str, max_file_size: int) -> None:
    """Write the layer tar for `upper` to `out_path` (uncompressed).

    A file whose apparent size exceeds `max_file_size` (the run's disk budget, which bounds
    the data it can really hold) is sparse: refused, so a run cannot make the helper write a
    terabyte of zeros to the host's disk.
    """
    try:
        with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_dir(tar, upper, "", max_file_size)
    except BaseException:
        os.unlink(out_path)  # nothing half-written is left for a builder to trust
        raise


def _add_dir(tar: tarfile.TarFile, host_dir: str, prefix: str, max_file_size: int) -> None:
    if prefix and _xattr(host_dir, "user.overlay.opaque") == b"y":
        marker = tarfile.TarInfo(f"{prefix}/{OPAQUE_MARKER}")
        marker.mtime = 0
        tar.addfile(marker)
    for name in sorted(os.listdir(host_dir)):
        path = os.path.join(host_dir, name)
        rel = f"{prefix}/{name}" if prefix else name
        st = os.lstat(path)
        if _is_whiteout(path, st):
            info = tarfile.TarInfo(f"{prefix}/{WHITEOUT_PREFIX}{name}" if prefix
                                   else f"{WHITEOUT_PREFIX}{name}")
            info.mtime = 0
            tar.addfile(info)
            continue
        info = _info(rel, st)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            _add_dir(tar, path, rel, max_file_size)
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > max_file_size:
                raise LayerTooLarge(f"{rel}: {st.st_size} bytes, more than the run's "
                                    f"{max_file_size}-byte disk: a sparse file")
            info.size = st.st_size
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                tar.addfile(info, f)
        # sockets, fifos and devices made by a build step are not carried into images
