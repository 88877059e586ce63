"""Named volumes: per-tenant directories that outlive every run, each with a size quota.

Layout on the worker host (`RuntimeSettings.volumes_dir`):

    <volumes_dir>/<tenant>/<name>/meta.json   quota, bytes used, timestamps
                                  /lock       flock(2) target: who has the volume attached
                                  /data/      the volume's files

How a run uses a volume (the mechanism the README describes):
- Read-write: the helper mounts a tmpfs of exactly the quota (plus one page, see below) in
  its own mount namespace, copies `data/` into it, and binds that tmpfs into the container.
  The kernel enforces the quota while the run writes: past it, writes fail with ENOSPC.
  After the run, with every process of the run dead, the helper reads the tmpfs usage: over
  the quota means the run tried to write more than it may, the verdict is VOLUME_QUOTA and
  the copy is thrown away. Otherwise, if the run ended by itself (OK, NONZERO_EXIT,
  SIGNALED), the tmpfs is copied to `data.new-*` and swapped with `data/` in one
  renameat2(RENAME_EXCHANGE): a run's changes land all at once or not at all, and a run that
  a limit stopped (or that was cancelled, or whose worker died) changes nothing.
  The spare page makes "tried to exceed" visible: a full tmpfs of exactly the quota would not
  tell a run that wrote the quota apart from one that wanted more.
- Read-only: `data/` itself is bound read-only, no copy. Readers share; a writer excludes
  readers and other writers (flock on `lock`: shared for read-only, exclusive for
  read-write), so a reader never sees a commit half-way.

Everything the runtime does on the host side with a volume's files treats them as hostile (a
run wrote them): trees are walked with directory fds, every open is O_NOFOLLOW relative to its
parent, symlinks are copied as links and never resolved, FIFOs, sockets and devices are
dropped, sparse files stay sparse (a 1 TB hole costs nothing on disk), hard links stay links
(so copying never inflates a volume past what the tmpfs counted), and the depth is bounded.
Files are stored owned by the runtime user; a run sees its read-write volume owned by its own
uid and gid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator, Sequence

import msgspec

from sandbox.errors import Conflict, InvalidSpec, VolumeBusy, VolumeError, VolumeNotFound
from sandbox.spec import VolumeMount, check_absolute_path

PAGE = 4096
"""Bytes: quotas are whole pages, since tmpfs counts pages."""
MAX_DEPTH = 128
"""Directory levels a volume may hold; deeper trees are not saved."""
RESERVED_TARGETS = ("/proc", "/dev", "/sys")
"""Container paths a volume may not be mounted on or under."""
LOCK_POLL = 0.05
"""Seconds between attempts while waiting for a busy volume."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_TENANT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


class VolumeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A volume as its tenant sees it. Sizes in bytes; times in seconds since the epoch."""

    name: str
    size: int
    """The quota."""
    used: int = 0
    """Bytes the volume's files take (whole pages), as of the last saved run."""
    created_at: float = 0.0
    updated_at: float = 0.0


class VolumeBind(msgspec.Struct, frozen=True):
    """A volume resolved for the helper: where it lives, where it goes, how it is mounted."""

    name: str
    root: str
    target: str
    read_only: bool
    quota: int


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise InvalidSpec(f"tenant {tenant!r} is not a valid tenant name", field="tenant")
    return tenant


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidSpec(
            f"{field}: volume name {name!r} must match [a-z0-9][a-z0-9_.-]{{0,62}}", field=field)
    return name


def check_target(path: str, field: str) -> str:
    target = check_absolute_path(path, field=field)
    for reserved in RESERVED_TARGETS:
        if target == reserved or target.startswith(reserved + "/"):
            raise InvalidSpec(f"{field}: volumes cannot be mounted on {reserved}", field=field)
    return target


