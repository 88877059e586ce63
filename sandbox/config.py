"""Runtime settings: one frozen object, built once by the caller and passed in.

Nothing in sandbox/ reads the environment at import time; `RuntimeSettings.from_env()` is the
one place that does, and only when a caller asks for it.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class RuntimeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state_dir: str = "/var/lib/sbx"
    """Images, volumes and per-worker scratch live below this directory."""
    cgroup_mode: Literal["auto", "v2", "v1", "none"] = "auto"
    """Which cgroup hierarchy to use for limits and accounting; auto picks the first writable."""
    cgroup_v2_root: str = ""
    """A cgroup v2 directory delegated to this user; empty: `sbx` under the v2 mount
    (/sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one)."""
    cgroup_v1_root: str = "/sys/fs/cgroup"
    """Mount point of the v1 controllers; each controller's `sbx` child must be ours."""
    cgroup_name: str = "sbx"
    """Name of the delegated child under each v1 controller."""
    userns: Literal["auto", "subuid", "single"] = "auto"
    """subuid: map /etc/subuid ranges with newuidmap; single: map only our own uid."""
    warm_spares: Annotated[int, Meta(ge=0, le=8)] = 1
    """Containers kept cloned ahead (id-mapped, loopback up, in their cgroup) for the next
    runs; 0 clones every run on demand. A second spare measured no faster for one caller."""
    netns_pool: Annotated[int, Meta(ge=0, le=16)] = 4
    """Loopback-only network namespaces each helper keeps to reuse for runs with network
    "none", one run at a time, and only while no run has left a socket or sent a packet in
    them (sandbox.netns_pool); 0 makes a fresh one for every run. SBX_NETNS_POOL."""
    registry: str = "127.0.0.1:5000"
    """Default registry for image references without a host."""
    insecure_registries: tuple[str, ...] = ("127.0.0.1:5000", "localhost:5000")
    """Registries spoken to over plain HTTP."""
    docker_config: str = ""
    """Path of a docker config.json with `auths`; empty means ~/.docker/config.json."""
    # -- networks and volumes (issue 5) --
    max_volume_size: int = 1 << 30
    """Largest volume quota (bytes). A read-write volume is copied into a tmpfs for each run,
    so this much memory may be used per attached volume."""
    max_volumes_per_tenant: int = 64
    volume_wait: float = 0.0
    """Seconds a run waits for a volume another run holds; 0 refuses at once (VolumeBusy)."""
    egress: bool = False
    """Whether runs may ask for network "egress" (outbound through slirp4netns). Off: refused."""
    egress_allow: tuple[str, ...] = ()
    """Where egress may go: "CIDR", "CIDR:PORT" or "CIDR:LOW-HIGH" (TCP and UDP). Nothing else
    is reachable; the host's loopback and own addresses never are, whatever is listed."""
    egress_netns: str = ""
    """Path of a network namespace (e.g. /proc/PID/ns/net, or a link to one) that egress
    leaves from; empty: the host's. It must belong to the runtime's user namespace or one
    below it. Lets an operator route runs through a namespace of their own."""

    @property
    def v2_root(self) -> str:
        if self.cgroup_v2_root:
            return self.cgroup_v2_root
        if os.path.exists(os.path.join(self.cgroup_v1_root, "cgroup.controllers")):
            return os.path.join(self.cgroup_v1_root, self.cgroup_name)
        return os.path.join(self.cgroup_v1_root, "unified", self.cgroup_name)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.state_dir, "images")

    @property
    def volumes_dir(self) -> str:
        return os.path.join(self.state_dir, "volumes")

    @property
    def scratch_dir(self) -> str:
        return os.path.join(self.state_dir, "scratch")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "RuntimeSettings":
        env = os.environ if environ is None else environ
        values: dict = {}
        if "SBX_STATE_DIR" in env:
            values["state_dir"] = env["SBX_STATE_DIR"]
        if "SBX_CGROUP_MODE" in env:
            values["cgroup_mode"] = env["SBX_CGROUP_MODE"]
        if "SBX_USERNS" in env:
            values["userns"] = env["SBX_USERNS"]
        if "SBX_REGISTRY" in env:
            values["registry"] = env["SBX_REGISTRY"]
        if "SBX_INSECURE_REGISTRIES" in env:
            values["insecure_registries"] = tuple(
                r for r in env["SBX_INSECURE_REGISTRIES"].split(",") if r
            )
        if "SBX_MAX_VOLUME_SIZE" in env:
            values["max_volume_size"] = int(env["SBX_MAX_VOLUME_SIZE"])
        if "SBX_EGRESS" in env:
            values["egress"] = env["SBX_EGRESS"].lower() in ("1", "true", "yes")
        if "SBX_NETNS_POOL" in env:
            values["netns_pool"] = int(env["SBX_NETNS_POOL"])
        if "SBX_EGRESS_ALLOW" in env:
            values["egress_allow"] = tuple(r for r in env["SBX_EGRESS_ALLOW"].split(",") if r)
        values.update(overrides)
        return msgspec.convert(values, cls)
