"""The runtime's helper process: holder of the user namespace, launcher and monitor of runs.

Started once per Runtime as a small fresh interpreter, it unshares a user and mount namespace,
waits for the runtime to map its subuid range (newuidmap), makes its mounts private and puts a
tmpfs over the scratch directory, so every run's files live in memory of this namespace only:
if the helper dies, its mount namespace and every run's data go with it.

Per run it mounts a size-capped tmpfs (upper dir, work dir, work directory, stdin), creates the
run's cgroup, has its cloner (sandbox.cloner) clone the container as the helper's own child
(sandbox.container.init_main), writes the nested id maps,
and then watches, in one selector loop shared by all runs: stdout/stderr pipes (capped, always
drained), the status pipe, a pidfd for the exit, the wall deadline and the cgroup's CPU usage.
When the container's init exits the kernel has already killed and reaped everything in its pid
namespace, so the helper can safely copy files out, read the cgroup and unmount.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import selectors
import signal
import socket
import sys
import time

import msgspec

from sandbox import cgroups, copyio, seccomp, upperdiff, userns
from sandbox import syscalls as sc
from sandbox.config import RuntimeSettings
from sandbox.errors import SetupError
from sandbox.cloner import Cloner
from sandbox.container import InitFds
from sandbox.helper_netvol import NetVol, NetVolMixin
from sandbox.protocol import (FrameBuffer, Hello, KillRequest, Mapped, NetworkRequest,
                              ProbeRequest, Ready, RunReply, RunRequest, encode, recv_message)
from sandbox.plans import (Bind, ContainerPlan, PayloadPlan, RootfsPlan, StatusMessage, for_init,
                           read_status)
from sandbox.rootfs import prepare_dev_template
from sandbox.spec import Limits, RunResult, RunSpec, Verdict
from sandbox.verdict import Observation, decide

CPU_POLL_INTERVAL = 0.02
"""Seconds between reads of a run's cgroup CPU usage."""
READ_CHUNK = 1 << 16
MAX_RETIRED = 8
"""Ended runs whose tmpfs and cgroup may wait for an idle moment; more are freed at once."""
SPARE_RETRY_DELAY = 1.0
"""Seconds without spares after making one failed (runs then clone on demand)."""
STDERR_TAIL = 4096


DEFAULT_LIMITS = Limits()


class Slot:
    """A run's resources, made before (spare) or when (direct) its request arrives."""

    def __init__(self, run_dir: str, limits: Limits) -> None:
        self.run_dir = run_dir
        self.limits = limits
        self.pid = 0
        self.pidfd = -1
        self.netns_loan: tuple[int, int] | None = None  # a pooled network namespace (cloner)
        self.cgroup: cgroups.RunCgroup | None = None
        self.cgroup_fds: tuple[int, ...] = ()
        self.netvol = NetVol()  # networks and volumes (sandbox.helper_netvol)
        self.guess: RootfsPlan | None = None  # the root a spare mounted before its request
        self.guess_layers: tuple[tuple[int, int], ...] = ()  # (st_dev, st_ino) of its layers
        self.out_r = self.out_w = self.err_r = self.err_w = -1
        self.status_r = self.status_w = self.plan_r = self.plan_w = -1

    @staticmethod
    def tmpfs_size(limits: Limits) -> int:
        """The run's root upper dir, work directory and /tmp share `disk` bytes."""
        return limits.disk

    def close_child_ends(self) -> None:
        """The container holds these now; the helper keeps only its own ends."""
        for name in ("out_w", "err_w", "status_w", "plan_r"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        for fd in self.cgroup_fds:
            os.close(fd)
        self.cgroup_fds = ()

    def close_all(self) -> None:
        self.close_child_ends()
        for name in ("out_r", "err_r", "status_r", "plan_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class ActiveRun:
    """Book-keeping of one container between clone and reply."""

    def __init__(self, key: str, spec: RunSpec, run_dir: str, diff_tar: str | None) -> None:
        self.key = key
        self.spec = spec
        self.run_dir = run_dir
        self.diff_tar = diff_tar
        self.pid = 0
        self.pidfd = -1
        self.started = 0.0
        self.deadline = 0.0
        self.next_cpu_poll = 0.0
        self.cgroup: cgroups.RunCgroup | None = None
        self.out = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}
        self.pipes: dict[int, int] = {}  # read fd -> stream number (1, 2) or 0 for status
        self.status = bytearray()
        self.killed_for: str | None = None
        self.finished_at: float | None = None  # init reported, or died
        self.exited = False  # init reaped
        self.replied = False
        self.netvol = NetVol()
        self.netns_loan: tuple[int, int] | None = None

    def kill(self, reason: str) -> None:
        if self.killed_for is None:
            self.killed_for = reason
        if self.pidfd >= 0:
            sc.pidfd_send_signal(self.pidfd, signal.SIGKILL)


def _rlimits(spec: RunSpec, use_cgroup: bool) -> tuple[tuple[int, int, int], ...]:
    lim = spec.limits
    # RLIMIT_NPROC counts per uid of the run's own user namespace, init included (+1). With a
    # pids cgroup it is only a backstop, set above pids.max so the cgroup (whose events say
    # "limit hit") trips first.
    nproc = lim.pids + 1 if not use_cgroup else 2 * lim.pids + 1
    # Never above what we inherited: a hard limit cannot be raised (an outer prlimit that
    # protects the machine stays in force).
    inherited = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if inherited != resource.RLIM_INFINITY:
        nproc = min(nproc, inherited)
    cpu = max(1, math.ceil(lim.cpu_time))
    out = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, lim.file_size, lim.file_size),
        (resource.RLIMIT_NOFILE, lim.open_files, lim.open_files),
        (resource.RLIMIT_STACK, lim.stack, lim.stack),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, nproc, nproc),
    ]
    return tuple(out)


