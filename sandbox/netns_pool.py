"""Network namespaces reused between runs: loopback only, owned by the helper's user namespace.

Making a network namespace, and the kernel's deferred teardown of it, was the largest cost of
a run outside the interpreters: with busybox `true` at concurrency 8, runs with no
CLONE_NEWNET took 11.8-12.1 ms of machine CPU against 14.4-15.5 ms (sysctl tables, loopback,
IPv6 and the cleanup work; loadtest/load_api.py). A run with network "none" only ever sees
loopback, so the cloner keeps a few such namespaces and clones a container into one: setns(2)
before clone(2), and no CLONE_NEWNET.

Why that is as good as a fresh one:
- The cloner makes them in the helper's user namespace; a container's user namespace is a
  child of it and so holds no capability over them: its root cannot change links, addresses,
  routes, netfilter or sysctls. The cloner brings loopback up once, when it makes one.
- One container at a time: a namespace comes back only when the helper has reaped the
  container's init, and a pid namespace's init exits only after every process in it has.
- It comes back only as it was made: no socket of any kind left (/proc/net/sockstat: in use,
  TCP orphans, TIME_WAIT) and loopback's counters unchanged, i.e. not one packet was sent, so
  there is no connection state, cache or counter a later run could see. Otherwise it is
  dropped and the kernel tears it down as before: a run that uses loopback pays for a fresh
  namespace; one that does not (a judge's compile or test run) does not.
What later runs of the same helper do share is the namespace's identity (its inode number
and SO_NETNS_COOKIE).

This runs in the cloner (sandbox.cloner_process), so it imports only what init may.
The cloner leaves the host's network namespace the first time it makes one and never goes
back: it does no networking itself, and a run on a private or egress network still gets a
fresh namespace from clone(CLONE_NEWNET), wherever the cloner stands.
"""

from __future__ import annotations

import os

from sandbox import syscalls as sc
from sandbox.ifconfig import bring_up_loopback

SOCKET_COUNTS = frozenset({"used", "inuse", "orphan", "tw"})
"""The per-namespace counts in /proc/net/sockstat (the others there, alloc and mem, are
host-wide)."""


def sockets_left(sockstat: str) -> int:
    """How many sockets /proc/net/sockstat's text counts in its namespace, in any state."""
    left = 0
    for line in sockstat.splitlines():
        words = line.split(":", 1)[-1].split()
        for name, value in zip(words[::2], words[1::2]):
            if name in SOCKET_COUNTS:
                left += int(value)
    return left


def loopback_counters(dev: str) -> tuple[int, ...]:
    """The `lo` row of /proc/net/dev: bytes, packets, errors ... received and sent."""
    for line in dev.splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return tuple(int(value) for value in counters.split())
    raise ValueError("no loopback in /proc/net/dev")


class PooledNetns:
    """One namespace: an fd of it, and of its sockstat and dev files (opened inside it, they
    keep reading it), and loopback's counters as made."""

    def __init__(self, ns: int, sockstat: int, dev: int) -> None:
        self.ns, self.sockstat, self.dev = ns, sockstat, dev
        self.made = self.counters()

    @classmethod
    def create(cls) -> "PooledNetns":
        """Make one; this process is in it afterwards."""
        sc.unshare(sc.CLONE_NEWNET)
        bring_up_loopback()
        fds: list[int] = []
        try:
            for path in ("ns/net", "net/sockstat", "net/dev"):
                fds.append(os.open(f"/proc/thread-self/{path}", os.O_RDONLY | os.O_CLOEXEC))
            return cls(*fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def counters(self) -> tuple[int, ...]:
        return loopback_counters(os.pread(self.dev, 1 << 12, 0).decode())  # lo alone: ~450 B

    def as_made(self) -> bool:
        try:
            sockstat = os.pread(self.sockstat, 1 << 12, 0).decode()
            return sockets_left(sockstat) == 0 and self.counters() == self.made
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        for fd in (self.ns, self.sockstat, self.dev):
            os.close(fd)


class NetnsPool:
    """The cloner's namespaces: idle ones (at most `keep`), and those lent to containers by id."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.idle: list[PooledNetns] = []
        self.lent: dict[int, PooledNetns] = {}
        self.last_id = 0

    def enter(self) -> int:
        """Move this process into an idle namespace (a new one if none is idle) and lend it:
        a clone(2) without CLONE_NEWNET made next is in it. Returns the loan's id."""
        if self.idle:
            netns = self.idle.pop()
            try:
                sc.setns(netns.ns, sc.CLONE_NEWNET)
            except OSError:
                netns.close()
                raise
        else:
            netns = PooledNetns.create()
        self.last_id += 1
        self.lent[self.last_id] = netns
        return self.last_id

    def give_back(self, loan: int) -> None:
        """The container that had it is gone: keep the namespace if it is as made, else drop
        it (the kernel frees it once nothing, the cloner included, is in it)."""
        netns = self.lent.pop(loan, None)
        if netns is None:
            return
        if len(self.idle) < self.keep and netns.as_made():
            self.idle.append(netns)
        else:
            netns.close()
