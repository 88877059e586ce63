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

MAX_REPLY = 1 << 16
"""A reply is (pid, loan, error text of at most MAX_ERROR characters)."""
SANDBOX_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__)))
"""The directory that holds the sandbox package: the cloner runs without site (-S), so
without the venv's paths."""
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from sandbox.cloner_process import main; main(int(sys.argv[2]))")


class Cloner:
    """The helper's handle on its cloner process (started with the helper; started again by
    the next clone if it died)."""

    def __init__(self, env: dict[str, str], keep_netns: int) -> None:
        self.env = env
        self.keep_netns = keep_netns  # idle pooled network namespaces (sandbox.netns_pool)
        self.setup = b""  # the encoded seccomp programs and pool size, once they are known
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.generation = 0  # how many cloner processes this handle has started
        self.loans: set[tuple[int, int]] = set()  # (generation, loan): pooled namespaces lent

    def set_programs(self, programs: dict[str, sc.SeccompProgram | None]) -> None:
        self.setup = marshal.dumps(
            ({name: p.bpf if p else None for name, p in programs.items()}, self.keep_netns))
        if self.sock is not None:
            self.sock.send(self.setup)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the process (it imports while the helper goes on; it waits for its setup)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.generation += 1
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

    def clone(self, fds: InitFds, plan: ContainerPlan | None, guess: RootfsPlan | None,
              own_netns: bool) -> tuple[int, tuple[int, int] | None]:
        """Clone a container running init_main(fds, programs, plan, guess, own_netns).

        Without own_netns (and with a pool) it goes into a pooled network namespace. Returns
        its pid and the namespace's loan (None for none): give_back_netns(loan) once the
        container is reaped. A loan names the cloner process too: ids restart with each."""
        own_netns = own_netns or not self.keep_netns
        order = marshal.dumps(("clone", fds.plan >= 0, own_netns, for_init(plan),
                               for_init(guess)))
        passed = [fds.sync, fds.status, fds.stdout, fds.stderr,
                  *([fds.plan] if fds.plan >= 0 else []), *fds.cgroup]
        for _ in range(2):
            if self.sock is None:
                self.start()
            assert self.sock is not None
            try:
                socket.send_fds(self.sock, [order], passed)
                data = self.sock.recv(MAX_REPLY)
                if data:
                    break
            except OSError:
                pass
            self.stop()  # it died: start another once
        else:
            raise SetupError("the container cloner is gone", stage="clone")
        try:
            pid, loan, error = marshal.loads(data)
        except (ValueError, TypeError, EOFError) as exc:
            raise SetupError(f"clone: unreadable reply from the cloner: {exc}",
                             stage="clone") from exc
        if error or not isinstance(pid, int) or pid <= 0:
            raise SetupError(f"clone: {error or 'no pid'}", stage="clone")
        if not loan:
            return pid, None
        self.loans.add((self.generation, loan))
        return pid, (self.generation, loan)

    def give_back_netns(self, loan: tuple[int, int] | None) -> None:
        """The container that had this pooled namespace is reaped: the cloner may reuse it.
        Never call it earlier: the namespace would be a live container's."""
        if loan not in self.loans:
            return  # none, or lent by a cloner that has died since (its pool died with it)
        self.loans.discard(loan)
        try:
            assert self.sock is not None
            self.sock.send(marshal.dumps(("netns_back", loan[1])))
        except OSError:
            pass  # it died: the next clone starts another

    def stop(self) -> None:
        self.loans.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
