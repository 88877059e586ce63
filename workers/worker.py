"""sbx's rq worker: non-forking, allow-listed, without rq's job-time alarm.

`SbxWorker` is rq's SimpleWorker (no fork per job; the sandbox isolates the code, and forking
costs a lot per job, see the README's figures) with three changes:
- a job whose function is not one of sbx's (`SbxJob.refusal`) is failed with the reason
  "refused: ..." without importing or calling anything;
- no SIGALRM death penalty: interrupting the runtime mid-setup could leak a container, and
  the runtime enforces the run's wall-time limit itself;
- the msgpack serializer and the allow-listed job class are fixed.
"""

from __future__ import annotations

import threading

from rq.timeouts import BaseDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker

from workers.jobclass import SbxJob
from workers.serializer import MsgpackSerializer

WORKER_TTL = 60
"""Seconds rq keeps its own worker record; rq blocks on the queue for WORKER_TTL - 15."""


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

    def _install_signal_handlers(self) -> None:
        # Only the main thread may install handlers; tests run burst workers in threads.
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def perform_job(self, job, queue, execution) -> bool:  # type: ignore[override]
        reason = job.refusal() if isinstance(job, SbxJob) else "not an sbx job"
        if reason is None:
            return super().perform_job(job, queue, execution)
        self.log.warning("Worker %s: refused job %s: %s", self.name, job.id, reason)
        self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        job.retries_left = None
        job.started_at = job.started_at or now()
        job.ended_at = now()
        self.handle_job_failure(job, queue, exc_string=f"refused: {reason}", execution=execution)
        return False
