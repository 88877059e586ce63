"""The few rtnetlink requests a job network needs, packed by hand.

A job network is a bridge in a network namespace of its own, plus one veth pair per
container. Three messages do all of it: create a bridge, look a link up by name, create a
veth pair with one end on the bridge and the other moved straight into a container's
network namespace (IFLA_NET_NS_PID in the peer's attributes). pyroute2 would do the same in
a much larger package that every container clone of the helper would carry; these ~100
lines have no dependency.

A netlink socket talks to the network namespace it was created in, whichever namespace the
process using it is in later: the helper keeps one socket per job network and never has to
enter the namespace (it could not come back: the host's namespace belongs to the initial
user namespace, where the helper has no capability).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

RTM_NEWLINK = 16
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_PID = 19
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


class NetlinkError(OSError):
    pass


class Rtnl:
    """A NETLINK_ROUTE socket bound to the namespace it was created in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    @classmethod
    def open(cls) -> "Rtnl":
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        sock.bind((0, 0))
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        self.seq += 1
        seq = self.seq
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0)
        self.sock.send(msg + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, rseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if rseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return replies
                replies.append((mtype, payload))
                if not flags & NLM_F_ACK:
                    return replies

    def link_index(self, name: str) -> int:
        replies = self._request(RTM_GETLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, _name(name)))
        for mtype, payload in replies:
            if mtype == RTM_NEWLINK:
                return _IFINFOMSG.unpack_from(payload)[2]
        raise NetlinkError(errno.ENODEV, f"no link {name}")

    def set_up(self, index: int) -> None:
        self._request(RTM_NEWLINK, NLM_F_ACK, _ifinfo(index, IFF_UP, IFF_UP))

    def add_bridge(self, name: str) -> int:
        info = _attr(IFLA_INFO_KIND, b"bridge")
        self._request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                      _ifinfo(0, IFF_UP, IFF_UP) + _attr(IFLA_IFNAME, _name(name))
                      + _attr(IFLA_LINKINFO, info))
        return self.link_index(name)

    def add_veth_into(self, name: str, master: int, peer_name: str, peer_pid: int,
                      mtu: int = 0) -> None:
        """A veth pair: `name` here, up, on bridge `master`; `peer_name` in the network
        namespace of process `peer_pid` (left down: the container brings it up)."""
        peer = _ifinfo() + _attr(IFLA_IFNAME, _name(peer_name)) \
            + _attr(IFLA_NET_NS_PID, struct.pack("=I", peer_pid))
        if mtu:
            peer += _attr(IFLA_MTU, struct.pack("=I", mtu))
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
        body = _ifinfo(0, IFF_UP, IFF_UP) + _attr(IFLA_IFNAME, _name(name)) \
            + _attr(IFLA_MASTER, struct.pack("=I", master)) + _attr(IFLA_LINKINFO, info)
        if mtu:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        self._request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)