def _spare_can_serve(req: RunRequest) -> bool:
    """Binds and networks may name mounts or namespaces made after a spare's clone."""
    return not (req.binds or req.volumes or req.spec.network != "none")


def _layer_ids(layers: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Which directories the layer paths name now (a pruned and re-pulled layer differs)."""
    ids = []
    for path in layers:
        st = os.stat(path)
        ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


class Helper(NetVolMixin):
    def __init__(self, sock: socket.socket, settings: RuntimeSettings,
                 mapping: userns.IdMapping) -> None:
        self.sock = sock
        self.settings = settings
        self.mapping = mapping
        self.selector = selectors.DefaultSelector()
        self.runs: dict[str, ActiveRun] = {}
        self.by_fd: dict[int, ActiveRun] = {}
        self.frames = FrameBuffer()
        self.cloner = Cloner({name: os.environ.get(name, "")
                              for name in ("PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")},
                             keep_netns=settings.netns_pool)
        self.cloner.start()  # its interpreter starts while the profiles compile
        self.programs = seccomp.compile_all()
        self.cloner.set_programs(self.programs)
        self.cgroup = cgroups.detect(settings.cgroup_mode, v2_root=settings.v2_root,
                                     v1_root=settings.cgroup_v1_root, name=settings.cgroup_name)
        if self.cgroup:
            self.cgroup.clean_stale()
        self.scratch = settings.scratch_dir
        self.last_cap = sc.last_cap()
        self.dev_template = os.path.join(self.scratch, "dev")
        os.mkdir(self.dev_template, 0o755)
        prepare_dev_template(self.dev_template)
        self.seq = 0
        self.spares: list[Slot] = []  # oldest first: the most likely to be ready
        self.last_root: RootfsPlan | None = None  # root of the last run a spare could serve
        self.last_req: RunRequest | None = None
        self.root_streak = 0  # how many such runs in a row had that root
        self.retired: list[ActiveRun] = []  # ended runs whose tmpfs and cgroup wait for idle
        self.spare_retry_at = 0.0
        self._netvol_init()

    def info(self) -> dict[str, str]:
        return {"limits_mode": self.cgroup.mode if self.cgroup else "rlimit",
                "userns": self.mapping.mode, "helper_pid": str(os.getpid()),
                "max_container_id": str(self.mapping.max_id),
                "seccomp_profiles": ",".join(sorted(self.programs)),
                "cloner_pid": str(self.cloner.pid or "")}

    # -- loop ---------------------------------------------------------------------------------

    def serve(self) -> None:
        self.sock.setblocking(False)
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        while True:
            events = self.selector.select(0)
            if not events and self.retired:
                # Unmounting waits for an RCU grace period: done when nothing else is ready,
                # so the next request does not queue behind the last run's teardown.
                self._release(self.retired.pop(0))
                continue
            if (not events and len(self.spares) < self.settings.warm_spares
                    and time.monotonic() >= self.spare_retry_at):
                # Spares are made only when nothing is ready: a run's output, its end or a
                # request always comes first, and the clone fills the time a run executes.
                self._make_spare()
                continue
            if not events:
                events = self.selector.select(self._next_timeout())
            for key, _ in events:
                if key.fileobj is self.sock:
                    if not self._read_requests():
                        return
                else:
                    self._on_fd(key.fd)
            self._check_timers()

    def _next_timeout(self) -> float | None:
        if not self.runs:
            return None
        now = time.monotonic()
        pending = [min(r.deadline, r.next_cpu_poll) for r in self.runs.values() if not r.replied]
        if not pending:
            return None
        soonest = min(pending)
        return max(0.0, soonest - now)

    def _read_requests(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            self._shutdown()
            return False
        for msg in self.frames.feed(chunk):
            if isinstance(msg, RunRequest):
                self._start(msg)
            elif isinstance(msg, KillRequest):
                for key, run in list(self.runs.items()):
                    if key == msg.key or key.startswith(msg.key + "/"):  # a job's services too
                        run.kill("cancel")
            elif isinstance(msg, (NetworkRequest, ProbeRequest)):
                self._netvol_request(msg)
        return True

    def _send(self, msg) -> None:
        data = encode(msg)
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def _shutdown(self) -> None:
        self.cloner.stop()
        while self.retired:
            self._release(self.retired.pop())
        while self.spares:
            self._discard(self.spares.pop())
        for run in list(self.runs.values()):
            run.kill("cancel")
            if not run.exited:
                os.waitpid(run.pid, 0)  # SIGKILLed: its namespaces go with it
                run.exited = True
            del self.runs[run.key]
            self._cleanup(run)  # back to the pool, which main() then empties
        self._netvol_shutdown()

    def _check_timers(self) -> None:
        now = time.monotonic()
        for run in list(self.runs.values()):
            if run.killed_for is not None or run.replied:
                continue
            if now >= run.deadline:
                run.kill("wall")
            elif now >= run.next_cpu_poll:
                run.next_cpu_poll = now + CPU_POLL_INTERVAL
                used = run.cgroup.cpu_time() if run.cgroup else None
                if used is not None and used > run.spec.limits.cpu_time:
                    run.kill("cpu")

    # -- start --------------------------------------------------------------------------------
    #
    # A slot is a run's resources made before the request is known: its tmpfs, cgroup, pipes.
    # A spare is a slot with a container already cloned into it, id-mapped and with loopback
    # up, waiting on a pipe for its plan: the clone, the maps and the first copy-on-write
    # faults of the cloned interpreter are paid while the previous run executes, not on the
    # caller's path. Requests that need what a spare cannot give get a fresh clone instead.

    def _start(self, req: RunRequest) -> None:
        if _spare_can_serve(req):
            self._note_root(req)
        slot = self._take_spare(req)
        if slot is not None:
            try:
                self._configure(slot, req)
                self._send_plan(slot, self._plan(slot, req))
            except Exception:  # noqa: BLE001 - the spare died or did not fit: clone afresh
                self._discard(slot)
                slot = None
        try:
            if slot is None:
                slot = self._new_slot(req.spec.limits)
                self._configure(slot, req)
                self._clone(slot, self._plan(slot, req), own_netns=req.spec.network != "none")
        except Exception as exc:  # noqa: BLE001 - reported as SETUP_ERROR of this run
            stage = getattr(exc, "stage", "prepare")
            if slot is not None:
                self._discard(slot)
            self._send(RunReply(req.key, RunResult(verdict=Verdict.SETUP_ERROR, stage=stage,
                                                   message=str(exc))))
            return
        self._activate(slot, req)

    def _take_spare(self, req: RunRequest) -> "Slot | None":
        if not self.spares or not _spare_can_serve(req):
            return None
        slot = self.spares.pop(0)
        if slot.guess is not None and not self._guess_holds(slot, req):
            # Mounted for another image (or the image's layers were replaced since): a fresh
            # clone is cheaper than taking that root apart.
            self._discard(slot)
            return None
        return slot

    def _guess_holds(self, slot: "Slot", req: RunRequest) -> bool:
        if slot.guess != self._rootfs_plan(slot.run_dir, req, ()):
            return False
        try:
            return _layer_ids(req.rootfs.layers) == slot.guess_layers
        except OSError:  # a layer is gone: the fresh clone reports it as the run's error
            return False

    # The guess: when the last two runs a spare could serve had the same root (image, work
    # directory, read-only flag), the next spare mounts that root while it waits. A judge
    # alternating languages gets plain spares instead of one wasted mount per run.

    def _note_root(self, req: RunRequest) -> None:
        shape = self._rootfs_plan("", req, ())
        self.root_streak = self.root_streak + 1 if shape == self.last_root else 1
        self.last_root, self.last_req = shape, req

    def _guess(self, slot: "Slot") -> None:
        if self.root_streak < 2 or self.last_req is None:
            return
        try:
            slot.guess_layers = _layer_ids(self.last_req.rootfs.layers)
        except OSError:
            return  # the image is gone: nothing to guess
        slot.guess = self._rootfs_plan(slot.run_dir, self.last_req, ())

    def _make_spare(self) -> None:
        if len(self.spares) >= self.settings.warm_spares:
            return
        try:
            slot = self._new_slot(DEFAULT_LIMITS)
            self._guess(slot)
            self._clone(slot, None, own_netns=False)  # it serves only network "none"
        except Exception:  # noqa: BLE001 - no spare: runs clone on demand for a while
            self.spare_retry_at = time.monotonic() + SPARE_RETRY_DELAY
            return
        self.spares.append(slot)

    def _new_slot(self, limits) -> "Slot":
        self.seq += 1
        slot = Slot(os.path.join(self.scratch, f"r{self.seq}"), limits)
        try:
            os.mkdir(slot.run_dir, 0o700)
            sc.mount("tmpfs", slot.run_dir, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                     f"size={slot.tmpfs_size(limits)},mode=0700")
            for name in ("upper", "work", "root", "box"):
                os.mkdir(os.path.join(slot.run_dir, name), 0o755)
            slot.out_r, slot.out_w = os.pipe2(os.O_CLOEXEC)
            slot.err_r, slot.err_w = os.pipe2(os.O_CLOEXEC)
            slot.status_r, slot.status_w = os.pipe2(os.O_CLOEXEC)
            slot.plan_r, slot.plan_w = os.pipe2(os.O_CLOEXEC)
            if self.cgroup:
                slot.cgroup = self.cgroup.acquire(limits.memory, limits.pids + 1)  # +1: init
                slot.cgroup_fds = tuple(os.open(p, os.O_WRONLY | os.O_CLOEXEC)
                                        for p in slot.cgroup.procs_files)
        except BaseException:
            self._discard(slot)
            raise
        return slot

    def _configure(self, slot: "Slot", req: RunRequest) -> None:
        """Fit a slot to the request: sizes, limits, ownership, files, stdin."""
        spec, lim = req.spec, req.spec.limits
        if max(spec.uid, spec.gid) > self.mapping.max_id:
            raise SetupError(
                f"uid/gid {spec.uid}/{spec.gid} is not mapped: this runtime maps ids 0-"
                f"{self.mapping.max_id} ({self.mapping.mode} mode; without an /etc/subuid range "
                "runs must use uid 0)", stage="user")
        size = slot.tmpfs_size(lim) + len(spec.stdin)
        if size != slot.tmpfs_size(slot.limits):
            sc.mount(None, slot.run_dir, None, sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV,
                     f"size={size}")
        if slot.cgroup:
            if (lim.memory, lim.pids) != (slot.limits.memory, slot.limits.pids):
                slot.cgroup.set_limits(lim.memory, lim.pids + 1)
            # A spare's init joined long ago: its own pages are this run's baseline, not peak.
            slot.cgroup.driver.reset(slot.cgroup)
        box = os.path.join(slot.run_dir, "box")
        os.chown(box, spec.uid, spec.gid)
        copyio.copy_in(box, spec.files, spec.uid, spec.gid)
        fd = os.open(os.path.join(slot.run_dir, "stdin"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            view = memoryview(spec.stdin)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._netvol_configure(slot, req)

    def _plan(self, slot: "Slot", req: RunRequest) -> ContainerPlan:
        spec, lim = req.spec, req.spec.limits
        rootfs = self._rootfs_plan(slot.run_dir, req, slot.netvol.binds)
        payload = PayloadPlan(argv=tuple(spec.cmd), env=tuple(spec.env.items()),
                              workdir=spec.workdir, uid=spec.uid, gid=spec.gid,
                              rlimits=_rlimits(spec, self.cgroup is not None),
                              hostname=spec.hostname, last_cap=self.last_cap,
                              address_space_limit=0 if self.cgroup else lim.memory,
                              **self._netvol_payload(slot))
        return ContainerPlan(rootfs, payload, spec.seccomp, os.path.join(slot.run_dir, "stdin"))

    def _rootfs_plan(self, run_dir: str, req: RunRequest, extra: tuple[Bind, ...]) -> RootfsPlan:
        spec = req.spec
        return RootfsPlan(
            run_dir=run_dir, dev_template=self.dev_template, layers=req.rootfs.layers,
            binds=(Bind(os.path.join(run_dir, "box"), spec.workdir), *req.binds, *extra),
            tmp_size=spec.limits.disk if spec.read_only_root else 0,  # only sizes a tmpfs /tmp
            read_only_root=spec.read_only_root)

    def _clone(self, slot: "Slot", plan: ContainerPlan | None, own_netns: bool) -> None:
        """Clone the container into `slot`: with its plan, or as a spare waiting for one;
        in a fresh network namespace or (not own_netns) a pooled one."""
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        fds = InitFds(sync=sync_r, status=slot.status_w, stdout=slot.out_w, stderr=slot.err_w,
                      cgroup=slot.cgroup_fds, plan=slot.plan_r if plan is None else -1)
        try:
            pid, slot.netns_loan = self.cloner.clone(fds, plan, slot.guess, own_netns)
            slot.pid = pid
            slot.pidfd = sc.pidfd_open(pid)
            slot.close_child_ends()
            if plan is not None and slot.plan_w >= 0:  # a direct clone never reads a plan
                os.close(slot.plan_w)
                slot.plan_w = -1
            os.close(sync_r)
            sync_r = -1
            try:
                userns.write_nested_maps(pid, self.mapping)
            except OSError as exc:
                raise SetupError(f"writing nested id maps: {exc}", stage="userns") from exc
            if plan is not None:
                self._netvol_connect(slot, pid)
            os.write(sync_w, b"1")
        finally:
            os.close(sync_w)
            if sync_r >= 0:
                os.close(sync_r)

    def _send_plan(self, slot: "Slot", plan: ContainerPlan) -> None:
        data = for_init(plan)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(slot.plan_w, view):]
        except OSError as exc:
            raise SetupError(f"the waiting container is gone: {exc}", stage="plan") from exc
        finally:
            os.close(slot.plan_w)
            slot.plan_w = -1

    def _activate(self, slot: "Slot", req: RunRequest) -> None:
        run = ActiveRun(req.key, req.spec, slot.run_dir, req.diff_tar)
        run.pid, run.pidfd, run.cgroup = slot.pid, slot.pidfd, slot.cgroup
        run.netns_loan = slot.netns_loan
        run.netvol = slot.netvol
        now = time.monotonic()
        run.started = now
        run.deadline = now + req.spec.limits.wall_time
        run.next_cpu_poll = now + CPU_POLL_INTERVAL
        self.runs[run.key] = run
        for fd, stream in ((slot.out_r, 1), (slot.err_r, 2), (slot.status_r, 0)):
            os.set_blocking(fd, False)
            run.pipes[fd] = stream
            self.by_fd[fd] = run
            self.selector.register(fd, selectors.EVENT_READ, None)
        self.by_fd[run.pidfd] = run
        self.selector.register(run.pidfd, selectors.EVENT_READ, None)

    def _discard(self, slot: "Slot") -> None:
        """Undo a slot that never became a run (or a spare at shutdown)."""
        if slot.pidfd >= 0:
            sc.pidfd_send_signal(slot.pidfd, signal.SIGKILL)
            os.close(slot.pidfd)
        if slot.pid:
            os.waitpid(slot.pid, 0)
        slot.close_all()
        self._release(slot)

    # -- progress -----------------------------------------------------------------------------
    #
    # A run is answered as soon as init has reported (its payload tree is dead and reaped) and
    # both output pipes are at EOF; init's own exit, the namespace teardown the kernel does
    # with it, and the unmounting are waited for afterwards, off the caller's path.

    def _on_fd(self, fd: int) -> None:
        run = self.by_fd.get(fd)
        if run is None:
            return
        if fd == run.pidfd:
            self._on_exit(run)
        else:
            self._drain(run, fd, once=True)
        self._progress(run)

    def _drain(self, run: ActiveRun, fd: int, *, once: bool) -> None:
        stream = run.pipes[fd]
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                self._close_pipe(run, fd)
                return
            if stream == 0:
                run.status += chunk[: 65536 - len(run.status)]
                if run.finished_at is None and b"\n" in chunk:
                    run.finished_at = time.monotonic()
            else:
                self._keep_output(run, stream, chunk)
            if once:
                return

    def _keep_output(self, run: ActiveRun, stream: int, chunk: bytes) -> None:
        buf = run.out[stream]
        room = run.spec.limits.output - len(buf)
        if len(chunk) > room:
            buf += chunk[:max(room, 0)]
            run.truncated[stream] = True
            run.kill("output")
        else:
            buf += chunk

    def _close_pipe(self, run: ActiveRun, fd: int) -> None:
        self.selector.unregister(fd)
        del self.by_fd[fd]
        del run.pipes[fd]
        os.close(fd)

    def _on_exit(self, run: ActiveRun) -> None:
        os.waitpid(run.pid, 0)
        run.exited = True
        if run.finished_at is None:
            run.finished_at = time.monotonic()
        self.selector.unregister(run.pidfd)
        del self.by_fd[run.pidfd]
        os.close(run.pidfd)
        run.pidfd = -1
        for fd in list(run.pipes):
            self._drain(run, fd, once=False)

    def _progress(self, run: ActiveRun) -> None:
        outputs_open = any(stream != 0 for stream in run.pipes.values())
        if not run.replied and run.finished_at is not None and not outputs_open:
            run.replied = True
            try:
                result = self._result(run, run.finished_at - run.started)
                result = self._netvol_settle(run, result)
            except Exception as exc:  # noqa: BLE001
                result = RunResult(verdict=Verdict.INTERNAL_ERROR,
                                   message=f"collecting result: {exc}")
            self._send(RunReply(run.key, result))
        if run.replied and run.exited:
            del self.runs[run.key]
            self._cleanup(run, later=True)

    def _result(self, run: ActiveRun, wall: float) -> RunResult:
        messages = read_status(bytes(run.status))
        setup = next((m for m in messages if m.kind == "setup_error"), None)
        exit_msg = next((m for m in messages if m.kind == "exit"), None)
        limits = run.spec.limits
        stats = run.cgroup.stats() if run.cgroup else cgroups.CgroupStats()
        mode = self.cgroup.mode if self.cgroup else "rlimit"
        common = dict(stdout=bytes(run.out[1]), stderr=bytes(run.out[2]),
                      stdout_truncated=run.truncated[1], stderr_truncated=run.truncated[2],
                      wall_time=round(wall, 6), limits_mode=mode)
        if setup is not None:
            return RunResult(verdict=Verdict.SETUP_ERROR, stage=setup.stage,
                             message=setup.message, **common)
        if exit_msg is None:
            if run.killed_for in ("wall", "cancel", "output", "cpu"):
                # Killed before init could report: the payload never finished setting up.
                exit_msg = StatusMessage("exit", wait_status=signal.SIGKILL)
            else:
                return RunResult(verdict=Verdict.INTERNAL_ERROR,
                                 message="container init died without a report", **common)
        cpu = stats.cpu_time if stats.cpu_time is not None else exit_msg.cpu_time
        memory = stats.memory_peak if run.cgroup else exit_msg.max_rss
        verdict, exit_code, sig = decide(Observation(
            wait_status=exit_msg.wait_status, killed_for=run.killed_for, cpu_time=cpu,
            cpu_limit=limits.cpu_time, memory_peak=memory, memory_limit=limits.memory,
            oom_kills=stats.oom_kills, pids_limit_hits=stats.pids_limit_hits,
            cgroup=run.cgroup is not None, stderr_tail=bytes(run.out[2][-STDERR_TAIL:])))
        files, problems = {}, []
        box = os.path.join(run.run_dir, "box")
        if run.spec.copy_out:
            files, problems = copyio.copy_out(box, list(run.spec.copy_out), limits.output)
        if run.diff_tar:
            upperdiff.write_layer(os.path.join(run.run_dir, "upper"), run.diff_tar,
                                  limits.disk)
        message = "cancelled" if run.killed_for == "cancel" else ""
        if problems:
            message = "; ".join(filter(None, [message, *problems]))
        return RunResult(verdict=verdict, exit_code=exit_code, signal=sig,
                         cpu_time=round(cpu, 6), memory=memory, files=files, message=message,
                         **common)

    def _cleanup(self, run: ActiveRun, *, later: bool = False) -> None:
        """Close a finished run's descriptors and leave its network now; give back its
        cgroup and tmpfs now, or (`later`) once the helper is idle."""
        for fd in list(run.pipes):
            self._close_pipe(run, fd)
        if run.pidfd >= 0:
            os.close(run.pidfd)
            run.pidfd = -1
        self._netvol_release(run)  # at once: the job's next request may remove the network
        self._give_back_netns(run)  # at once: the next run may use it
        if later and len(self.retired) < MAX_RETIRED:
            self.retired.append(run)
        else:
            self._release(run)

    def _give_back_netns(self, holder: "ActiveRun | Slot") -> None:
        """Only for a reaped container: its pooled namespace may be the next one's."""
        self.cloner.give_back_netns(holder.netns_loan)
        holder.netns_loan = None

    def _release(self, holder: "ActiveRun | Slot") -> None:
        """Give back what a run or an unused slot (its container reaped) held: network,
        cgroup, tmpfs."""
        self._netvol_release(holder)  # stop slirp4netns, leave the job network
        self._give_back_netns(holder)
        if holder.cgroup:
            try:
                holder.cgroup.driver.release(holder.cgroup)
            except OSError:
                pass
        try:
            sc.umount2(holder.run_dir, sc.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        try:
            os.rmdir(holder.run_dir)
        except FileNotFoundError:
            pass


def _enter_namespace(sock: socket.socket, settings: RuntimeSettings) -> userns.IdMapping:
    mapping = userns.plan_mapping(settings.userns)
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
    sock.sendall(encode(Hello(os.getpid())))
    reply = recv_message(sock)
    if not isinstance(reply, Mapped) or not reply.ok:
        raise SystemExit(f"sbx helper: id mapping failed: {getattr(reply, 'message', '')}")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", settings.scratch_dir, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             "size=1m,mode=0700")
    return mapping


def main() -> None:
    fd = int(sys.argv[1])
    settings = msgspec.json.decode(sys.argv[2].encode(), type=RuntimeSettings)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=fd)
    mapping = _enter_namespace(sock, settings)
    helper = Helper(sock, settings, mapping)
    helper._make_spare()
    sock.sendall(encode(Ready(helper.info())))
    helper.serve()
    if helper.cgroup:
        helper.cgroup.close()  # the idle ones; a dead helper's are the next one's to clean


if __name__ == "__main__":
    main()
