"""User namespaces: which host ids the runtime may use and how they are mapped.

The runtime holds one long-lived user namespace (the helper's), mapped once per process start:
in-namespace 0 is the runtime's own uid, and 1..N are the user's /etc/subuid range, written by
the setuid helpers newuidmap/newgidmap. Each run then gets a nested user namespace whose map the
helper writes itself (it holds CAP_SETUID over its own namespace), one line per parent extent,
since the kernel requires each nested extent to fall within one parent extent.
Without a subuid range the fallback maps only the runtime's own id ("single" mode); untrusted
code then runs as in-container root of a namespace that owns nothing else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import msgspec

from sandbox.errors import SetupError


class IdRange(msgspec.Struct, frozen=True):
    start: int
    count: int


class IdMapping(msgspec.Struct, frozen=True):
    """How the helper's namespace is mapped: own id at 0, the subordinate range at 1.."""

    mode: str  # "subuid" or "single"
    uid: int
    gid: int
    subuid: IdRange | None
    subgid: IdRange | None

    @property
    def max_id(self) -> int:
        """Highest id usable inside containers."""
        if self.subuid is None or self.subgid is None:
            return 0
        return min(self.subuid.count, self.subgid.count)

    def nested_map(self) -> str:
        """The uid_map/gid_map text for a run's namespace: identity over the helper's ids."""
        if self.max_id == 0:
            return "0 0 1\n"
        return f"0 0 1\n1 1 {self.max_id}\n"


def read_subid_range(path: str, user: str, uid: int) -> IdRange | None:
    """First range for `user` (by name or numeric id) in an /etc/subuid-style file."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count >= 1:
            return IdRange(start, count)
    return None


def plan_mapping(mode: str = "auto", *, subuid_file: str = "/etc/subuid",
                 subgid_file: str = "/etc/subgid") -> IdMapping:
    """Decide the mapping for the current user; `mode` is auto, subuid or single."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        raise SetupError("the runtime must run as an unprivileged user, not root",
                         stage="userns")
    user = pwd.getpwuid(uid).pw_name
    if mode == "single":
        return IdMapping("single", uid, gid, None, None)
    subuid = read_subid_range(subuid_file, user, uid)
    subgid = read_subid_range(subgid_file, user, uid)
    helpers = shutil.which("newuidmap") and shutil.which("newgidmap")
    if subuid and subgid and helpers:
        return IdMapping("subuid", uid, gid, subuid, subgid)
    if mode == "subuid":
        raise SetupError(f"no /etc/subuid and /etc/subgid range for {user} or newuidmap missing",
                         stage="userns")
    return IdMapping("single", uid, gid, None, None)


def write_helper_maps(pid: int, mapping: IdMapping) -> None:
    """Map the helper's fresh namespace (called from outside it, as the runtime user)."""
    if mapping.mode == "subuid":
        assert mapping.subuid and mapping.subgid
        for tool, own, rng in (("newuidmap", mapping.uid, mapping.subuid),
                               ("newgidmap", mapping.gid, mapping.subgid)):
            proc = subprocess.run(
                [tool, str(pid), "0", str(own), "1", "1", str(rng.start), str(rng.count)],
                capture_output=True, text=True)
            if proc.returncode != 0:
                raise SetupError(f"{tool} failed: {proc.stderr.strip()}", stage="userns")
        return
    try:
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {mapping.uid} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {mapping.gid} 1\n")
    except OSError as exc:
        raise SetupError(f"writing id maps: {exc}", stage="userns") from exc


def write_nested_maps(pid: int, mapping: IdMapping) -> None:
    """From inside the helper's namespace, map a run's nested namespace."""
    text = mapping.nested_map()
    if mapping.mode == "single":
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
