"""Files into and out of a run's work directory, never trusting what the run left there.

Copy-in happens before any untrusted code exists, into a fresh tmpfs. Copy-out happens after
every process of the run is dead, but the directory holds whatever the run planted: each path
is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) relative
to the work directory, O_NOFOLLOW | O_NONBLOCK so a FIFO cannot hang us, then fstat'ed: only
regular files are read, and only up to a size cap (Judge0's CVE-2024-28185/28189 and
go-judge#176 were copy-outs that followed links or opened FIFOs).
"""

from __future__ import annotations

import errno
import os
import stat

from sandbox import syscalls as sc
from sandbox.spec import FileIn

RESOLVE_SAFE = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS


def _mkdirs_beneath(dir_fd: int, parts: list[str], uid: int, gid: int) -> int:
    """Open (creating) each directory in `parts` below dir_fd; returns an fd of the last."""
    fd = os.dup(dir_fd)
    for part in parts:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
            os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            pass
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def copy_in(box: str, files: list[FileIn], uid: int, gid: int) -> None:
    """Write `files` (paths already checked relative) into `box`, owned by uid:gid."""
    box_fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for item in files:
            *dirs, name = item.path.split("/")
            parent = _mkdirs_beneath(box_fd, dirs, uid, gid)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, item.mode, dir_fd=parent)
                try:
                    view = memoryview(item.content)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, item.mode)
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
    finally:
        os.close(box_fd)


def read_beneath(box: str, path: str, cap: int) -> tuple[bytes | None, str]:
    """Read regular file `path` below `box`; (None, reason) if it is not safe to."""
    box_fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fd = sc.openat2(box_fd, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                            | os.O_NOCTTY, RESOLVE_SAFE)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                return None, f"{path}: refused (symbolic link or escape)"
            return None, f"{path}: {exc.strerror}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, f"{path}: refused (not a regular file)"
            if st.st_size > cap:
                return None, f"{path}: larger than the {cap}-byte copy-out cap"
            data = os.read(fd, cap + 1)
            chunks = [data]
            total = len(data)
            while data and total <= cap:
                data = os.read(fd, cap + 1 - total)
                chunks.append(data)
                total += len(data)
            if total > cap:
                return None, f"{path}: larger than the {cap}-byte copy-out cap"
            return b"".join(chunks), ""
        finally:
            os.close(fd)
    finally:
        os.close(box_fd)


def copy_out(box: str, paths: list[str], cap: int) -> tuple[dict[str, bytes], list[str]]:
    files: dict[str, bytes] = {}
    problems: list[str] = []
    for path in paths:
        data, problem = read_beneath(box, path, cap)
        if data is None:
            problems.append(problem)
        else:
            files[path] = data
    return files, problems
