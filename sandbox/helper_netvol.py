"""The helper's side of networks and volumes, mixed into `sandbox.helper.Helper`.

Kept apart from the helper's run loop so that file only carries the hooks, in start order:
  _netvol_configure (before the clone: stage volumes, write /etc/hosts, check the network)
  -> _netvol_connect (after the id maps, before init may go on: veth or slirp4netns)
  -> _netvol_settle (after the run: quota verdict, commit or discard read-write volumes)
  -> _netvol_release (teardown: stop slirp4netns, take the member off its network).
Network and probe requests from the runtime are answered by `_netvol_request`.
"""

from __future__ import annotations

import os

import msgspec

from sandbox import volumes
from sandbox import syscalls as sc
from sandbox.errors import SetupError
from sandbox.network import (PRIVATE_PREFIXLEN, Egress, JobNetwork, parse_allow, write_hosts)
from sandbox.protocol import NetAttach, NetworkRequest, OpReply, ProbeRequest
from sandbox.plans import Bind
from sandbox.spec import RunResult, Verdict

TCP_LISTEN = "0A"


class NetVol:
    """What one run has of networks and volumes, from configure to release."""

    def __init__(self) -> None:
        self.volumes: tuple[volumes.VolumeBind, ...] = ()
        self.binds: tuple[Bind, ...] = ()
        self.net: NetAttach | None = None
        self.address = ""
        self.want_egress = False
        self.egress: Egress | None = None
        self.attached = False


def listening(pid: int, port: int) -> bool:
    """Does the network namespace of `pid` hold a TCP socket listening on `port`?"""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == TCP_LISTEN \
                            and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (FileNotFoundError, ProcessLookupError):
            return False
    return False


class NetVolMixin:
    """Needs from the host class: settings, runs, _send, and a `netvol` on slots and runs."""

    def _netvol_init(self) -> None:
        self.networks: dict[str, JobNetwork] = {}
        self.egress_allow = parse_allow(self.settings.egress_allow) if self.settings.egress else []

    # -- requests -----------------------------------------------------------------------------

    def _netvol_request(self, msg) -> None:
        if isinstance(msg, NetworkRequest):
            try:
                if msg.op == "create":
                    if msg.network in self.networks:
                        raise SetupError(f"network {msg.network} exists", stage="network")
                    network = JobNetwork(msg.network, msg.members)
                    self.networks[msg.network] = network
                    self._send(OpReply(msg.key, True, values={
                        "netns": str(network.netns_inode), **network.addresses}))
                    return
                elif msg.op == "remove":
                    network = self.networks.pop(msg.network, None)
                    if network is not None:
                        network.close()
                else:
                    raise SetupError(f"unknown network operation {msg.op!r}", stage="network")
            except Exception as exc:  # noqa: BLE001 - answered, never fatal to the helper
                self._send(OpReply(msg.key, False, f"network: {exc}"))
                return
            self._send(OpReply(msg.key, True))
        elif isinstance(msg, ProbeRequest):
            run = self.runs.get(msg.run)
            if run is None or run.finished_at is not None or run.pidfd < 0:
                state = "gone"
            else:
                state = "listening" if listening(run.pid, msg.port) else "waiting"
            self._send(OpReply(msg.key, True, values={"state": state}))

    def _netvol_shutdown(self) -> None:
        for network in self.networks.values():
            network.close()
        self.networks.clear()

    # -- a run's life -------------------------------------------------------------------------

    def _netvol_configure(self, slot, req) -> None:
        nv: NetVol = slot.netvol
        spec = req.spec
        if req.volumes:
            nv.volumes = req.volumes
            try:
                staged = volumes.stage(slot.run_dir, req.volumes, spec.uid, spec.gid,
                                       _mount_tmpfs)
            except (OSError, volumes.TreeError) as exc:
                raise SetupError(f"preparing volumes: {exc}", stage="volumes") from exc
            nv.binds = tuple(Bind(src, target, ro) for src, target, ro in staged)
        if spec.network == "private":
            network = self.networks.get(req.net.network) if req.net else None
            if network is None:
                raise SetupError("the run's private network does not exist (any more)",
                                 stage="network")
            nv.net = req.net
            nv.address = network.address(req.net.member)
            try:
                write_hosts(os.path.join(slot.run_dir, "upper"), req.rootfs.layers,
                            network.hosts)
            except OSError as exc:
                raise SetupError(f"writing /etc/hosts: {exc}", stage="network") from exc
        elif spec.network == "egress":
            if not self.settings.egress:
                raise SetupError("network 'egress' is disabled on this server", stage="network")
            nv.want_egress = True

    def _netvol_payload(self, slot) -> dict:
        """Fields of the container's PayloadPlan this module decides."""
        nv: NetVol = slot.netvol
        if nv.address:
            return {"net_address": nv.address, "net_prefixlen": PRIVATE_PREFIXLEN}
        return {}

    def _netvol_connect(self, slot, pid: int) -> None:
        """Between the id maps and the sync byte: init waits; untrusted code does not exist."""
        nv: NetVol = slot.netvol
        try:
            if nv.net is not None:
                network = self.networks.get(nv.net.network)
                if network is None:
                    raise SetupError("the run's private network is gone", stage="network")
                network.attach(nv.net.member, pid)
                nv.attached = True
            if nv.want_egress:
                nv.egress = Egress(pid, self.egress_allow, self.settings.egress_netns or None)
        except SetupError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SetupError(str(exc), stage="network") from exc

    def _netvol_settle(self, run, result: RunResult) -> RunResult:
        """Quota verdict, then commit (a run that ended by itself) or discard its volumes."""
        nv: NetVol = run.netvol
        writable = [vb for vb in nv.volumes if not vb.read_only]
        if not writable or result.verdict in (Verdict.SETUP_ERROR, Verdict.INTERNAL_ERROR):
            return result
        try:
            problems = volumes.over_quota(run.run_dir, nv.volumes)
        except OSError as exc:
            problems = [f"volumes could not be checked ({exc}); nothing was saved"]
        ended_by_itself = run.killed_for is None \
            and result.verdict.value in volumes.COMMIT_VERDICTS
        if problems:
            verdict = Verdict.VOLUME_QUOTA if ended_by_itself else result.verdict
            message = "; ".join(filter(None, [result.message, *problems]))
            return msgspec.structs.replace(result, verdict=verdict, message=message)
        if not ended_by_itself:
            note = "read-write volumes were not saved: the run did not end by itself"
            return msgspec.structs.replace(
                result, message="; ".join(filter(None, [result.message, note])))
        problems = volumes.commit(run.run_dir, nv.volumes)
        if problems:
            result = msgspec.structs.replace(
                result, message="; ".join(filter(None, [result.message, *problems])))
        return result

    def _netvol_release(self, holder) -> None:
        nv: NetVol = holder.netvol
        if nv.egress is not None:
            nv.egress.close()
            nv.egress = None
        if nv.net is not None and nv.attached:
            network = self.networks.get(nv.net.network)
            if network is not None:
                network.detach(nv.net.member)
            nv.attached = False


def _mount_tmpfs(path: str, options: str) -> None:
    sc.mount("tmpfs", path, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, options)
