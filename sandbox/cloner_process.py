"""The cloner process: it clones every container on its helper's behalf (see sandbox.cloner).

A clone starts as a copy of this process, so it imports only what a container's init runs:
no msgspec, no typing, no subprocess (sandbox.plans says why and what it saved). It is
started with `python -I -S` (no site: the venv's .pth hooks alone doubled its heap) and does
nothing between clones; what it holds is frozen so that no collection dirties it.

Protocol, over a SOCK_SEQPACKET pair (one message per datagram, every message `marshal` of
builtins, exchanged only with the helper that started it): first the seccomp programs
{profile: BPF bytes or None}; then per container an order (has_plan_fd, plan, guess) - plan
and guess encoded by sandbox.plans.for_init - with the init's descriptors attached
(SCM_RIGHTS: sync, status, stdout, stderr, the plan fd when has_plan_fd, then the cgroup.procs
files), answered by (pid, error).
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import socket
import sys

from sandbox import syscalls as sc
from sandbox.container import InitFds, init_main, plan_view

CONTAINER_FLAGS = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC
                   | sc.CLONE_NEWUTS | sc.CLONE_NEWNET)
MAX_FDS = 16
MAX_MESSAGE = 1 << 20


def _clone(sock: socket.socket, data: bytes, fds: list[int],
           programs: dict[str, sc.SeccompProgram | None]) -> int:
    has_plan_fd, plan, guess = marshal.loads(data)
    first_cgroup = 5 if has_plan_fd else 4
    init_fds = InitFds(sync=fds[0], status=fds[1], stdout=fds[2], stderr=fds[3],
                       cgroup=tuple(fds[first_cgroup:]), plan=fds[4] if has_plan_fd else -1)
    plan, guess = plan_view(plan), plan_view(guess)
    pid = sc.clone(CONTAINER_FLAGS | sc.CLONE_PARENT)
    if pid == 0:
        try:
            sock.close()
            init_main(init_fds, programs, plan, guess)
        finally:
            os._exit(125)
    return pid


def _serve(sock: socket.socket, programs: dict[str, sc.SeccompProgram | None]) -> None:
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        if not data:
            return
        try:
            reply = (_clone(sock, data, fds, programs), "")
        except (OSError, IndexError, ValueError, TypeError, EOFError) as exc:
            reply = (0, str(exc) or type(exc).__name__)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(marshal.dumps(reply))


def main(sock_fd: int) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper is our parent
    sock = socket.socket(fileno=sock_fd)
    setup = marshal.loads(sock.recv(MAX_MESSAGE))
    programs = {name: sc.SeccompProgram(bpf) if bpf is not None else None
                for name, bpf in setup.items()}
    # What exists now is shared with every container; a collector walking it would dirty
    # its pages in each of them.
    gc.freeze()
    gc.disable()
    _serve(sock, programs)


if __name__ == "__main__":
    main(int(sys.argv[1]))
