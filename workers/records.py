"""Reading runs back: a job's rq state translated into sbx's run status, and cancelling.

`load` answers GET /v1/runs/{id}; `wait` blocks on the job's rq result stream (XREAD BLOCK, no
polling) until the worker records an outcome or the timeout passes (`load_async` can do both
in one round trip); `cancel` removes a queued
job or asks the worker holding a running one to kill its container.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime

import anyio.to_thread
import msgspec
import redis
import redis.asyncio
from rq.job import JobStatus
from rq.results import Result

from workers.jobclass import SbxJob
from workers.protocol import Outcome, decode_outcome
from workers.queues import JOB_ID_PATTERN, cancel_key, control_key, worker_key
from workers.serializer import MsgpackSerializer

_JOB_ID = re.compile(JOB_ID_PATTERN)

CONTROL_TTL = 300
"""Seconds a worker's control list lives without the worker popping it."""


class RunStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


TERMINAL = frozenset({RunStatus.DONE, RunStatus.CANCELLED, RunStatus.FAILED})


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A run as the queue knows it. `reason` explains a failure that has no outcome."""

    id: str
    tenant: str
    kind: str
    status: RunStatus
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str = ""
    outcome: Outcome | None = None
    reason: str | None = None


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "the job failed"


def _status(job: SbxJob, outcome: Outcome | None, cancelled: bool) -> RunStatus:
    state = job.get_status(refresh=False)
    if state in (JobStatus.CANCELED, JobStatus.STOPPED):
        return RunStatus.CANCELLED
    if state == JobStatus.STARTED:
        return RunStatus.RUNNING
    if state == JobStatus.FINISHED:
        if cancelled:
            return RunStatus.CANCELLED
        return RunStatus.FAILED if outcome is None or outcome.error else RunStatus.DONE
    if state == JobStatus.FAILED:
        return RunStatus.CANCELLED if cancelled else RunStatus.FAILED
    return RunStatus.QUEUED


def load(connection: redis.Redis, run_id: str) -> RunRecord | None:
    """The run `run_id`, or None when it does not exist (or has expired).

    A run shown as running whose worker has stopped beating is failed on the spot (the same
    sweep every worker runs), so a reader never sees a dead run as "running".
    """
    record = _load(connection, run_id)
    if record is not None and record.status == RunStatus.RUNNING and record.worker:
        if not connection.exists(worker_key(record.worker)):
            from workers.liveness import sweep_abandoned

            sweep_abandoned(connection)
            record = _load(connection, run_id)
    return record


def _load(connection: redis.Redis, run_id: str) -> RunRecord | None:
    if not _JOB_ID.match(run_id):
        return None
    with connection.pipeline(transaction=False) as pipe:  # one round trip for the whole record
        _queue_reads(pipe, run_id)
        raw, latest_raw, cancelled = pipe.execute()
    return _parse(connection, run_id, raw, latest_raw, cancelled)


async def load_async(aconn: redis.asyncio.Redis, connection: redis.Redis, run_id: str,
                     wait: float = 0.0) -> RunRecord | None:
    """`load` for the event loop, after waiting up to `wait` seconds for the run to finish
    (as `wait` does; the async client's socket timeout must exceed it). `connection` (sync)
    is only used, in a thread, in the rare case the run's worker has died and the run must
    be swept.

    The wait and the reads go in one round trip: Redis runs the commands pipelined behind a
    blocking XREAD only once it returns (the worker records an outcome in one transaction,
    so the reads see all of it)."""
    if not _JOB_ID.match(run_id):
        return None
    async with aconn.pipeline(transaction=False) as pipe:
        if wait > 0:
            pipe.xread({Result.get_key(run_id): "0-0"}, count=1, block=max(1, int(wait * 1000)))
        _queue_reads(pipe, run_id)
        raw, latest_raw, cancelled = (await pipe.execute())[-3:]
    record = _parse(connection, run_id, raw, latest_raw, cancelled)
    if record is not None and record.status == RunStatus.RUNNING and record.worker:
        if not await aconn.exists(worker_key(record.worker)):
            return await anyio.to_thread.run_sync(load, connection, run_id)
    return record


def _queue_reads(pipe, run_id: str) -> None:
    pipe.hgetall(f"{SbxJob.redis_job_namespace_prefix}{run_id}")
    pipe.xrevrange(Result.get_key(run_id), "+", "-", count=1)
    pipe.exists(cancel_key(run_id))


def _parse(connection: redis.Redis, run_id: str, raw, latest_raw, cancelled) -> RunRecord | None:
    """A run record from the replies of `_queue_reads` (no I/O: `connection` is only handed to
    rq's objects, which want one)."""
    if not raw:
        return None
    job = SbxJob(run_id, connection=connection, serializer=MsgpackSerializer)
    try:
        job.restore(raw)
    except Exception:  # a job hash sbx did not write: show nothing rather than fail
        return None
    meta = job.meta if isinstance(job.meta, dict) else {}
    outcome: Outcome | None = None
    reason: str | None = None
    state = job.get_status(refresh=False)
    if latest_raw and state in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED):
        result_id, payload = latest_raw[0]
        latest = Result.restore(run_id, result_id.decode(), payload, connection=connection,
                                serializer=MsgpackSerializer)
        if latest.type == Result.Type.SUCCESSFUL:
            try:
                outcome = decode_outcome(latest.return_value)
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
                reason = "the worker returned an unreadable outcome"
        else:
            reason = _last_line(latest.exc_string)
    if outcome is not None and outcome.error is not None:
        reason = outcome.error.message
    return RunRecord(
        id=run_id,
        tenant=str(meta.get("tenant", "")),
        kind=str(meta.get("kind", "run")),
        status=_status(job, outcome, bool(cancelled)),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.ended_at,
        worker=job.worker_name or "",
        outcome=outcome,
        reason=reason,
    )


def wait(connection: redis.Redis, run_id: str, timeout: float) -> None:
    """Block until the run has an outcome in its result stream, or `timeout` seconds pass.

    A blocking XREAD on rq's per-job result stream: the worker's write wakes us. The
    connection's socket timeout must exceed `timeout` (see workers.queues.connect).
    """
    if timeout <= 0 or not _JOB_ID.match(run_id):
        return
    connection.xread({Result.get_key(run_id): "0-0"}, count=1, block=max(1, int(timeout * 1000)))


def cancel(connection: redis.Redis, run_id: str, ttl: int) -> RunRecord | None:
    """Cancel a queued or running run; a finished run is returned unchanged."""
    record = load(connection, run_id)
    if record is None or record.status in TERMINAL:
        return record
    connection.set(cancel_key(run_id), b"1", ex=max(ttl, 60))
    job = SbxJob.fetch(run_id, connection=connection, serializer=MsgpackSerializer)
    state = job.get_status(refresh=True)
    if state in (JobStatus.QUEUED, JobStatus.CREATED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
    elif state == JobStatus.STARTED and job.worker_name:
        ctl = control_key(job.worker_name)
        with connection.pipeline() as pipe:
            pipe.rpush(ctl, run_id.encode())
            pipe.expire(ctl, CONTROL_TTL)
            pipe.execute()
    return load(connection, run_id)
