"""sbx's rq worker: non-forking, allow-listed, with the per-job bookkeeping safety needs.

`SbxWorker` is rq's SimpleWorker (no fork per job: the sandbox isolates the code, and rq's
forking Worker costs a fork per job, see the README's figures) that keeps rq's queue, job
hashes, result streams and started-job registry, but does per job only what sbx relies on:

- refuse a job whose function is not one of sbx's (`SbxJob.refusal`) without importing or
  calling anything: it is failed with the reason "refused: ...";
- mark the job started (status, worker, start time) and enter it in the started-job registry
  in one transaction, so the janitor (workers.liveness) can fail it if this process dies;
- run it, then record the outcome in one transaction: status, end time, rq `Result` (which
  wakes the API's blocking XREAD), the job's TTL, and leave the registry.

What is skipped: rq's execution records and their heartbeats (our beacon covers liveness),
per-job worker state and statistics writes, finished/failed registries (job TTLs expire the
records), and the SIGALRM job timeout (interrupting the runtime mid-setup could leak a
container; the runtime enforces the run's wall-time limit itself). rq's own worker record is
still refreshed, at most every HEARTBEAT_EVERY seconds. This brings rq's ~70 Redis commands
per job down to about 20 (see loadtest/bench_queue.py).
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid

from rq.job import JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.timeouts import BaseDeathPenalty
from rq.utils import current_timestamp, now, utcformat
from rq.worker import SimpleWorker

from workers.jobclass import SbxJob
from workers.queues import cancel_key
from workers.serializer import MsgpackSerializer

WORKER_TTL = 60
"""Seconds rq keeps its own worker record; rq blocks on the queue for WORKER_TTL - 15."""
HEARTBEAT_EVERY = 10.0
"""Seconds between refreshes of rq's worker record (our liveness is workers.liveness)."""
DEFAULT_JOB_TIMEOUT = 180
REGISTRY_MARGIN = 60
"""Seconds past a job's timeout after which rq's own registry cleanup may call it abandoned."""


class NoDeathPenalty(BaseDeathPenalty):
    """rq's per-job timeout does nothing here: the runtime bounds every run's wall time."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class SbxWorker(SimpleWorker):
    job_class = SbxJob
    death_penalty_class = NoDeathPenalty

    def __init__(self, queues, *, connection, name: str, **kwargs) -> None:
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", 60)
        super().__init__(
            queues,
            connection=connection,
            name=name,
            job_class=SbxJob,
            serializer=MsgpackSerializer,
            **kwargs,
        )
        self._last_beat = 0.0
        self._last_suspension_check = 0.0
        self.on_finish = None
        """Optional callable(pipeline) adding commands to each job's end-of-job transaction."""

    # -- rq bookkeeping we keep light --------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # Only the main thread may install handlers; tests run burst workers in threads.
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def set_state(self, state: str, pipeline=None) -> None:
        self._state = state  # kept in memory for warm shutdown; not written per job

    def check_for_suspension(self, burst: bool) -> None:
        # rq reads its suspension flag before every job; once every few seconds is enough.
        if time.monotonic() - self._last_suspension_check >= HEARTBEAT_EVERY / 2:
            self._last_suspension_check = time.monotonic()
            super().check_for_suspension(burst)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is None and time.monotonic() - self._last_beat < HEARTBEAT_EVERY:
            return
        self._last_beat = time.monotonic()
        super().heartbeat(timeout, pipeline)

    # -- one job ---------------------------------------------------------------------------------

    def execute_job(self, job, queue) -> None:
        self.set_state("busy")
        try:
            self._execute(job, queue)
        finally:
            self.set_state("idle")

    def _execute(self, job, queue) -> None:
        entry = f"{job.id}:{uuid.uuid4().hex[:12]}"
        registry = StartedJobRegistry(queue.name, connection=self.connection, job_class=SbxJob,
                                      serializer=MsgpackSerializer)
        started = now()
        job.started_at, job.worker_name = started, self.name
        timeout = int(job.timeout) if job.timeout and job.timeout > 0 else DEFAULT_JOB_TIMEOUT
        with self.connection.pipeline() as pipe:
            pipe.hset(job.key, mapping={
                "status": JobStatus.STARTED.value,
                "started_at": utcformat(started),
                "last_heartbeat": utcformat(started),
                "worker_name": self.name,
            })
            pipe.persist(job.key)
            pipe.zadd(registry.key, {entry: current_timestamp() + timeout + REGISTRY_MARGIN})
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.exists(cancel_key(job.id))
            cancelled = pipe.execute()[-1]
        job._status = JobStatus.STARTED
        job.cancel_requested = bool(cancelled)  # read by workers.tasks before the run starts

        reason = job.refusal() if isinstance(job, SbxJob) else "not an sbx job"
        if reason is not None:
            self.log.warning("Worker %s: refused job %s: %s", self.name, job.id, reason)
            self._record_failure(job, registry.key, entry, f"refused: {reason}")
            return
        try:
            value = job.perform()
        except Exception:  # a bug in a job function, not the untrusted code (that is a verdict)
            self.log.exception("Worker %s: job %s raised", self.name, job.id)
            self._record_failure(job, registry.key, entry, traceback.format_exc(limit=20))
            return
        ended = now()
        job.ended_at = ended
        ttl = job.get_result_ttl(self.default_result_ttl)
        with self.connection.pipeline() as pipe:
            pipe.hset(job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": utcformat(ended)})
            Result.create(job, Result.Type.SUCCESSFUL, ttl, return_value=value, worker_name=self.name,
                          pipeline=pipe, execution_started_at=started, execution_ended_at=ended)
            if ttl > 0:
                pipe.expire(job.key, ttl)
            pipe.zrem(registry.key, entry)
            if self.on_finish is not None:
                self.on_finish(pipe)
            pipe.execute()
        job._status = JobStatus.FINISHED

    def _record_failure(self, job, registry_key: str, entry: str, reason: str) -> None:
        ended = now()
        job.ended_at = ended
        ttl = job.failure_ttl or self.default_result_ttl
        with self.connection.pipeline() as pipe:
            pipe.hset(job.key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(ended)})
            Result.create_failure(job, ttl, exc_string=reason, worker_name=self.name, pipeline=pipe,
                                  execution_started_at=job.started_at, execution_ended_at=ended)
            pipe.expire(job.key, ttl)
            pipe.zrem(registry_key, entry)
            pipe.execute()
        job._status = JobStatus.FAILED
