"""Control groups: per-run memory, pids and CPU accounting on a delegated v2 or v1 hierarchy.

A run's cgroup is created by the helper, limits are written, and the container's payload
joins it itself (writing "0" to cgroup.procs through fds opened before pivot_root) so the
container's init, a Python process, is not charged. After the run the helper reads the peak
memory, OOM kills, pids-limit hits and CPU usage, then removes the directory.

v2: a delegated directory (`cgroup.subtree_control` ours) with memory and pids enabled. The
helper first moves itself into a leaf `helper-PID` below it, so every migration stays inside
the delegated tree. v1: a directory named `sbx` under each controller's mount, chowned to us.
When neither is writable the caller falls back to rlimits (`detect` returns None).
"""

from __future__ import annotations

import errno
import os

import msgspec

from sandbox.errors import SetupError


class CgroupStats(msgspec.Struct, frozen=True):
    memory_peak: int = 0
    oom_kills: int = 0
    pids_limit_hits: int = 0
    cpu_time: float | None = None


def _read_fd(fd: int) -> str:
    """The whole text of an open cgroup file, read from its start (the kernel renders it
    afresh for each read from offset 0)."""
    chunks = []
    while True:
        chunk = os.pread(fd, 65536, 65536 * len(chunks))
        chunks.append(chunk)
        if len(chunk) < 65536:  # the kernel fills the buffer unless the file has ended
            break
    return b"".join(chunks).decode()


