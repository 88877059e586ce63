"""Code that runs inside a new container: its init (pid 1) and the payload's last steps.

The helper's cloner (sandbox.cloner) clones a child into fresh user, mount, pid, ipc and uts
namespaces and a fresh or pooled (sandbox.netns_pool) network namespace; that child runs
`init_main`. Start order (after runc's init; each step names its stage on failure):
  wait for the id maps -> network (loopback up; a pooled one has it up) -> rootfs (overlay,
  /proc, /dev, tmpfs, binds, pivot_root) -> hostname -> stdio -> rlimits -> cgroup join ->
  cgroup namespace -> drop the capability bounding set -> uid/gid -> not dumpable -> workdir
  -> close every fd but 0-2 -> no_new_privs -> seccomp -> spawn the payload (setsid, default
  signals) -> execve.
A spare (cloned before its request) joins its cgroup right after the loopback, and mounts and
enters its root too when the helper guessed the request's root, then waits for its plan.
Init drops its own privileges and loads the filter itself, then starts the payload with
posix_spawn (vfork-fast, no copy of a Python process): everything is inherited. Seccomp comes
last because every call after it is filtered: loading it earlier would force the profile to
allow the setup calls (mount, setuid, prctl) that it exists to forbid.

Init stays as pid 1, unprivileged and filtered like the payload, and not dumpable so the
payload cannot write into it. It reaps every orphan; when the payload exits it kills everything
left in the namespace (a double-forked or setsid'd child included), reaps it, and reports the
wait status and rusage of the whole tree on the status pipe.
"""

from __future__ import annotations

import collections
import marshal
import os
import resource
import signal
from _json import encode_basestring_ascii as _json_string
from types import SimpleNamespace

from sandbox import syscalls as sc
from sandbox.errors import SetupError
from sandbox.ifconfig import bring_up_loopback, configure_interface
from sandbox.rootfs import enter_root, mount_root, root_dir

SETUP_FAILED_EXIT = 125
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU, signal.SIGINT, signal.SIGTERM,
                 signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
"""Python ignores or handles these; the payload must start with the default dispositions."""


