"""Translating between the wire (api.schemas) and the queue (workers.protocol / records).

`to_run_job` is where a request meets the server's policy: limits default and are capped by
the server maxima, base64 is decoded, paths and names are checked by the runtime's own
validators (sandbox.spec), each failure naming its field. `run_out` turns a queue record into
the response, rendering output as UTF-8 text (invalid bytes replaced) or lossless base64.
"""

from __future__ import annotations

import base64
import binascii

from api.schemas import ErrorOut, ImageOut, PullOut, RunOut, RunRequest, RunResultOut
from api.settings import Settings
from sandbox.errors import InvalidSpec
from sandbox.spec import FileIn, Limits, RunResult, RunSpec, check_relative_path, validate_spec
from workers.protocol import ImageInfo, RunJob
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
    )
    validate_spec(spec)
    return RunJob(tenant=tenant, image=request.image, spec=spec)


def job_timeout(job: RunJob, settings: Settings) -> int:
    """Seconds a worker may hold the job: the wall-time limit plus setup margin."""
    return int(job.spec.limits.wall_time) + 1 + settings.job_margin


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