def _read(path: str) -> str:
    """A cgroup file's text. Plain fds, not open(): a text file object costs four times the
    syscalls' time."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # as a shell's `>` does
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _keyed(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_members(path: str) -> None:
    """SIGKILL every process left in a cgroup tree (a crashed helper's containers)."""
    for dirpath, _, files in os.walk(path):
        if "cgroup.procs" not in files:
            continue
        try:
            pids = _read(os.path.join(dirpath, "cgroup.procs")).split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def _remove_tree(path: str) -> None:
    """rmdir a cgroup and its children, deepest first; missing is fine."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


class RunCgroup:
    """One run's cgroup(s). `procs_files` are the cgroup.procs files the payload joins.

    A cgroup may serve many runs one after another (see CgroupDriver.acquire): its counters
    are cumulative, so each run reads them relative to `baseline`, taken when it was handed out.
    The files it reads stay open while it lives: a run reads about fifteen of them, and the
    path walk of each open was most of the helper's time in the kernel (perf).
    """

    def __init__(self, driver: "CgroupDriver", dirs: dict[str, str]) -> None:
        self.driver = driver
        self.dirs = dirs
        self.procs_files = sorted({os.path.join(d, "cgroup.procs") for d in dirs.values()})
        self.baseline = CgroupStats(cpu_time=0.0)
        self.fds: dict[str, int] = {}  # path -> fd open to read

    def read(self, controller: str, name: str) -> str:
        return self._read_kept(os.path.join(self.dirs[controller], name))

    def _read_kept(self, path: str) -> str:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return _read_fd(fd)

    def write(self, controller: str, name: str, value: str) -> None:
        _write(os.path.join(self.dirs[controller], name), value)

    def close_files(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def cpu_time(self) -> float | None:
        used = self.driver.cpu_time(self)
        return None if used is None else used - (self.baseline.cpu_time or 0.0)

    def set_limits(self, memory: int, pids: int) -> None:
        self.driver.set_limits(self, memory, pids)

    def stats(self) -> CgroupStats:
        raw, base = self.driver.stats(self), self.baseline
        return CgroupStats(
            memory_peak=max(0, raw.memory_peak - base.memory_peak),
            oom_kills=raw.oom_kills - base.oom_kills,
            pids_limit_hits=raw.pids_limit_hits - base.pids_limit_hits,
            cpu_time=None if raw.cpu_time is None else raw.cpu_time - (base.cpu_time or 0.0))

    def empty(self) -> bool:
        return all(not self._read_kept(path).strip() for path in self.procs_files)

    def remove(self) -> None:
        self.close_files()
        for path in set(self.dirs.values()):
            for _ in range(50):
                try:
                    _remove_tree(path)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    os.sched_yield()


POOL_SIZE = 4
"""Idle run cgroups a helper keeps for reuse."""


class CgroupDriver:
    mode = "none"
    reusable = False
    """Whether a run cgroup can be reset and handed to the next run. On this kernel a fresh
    memory cgroup makes the first program in it start much slower (python3 -c pass: +15 ms
    measured), so drivers that can reset their counters keep a few cgroups for reuse."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self._seq = 0
        self.free: list[RunCgroup] = []

    def acquire(self, memory: int, pids: int) -> RunCgroup:
        """A run cgroup with these limits: a reset idle one, or a new one."""
        while self.free:
            cg = self.free.pop()
            try:
                self.set_limits(cg, memory, pids)
                self.reset(cg)
                return cg
            except OSError:
                cg.remove()  # e.g. usage above the new limit: start clean instead
        cg = self.create(memory, pids)
        try:
            self.reset(cg)
        except OSError as exc:
            cg.remove()
            raise SetupError(f"reading new cgroup: {exc}", stage="cgroup") from exc
        return cg

    def release(self, cg: RunCgroup) -> None:
        """Take a run's cgroup back once its processes are gone: keep it or remove it."""
        try:
            if self.reusable and len(self.free) < POOL_SIZE and cg.empty():
                self.free.append(cg)
                return
        except OSError:
            pass
        cg.remove()

    def close(self) -> None:
        while self.free:
            self.free.pop().remove()

    def reset(self, cg: RunCgroup) -> None:
        """Start a new run's accounting: peak back to current usage, counters as baseline."""
        cg.baseline = self.stats(cg)

    def next_name(self) -> str:
        self._seq += 1
        return f"run-{self.owner_pid}-{self._seq}"

    def create(self, memory: int, pids: int) -> RunCgroup:
        """A new run cgroup with these limits (SetupError, nothing left behind, on failure)."""
        name = self.next_name()
        cg = RunCgroup(self, self.run_dirs(name))
        try:
            for path in cg.dirs.values():
                os.mkdir(path)
            self.prepare(cg)
            self.set_limits(cg, memory, pids)
        except OSError as exc:
            cg.remove()
            raise SetupError(f"creating cgroup {name}: {exc}", stage="cgroup") from exc
        return cg

    def run_dirs(self, name: str) -> dict[str, str]:
        """The directories (by controller) of the run cgroup called `name`."""
        raise NotImplementedError

    def prepare(self, cg: RunCgroup) -> None:
        """Settings a new run cgroup gets once, beside its limits."""

    def set_limits(self, cg: RunCgroup, memory: int, pids: int) -> None:
        raise NotImplementedError

    def cpu_time(self, cg: RunCgroup) -> float | None:
        raise NotImplementedError

    def stats(self, cg: RunCgroup) -> CgroupStats:
        raise NotImplementedError

    def roots(self) -> list[str]:
        raise NotImplementedError

    def clean_stale(self) -> int:
        """Remove run cgroups left by helpers that died; returns how many."""
        removed = 0
        for root in self.roots():
            for entry in os.scandir(root):
                parts = entry.name.split("-")
                if len(parts) < 2 or parts[0] not in ("run", "helper") or not entry.is_dir():
                    continue
                try:
                    pid = int(parts[1])
                except ValueError:
                    continue
                if pid != self.owner_pid and not _pid_alive(pid):
                    _kill_members(entry.path)
                    try:
                        _remove_tree(entry.path)
                        removed += 1
                    except OSError:
                        pass
        return removed


class CgroupV1(CgroupDriver):
    mode = "cgroup-v1"
    reusable = True

    def __init__(self, memory_root: str, pids_root: str, cpuacct_root: str | None) -> None:
        super().__init__()
        self.memory_root = memory_root
        self.pids_root = pids_root
        self.cpuacct_root = cpuacct_root

    def roots(self) -> list[str]:
        return [r for r in (self.memory_root, self.pids_root, self.cpuacct_root) if r]

    def run_dirs(self, name: str) -> dict[str, str]:
        dirs = {"memory": os.path.join(self.memory_root, name),
                "pids": os.path.join(self.pids_root, name)}
        if self.cpuacct_root:
            dirs["cpuacct"] = os.path.join(self.cpuacct_root, name)
        return dirs

    def set_limits(self, cg: RunCgroup, memory: int, pids: int) -> None:
        cg.write("memory", "memory.limit_in_bytes", str(memory))
        cg.write("pids", "pids.max", str(pids))

    def cpu_time(self, cg: RunCgroup) -> float | None:
        if "cpuacct" not in cg.dirs:
            return None
        return int(cg.read("cpuacct", "cpuacct.usage")) / 1e9

    def reset(self, cg: RunCgroup) -> None:
        cg.write("memory", "memory.max_usage_in_bytes", "0")  # peak := usage now
        raw = self.stats(cg)
        usage = int(cg.read("memory", "memory.usage_in_bytes"))
        cg.baseline = CgroupStats(memory_peak=usage, oom_kills=raw.oom_kills,
                                  pids_limit_hits=raw.pids_limit_hits, cpu_time=raw.cpu_time)

    def stats(self, cg: RunCgroup) -> CgroupStats:
        return CgroupStats(
            memory_peak=int(cg.read("memory", "memory.max_usage_in_bytes")),
            oom_kills=_keyed(cg.read("memory", "memory.oom_control"), "oom_kill"),
            pids_limit_hits=_keyed(cg.read("pids", "pids.events"), "max"),
            cpu_time=self.cpu_time(cg),
        )


class CgroupV2(CgroupDriver):
    mode = "cgroup-v2"

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    def roots(self) -> list[str]:
        return [self.root]

    def enter(self) -> None:
        """Move the calling process into a leaf of the delegated tree."""
        leaf = os.path.join(self.root, f"helper-{os.getpid()}")
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), "0")
        controls = _read(os.path.join(self.root, "cgroup.subtree_control")).split()
        missing = [c for c in ("memory", "pids") if c not in controls]
        if missing:
            _write(os.path.join(self.root, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in missing))

    def run_dirs(self, name: str) -> dict[str, str]:
        return {"unified": os.path.join(self.root, name)}

    def prepare(self, cg: RunCgroup) -> None:
        swap = os.path.join(cg.dirs["unified"], "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")

    def set_limits(self, cg: RunCgroup, memory: int, pids: int) -> None:
        cg.write("unified", "memory.max", str(memory))
        cg.write("unified", "pids.max", str(pids))

    def cpu_time(self, cg: RunCgroup) -> float | None:
        return _keyed(cg.read("unified", "cpu.stat"), "usage_usec") / 1e6

    def stats(self, cg: RunCgroup) -> CgroupStats:
        try:
            peak = int(cg.read("unified", "memory.peak"))
        except FileNotFoundError:  # kernels before 5.19
            peak = 0
        return CgroupStats(
            memory_peak=peak,
            oom_kills=_keyed(cg.read("unified", "memory.events"), "oom_kill"),
            pids_limit_hits=_keyed(cg.read("unified", "pids.events"), "max"),
            cpu_time=self.cpu_time(cg),
        )


