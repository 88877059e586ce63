"""Wire schemas of the HTTP API (the OpenAPI schema is generated from these).

Requests are frozen msgspec Structs with bounds on the types and `forbid_unknown_fields`, so
msgspec refuses malformed input with a message naming the field. `Limits` and `Verdict` are
the runtime's own (sandbox.spec), so `POST /v1/runs` and `sbx run --json` use the same names.

Networks and volumes (issue 5): `RunRequest` has `network`, `services` and `volumes`, each
mapped onto `workers.protocol.RunJob`; the /v1/volumes routes use `VolumeCreate` and
`VolumeOut`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sandbox.spec import Limits, Verdict
from workers.protocol import ImageRef

Encoding = Literal["utf-8", "base64"]
Arg = Annotated[str, Meta(max_length=128 * 1024)]
EnvName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^=\x00]+$")]
EnvValue = Annotated[str, Meta(max_length=128 * 1024)]
Wait = bool | Annotated[float, Meta(ge=0, le=3600)]


class FileSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A file written to the work directory before the run."""

    path: Annotated[str, Meta(min_length=1, max_length=1024)]
    """Relative to the work directory; no '..', not absolute, no NUL."""
    content: Annotated[str, Meta(max_length=64 * 1024 * 1024)] = ""
    encoding: Encoding = "utf-8"
    """How `content` is written: plain UTF-8 text, or base64 for binary files."""
    mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o644


VolumeName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
HostName = Annotated[str, Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]


class ServiceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A container started before the run, on the run's private network, reachable by
    `name`; the run starts once `port` accepts TCP connections. It is killed when the run
    ends."""

    name: HostName
    image: ImageRef
    cmd: Annotated[list[Arg], Meta(min_length=1, max_length=4096)]
    env: Annotated[dict[EnvName, EnvValue], Meta(max_length=256)] = {}
    port: Annotated[int, Meta(ge=1, le=65535)]


class VolumeMountIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One of the tenant's volumes, mounted at `path` in the run."""

    name: VolumeName
    path: Annotated[str, Meta(min_length=2, max_length=1024)]
    read_only: bool = False


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/runs. Every field but `image` and `cmd` is optional."""

    image: ImageRef
    cmd: Annotated[list[Arg], Meta(min_length=1, max_length=4096)]
    stdin: Annotated[str, Meta(max_length=64 * 1024 * 1024)] = ""
    stdin_encoding: Encoding = "utf-8"
    files: Annotated[list[FileSpec], Meta(max_length=256)] = []
    env: Annotated[dict[EnvName, EnvValue], Meta(max_length=256)] = {}
    workdir: Annotated[str, Meta(min_length=1, max_length=1024)] = "/work"
    limits: Limits | None = None
    """Each limit is capped by the server's maximum; omitted ones take the server default."""
    wait: Wait = False
    """true: answer with the result (up to the server's bound); a number: wait that many seconds."""
    output_encoding: Encoding = "utf-8"
    """utf-8: stdout/stderr as text, invalid bytes replaced; base64: lossless."""
    network: Literal["none", "private", "egress"] | None = None
    """none: loopback only (the default without services). private: the run and its
    services on a network of their own, nothing else reachable (the default with services).
    egress: outbound access to what the operator allows, if the server enables it."""
    services: Annotated[list[ServiceSpec], Meta(max_length=8)] = []
    volumes: Annotated[list[VolumeMountIn], Meta(max_length=16)] = []


class VolumeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/volumes."""

    name: VolumeName
    size: Annotated[int, Meta(ge=4096, le=1 << 40)]
    """The quota in bytes (rounded up to whole 4 KiB pages); the server may cap it lower."""


class VolumeOut(msgspec.Struct, frozen=True, kw_only=True):
    """A named volume: quota (`size`) and bytes used as of the last saved run."""

    name: str
    size: int
    used: int
    created_at: datetime
    updated_at: datetime


class VolumeList(msgspec.Struct, frozen=True, kw_only=True):
    volumes: list[VolumeOut]


class PullRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /v1/images/pull."""

    image: ImageRef
    wait: bool = True


class RunResultOut(msgspec.Struct, frozen=True, kw_only=True):
    """The runtime's result; times in seconds, memory in bytes (as `sbx run --json`)."""

    verdict: Verdict
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    output_encoding: Encoding
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time: float = 0.0
    wall_time: float = 0.0
    memory: int = 0
    stage: str | None = None
    message: str = ""
    files: dict[str, str] = {}
    """Files copied out of the work directory, base64 (as `sbx run --json`)."""
    limits_mode: str = ""
    setup_time: float = 0.0
    """Seconds from the start of a run with services to its own start: the private network,
    the service containers and waiting for their ports (0 without services)."""


class ErrorOut(msgspec.Struct, frozen=True, kw_only=True):
    """Every error response: a stable code, a message, and the input at fault if any."""

    error: str
    message: str
    field: str | None = None
    id: str | None = None


RunStatusName = Literal["queued", "running", "done", "cancelled", "failed"]


class RunOut(msgspec.Struct, frozen=True, kw_only=True):
    """A run: its status, result once done, and timestamps (UTC)."""

    id: str
    status: RunStatusName
    result: RunResultOut | None = None
    error: ErrorOut | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ImageOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    digest: str = ""
    source: Literal["registry", "local"] = "registry"


class ImageList(msgspec.Struct, frozen=True, kw_only=True):
    images: list[ImageOut]
    registry_error: str | None = None


class PullOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: RunStatusName
    image: ImageOut | None = None
    error: ErrorOut | None = None


class WorkerOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    host: str = ""
    pid: int = 0
    limits_mode: str = ""
    current: str = ""


class ComponentOut(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str | None = None


class HealthOut(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded", "down"]
    redis: ComponentOut
    registry: ComponentOut
    workers_alive: int
    workers: list[WorkerOut]
    limits_modes: list[str]
    queue_depth: int
