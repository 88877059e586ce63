"""The helper's handle on its cloner: a small process that clones every container.

clone(2) copies the calling process: its page tables at once, then every page either side
writes afterwards (copy-on-write), and the clone tears all of it down when it exits. Cloned
from the helper (a busy 20 MB interpreter), each run cost ~1 ms of page copies in the helper
itself and more in the container's init (measured with perf: a quarter of the machine's CPU
per run went to page faults). The cloner (sandbox.cloner_process) imports only what a
container's init runs, does nothing between clones, and clones with CLONE_PARENT: each
container is still the helper's child, so the helper waits for it, sees its exit on a pidfd,
and PR_SET_PDEATHSIG ties it to the helper, not to the cloner. Its protocol is described
there; this side encodes plans with sandbox.plans.for_init.
"""

from __future__ import annotations

import marshal
import os
import socket
import subprocess
import sys

import sandbox
from sandbox import syscalls as sc
from sandbox.container import InitFds
from sandbox.errors import SetupError
from sandbox.plans import ContainerPlan, RootfsPlan, for_init

MAX_MESSAGE = 1 << 20
SANDBOX_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__)))
"""The directory that holds the sandbox package: the cloner runs without site (-S), so
without the venv's paths."""
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from sandbox.cloner_process import main; main(int(sys.argv[2]))")


class Cloner:
    """The helper's handle on its cloner process (started with the helper; started again by
    the next clone if it died)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.setup = b""  # the encoded seccomp programs, once they are known
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None

    def set_programs(self, programs: dict[str, sc.SeccompProgram | None]) -> None:
        self.setup = marshal.dumps({name: p.bpf if p else None for name, p in programs.items()})
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
                [sys.executable, "-I", "-S", "-c", BOOT, SANDBOX_PARENT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, cwd="/")
        finally:
            theirs.close()
        if self.setup:
            ours.send(self.setup)
        self.sock = ours

    def clone(self, fds: InitFds, plan: ContainerPlan | None,
              guess: RootfsPlan | None) -> int:
        """Clone a container running init_main(fds, programs, plan, guess); its pid."""
        order = marshal.dumps((fds.plan >= 0, for_init(plan), for_init(guess)))
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
        try:
            pid, error = marshal.loads(data)
        except (ValueError, TypeError, EOFError) as exc:
            raise SetupError(f"clone: unreadable reply from the cloner: {exc}",
                             stage="clone") from exc
        if error or not isinstance(pid, int) or pid <= 0:
            raise SetupError(f"clone: {error or 'no pid'}", stage="clone")
        return pid

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