def _v2_usable(root: str) -> bool:
    if not _writable_dir(root):
        return False
    try:
        available = _read(os.path.join(root, "cgroup.controllers")).split()
    except OSError:
        return False
    return "memory" in available and "pids" in available


def _v1_controller_dir(v1_root: str, controller: str, name: str) -> str | None:
    """<v1_root>/<mount containing controller>/<name>, if it is ours to write."""
    if not os.path.isdir(v1_root):
        return None
    for entry in sorted(os.listdir(v1_root)):
        if controller in entry.split(","):
            path = os.path.join(v1_root, entry, name)
            if _writable_dir(path):
                return path
    return None


def detect(mode: str, *, v2_root: str, v1_root: str, name: str) -> CgroupDriver | None:
    """The driver for `mode` (auto, v2, v1, none); None means rlimits only."""
    if mode in ("auto", "v2") and _v2_usable(v2_root):
        driver = CgroupV2(v2_root)
        try:
            driver.enter()
            return driver
        except OSError:
            if mode == "v2":
                raise SetupError(f"cannot enter delegated cgroup v2 tree {v2_root}",
                                 stage="cgroup")
    if mode in ("auto", "v1"):
        memory = _v1_controller_dir(v1_root, "memory", name)
        pids = _v1_controller_dir(v1_root, "pids", name)
        if memory and pids:
            return CgroupV1(memory, pids, _v1_controller_dir(v1_root, "cpuacct", name))
    if mode in ("v1", "v2"):
        raise SetupError(f"cgroup mode {mode} requested but no writable hierarchy found",
                         stage="cgroup")
    return None
