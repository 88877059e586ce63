"""A run's network: `none` (loopback only), a job's `private` network, or opt-in `egress`.

Every container gets its own network namespace (CLONE_NEWNET); the kernel creates it with
only `lo`, down. Init sets IFF_UP on it from inside (sandbox.ifconfig, an SIOCSIFFLAGS
ioctl), so programs can talk to themselves on 127.0.0.1. That is all of `none`.

`private` (several containers of one job talking by name):
- The helper makes a *job network namespace* (a short-lived child clones itself into a new
  network namespace, opens a netlink socket there and hands it back over SCM_RIGHTS). It
  belongs to the helper's user namespace and holds one bridge and nothing else: no uplink,
  no route, no address of the host. Only the netlink socket keeps it alive.
- Per container, one netlink request creates a veth pair: one end on the bridge, the other
  created directly inside the container's own network namespace as `eth0`. The container's
  init gives it its address (ioctls, like loopback) before any untrusted code runs; the
  payload holds no capability, so it cannot change addresses or routes.
- Names: every member's address is fixed when the network is made (member i of the job is
  10.88.0.(i+2)/24), and each container's /etc/hosts lists them all (the helper writes it
  into the overlay's upper directory, so it is there even on a read-only root).
- Teardown: closing the netlink socket drops the job namespace; each container's namespace
  dies with its last process and takes its veth pair (and so the bridge port) with it. If
  the helper dies, its file descriptors close and the containers die with it (parent-death
  signal), so nothing can outlive it: there is nothing on disk and nothing in the host's
  namespace to clean up on the next start.

`egress` (per run, only when the operator enables it): slirp4netns, a user-mode TCP/IP
stack, is started for the container: it makes `tap0` inside the container's namespace
(10.0.2.100/24, default route 10.0.2.2) and opens ordinary sockets on the host side for
the connections the container makes. `--disable-host-loopback` stops 10.0.2.2 from reaching
the host's 127.0.0.1; an nftables output filter inside the container's namespace (loaded
by the helper before the payload starts; the payload cannot change it) drops everything
but the operator's allow-list, and always drops the host's own addresses, 10.0.2.2,
link-local addresses and multicast, whatever the list says.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import selectors
import signal
import socket
import stat
import subprocess
import time

from sandbox import syscalls as sc
from sandbox.errors import InvalidSpec, NetworkError
from sandbox.netlink import NetlinkError, Rtnl

PRIVATE_PREFIX = "10.88.0."
PRIVATE_PREFIXLEN = 24
MAX_MEMBERS = 64
"""Containers (services and the main one) on one private network."""
MEMBER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""A member's name is its host name on the network (RFC 1123 label, lower case)."""
BRIDGE = "br0"
CONTAINER_IFACE = "eth0"

SLIRP_READY_TIMEOUT = 5.0
"""Seconds slirp4netns gets to set up tap0 before the run fails with stage `network`."""
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"
ALWAYS_DENIED = ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8",
                 "255.255.255.255/32", "10.0.2.0/24")
"""Egress never reaches these, whatever the allow-list says: 10.0.2.0/24 is slirp4netns's
own network (10.0.2.2 is its door to the host), 169.254/16 holds cloud metadata services.
The one exception is slirp's DNS forwarder 10.0.2.3 port 53, when the list names it."""


# -- private job networks (helper side) ------------------------------------------------------


def check_members(members) -> tuple[str, ...]:
    members = tuple(members)
    if not members or len(members) > MAX_MEMBERS:
        raise InvalidSpec(f"a private network has 1 to {MAX_MEMBERS} members", field="services")
    for name in members:
        if not isinstance(name, str) or not MEMBER_NAME.match(name):
            raise InvalidSpec(f"member name {name!r} is not a valid host name (a-z, 0-9, '-')",
                              field="services")
    if len(set(members)) != len(members):
        raise InvalidSpec("member names on one network must differ", field="services")
    return members


def member_address(index: int) -> str:
    return f"{PRIVATE_PREFIX}{index + 2}"


def hosts_text(addresses: dict[str, str]) -> bytes:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{addr}\t{name}" for name, addr in addresses.items()]
    return ("\n".join(lines) + "\n").encode()