def _json_text(text: str) -> str:
    # A lone surrogate (a path that was not UTF-8) would make the line invalid JSON.
    return _json_string(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _report(fd: int, kind: str, **fields) -> None:
    """Write one sandbox.plans.StatusMessage line (JSON) on the status pipe."""
    parts = [f'"kind":{_json_text(kind)}']
    for name, value in fields.items():
        parts.append(f'"{name}":{_json_text(value) if isinstance(value, str) else repr(value)}')
    try:
        os.write(fd, ("{" + ",".join(parts) + "}\n").encode())
    except OSError:
        pass


def _close_all_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _resolve(argv0: str, env: dict[str, str]) -> str:
    if "/" in argv0:
        return argv0
    for directory in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
        candidate = os.path.join(directory or ".", argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return argv0


def _drop_to_payload(plan, stdio: tuple[int, int, int],
                     cgroup_fds: tuple[int, ...], status_fd: int,
                     program: sc.SeccompProgram | None) -> str:
    """Turn this process (init) into the payload's unprivileged, filtered parent.

    Everything here is inherited by the payload; init keeps only the right to wait for it.
    Returns the resolved executable path. Raises with `stage` set on the exception.
    """
    stage = "stdio"
    try:
        for target, fd in enumerate(stdio):
            os.dup2(fd, target, inheritable=True)
        stage = "rlimits"
        for which, soft, hard in plan.rlimits:
            resource.setrlimit(which, (soft, hard))
        stage = "cgroup"
        _join_cgroup(cgroup_fds)
        stage = "capabilities"
        if plan.uid == 0:
            # execve as uid 0 would refill the permitted set from the bounding set. A non-zero
            # uid gains nothing on execve under no_new_privs (no setuid, no file caps), so
            # the 41 prctl calls are only paid where they matter.
            for cap in range(plan.last_cap + 1):
                sc.prctl(sc.PR_CAPBSET_DROP, cap)
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
        stage = "user"
        try:
            os.setgroups([plan.gid])
        except PermissionError:
            pass  # single-id mode: the namespace denies setgroups; nothing to drop
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        sc.capset_empty()
        # A credential change clears the parent-death signal; set it again so a dying
        # helper still takes this container (and so its pid namespace) down.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # Not dumpable: the payload runs as the same uid and must not ptrace or write
        # /proc/1/mem to forge init's report.
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        stage = "workdir"
        os.chdir(plan.workdir)
        stage = "fds"
        path = _resolve(plan.argv[0], dict(plan.env))
        os.set_inheritable(status_fd, False)
        _close_all_except({status_fd})
        stage = "no_new_privs"
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        stage = "seccomp"
        if program is not None:
            program.load()
        return path
    except Exception as exc:
        exc.stage = stage  # type: ignore[attr-defined]
        raise


def _join_cgroup(cgroup_fds: tuple[int, ...]) -> None:
    """Move this process into the run's cgroup and root a cgroup namespace there.

    Moving a task takes the kernel's cgroup_threadgroup_rwsem for writing, which can wait for
    an RCU grace period: over 15 ms was measured here. A spare pays it while it waits for its
    plan; a fresh clone pays it on the run's path."""
    for fd in cgroup_fds:
        os.write(fd, b"0")
    if cgroup_fds:
        sc.unshare(sc.CLONE_NEWCGROUP)


def _start_payload(plan, path: str) -> int:
    """Start the payload as init's only child, in a new session, default signals."""
    if plan.address_space_limit:
        # rlimit mode: RLIMIT_AS can only go on the payload itself, so fork and set it there.
        child = os.fork()
        if child == 0:
            try:
                os.setsid()
                resource.setrlimit(resource.RLIMIT_AS, (plan.address_space_limit,) * 2)
                for sig in RESET_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.execve(path, list(plan.argv), dict(plan.env))
            except OSError as exc:
                _exec_failed(plan, exc)
            os._exit(126)
        return child
    try:
        return os.posix_spawn(path, list(plan.argv), dict(plan.env), setsid=True,
                              setsigdef=RESET_SIGNALS, setsigmask=())
    except OSError as exc:
        # posix_spawn reports exec failures here; mimic a shell: message and 126/127.
        child = os.fork()
        if child == 0:
            _exec_failed(plan, exc)
        return child


def _exec_failed(plan, exc: OSError) -> None:
    code = 127 if isinstance(exc, FileNotFoundError) else 126
    try:
        os.write(2, f"sbx: {plan.argv[0]}: {exc.strerror}\n".encode(errors="replace"))
    finally:
        os._exit(code)


InitFds = collections.namedtuple("InitFds", "sync status stdout stderr cgroup plan", defaults=(-1,))
"""The descriptors a cloned init inherits from the helper: sync (helper -> init: "1" once the
id maps are written), status (init -> helper: StatusMessage lines), stdout, stderr, cgroup
(cgroup.procs files to join), plan (helper -> init: the plan; spares only, else -1)."""


def plan_view(data: bytes):
    """A plan the helper encoded with sandbox.plans.for_init, as attribute views: each dict
    a SimpleNamespace (views compare by value), each list or tuple a tuple; None stays None."""
    return _view(marshal.loads(data))


def _view(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{name: _view(item) for name, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_view(item) for item in value)
    return value


def _read_plan(fd: int):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:
        os._exit(SETUP_FAILED_EXIT)  # the helper retired this spare
    return plan_view(b"".join(chunks))


def init_main(fds: InitFds, programs: dict[str, sc.SeccompProgram | None],
              plan=None, guess=None, own_netns: bool = True) -> None:
    """Body of the cloned child. Never returns.

    `plan` and `guess` are views (plan_view) of a sandbox.plans.ContainerPlan and RootfsPlan.
    With `plan` the request is known at clone time. Without it this is a spare: it does the
    request-independent steps (id maps, loopback) ahead of time and then waits on `fds.plan`.
    A spare given a `guess` (the helper's bet on the next request's root) also mounts that
    root and pivots into it while it waits; the helper only sends it a plan whose root is the
    guess. Without `own_netns` it was cloned into a pooled network namespace
    (sandbox.netns_pool) whose loopback is up already and that it may not configure.
    """
    stage = "init"
    try:
        # If the helper is already gone the sync read below sees EOF and we stop there.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_all_except({fds.sync, fds.status, fds.stdout, fds.stderr, fds.plan, *fds.cgroup})
        stage = "userns"
        if os.read(fds.sync, 1) != b"1":
            os._exit(SETUP_FAILED_EXIT)
        os.close(fds.sync)
        if own_netns:
            stage = "network"
            bring_up_loopback()
        cgroup_fds = fds.cgroup
        entered = None
        if plan is None:
            stage = "cgroup"
            _join_cgroup(cgroup_fds)  # off the run's path; the helper re-bases the counters
            cgroup_fds = ()
            stage = "rootfs"
            entered = _enter_ahead(guess)
            stage = "plan"
            plan = _read_plan(fds.plan)
        if plan.payload.net_address:
            stage = "network"
            configure_interface("eth0", plan.payload.net_address, plan.payload.net_prefixlen)
        stage = "stdin"
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if entered is None:
            stdin = os.open(plan.stdin_path, flags)
            stage = "rootfs"
            mount_root(plan.rootfs)
            enter_root(plan.rootfs)
        else:
            if entered.rootfs != plan.rootfs:  # the helper checks; never trust it
                raise SetupError("the spare's root does not match the plan", stage="rootfs")
            # The host path is out of reach since pivot_root; the slot's fd is not.
            stdin = os.open(os.path.basename(plan.stdin_path), flags, dir_fd=entered.run_dir)
            os.close(entered.run_dir)
        stage = "hostname"
        sc.sethostname(plan.payload.hostname)
        stdio = (stdin, fds.stdout, fds.stderr)
        path = _drop_to_payload(plan.payload, stdio, cgroup_fds, fds.status,
                                programs[plan.profile])
        stage = "exec"
        child = _start_payload(plan.payload, path)
        # Init writes nothing to the payload's stdio: closing its copies lets the helper see
        # EOF the moment the payload's last process is gone.
        for fd in (0, 1, 2):
            os.close(fd)
    except Exception as exc:  # noqa: BLE001 - every failure is a named setup stage
        stage = getattr(exc, "stage", stage)
        message = getattr(exc, "detail", None) or str(exc)
        _report(fds.status, "setup_error", stage=stage, message=message)
        os._exit(SETUP_FAILED_EXIT)
    _reap_until(child, fds.status)


_Entered = collections.namedtuple("_Entered", "rootfs run_dir")
"""A spare's root (the guess's view), mounted and pivoted into before its request arrived,
and an O_PATH fd of its slot directory, still reachable after pivot_root."""


def _enter_ahead(guess) -> _Entered | None:
    """Mount the guessed root and pivot into it ahead of the request. If it cannot be
    mounted, leave nothing mounted: the run then mounts its own root and reports its error."""
    if guess is None:
        return None
    try:
        mount_root(guess)
    except Exception:  # noqa: BLE001 - the run's own mount_root names the error
        try:
            sc.umount2(root_dir(guess), sc.MNT_DETACH)
        except OSError:
            pass
        return None
    run_dir = os.open(guess.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        enter_root(guess)
    except Exception:  # noqa: BLE001 - half entered: this spare is no use, the helper replaces it
        os._exit(SETUP_FAILED_EXIT)
    return _Entered(guess, run_dir)


def _reap_until(child: int, status_fd: int) -> None:
    payload_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            payload_status = status
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    _report(status_fd, "exit", wait_status=payload_status or 0,
            cpu_time=usage.ru_utime + usage.ru_stime, max_rss=usage.ru_maxrss * 1024)
    os._exit(0)