def round_quota(size: int) -> int:
    return -(-size // PAGE) * PAGE


# -- the store (the caller's side: worker, CLI) ---------------------------------------------


class VolumeStore:
    """Create, list, inspect, delete and attach the volumes of each tenant under `root`."""

    def __init__(self, root: str, *, max_size: int, max_per_tenant: int,
                 min_size: int = PAGE) -> None:
        self.root = root
        self.max_size = max_size
        self.max_per_tenant = max_per_tenant
        self.min_size = min_size

    @classmethod
    def from_settings(cls, settings) -> "VolumeStore":
        return cls(settings.volumes_dir, max_size=settings.max_volume_size,
                   max_per_tenant=settings.max_volumes_per_tenant)

    def _tenant_dir(self, tenant: str, *, create: bool = False) -> str:
        path = os.path.join(self.root, check_tenant(tenant))
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _path(self, tenant: str, name: str) -> str:
        return os.path.join(self._tenant_dir(tenant), check_name(name))

    @contextlib.contextmanager
    def _tenant_lock(self, tenant: str) -> Iterator[None]:
        """Serialises create and delete within a tenant (the per-tenant count is exact)."""
        fd = os.open(os.path.join(self._tenant_dir(tenant, create=True), ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create(self, tenant: str, name: str, size: int) -> VolumeInfo:
        check_name(name)
        if not isinstance(size, int) or size < self.min_size or size > self.max_size:
            raise InvalidSpec(f"size: {size} must be between {self.min_size} and "
                              f"{self.max_size} bytes", field="size")
        with self._tenant_lock(tenant):
            tenant_dir = self._tenant_dir(tenant)
            if len(self._names(tenant_dir)) >= self.max_per_tenant:
                raise VolumeError(f"tenant has {self.max_per_tenant} volumes already, the most "
                                  "allowed", field="name")
            now = time.time()
            info = VolumeInfo(name=name, size=round_quota(size), created_at=now, updated_at=now)
            staging = os.path.join(tenant_dir, f".new-{uuid.uuid4().hex}")
            os.mkdir(staging, 0o700)
            try:
                os.mkdir(os.path.join(staging, "data"), 0o755)
                os.close(os.open(os.path.join(staging, "lock"),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
                _write_meta(staging, info)
                try:
                    # rename(2) onto an existing non-empty directory fails: creation is atomic.
                    os.rename(staging, os.path.join(tenant_dir, name))
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise Conflict(f"volume {name!r} already exists", field="name") from None
                    raise
            except BaseException:
                remove_tree(staging)
                raise
        return info

    def _names(self, tenant_dir: str) -> list[str]:
        try:
            entries = os.listdir(tenant_dir)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if _NAME.match(e)
                      and stat.S_ISDIR(os.lstat(os.path.join(tenant_dir, e)).st_mode))

    def list(self, tenant: str) -> list[VolumeInfo]:
        out = []
        tenant_dir = self._tenant_dir(tenant)
        for name in self._names(tenant_dir):
            try:
                out.append(_read_meta(os.path.join(tenant_dir, name), name))
            except VolumeNotFound:
                continue  # deleted meanwhile
        return out

    def inspect(self, tenant: str, name: str) -> VolumeInfo:
        return _read_meta(self._path(tenant, name), name)

    def delete(self, tenant: str, name: str) -> None:
        """Remove a volume; refused with VolumeBusy while a run has it attached."""
        path = self._path(tenant, name)
        with self._tenant_lock(tenant):
            dir_fd, lock_fd = _open_volume(path, name)
            try:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise VolumeBusy(f"volume {name!r} is attached to a run", field="name") from None
                trash = os.path.join(os.path.dirname(path), f".trash-{uuid.uuid4().hex}")
                os.rename(path, trash)
            finally:
                os.close(lock_fd)
                os.close(dir_fd)
        remove_tree(trash)

    @contextlib.contextmanager
    def attach(self, tenant: str, mounts: Sequence[VolumeMount], *,
               wait: float = 0.0) -> Iterator[tuple[VolumeBind, ...]]:
        """Lock the tenant's volumes for one run and resolve them for the helper.

        Read-only mounts take a shared lock, read-write ones an exclusive lock; a volume held
        by another run is waited for up to `wait` seconds, then refused with VolumeBusy. The
        locks are released when the block ends (or this process dies).
        """
        check_tenant(tenant)
        seen: dict[str, VolumeMount] = {}
        targets: set[str] = set()
        for i, mount in enumerate(mounts):
            check_name(mount.name, f"volumes[{i}].name")
            target = check_target(mount.path, f"volumes[{i}].path")
            if mount.name in seen:
                raise InvalidSpec(f"volumes[{i}]: volume {mount.name!r} is mounted twice",
                                  field=f"volumes[{i}].name")
            if target in targets:
                raise InvalidSpec(f"volumes[{i}]: two volumes at {target}",
                                  field=f"volumes[{i}].path")
            seen[mount.name] = mount
            targets.add(target)
        held: list[int] = []
        binds: dict[str, VolumeBind] = {}
        deadline = time.monotonic() + max(0.0, wait)
        try:
            for name in sorted(seen):  # one order for every run: waiting runs cannot deadlock
                mount = seen[name]
                path = self._path(tenant, name)
                dir_fd, lock_fd = _open_volume(path, name)
                held.append(lock_fd)
                try:
                    mode = fcntl.LOCK_SH if mount.read_only else fcntl.LOCK_EX
                    while True:
                        try:
                            fcntl.flock(lock_fd, mode | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if time.monotonic() >= deadline:
                                how = "read-write by another run" if mount.read_only else \
                                    "by another run"
                                raise VolumeBusy(f"volume {name!r} is in use {how}",
                                                 field="volumes") from None
                            time.sleep(LOCK_POLL)
                    # Deleted (renamed away) between open and lock? Then it is gone.
                    try:
                        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(dir_fd).st_ino
                    except FileNotFoundError:
                        same = False
                    if not same:
                        raise VolumeNotFound(f"volume {name!r} not found", field="volumes")
                finally:
                    os.close(dir_fd)
                info = _read_meta(path, name)
                binds[name] = VolumeBind(name=name, root=path,
                                         target=check_absolute_path(mount.path, field="volumes"),
                                         read_only=mount.read_only, quota=info.size)
            yield tuple(binds[m.name] for m in mounts)
        finally:
            for fd in held:
                os.close(fd)


def _open_volume(path: str, name: str) -> tuple[int, int]:
    try:
        dir_fd = os.open(path, _OPEN_DIR)
    except (FileNotFoundError, NotADirectoryError):
        raise VolumeNotFound(f"volume {name!r} not found", field="name") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VolumeNotFound(f"volume {name!r} not found", field="name") from None
        raise
    try:
        lock_fd = os.open("lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        os.close(dir_fd)
        raise VolumeNotFound(f"volume {name!r} not found", field="name") from None
    return dir_fd, lock_fd


def _write_meta(volume_dir: str, info: VolumeInfo) -> None:
    tmp = os.path.join(volume_dir, f".meta-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(info))
    os.rename(tmp, os.path.join(volume_dir, "meta.json"))


def _read_meta(volume_dir: str, name: str) -> VolumeInfo:
    try:
        with open(os.path.join(volume_dir, "meta.json"), "rb") as f:
            return msgspec.json.decode(f.read(), type=VolumeInfo)
    except (FileNotFoundError, NotADirectoryError):
        raise VolumeNotFound(f"volume {name!r} not found", field="name") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise VolumeError(f"volume {name!r}: unreadable metadata ({exc})") from None


def remove_tree(path: str) -> None:
    """rmtree that never follows links and gets past directories a run made unwritable."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        try:
            fd = os.open(path, _OPEN_DIR)
        except OSError:
            os.chmod(path, 0o700)
            fd = os.open(path, _OPEN_DIR)
        try:
            os.fchmod(fd, 0o700)
            _open_up(fd, 0)
        finally:
            os.close(fd)
        shutil.rmtree(path)


def _open_up(dir_fd: int, depth: int) -> None:
    """Give the owner rwx on every directory below `dir_fd` (links are never followed)."""
    if depth > 4 * MAX_DEPTH:
        return
    for name in os.listdir(dir_fd):
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            continue
        os.chmod(name, 0o700, dir_fd=dir_fd)  # a directory, not a link: nothing to follow
        sub = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
        try:
            _open_up(sub, depth + 1)
        finally:
            os.close(sub)


# -- copying trees that a run wrote ---------------------------------------------------------


class TreeError(Exception):
    pass


def _copy_file_data(src: int, dst: int, size: int) -> None:
    """Copy the data extents of `src` to `dst` (holes stay holes), then set the length."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        pos = start
        while pos < end:
            chunk = os.pread(src, min(1 << 20, end - pos), pos)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                written = os.pwrite(dst, view, pos)
                view = view[written:]
                pos += written
        offset = max(end, start + 1)
    os.ftruncate(dst, size)


def _chown(owner: tuple[int, int] | None, fd: int | None = None, *, name: str = "",
           dir_fd: int | None = None) -> None:
    """Give a copy to the run's ids; ids this namespace does not map (single-id mode) stay."""
    if owner is None:
        return
    try:
        if fd is not None:
            os.fchown(fd, *owner)
        else:
            os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def copy_tree(src_dir: int, dst_dir: int, *, owner: tuple[int, int] | None) -> None:
    """Copy the tree under fd `src_dir` into the (empty) directory fd `dst_dir`.

    Only directories, regular files and symbolic links are copied; nothing is followed.
    `owner` (uid, gid) is applied to every copy, or None to leave the copier's ids.
    """
    links: dict[tuple[int, int], str] = {}
    _copy_dir(src_dir, dst_dir, "", 0, owner, links, dst_dir)


def _copy_dir(src: int, dst: int, rel: str, depth: int, owner, links, dst_root: int) -> None:
    if depth > MAX_DEPTH:
        raise TreeError(f"directories nested deeper than {MAX_DEPTH} levels")
    with os.scandir(src) as entries:
        names = [e.name for e in entries]
    for name in names:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        path = f"{rel}/{name}" if rel else name
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            s = os.open(name, _OPEN_DIR, dir_fd=src)
            try:
                d = os.open(name, _OPEN_DIR, dir_fd=dst)
                try:
                    _copy_dir(s, d, path, depth + 1, owner, links, dst_root)
                    _chown(owner, d)
                    os.fchmod(d, mode | 0o700)
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(d)
            finally:
                os.close(s)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], name, src_dir_fd=dst_root, dst_dir_fd=dst,
                        follow_symlinks=False)
                continue
            s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        dir_fd=src)
            try:
                if not stat.S_ISREG(os.fstat(s).st_mode):  # swapped since the stat
                    continue
                d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                            | os.O_CLOEXEC, 0o600, dir_fd=dst)
                try:
                    _copy_file_data(s, d, st.st_size)
                    _chown(owner, d)
                    os.fchmod(d, mode)
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(d)
            finally:
                os.close(s)
            if st.st_nlink > 1:
                links[key] = path
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            _chown(owner, name=name, dir_fd=dst)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst,
                     follow_symlinks=False)
        # FIFOs, sockets and device nodes are not kept.


def tmpfs_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _renameat2_exchange(dir_fd: int, a: str, b: str) -> None:
    if _libc.renameat2(dir_fd, a.encode(), dir_fd, b.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- the helper's side: stage before the run, commit or discard after -----------------------

COMMIT_VERDICTS = frozenset({"OK", "NONZERO_EXIT", "SIGNALED"})
"""Runs that ended by themselves save their read-write volumes; any other ending discards."""


def stage_dir(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"vol{index}")


def stage(run_dir: str, binds: Sequence[VolumeBind], uid: int, gid: int,
          mount_tmpfs) -> list[tuple[str, str, bool]]:
    """Prepare each volume of a run; returns (source, target, read_only) bind triples.

    Called by the helper before the clone. `mount_tmpfs(path, options)` mounts a tmpfs.
    """
    out = []
    for i, vb in enumerate(binds):
        data = os.path.join(vb.root, "data")
        if vb.read_only:
            out.append((data, vb.target, True))
            continue
        path = stage_dir(run_dir, i)
        os.mkdir(path, 0o700)
        inodes = max(1024, vb.quota // 1024)
        mount_tmpfs(path, f"size={vb.quota + PAGE},nr_inodes={inodes},mode=0755")
        src = os.open(data, _OPEN_DIR)
        try:
            dst = os.open(path, _OPEN_DIR)
            try:
                copy_tree(src, dst, owner=(uid, gid))
                _chown((uid, gid), dst)
                os.fchmod(dst, stat.S_IMODE(os.fstat(src).st_mode) | 0o700)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        out.append((path, vb.target, False))
    return out


def over_quota(run_dir: str, binds: Sequence[VolumeBind]) -> list[str]:
    """Messages for each read-write volume the run filled past its quota."""
    problems = []
    for i, vb in enumerate(binds):
        if vb.read_only:
            continue
        used = tmpfs_used(stage_dir(run_dir, i))
        if used > vb.quota:
            problems.append(f"volume {vb.name!r} went over its quota of {vb.quota} bytes; "
                            "the run's changes to it were discarded")
    return problems


def commit(run_dir: str, binds: Sequence[VolumeBind]) -> list[str]:
    """Save each read-write volume from its tmpfs; returns problems (nothing saved for those)."""
    problems = []
    for i, vb in enumerate(binds):
        if vb.read_only:
            continue
        staged = stage_dir(run_dir, i)
        try:
            _commit_one(staged, vb)
        except (OSError, TreeError) as exc:
            problems.append(f"volume {vb.name!r} was not saved: {exc}")
    return problems


def _commit_one(staged: str, vb: VolumeBind) -> None:
    used = tmpfs_used(staged)
    root_fd = os.open(vb.root, _OPEN_DIR)
    try:
        for entry in os.listdir(root_fd):  # leftovers of a commit cut short
            if entry.startswith(("data.new-", "data.old-")):
                remove_tree(os.path.join(vb.root, entry))
        fresh = f"data.new-{uuid.uuid4().hex}"
        os.mkdir(fresh, 0o755, dir_fd=root_fd)
        try:
            src = os.open(staged, _OPEN_DIR)
            try:
                dst = os.open(fresh, _OPEN_DIR, dir_fd=root_fd)
                try:
                    copy_tree(src, dst, owner=None)
                    os.fchmod(dst, (stat.S_IMODE(os.fstat(src).st_mode) & 0o777) | 0o700)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            _renameat2_exchange(root_fd, fresh, "data")
        finally:
            remove_tree(os.path.join(vb.root, fresh))  # the new tree, or now the old one
        info = _read_meta(vb.root, vb.name)
        _write_meta(vb.root, msgspec.structs.replace(info, used=used, updated_at=time.time()))
    finally:
        os.close(root_fd)