def _namespace_rtnl() -> tuple[Rtnl, int]:
    """A netlink socket in a brand-new network namespace owned by our user namespace, and
    that namespace's inode number (for tests and diagnostics)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = sc.clone(sc.CLONE_NEWNET)
        if pid == 0:
            code = 1
            try:
                parent.close()
                rtnl = Rtnl.open()
                ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                socket.send_fds(child, [b"1"], [rtnl.fileno(), ns])
                code = 0
            finally:
                os._exit(code)
        child.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(parent, 16, 2)
        finally:
            os.waitpid(pid, 0)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise NetworkError("could not create a network namespace")
        inode = os.fstat(fds[1]).st_ino
        os.close(fds[1])
        return Rtnl(socket.socket(fileno=fds[0])), inode
    finally:
        parent.close()
        if child.fileno() >= 0:
            child.close()


class JobNetwork:
    """One private network (helper side): the bridge's namespace and who is on it."""

    def __init__(self, net_id: str, members: tuple[str, ...]) -> None:
        self.id = net_id
        self.addresses = {name: member_address(i) for i, name in enumerate(members)}
        self.attached: set[str] = set()
        self.rtnl, self.netns_inode = _namespace_rtnl()
        try:
            self.rtnl.set_up(self.rtnl.link_index("lo"))
            self.bridge = self.rtnl.add_bridge(BRIDGE)
        except BaseException:
            self.rtnl.close()
            raise
        self.hosts = hosts_text(self.addresses)

    def address(self, member: str) -> str:
        try:
            return self.addresses[member]
        except KeyError:
            raise NetworkError(f"{member!r} is not a member of network {self.id}") from None

    def attach(self, member: str, pid: int) -> str:
        """Wire the container whose init is `pid` (in our pid namespace) onto the bridge."""
        address = self.address(member)
        if member in self.attached:
            raise NetworkError(f"{member!r} is already on network {self.id}")
        index = list(self.addresses).index(member)
        try:
            self.rtnl.add_veth_into(f"v{index}", self.bridge, CONTAINER_IFACE, pid)
        except NetlinkError as exc:
            if exc.errno == 17:  # EEXIST: the previous holder of the name is still going away
                raise NetworkError(f"{member!r}: its previous container is still on the "
                                   "network") from None
            raise
        self.attached.add(member)
        return address

    def detach(self, member: str) -> None:
        """The member's container is gone (its veth went with its namespace)."""
        self.attached.discard(member)

    def close(self) -> None:
        self.rtnl.close()


def write_hosts(upper: str, layers: tuple[str, ...], content: bytes) -> None:
    """Put /etc/hosts into a run's overlay upper directory (before the container exists).

    upper/etc gets the owner and mode of the image's /etc (the top-most layer that has it),
    so the merged /etc looks exactly as the image's.
    """
    mode, uid, gid = 0o755, 0, 0
    for layer in reversed(layers):
        try:
            st = os.lstat(os.path.join(layer, "etc"))
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NetworkError("the image's /etc is not a directory; cannot write /etc/hosts")
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        break
    etc = os.path.join(upper, "etc")
    os.mkdir(etc, mode)
    os.chown(etc, uid, gid)
    os.chmod(etc, mode)
    fd = os.open(os.path.join(etc, "hosts"), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                 | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, content)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


# -- egress ----------------------------------------------------------------------------------


class AllowRule:
    """One allow-list entry: a network and an optional port range."""

    def __init__(self, text: str) -> None:
        net, _, ports = text.strip().partition(":")
        try:
            self.network = ipaddress.IPv4Network(net.strip(), strict=False)
        except ValueError:
            raise InvalidSpec(f"egress allow-list entry {text!r}: not an IPv4 CIDR",
                              field="egress_allow") from None
        self.ports: tuple[int, int] | None = None
        if ports:
            low, _, high = ports.partition("-")
            try:
                lo, hi = int(low), int(high or low)
            except ValueError:
                raise InvalidSpec(f"egress allow-list entry {text!r}: bad port",
                                  field="egress_allow") from None
            if not 1 <= lo <= hi <= 65535:
                raise InvalidSpec(f"egress allow-list entry {text!r}: bad port range",
                                  field="egress_allow")
            self.ports = (lo, hi)

    @property
    def is_dns(self) -> bool:
        return self.network == ipaddress.IPv4Network(f"{SLIRP_DNS}/32")

    def nft(self) -> list[str]:
        if self.ports is None:
            return [f"ip daddr {self.network} accept"]
        lo, hi = self.ports
        span = str(lo) if lo == hi else f"{lo}-{hi}"
        return [f"ip daddr {self.network} {proto} dport {span} accept" for proto in ("tcp", "udp")]


