"""Translating between the wire (api.schemas) and the queue (workers.protocol / records).

`to_run_job` is where a request meets the server's policy: limits default and are capped by
the server maxima, base64 is decoded, paths and names are checked by the runtime's own
validators (sandbox.spec), each failure naming its field. `run_out` turns a queue record into
the response, rendering output as UTF-8 text (invalid bytes replaced) or lossless base64.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from api.schemas import ErrorOut, ImageOut, PullOut, RunOut, RunRequest, RunResultOut
from api.settings import Settings
from sandbox.errors import InvalidSpec
from sandbox.spec import (FileIn, Limits, RunResult, RunSpec, VolumeMount, check_absolute_path,
                          check_relative_path, validate_spec)
from workers.protocol import ImageInfo, RunJob, ServiceJob
from workers.records import RunRecord, RunStatus


def _decode(text: str, encoding: str, *, field: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidSpec(f"{field}: not valid base64 ({exc})", field=field) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSpec(f"{field}: text is not encodable as UTF-8", field=field) from None


def capped_limits(requested: Limits | None, settings: Settings) -> Limits:
    limits = requested or settings.default_limits
    for name in Limits.__struct_fields__:
        value, maximum = getattr(limits, name), getattr(settings.max_limits, name)
        if value > maximum:
            raise InvalidSpec(
                f"limits.{name}: {value} is above the server maximum {maximum}", field=f"limits.{name}"
            )
    return limits


def to_run_job(request: RunRequest, *, tenant: str, settings: Settings) -> RunJob:
    files = []
    for i, f in enumerate(request.files):
        field = f"files[{i}]"
        path = check_relative_path(f.path, field=f"{field}.path")
        files.append(FileIn(path=path, content=_decode(f.content, f.encoding, field=f"{field}.content"), mode=f.mode))
    spec = RunSpec(
        cmd=list(request.cmd),
        env=dict(request.env),
        stdin=_decode(request.stdin, request.stdin_encoding, field="stdin"),
        workdir=request.workdir,
        files=files,
        limits=capped_limits(request.limits, settings),
        network=request.network or ("private" if request.services else "none"),
    )
    validate_spec(spec)
    services = _services(request, spec, settings)
    volumes = []
    for i, v in enumerate(request.volumes):
        path = check_absolute_path(v.path, field=f"volumes[{i}].path")
        volumes.append(VolumeMount(name=v.name, path=path, read_only=v.read_only))
    return RunJob(tenant=tenant, image=request.image, spec=spec, volumes=volumes,
                  services=services)


SERVICE_READY_MARGIN = 35
"""Seconds a run with services may spend on them before its own wall time starts
(sandbox.jobs.READY_TIMEOUT plus start-up)."""


def _services(request: RunRequest, spec: RunSpec, settings: Settings) -> list[ServiceJob]:
    if request.services and spec.network != "private":
        raise InvalidSpec("services need network 'private' (or no network given)", field="network")
    out = []
    # Services live as long as the run (they are killed when it ends); their own wall time
    # is only a backstop.
    wall = min(settings.max_limits.wall_time, spec.limits.wall_time + SERVICE_READY_MARGIN)
    for i, svc in enumerate(request.services):
        svc_spec = RunSpec(cmd=list(svc.cmd), env=dict(svc.env), network="private",
                           hostname=svc.name,
                           limits=msgspec.structs.replace(spec.limits, wall_time=wall))
        validate_spec(svc_spec)
        out.append(ServiceJob(name=svc.name, image=svc.image, spec=svc_spec, port=svc.port))
    names = [s.name for s in out]
    if len(set(names)) != len(names) or spec.hostname in names:
        raise InvalidSpec("service names must differ from each other and from "
                          f"{spec.hostname!r}", field="services")
    return out


def job_timeout(job: RunJob, settings: Settings) -> int:
    """Seconds a worker may hold the job: the wall-time limit plus setup margin."""
    extra = SERVICE_READY_MARGIN if job.services else 0
    return int(job.spec.limits.wall_time) + 1 + settings.job_margin + extra


def _text(data: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    return data.decode("utf-8", "replace")


def result_out(result: RunResult, encoding: str) -> RunResultOut:
    return RunResultOut(
        verdict=result.verdict,
        exit_code=result.exit_code,
        signal=result.signal,
        stdout=_text(result.stdout, encoding),
        stderr=_text(result.stderr, encoding),
        output_encoding=encoding,  # type: ignore[arg-type]
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
        cpu_time=result.cpu_time,
        wall_time=result.wall_time,
        memory=result.memory,
        stage=result.stage,
        message=result.message,
        files={name: base64.b64encode(data).decode("ascii") for name, data in result.files.items()},
        limits_mode=result.limits_mode,
        setup_time=getattr(result, "setup_time", 0.0),
    )


def error_of(record: RunRecord) -> ErrorOut | None:
    outcome = record.outcome
    if outcome is not None and outcome.error is not None:
        e = outcome.error
        return ErrorOut(error=e.code, message=e.message, field=e.field, id=record.id)
    if record.status == RunStatus.FAILED:
        return ErrorOut(error="run_failed", message=record.reason or "the run failed", id=record.id)
    return None


def run_out(record: RunRecord, encoding: str = "utf-8") -> RunOut:
    outcome = record.outcome
    result = outcome.result if outcome is not None else None
    return RunOut(
        id=record.id,
        status=record.status.value,  # type: ignore[arg-type]
        result=result_out(result, encoding) if result is not None else None,
        error=error_of(record),
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
    )


def image_out(info: ImageInfo) -> ImageOut:
    source = "local" if info.source == "local" else "registry"
    return ImageOut(name=info.name, digest=info.digest, source=source)


def pull_out(record: RunRecord) -> PullOut:
    outcome = record.outcome
    image = image_out(outcome.image) if outcome is not None and outcome.image is not None else None
    return PullOut(id=record.id, status=record.status.value, image=image, error=error_of(record))  # type: ignore[arg-type]
