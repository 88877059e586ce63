"""The cloner process: it clones every container on its helper's behalf (see sandbox.cloner).

A clone starts as a copy of this process, so it imports only what a container's init runs:
no msgspec, no typing, no subprocess (sandbox.plans says why and what it saved). It is
started with `python -I -S` (no site: the venv's .pth hooks alone doubled its heap) and does
nothing between clones; what it holds is frozen so that no collection dirties it.

Protocol, over a SOCK_SEQPACKET pair (one message per datagram, every message `marshal` of
builtins, exchanged only with the helper that started it): first the setup (seccomp programs
{profile: BPF bytes or None}, how many idle network namespaces to keep); then orders. A clone
order ("clone", has_plan_fd, own_netns, plan, guess) - plan and guess encoded by
sandbox.plans.for_init - comes with the init's descriptors attached (SCM_RIGHTS: sync,
status, stdout, stderr, the plan fd when has_plan_fd, then the cgroup.procs files) and is
answered by (pid, netns loan, error). Without own_netns the container goes into a pooled
network namespace (sandbox.netns_pool) and the loan names it; the helper sends
("netns_back", loan), unanswered, once it has reaped that container.
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
from sandbox.netns_pool import NetnsPool

CONTAINER_FLAGS = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC
                   | sc.CLONE_NEWUTS)
"""Every container's namespaces; the network one is fresh (CLONE_NEWNET) or pooled."""
MAX_FDS = 16
MAX_MESSAGE = 1 << 20
MAX_ERROR = 2000
"""Characters of an error text in a reply (the helper reads replies of up to 64 KiB)."""
_PEEK = bytearray(1)


def _clone(sock: socket.socket, order: tuple, fds: list[int],
           programs: dict[str, sc.SeccompProgram | None], pool: NetnsPool) -> tuple[int, int]:
    _kind, has_plan_fd, own_netns, plan, guess = order
    first_cgroup = 5 if has_plan_fd else 4
    init_fds = InitFds(sync=fds[0], status=fds[1], stdout=fds[2], stderr=fds[3],
                       cgroup=tuple(fds[first_cgroup:]), plan=fds[4] if has_plan_fd else -1)
    plan, guess = plan_view(plan), plan_view(guess)
    loan = 0 if own_netns else pool.enter()
    try:
        pid = sc.clone(CONTAINER_FLAGS | (sc.CLONE_NEWNET if own_netns else 0)
                       | sc.CLONE_PARENT)
    except OSError:
        pool.give_back(loan)  # nobody entered it
        raise
    if pid == 0:
        try:
            sock.close()
            init_main(init_fds, programs, plan, guess, own_netns)
        finally:
            os._exit(125)
    return pid, loan


def _serve(sock: socket.socket, programs: dict[str, sc.SeccompProgram | None],
           pool: NetnsPool) -> None:
    while True:
        # The order's real size first: receiving into a MAX_MESSAGE buffer would map and
        # unmap a megabyte for each few-KiB order (~15 us a time, measured).
        size = sock.recv_into(_PEEK, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        if not size:
            return
        data, fds, _flags, _addr = socket.recv_fds(sock, min(size, MAX_MESSAGE), MAX_FDS)
        if not data:
            return
        try:
            order = marshal.loads(data)
            if order[0] == "netns_back":
                pool.give_back(order[1])
                continue
            reply = (*_clone(sock, order, fds, programs, pool), "")
        except (OSError, IndexError, ValueError, TypeError, EOFError) as exc:
            reply = (0, 0, (str(exc) or type(exc).__name__)[:MAX_ERROR])
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(marshal.dumps(reply))


def main(sock_fd: int) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper is our parent
    sock = socket.socket(fileno=sock_fd)
    setup, keep_netns = marshal.loads(sock.recv(MAX_MESSAGE))
    programs = {name: sc.SeccompProgram(bpf) if bpf is not None else None
                for name, bpf in setup.items()}
    pool = NetnsPool(keep_netns)
    # What exists now is shared with every container; a collector walking it would dirty
    # its pages in each of them.
    gc.freeze()
    gc.disable()
    _serve(sock, programs, pool)


if __name__ == "__main__":
    main(int(sys.argv[1]))
