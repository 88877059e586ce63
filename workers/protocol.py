"""What travels through the queue: the job payload and the job outcome, as msgspec Structs.

These are the schemas the API and the workers share (the API never imports the runtime, only
these and workers.queues). A job carries one msgpack-encoded `RunJob` (or `PullJob`) as its
only argument and returns one msgpack-encoded `Outcome`, so rq itself only ever moves bytes.

Room for later work (issue 5): `RunJob` grows `services` and `volumes` lists beside `spec`
(whose `network` field already exists); older workers refuse unknown fields instead of
silently running a job without the network or volume it asked for.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from sandbox.spec import RunResult, RunSpec

ImageRef = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")]
"""An image reference: `name`, `name:tag`, `host:port/name:tag` or `name@sha256:...`."""

Tenant = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class RunJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One run as the worker receives it: the tenant, the image and the runtime's spec."""

    tenant: Tenant
    image: ImageRef
    spec: RunSpec


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
    worker: str = ""


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(obj)


def decode_run_job(data: bytes) -> RunJob:
    return msgspec.msgpack.decode(data, type=RunJob)


def decode_pull_job(data: bytes) -> PullJob:
    return msgspec.msgpack.decode(data, type=PullJob)


def decode_outcome(data: bytes) -> Outcome:
    return msgspec.msgpack.decode(data, type=Outcome)
