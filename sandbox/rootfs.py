"""The container's filesystem: overlay root, /proc, minimal /dev, tmpfs, binds, pivot_root.

Runs inside the run's fresh user and mount namespaces (as namespace root), before any
untrusted code exists, so nothing here races with the sandboxed program. Mount targets are
still created component by component with lstat checks: an image that ships a symlink where a
mount point should be gets a SETUP_ERROR, never a mount somewhere else.

The plan's type is sandbox.plans.RootfsPlan; init's process reads it as an attribute view
and imports no msgspec or typing (see sandbox.plans), so neither does this module: its
`plan` parameters are RootfsPlans or views of one.
"""

from __future__ import annotations

import os
import stat

from sandbox import syscalls as sc
from sandbox.errors import SetupError

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx", "shm": "/tmp"}
"""/dev/shm is the run's /tmp: POSIX shared memory and /tmp share the run's disk budget."""
MASKED_FILES = ("proc/keys", "proc/sysrq-trigger")
"""World-readable or -writable host-wide files. The rest of runc's masked list (kcore,
timer_list, sched_debug, ...) is mode 0400 root-of-the-host, which no id in our user namespace
can open, so masking them again would only cost mounts."""
READ_ONLY = ("proc/sys",)
"""/proc/sys holds the run's own network namespace sysctls, writable by in-container root."""
NOSUID_NODEV = sc.MS_NOSUID | sc.MS_NODEV


def root_dir(plan) -> str:
    """Where a root plan (sandbox.plans.RootfsPlan, or init's view of one) is mounted."""
    return os.path.join(plan.run_dir, "root")


def ensure_dir(root: str, path: str, mode: int = 0o755) -> str:
    """Create `path` (absolute, inside the container) under `root` without following links."""
    current = root
    for part in [p for p in path.split("/") if p]:
        if part in (".", ".."):
            raise SetupError(f"mount target {path!r} has '..'", stage="rootfs")
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, mode)
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise SetupError(f"mount target {path!r} is not a directory in the image",
                             stage="rootfs")
    return current


def _ensure_file(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        return
    if not stat.S_ISREG(st.st_mode):
        raise SetupError(f"{path} is not a regular file", stage="rootfs")


def prepare_dev_template(path: str) -> None:
    """Build, once per helper, the /dev every run gets: a small read-only tmpfs holding bind
    mounts of the host's harmless character devices, the usual symlinks and an empty pts/.
    Each run gets one recursive bind of it, which keeps its read-only flag: one mount
    instead of nine, and nothing written by one run can be seen by another."""
    sc.mount("tmpfs", path, "tmpfs", NOSUID_NODEV | sc.MS_NOEXEC, "mode=0755,size=64k")
    for name in DEVICES:
        target = os.path.join(path, name)
        _ensure_file(target)
        sc.mount(f"/dev/{name}", target, None, sc.MS_BIND)
    for name, dest in DEV_LINKS.items():
        os.symlink(dest, os.path.join(path, name))
    os.mkdir(os.path.join(path, "pts"))
    sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_RDONLY | NOSUID_NODEV | sc.MS_NOEXEC,
             "mode=0755,size=64k")


def _mount_dev(root: str, template: str) -> None:
    sc.mount(template, ensure_dir(root, "/dev"), None, sc.MS_BIND | sc.MS_REC)


def _mask_proc(root: str) -> None:
    null = os.path.join(root, "dev/null")
    for rel in MASKED_FILES:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            sc.mount(null, path, None, sc.MS_BIND)
    for rel in READ_ONLY:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | NOSUID_NODEV
                     | sc.MS_NOEXEC)


def mount_root(plan) -> None:
    """Mount everything under plan.root; enter_root then pivots into it (stage: rootfs).
    A spare does both before its request arrives when the helper guesses the request's root
    (nothing of the request is used)."""
    root = root_dir(plan)
    lower = ":".join(reversed(plan.layers))
    upper, work = os.path.join(plan.run_dir, "upper"), os.path.join(plan.run_dir, "work")
    sc.mount("overlay", root, "overlay", NOSUID_NODEV,
             f"lowerdir={lower},upperdir={upper},workdir={work},userxattr")
    sc.mount("proc", ensure_dir(root, "/proc"), "proc", NOSUID_NODEV | sc.MS_NOEXEC)
    _mount_dev(root, plan.dev_template)
    tmp = ensure_dir(root, "/tmp")
    if plan.read_only_root:
        sc.mount("tmpfs", tmp, "tmpfs", NOSUID_NODEV, f"mode=1777,size={plan.tmp_size}")
    else:
        # The root's upper dir is already the run's size-capped tmpfs: /tmp is a directory
        # of it, and /tmp, the work directory and the root share one disk budget.
        if stat.S_IMODE(os.lstat(tmp).st_mode) != 0o1777:
            os.chmod(tmp, 0o1777)  # a copy-up; images usually ship /tmp as 1777 already
    for bind in plan.binds:
        target = ensure_dir(root, bind.target)
        sc.mount(bind.source, target, None, sc.MS_BIND)
        if bind.read_only:
            sc.mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | NOSUID_NODEV)
    _mask_proc(root)


def enter_root(plan) -> None:
    """Pivot into the mounted plan.root and detach the old root."""
    os.chdir(root_dir(plan))
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    if plan.read_only_root:
        sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | NOSUID_NODEV)
