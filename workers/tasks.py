"""The job functions a worker runs: decode the payload, resolve the image, run, encode.

These are the only functions `workers.jobclass.ALLOWED_FUNCTIONS` lets rq call. Each takes one
msgpack payload (`workers.protocol.RunJob` / `PullJob`) and returns one msgpack `Outcome`.
A SandboxError (bad spec, unknown image, setup failure) becomes an `Outcome.error`, never an
exception, so the API can answer with the right 4xx and the run shows as failed with the
runtime's message. The worker process binds its context (runtime, images, Redis) once with
`bind()` before taking jobs.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

import msgspec
import redis
from rq import get_current_job

from sandbox.errors import ImageError, SandboxError, VolumeError
from sandbox.spec import Verdict, validate_spec
from workers.images import ImageResolver
from workers.protocol import (JobError, Outcome, decode_pull_job, decode_run_job,
                              decode_volume_job, encode)
from workers.queues import LATENCY_BUCKETS, METRICS_LATENCY, METRICS_VERDICTS, cancel_key


@dataclass
class WorkerContext:
    """Everything a job function needs, owned by one worker process."""

    name: str
    connection: redis.Redis
    runtime: object
    images: ImageResolver
    max_outcome_bytes: int = 64 * 1024 * 1024
    running: set[str] = field(default_factory=set)
    """Runs in progress in this process (one per worker thread)."""
    killed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    defer_metrics: bool = False
    """True when the worker writes metrics in its end-of-job transaction (flush_metrics)."""
    pending: list[tuple[str, float | None]] = field(default_factory=list)
    volumes: object = None
    """The volume store (sandbox.volumes.VolumeStore) when this host keeps the volumes."""
    volume_wait: float = 0.0

    def flush_metrics(self, pipe) -> None:
        """Queue the pending metric updates on `pipe` (the worker's end-of-job transaction)."""
        with self.lock:
            pending, self.pending = self.pending, []
        for label, seconds in pending:
            _metric_commands(pipe, label, seconds)

    def current(self) -> str:
        """The runs in progress, comma-separated (what /v1/health shows)."""
        with self.lock:
            return ",".join(sorted(self.running))

    def kill(self, run_id: str) -> None:
        """Called from the beacon thread: stop `run_id` if this process is running it."""
        with self.lock:
            if run_id not in self.running:
                return
            self.killed.add(run_id)
        kill = getattr(self.runtime, "kill", None)
        if kill is not None:
            kill(run_id)


_context: WorkerContext | None = None


def bind(context: WorkerContext | None) -> None:
    global _context
    _context = context


def _ctx() -> WorkerContext:
    if _context is None:
        raise RuntimeError("workers.tasks used outside a worker process (bind() was not called)")
    return _context


def _error(exc: SandboxError) -> JobError:
    field = exc.field or ("image" if isinstance(exc, ImageError) else None)
    return JobError(code=exc.code, message=exc.message, status=exc.status, field=field)


def _finish(ctx: WorkerContext, outcome: Outcome, enqueued_at: datetime | None) -> bytes:
    data = encode(outcome)
    if len(data) > ctx.max_outcome_bytes:
        outcome = Outcome(
            error=JobError(
                code="result_too_large",
                message=f"the run's result is {len(data)} bytes, over the {ctx.max_outcome_bytes} byte bound",
                status=413,
            ),
            worker=ctx.name,
        )
        data = encode(outcome)
    _record_metrics(ctx, outcome, enqueued_at)
    return data


def _record_metrics(ctx: WorkerContext, outcome: Outcome, enqueued_at: datetime | None) -> None:
    if outcome.result is not None:
        label = outcome.result.verdict.value
    elif outcome.error is not None:
        label = f"ERROR_{outcome.error.code.upper()}"
    else:
        return
    seconds = None
    if enqueued_at is not None:
        seconds = max(0.0, (datetime.now(timezone.utc) - enqueued_at).total_seconds())
    if ctx.defer_metrics:
        with ctx.lock:
            ctx.pending.append((label, seconds))
        return
    with ctx.connection.pipeline(transaction=False) as pipe:
        _metric_commands(pipe, label, seconds)
        pipe.execute()


def _metric_commands(pipe, label: str, seconds: float | None) -> None:
    pipe.hincrby(METRICS_VERDICTS, label, 1)
    if seconds is not None:
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        bound = str(LATENCY_BUCKETS[index]) if index < len(LATENCY_BUCKETS) else "+Inf"
        pipe.hincrby(METRICS_LATENCY, f"le={bound}", 1)
        pipe.hincrbyfloat(METRICS_LATENCY, "sum", seconds)
        pipe.hincrby(METRICS_LATENCY, "count", 1)


def _enqueued_at(job) -> datetime | None:
    when = getattr(job, "enqueued_at", None)
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


def run(payload: bytes) -> bytes:
    """Job function: one container run."""
    ctx = _ctx()
    job = get_current_job()
    run_id = job.id if job is not None else ""
    enqueued_at = _enqueued_at(job)
    try:
        request = decode_run_job(payload)
        validate_spec(request.spec)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _finish(ctx, Outcome(error=JobError(code="invalid_spec", message=str(exc), status=400)), enqueued_at)
    except SandboxError as exc:
        return _finish(ctx, Outcome(error=_error(exc), worker=ctx.name), enqueued_at)

    with ctx.lock:
        ctx.running.add(run_id)
    try:
        if run_id and _cancel_requested(job, ctx, run_id):
            return _finish(
                ctx,
                Outcome(error=JobError(code="cancelled", message="cancelled before it started", status=409)),
                enqueued_at,
            )
        image = ctx.images.resolve(request.image)
        spec = request.spec
        if image.env:
            spec = msgspec.structs.replace(spec, env={**image.env, **spec.env})
        if run_id in ctx.killed:
            raise _Cancelled()
        if request.volumes or request.services:
            result = _run_job(ctx, request, spec, image, run_id)
        else:
            result = _run_with_key(ctx.runtime, spec, image.rootfs, run_id)
        outcome = Outcome(result=result, worker=ctx.name)
    except _Cancelled:
        outcome = Outcome(error=JobError(code="cancelled", message="cancelled before it started", status=409))
    except SandboxError as exc:
        outcome = Outcome(error=_error(exc), worker=ctx.name)
    finally:
        with ctx.lock:
            ctx.running.discard(run_id)
            ctx.killed.discard(run_id)
    return _finish(ctx, outcome, enqueued_at)


def _cancel_requested(job, ctx: WorkerContext, run_id: str) -> bool:
    """Was the run cancelled while queued? SbxWorker reads the flag when it marks the job
    started (same transaction); other callers ask Redis."""
    flag = getattr(job, "cancel_requested", None)
    if flag is not None:
        return bool(flag)
    return bool(ctx.connection.exists(cancel_key(run_id)))


class _Cancelled(Exception):
    pass


def _run_with_key(runtime, spec, rootfs, run_id: str):
    """Call the runtime with the run id as its key, so `runtime.kill(run_id)` finds the run."""
    return runtime.run(spec, rootfs, key=run_id or None)


def _run_job(ctx: WorkerContext, request, spec, image, run_id: str):
    """A run with services (on a private network) and/or the tenant's volumes (issue 5)."""
    from sandbox.jobs import Service, run_job

    services = []
    for svc in request.services:
        resolved = ctx.images.resolve(svc.image)
        svc_spec = svc.spec
        if resolved.env:
            svc_spec = msgspec.structs.replace(svc_spec, env={**resolved.env, **svc_spec.env})
        services.append(Service(name=svc.name, spec=svc_spec, rootfs=resolved.rootfs,
                                port=svc.port))
    if not request.volumes:
        return run_job(ctx.runtime, spec, image.rootfs, services=services, key=run_id or None)
    if ctx.volumes is None:
        raise VolumeError("this worker does not keep volumes (it is not the volume host)",
                          field="volumes")
    with ctx.volumes.attach(request.tenant, request.volumes, wait=ctx.volume_wait) as binds:
        return run_job(ctx.runtime, spec, image.rootfs, services=services, volumes=binds,
                       key=run_id or None)


def volume(payload: bytes) -> bytes:
    """Job function: create, list, inspect or delete a tenant's volumes (volume host only)."""
    ctx = _ctx()
    job = get_current_job()
    try:
        request = decode_volume_job(payload)
        store = ctx.volumes
        if store is None:
            raise VolumeError("this worker does not keep volumes (it is not the volume host)")
        if request.op == "create":
            found = [store.create(request.tenant, request.name, request.size)]
        elif request.op == "list":
            found = store.list(request.tenant)
        elif request.op == "inspect":
            found = [store.inspect(request.tenant, request.name)]
        else:
            store.delete(request.tenant, request.name)
            found = []
        outcome = Outcome(volumes=found, worker=ctx.name)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        outcome = Outcome(error=JobError(code="invalid_spec", message=str(exc), status=400))
    except SandboxError as exc:
        outcome = Outcome(error=_error(exc), worker=ctx.name)
    return _finish(ctx, outcome, _enqueued_at(job))


def pull(payload: bytes) -> bytes:
    """Job function: pull (or confirm) an image on the worker that takes the job."""
    ctx = _ctx()
    job = get_current_job()
    try:
        request = decode_pull_job(payload)
        info = ctx.images.pull(request.image)
        outcome = Outcome(image=info, worker=ctx.name)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        outcome = Outcome(error=JobError(code="invalid_spec", message=str(exc), status=400))
    except SandboxError as exc:
        outcome = Outcome(error=_error(exc), worker=ctx.name)
    return _finish(ctx, outcome, _enqueued_at(job))


def self_test(runtime, images: ImageResolver, image: str, cmd: tuple[str, ...]) -> str:
    """Run `cmd` in `image` once; return "" when it ran OK, else what went wrong."""
    from sandbox.spec import RunSpec

    try:
        resolved = images.resolve(image)
        spec = RunSpec(cmd=list(cmd), env=resolved.env)
        result = runtime.run(spec, resolved.rootfs)
    except SandboxError as exc:
        return f"self-test in {image!r} failed: {exc.message}"
    if result.verdict != Verdict.OK:
        return f"self-test in {image!r} ended {result.verdict.value}: {result.message or result.stderr[:200]!r}"
    return ""
