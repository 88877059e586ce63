"""Network namespaces: a run's network. Today: `none`, a fresh namespace with loopback only.

Every run gets its own network namespace (CLONE_NEWNET); the kernel creates it with only a
`lo` interface, down. `bring_up_loopback` sets IFF_UP on it from inside, with the SIOCSIFFLAGS
ioctl, so programs can talk to themselves on 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40


def bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS,
                    struct.pack("16sh14x", b"lo", flags | IFF_UP | IFF_RUNNING))
