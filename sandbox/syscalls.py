"""Thin ctypes layer over the Linux syscalls Python's os module lacks.

unshare, raw clone with namespace flags, mount/umount2/pivot_root, sethostname, prctl,
capset, seccomp, openat2, pidfd_open/pidfd_send_signal. Every wrapper raises OSError with
errno on failure and does nothing else: policy lives in the modules that call them.
"""

from __future__ import annotations

import ctypes
import errno
import os

# PyDLL keeps the GIL across the call: a raw clone() must not release it, since the child
# starts with a copy of the interpreter state taken mid-call.
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# Looked up now, once: CDLL resolves a name (dlsym, a new function object) on first use, and
# every container's init is a fresh clone that would otherwise pay that for each call.
_unshare, _mount, _umount2 = _libc.unshare, _libc.mount, _libc.umount2
_sethostname, _prctl, _setns = _libc.sethostname, _libc.prctl, _libc.setns

# x86_64 syscall numbers.
SYS_clone = 56
SYS_pivot_root = 155
SYS_capset = 126
SYS_seccomp = 317
SYS_pidfd_send_signal = 424
SYS_pidfd_open = 434
SYS_openat2 = 437
SYS_close_range = 436

CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


def _check(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _path(p: str | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def clone(flags: int) -> int:
    """fork() with namespace flags; returns 0 in the child, the child's pid in the parent.

    Only safe in a single-threaded process: the child gets no at-fork handling.
    """
    return _check(_syscall(ctypes.c_long(SYS_clone), ctypes.c_ulong(flags | SIGCHLD),
                           ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0),
                           ctypes.c_void_p(0)))


def unshare(flags: int) -> None:
    _check(_unshare(ctypes.c_int(flags)))


def setns(fd: int, nstype: int) -> None:
    """Move this (single-threaded) process into the namespace `fd` refers to."""
    _check(_setns(ctypes.c_int(fd), ctypes.c_int(nstype)))


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags),
                       _path(data)))


def umount2(target: str, flags: int = 0) -> None:
    _check(_umount2(_path(target), ctypes.c_int(flags)))


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(ctypes.c_long(SYS_pivot_root), _path(new_root), _path(put_old)))


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_sethostname(raw, ctypes.c_size_t(len(raw))))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset_empty() -> None:
    """Clear the effective, permitted and inheritable capability sets of this thread."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_syscall(ctypes.c_long(SYS_capset), ctypes.byref(header), ctypes.byref(data)))


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A compiled classic-BPF seccomp program held in memory, ready to load in a child."""

    def __init__(self, bpf: bytes) -> None:
        if len(bpf) % 8:
            raise ValueError("BPF program length must be a multiple of 8")
        self.bpf = bytes(bpf)
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))
        self.size = len(bpf)

    def load(self) -> None:
        """Install the filter on the calling thread (no_new_privs must already be set)."""
        _check(_syscall(ctypes.c_long(SYS_seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                        ctypes.c_ulong(0), ctypes.byref(self._prog)))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dir_fd` under the `resolve` restrictions."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_syscall(ctypes.c_long(SYS_openat2), ctypes.c_int(dir_fd), _path(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))


def pidfd_open(pid: int) -> int:
    return _check(_syscall(ctypes.c_long(SYS_pidfd_open), ctypes.c_int(pid), ctypes.c_uint(0)))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    try:
        _check(_syscall(ctypes.c_long(SYS_pidfd_send_signal), ctypes.c_int(pidfd),
                        ctypes.c_int(sig), ctypes.c_void_p(0), ctypes.c_uint(0)))
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