def parse_allow(entries) -> list[AllowRule]:
    return [AllowRule(e) for e in entries]


def _run_in(netns: str | None, argv: list[str], data: bytes = b"") -> bytes:
    """Run a tool (ip, nft) in the network namespace at path `netns`, or in ours."""
    name = argv[0]
    if netns:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=10, close_fds=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if proc.returncode != 0:
        raise NetworkError(f"{name}: {proc.stderr.decode(errors='replace').strip()[:500]}")
    return proc.stdout


def outside_addresses(outside: str | None) -> list[str]:
    """IPv4 addresses of the namespace egress leaves from (the host's, by default)."""
    raw = _run_in(outside, ["ip", "-j", "-4", "addr", "show"])
    out = []
    for link in json.loads(raw or b"[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and info.get("local"):
                out.append(f"{info['local']}/32")
    return out


def egress_ruleset(allow: list[AllowRule], denied: list[str]) -> str:
    """The container's nftables filter: loopback, then the never-list, then the allow-list;
    everything else is refused at once (a TCP reset or an ICMP error, so clients fail fast
    instead of timing out)."""
    deny = sorted(set(ALWAYS_DENIED) | set(denied))
    lines = [
        "table inet sbx_egress {",
        "  chain output {",
        "    type filter hook output priority 0; policy drop;",
        '    oifname "lo" accept',
        *([f"    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept"]
          if any(rule.is_dns for rule in allow) else []),
        f"    ip daddr {{ {', '.join(deny)} }} jump refuse",
        "    meta nfproto ipv6 jump refuse",
    ]
    lines += [f"    {line}" for rule in allow if not rule.is_dns for line in rule.nft()]
    lines += ["    jump refuse",
              "  }",
              "  chain refuse {",
              "    meta l4proto tcp reject with tcp reset",
              "    reject with icmpx type admin-prohibited",
              "  }",
              "  chain input {",
              "    type filter hook input priority 0; policy drop;",
              '    iifname "lo" accept',
              "    ct state established,related accept",
              "  }", "}"]
    return "\n".join(lines) + "\n"


class Egress:
    """slirp4netns for one container, and the filter in front of it (helper side)."""

    def __init__(self, pid: int, allow: list[AllowRule], outside: str | None) -> None:
        self.proc: subprocess.Popen | None = None
        self.exit_w = -1
        self.log = -1
        target = f"/proc/{pid}/ns/net"
        denied = outside_addresses(outside)
        _run_in(target, ["nft", "-f", "-"], egress_ruleset(allow, denied).encode())
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, self.exit_w = os.pipe2(os.O_CLOEXEC)
        argv = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                "--enable-seccomp", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                *([] if any(rule.is_dns for rule in allow) else ["--disable-dns"]),
                "--netns-type=path", target, "tap0"]
        if outside:
            argv = ["nsenter", f"--net={outside}", "--", *argv]
        # Its messages go to a memory file, not a pipe: nobody drains a pipe during the run,
        # and a full one would stall the run's network.
        self.log = os.memfd_create("slirp4netns-log", os.MFD_CLOEXEC)
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(ready_w, exit_r), close_fds=True,
                                         stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=self.log,
                                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            self._wait_ready(ready_r)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)

    def _wait_ready(self, ready_r: int) -> None:
        deadline = time.monotonic() + SLIRP_READY_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(ready_r, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetworkError("slirp4netns did not get ready in time")
                if sel.select(left):
                    break
        if os.read(ready_r, 1) != b"1":
            if self.proc:
                self.proc.wait(timeout=2)
            err = os.pread(self.log, 2000, 0).decode(errors="replace").strip()
            raise NetworkError(f"slirp4netns failed: {err}")

    def close(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self.log >= 0:
            os.close(self.log)
            self.log = -1
