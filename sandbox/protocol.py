"""The runtime <-> helper wire: length-prefixed msgpack frames of a tagged union.

The runtime (any process, possibly large) talks to its helper over one socketpair. Frames are
a 4-byte big-endian length and a msgpack body; messages are msgspec Structs tagged by `kind`.
"""

from __future__ import annotations

import socket
import struct

import msgspec

from sandbox.plans import Bind
from sandbox.spec import Rootfs, RunResult, RunSpec
from sandbox.volumes import VolumeBind

MAX_FRAME = 1 << 31
_HEADER = struct.Struct(">I")


class Hello(msgspec.Struct, tag="hello", frozen=True):
    pid: int


class Mapped(msgspec.Struct, tag="mapped", frozen=True):
    ok: bool
    message: str = ""


class Ready(msgspec.Struct, tag="ready", frozen=True):
    info: dict[str, str]


class NetAttach(msgspec.Struct, frozen=True):
    """Put a run on private network `network` as `member` (its host name there)."""

    network: str
    member: str


class RunRequest(msgspec.Struct, tag="run", frozen=True):
    key: str
    spec: RunSpec
    rootfs: Rootfs
    binds: tuple[Bind, ...] = ()
    diff_tar: str | None = None
    volumes: tuple[VolumeBind, ...] = ()
    net: NetAttach | None = None


class NetworkInfo(msgspec.Struct, frozen=True):
    """A job network as `Runtime.create_network` returns it."""

    id: str
    netns: int
    """Inode number of the job's network namespace (it exists while the helper holds it)."""
    addresses: dict[str, str]
    """Member name -> IPv4 address."""


class NetworkRequest(msgspec.Struct, tag="network", frozen=True):
    """Create (with its members, in address order) or remove a private job network."""

    key: str
    op: str  # "create" | "remove"
    network: str
    members: tuple[str, ...] = ()


class ProbeRequest(msgspec.Struct, tag="probe", frozen=True):
    """Is anything in run `run`'s network namespace listening on TCP `port`?"""

    key: str
    run: str
    port: int


class OpReply(msgspec.Struct, tag="op", frozen=True):
    """Answer to a NetworkRequest or ProbeRequest."""

    key: str
    ok: bool
    message: str = ""
    values: dict[str, str] = {}


class KillRequest(msgspec.Struct, tag="kill", frozen=True):
    key: str


class RunReply(msgspec.Struct, tag="result", frozen=True):
    key: str
    result: RunResult


Message = (Hello | Mapped | Ready | RunRequest | KillRequest | RunReply | NetworkRequest
           | ProbeRequest | OpReply)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    return _decoder.decode(body)


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Read exactly `size` bytes; None on a clean EOF at a frame boundary."""
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return None
            raise ConnectionError("helper connection closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> Message | None:
    header = recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes is too large")
    body = recv_exact(sock, length) if length else b""
    if body is None:
        raise ConnectionError("helper connection closed mid-frame")
    return decode(body)


class FrameBuffer:
    """Accumulates bytes read from a non-blocking socket and yields whole messages."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[Message]:
        self._data += chunk
        out = []
        while len(self._data) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._data)
            if length > MAX_FRAME:
                raise ConnectionError(f"frame of {length} bytes is too large")
            end = _HEADER.size + length
            if len(self._data) < end:
                break
            out.append(decode(bytes(self._data[_HEADER.size:end])))
            del self._data[:end]
        return out
