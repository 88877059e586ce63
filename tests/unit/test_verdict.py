"""The verdict order: the cause a limit names beats the signal that carried it out."""

from __future__ import annotations

import signal

import pytest

from sandbox.spec import MiB, Verdict
from sandbox.verdict import Observation, decide


def obs(**kw) -> Observation:
    base = dict(wait_status=0, killed_for=None, cpu_time=0.1, cpu_limit=1.0,
                memory_peak=MiB, memory_limit=64 * MiB, oom_kills=0, pids_limit_hits=0,
                cgroup=True)
    base.update(kw)
    return Observation(**base)


def exited(code: int) -> int:
    return code << 8


KILLED = signal.SIGKILL


@pytest.mark.parametrize("observation, verdict, exit_code, sig", [
    (obs(), Verdict.OK, 0, None),
    (obs(wait_status=exited(3)), Verdict.NONZERO_EXIT, 3, None),
    (obs(wait_status=signal.SIGSEGV), Verdict.SIGNALED, None, signal.SIGSEGV),
    (obs(wait_status=signal.SIGXCPU), Verdict.TIME_LIMIT, None, signal.SIGXCPU),
    (obs(wait_status=KILLED, killed_for="cpu", cpu_time=1.01), Verdict.TIME_LIMIT, None, KILLED),
    (obs(cpu_time=1.5), Verdict.TIME_LIMIT, 0, None),
    (obs(wait_status=KILLED, killed_for="wall"), Verdict.WALL_TIME_LIMIT, None, KILLED),
    (obs(wait_status=KILLED, oom_kills=1), Verdict.MEMORY_LIMIT, None, KILLED),
    (obs(wait_status=KILLED, killed_for="output"), Verdict.OUTPUT_LIMIT, None, KILLED),
    (obs(wait_status=signal.SIGXFSZ), Verdict.FILE_SIZE_LIMIT, None, signal.SIGXFSZ),
    (obs(wait_status=exited(1), pids_limit_hits=3), Verdict.PROCESS_LIMIT, 1, None),
    (obs(wait_status=signal.SIGSYS), Verdict.SYSCALL_BLOCKED, None, signal.SIGSYS),
])
def test_single_causes(observation, verdict, exit_code, sig):
    assert decide(observation) == (verdict, exit_code, sig)


def test_fork_failures_that_were_handled_are_still_ok():
    assert decide(obs(pids_limit_hits=5))[0] is Verdict.OK


def test_memory_beats_the_wall_clock_that_ended_a_thrashing_run():
    assert decide(obs(wait_status=KILLED, killed_for="wall", oom_kills=2))[0] \
        is Verdict.MEMORY_LIMIT


def test_process_limit_beats_wall_for_a_fork_bomb():
    assert decide(obs(wait_status=KILLED, killed_for="wall", pids_limit_hits=100))[0] \
        is Verdict.PROCESS_LIMIT


def test_rlimit_mode_reads_memory_errors_and_fork_failures_from_stderr():
    assert decide(obs(cgroup=False, wait_status=exited(1),
                      stderr_tail=b"Traceback...\nMemoryError\n"))[0] is Verdict.MEMORY_LIMIT
    assert decide(obs(cgroup=False, wait_status=exited(2),
                      stderr_tail=b"sh: can't fork: Resource temporarily unavailable"))[0] \
        is Verdict.PROCESS_LIMIT
    # the same words from a cgroup-limited run prove nothing: the cgroup counters decide
    assert decide(obs(wait_status=exited(1), stderr_tail=b"MemoryError"))[0] \
        is Verdict.NONZERO_EXIT
