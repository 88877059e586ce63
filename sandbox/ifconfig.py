"""Interface ioctls a container's init makes in its own network namespace, before the payload.

SIOCSIFFLAGS brings `lo` up (every run) and, on a private job network, SIOCSIFADDR and
SIOCSIFNETMASK give `eth0` its IPv4 address. Init runs these as namespace root; the payload
holds no capability and cannot change them. Part of init's process, so it imports only what
the interpreter already has (see sandbox.plans); the helper's network code is sandbox.network.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1
IFF_RUNNING = 0x40


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _set_flags(sock: socket.socket, name: str, add: int) -> None:
    request = struct.pack("16sh14x", name.encode(), 0)
    flags = struct.unpack("16sh14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", name.encode(), flags | add))


def netmask(prefixlen: int) -> str:
    """The dotted IPv4 netmask of a prefix length (0-32)."""
    if not 0 <= prefixlen <= 32:
        raise ValueError(f"IPv4 prefix length {prefixlen} is not in 0-32")
    return socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF))


def bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_flags(sock, "lo", IFF_UP | IFF_RUNNING)


def configure_interface(name: str, address: str, prefixlen: int) -> None:
    """Give `name` an IPv4 address and bring it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for request, addr in ((SIOCSIFADDR, address), (SIOCSIFNETMASK, netmask(prefixlen))):
            sockaddr = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))
            fcntl.ioctl(sock.fileno(), request, _ifreq(name, sockaddr))
        _set_flags(sock, name, IFF_UP | IFF_RUNNING)
