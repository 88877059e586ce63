"""What the helper tells a container's init, and what init reports back.

The helper builds a `ContainerPlan` (root, payload, seccomp profile) for each run from the
validated request; init (sandbox.container, in a clone of the cloner) carries it out and
writes one `StatusMessage` line on its status pipe.

Init's process imports no msgspec: everything a clone inherits from the cloner is mapped
into the clone and torn down at its exit, and msgspec with its imports doubled the cloner's
anonymous memory (4 -> 10 MB), which cost ~1 ms of page-table copies and teardown per
container (measured by timing clones of both). So a plan crosses to init as `marshal` of
its builtins form (structs as dicts, every dict a struct; marshal is in the interpreter and
the data comes only from the helper), and init reads it as attribute views
(`sandbox.container.plan_view`). Init's status line is JSON that the helper decodes here.
"""

from __future__ import annotations

import marshal

import msgspec

from sandbox.rootfs import root_dir


class Bind(msgspec.Struct, frozen=True):
    """A host directory bound into the container at an absolute path."""

    source: str
    target: str
    read_only: bool = False


class RootfsPlan(msgspec.Struct, frozen=True):
    run_dir: str
    dev_template: str
    layers: tuple[str, ...]
    binds: tuple[Bind, ...]
    tmp_size: int
    read_only_root: bool

    @property
    def root(self) -> str:
        return root_dir(self)


class PayloadPlan(msgspec.Struct, frozen=True):
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    """(name, value) pairs: in init's view every dict is a struct."""
    workdir: str
    uid: int
    gid: int
    rlimits: tuple[tuple[int, int, int], ...]
    hostname: str
    last_cap: int = 40
    """Highest capability number of this kernel (read once by the helper)."""
    address_space_limit: int = 0
    """RLIMIT_AS for the payload alone (rlimit mode); 0 when a cgroup limits memory."""
    net_address: str = ""
    """IPv4 address of eth0 on a private job network (the helper made eth0); "" for none."""
    net_prefixlen: int = 24


class ContainerPlan(msgspec.Struct, frozen=True):
    """Everything a container's init needs that depends on the request."""

    rootfs: RootfsPlan
    payload: PayloadPlan
    profile: str
    stdin_path: str


class StatusMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line on the status pipe, from init to the helper."""

    kind: str  # "setup_error" or "exit"
    stage: str = ""
    message: str = ""
    wait_status: int = 0
    cpu_time: float = 0.0
    max_rss: int = 0


def for_init(plan: ContainerPlan | RootfsPlan | None) -> bytes:
    """`plan` as init reads it (sandbox.container.plan_view); None stays None."""
    return marshal.dumps(msgspec.to_builtins(plan))


_status_decoder = msgspec.json.Decoder(StatusMessage)


def read_status(data: bytes) -> list[StatusMessage]:
    """The messages init wrote on its status pipe; a line that does not decode is skipped."""
    messages = []
    for line in data.splitlines():
        try:
            messages.append(_status_decoder.decode(line))
        except msgspec.DecodeError:
            continue
    return messages
