"""The cloner: a small process that clones every container on the helper's behalf.

clone(2) copies the calling process: its page tables at once, then every page either side
writes afterwards (copy-on-write). Cloned from the helper (a busy 20 MB interpreter), each
run cost ~1 ms of page copies in the helper itself and more in the container's init
(measured with perf: a quarter of the machine's CPU per run went to page faults). The cloner
imports only what a container's init runs, does nothing between clones, and clones with
CLONE_PARENT: each container is still the helper's child, so the helper waits for it, sees
its exit on a pidfd, and PR_SET_PDEATHSIG ties it to the helper, not to the cloner.

Protocol, over a SOCK_SEQPACKET pair (one message per datagram): the helper first sends a
CloneSetup (the compiled seccomp programs); then per container a CloneOrder with the init's
descriptors attached (SCM_RIGHTS), answered by a CloneReply with the new pid.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys

import msgspec

from sandbox import syscalls as sc
from sandbox.container import ContainerPlan, InitFds, init_main
from sandbox.errors import SetupError
from sandbox.rootfs import RootfsPlan

CONTAINER_FLAGS = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC
                   | sc.CLONE_NEWUTS | sc.CLONE_NEWNET)
MAX_FDS = 16
MAX_MESSAGE = 1 << 20


class CloneSetup(msgspec.Struct, frozen=True):
    programs: dict[str, bytes | None]  # seccomp profile name -> BPF (None: no filter)


class CloneOrder(msgspec.Struct, frozen=True):
    """Clone one container. The attached fds are, in order: sync, status, stdout, stderr,
    plan (when has_plan_fd), then the cgroup.procs files."""

    has_plan_fd: bool
    plan: ContainerPlan | None = None
    guess: RootfsPlan | None = None


class CloneReply(msgspec.Struct, frozen=True):
    pid: int = 0
    error: str = ""


_encoder = msgspec.msgpack.Encoder()
_order_decoder = msgspec.msgpack.Decoder(CloneOrder)
_reply_decoder = msgspec.msgpack.Decoder(CloneReply)


# -- helper side --------------------------------------------------------------------------------


class Cloner:
    """The helper's handle on its cloner process (started with the helper; started again by
    the next clone if it died)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.setup = b""  # the encoded CloneSetup, once the programs are known
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None

    def set_programs(self, programs: dict[str, sc.SeccompProgram | None]) -> None:
        self.setup = _encoder.encode(
            CloneSetup({name: p.bpf if p else None for name, p in programs.items()}))
        if self.sock is not None:
            self.sock.send(self.setup)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the process (it imports while the helper goes on; it waits for its setup)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # LD_BIND_NOW: the dynamic linker binds every symbol at start, once, instead of on
        # each first call in each container (a lookup and a copied GOT page per container).
        env = {**self.env, "LD_BIND_NOW": "1"}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.cloner", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, cwd="/")
        finally:
            theirs.close()
        if self.setup:
            ours.send(self.setup)
        self.sock = ours

    def clone(self, fds: InitFds, plan: ContainerPlan | None,
              guess: RootfsPlan | None) -> int:
        """Clone a container running init_main(fds, programs, plan, guess); its pid."""
        order = _encoder.encode(CloneOrder(has_plan_fd=fds.plan >= 0, plan=plan, guess=guess))
        passed = [fds.sync, fds.status, fds.stdout, fds.stderr,
                  *([fds.plan] if fds.plan >= 0 else []), *fds.cgroup]
        for _ in range(2):
            if self.sock is None:
                self.start()
            assert self.sock is not None
            try:
                socket.send_fds(self.sock, [order], passed)
                data = self.sock.recv(MAX_MESSAGE)
                if data:
                    break
            except OSError:
                pass
            self.stop()  # it died: start another once
        else:
            raise SetupError("the container cloner is gone", stage="clone")
        reply = _reply_decoder.decode(data)
        if reply.error:
            raise SetupError(f"clone: {reply.error}", stage="clone")
        return reply.pid

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# -- cloner process -----------------------------------------------------------------------------


def _serve(sock: socket.socket, programs: dict[str, sc.SeccompProgram | None]) -> None:
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        if not data:
            return
        try:
            order = _order_decoder.decode(data)
            plan_fd = fds[4] if order.has_plan_fd else -1
            init_fds = InitFds(sync=fds[0], status=fds[1], stdout=fds[2], stderr=fds[3],
                               cgroup=tuple(fds[5 if order.has_plan_fd else 4:]), plan=plan_fd)
            pid = sc.clone(CONTAINER_FLAGS | sc.CLONE_PARENT)
            if pid == 0:
                try:
                    sock.close()
                    init_main(init_fds, programs, order.plan, order.guess)
                finally:
                    os._exit(125)
            reply = CloneReply(pid=pid)
        except (OSError, IndexError, msgspec.DecodeError) as exc:
            reply = CloneReply(error=str(exc) or type(exc).__name__)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(_encoder.encode(reply))


def main() -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper is our parent
    sock = socket.socket(fileno=int(sys.argv[1]))
    setup = msgspec.msgpack.decode(sock.recv(MAX_MESSAGE), type=CloneSetup)
    programs = {name: sc.SeccompProgram(bpf) if bpf is not None else None
                for name, bpf in setup.programs.items()}
    # What exists now is shared with every container; a collector walking it would dirty
    # its pages in each of them.
    gc.freeze()
    gc.disable()
    _serve(sock, programs)


if __name__ == "__main__":
    main()
