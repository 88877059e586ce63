"""What travels through the queue: the job payload and the job outcome, as msgspec Structs.

These are the schemas the API and the workers share (the API never imports the runtime, only
these and workers.queues). A job carries one msgpack-encoded `RunJob` (or `PullJob`) as its
only argument and returns one msgpack-encoded `Outcome`, so rq itself only ever moves bytes.

`RunJob` carries `services` and `volumes` beside `spec` (whose `network` says none, private
or egress); older workers refuse unknown fields instead of silently running a job without
the network or volume it asked for. `VolumeJob` is a volume operation on the volume host.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sandbox.spec import RunResult, RunSpec, VolumeMount
from sandbox.volumes import VolumeInfo

ImageRef = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")]
"""An image reference: `name`, `name:tag`, `host:port/name:tag` or `name@sha256:...`."""

Tenant = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class ServiceJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A service container of a run (issue 5): started first, on the run's private network,
    reachable by `name`; the main container starts once `port` accepts connections."""

    name: str
    image: ImageRef
    spec: RunSpec
    port: Annotated[int, Meta(ge=1, le=65535)]


class RunJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One run as the worker receives it: the tenant, the image and the runtime's spec,
    with the tenant's volumes to mount and the services to start first, if any."""

    tenant: Tenant
    image: ImageRef
    spec: RunSpec
    volumes: list[VolumeMount] = []
    services: list[ServiceJob] = []


class VolumeJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A volume operation, run by a worker on the host that holds the volumes."""

    op: Literal["create", "list", "inspect", "delete"]
    tenant: Tenant
    name: str = ""
    size: int = 0


class PullJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Pull (or refresh) an image into the store of the worker that takes the job."""

    image: ImageRef


class JobError(msgspec.Struct, frozen=True, kw_only=True):
    """A SandboxError raised while preparing or running a job, flattened for the wire."""

    code: str
    message: str
    status: int = 500
    field: str | None = None


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An image a worker can run: its reference, digest (if known) and where it came from."""

    name: str
    digest: str = ""
    source: str = "registry"
    size: int = 0


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a job function returns: exactly one of `result`, `image` or `error` is set."""

    result: RunResult | None = None
    image: ImageInfo | None = None
    error: JobError | None = None
    volumes: list[VolumeInfo] | None = None
    """Volume jobs: the volume created or inspected (one), or the tenant's list."""
    worker: str = ""


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(obj)


def decode_run_job(data: bytes) -> RunJob:
    return msgspec.msgpack.decode(data, type=RunJob)


def decode_pull_job(data: bytes) -> PullJob:
    return msgspec.msgpack.decode(data, type=PullJob)


def decode_volume_job(data: bytes) -> VolumeJob:
    return msgspec.msgpack.decode(data, type=VolumeJob)


def decode_outcome(data: bytes) -> Outcome:
    return msgspec.msgpack.decode(data, type=Outcome)
