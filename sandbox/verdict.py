"""From what was observed about a finished run to one verdict, exit code and signal.

The order is the order of causes: a limit the helper enforced (output, memory, processes,
CPU, wall) explains a death better than the signal that carried it out.
"""

from __future__ import annotations

import os
import signal

import msgspec

from sandbox.spec import Verdict

MEMORY_ERROR_MARKERS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory",
                        b"out of memory", b"Out of memory")
"""rlimit mode only: how a failed allocation under RLIMIT_AS shows on stderr."""
FORK_ERROR_MARKERS = (b"can't fork", b"Cannot fork", b"can't start new thread",
                      b"Resource temporarily unavailable", b"fork: retry")
"""rlimit mode only: how a fork refused by RLIMIT_NPROC shows on stderr."""


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    wait_status: int
    killed_for: str | None  # "output", "cpu", "wall", "cancel" or None
    cpu_time: float
    cpu_limit: float
    memory_peak: int
    memory_limit: int
    oom_kills: int
    pids_limit_hits: int
    cgroup: bool
    stderr_tail: bytes = b""


def decide(obs: Observation) -> tuple[Verdict, int | None, int | None]:
    exit_code: int | None = None
    sig: int | None = None
    if os.WIFSIGNALED(obs.wait_status):
        sig = os.WTERMSIG(obs.wait_status)
    elif os.WIFEXITED(obs.wait_status):
        exit_code = os.WEXITSTATUS(obs.wait_status)
    clean = exit_code == 0 and obs.killed_for is None
    if obs.killed_for == "output":
        return Verdict.OUTPUT_LIMIT, exit_code, sig
    if obs.oom_kills > 0:
        return Verdict.MEMORY_LIMIT, exit_code, sig
    if not obs.cgroup and not clean and (
            obs.memory_peak >= 0.8 * obs.memory_limit
            or any(m in obs.stderr_tail for m in MEMORY_ERROR_MARKERS)):
        return Verdict.MEMORY_LIMIT, exit_code, sig
    if not clean and (obs.pids_limit_hits > 0 or (
            not obs.cgroup and any(m in obs.stderr_tail for m in FORK_ERROR_MARKERS))):
        return Verdict.PROCESS_LIMIT, exit_code, sig
    if obs.killed_for == "cpu" or sig == signal.SIGXCPU or obs.cpu_time > obs.cpu_limit:
        return Verdict.TIME_LIMIT, exit_code, sig
    if obs.killed_for == "wall":
        return Verdict.WALL_TIME_LIMIT, exit_code, sig
    if sig == signal.SIGXFSZ:
        return Verdict.FILE_SIZE_LIMIT, exit_code, sig
    if sig == signal.SIGSYS:
        return Verdict.SYSCALL_BLOCKED, exit_code, sig
    if sig is not None:
        return Verdict.SIGNALED, exit_code, sig
    if exit_code:
        return Verdict.NONZERO_EXIT, exit_code, sig
    return Verdict.OK, exit_code, sig
