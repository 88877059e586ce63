"""Liveness of worker processes, cancel delivery, and the janitor for runs whose worker died.

Each worker process runs one `Beacon` thread with its own Redis connection. It
- keeps `sbx:worker:<name>` alive (a hash with a TTL of a few beats) holding what /v1/health
  reports: host, pid, limits mode, the run in progress;
- pops its control list (`sbx:ctl:<name>`) with a blocking BLPOP between beats, and hands the
  run ids to kill to the worker (the API pushes them on DELETE of a running run);
- every few seconds sweeps rq's started-job registry: a run whose worker's liveness key has
  expired (the process was SIGKILLed, the machine died) is marked failed with a clear reason,
  so it never stays "running" forever. Every worker sweeps; the first one to see it wins.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.utils import now, parse_composite_key, utcformat

from workers.jobclass import SbxJob
from workers.queues import QUEUE_NAME, VOLUME_QUEUE, WORKERS_SET, control_key, worker_key
from workers.serializer import MsgpackSerializer

log = logging.getLogger("sbx.worker")


def abandoned_reason(worker: str) -> str:
    return (
        f"worker {worker} stopped responding while the run was in progress "
        "(killed or crashed); the run was abandoned"
    )


def sweep_abandoned(connection: redis.Redis, *, queue_name: str | None = None) -> list[str]:
    """Fail every started run whose worker is no longer alive; return their ids.
    Without `queue_name`: both queues (runs, and runs and operations on volumes)."""
    if queue_name is None:
        return [*sweep_abandoned(connection, queue_name=QUEUE_NAME),
                *sweep_abandoned(connection, queue_name=VOLUME_QUEUE)]
    registry = StartedJobRegistry(
        queue_name, connection=connection, job_class=SbxJob, serializer=MsgpackSerializer
    )
    entries = [e.decode() if isinstance(e, bytes) else e for e in connection.zrange(registry.key, 0, -1)]
    failed: list[str] = []
    for entry in entries:
        job_id, _execution = parse_composite_key(entry)
        try:
            job = SbxJob.fetch(job_id, connection=connection, serializer=MsgpackSerializer)
        except NoSuchJobError:
            connection.zrem(registry.key, entry)
            continue
        worker = job.worker_name or ""
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue
        if worker and connection.exists(worker_key(worker)):
            continue
        with connection.pipeline() as pipe:
            pipe.watch(job.key)
            if pipe.hget(job.key, "status") != JobStatus.STARTED.value.encode():
                pipe.unwatch()
                continue
            pipe.multi()
            record_job_failure(job, abandoned_reason(worker or "(unknown)"), pipe)
            pipe.hset(job.key, "ended_at", utcformat(now()))
            pipe.zrem(registry.key, entry)
            try:
                pipe.execute()
            except redis.WatchError:
                continue
        log.warning("run %s abandoned by dead worker %s: marked failed", job_id, worker)
        failed.append(job_id)
    return failed


class Beacon(threading.Thread):
    """The liveness, control and janitor thread of one worker process."""

    def __init__(
        self,
        connection: redis.Redis,
        name: str,
        *,
        interval: float,
        ttl: int,
        janitor_interval: float,
        info: dict[str, str],
        on_kill: Callable[[str], None],
        current: Callable[[], str] = lambda: "",
    ) -> None:
        super().__init__(name=f"beacon-{name}", daemon=True)
        self.connection = connection
        self.worker_name = name
        self.interval = interval
        self.ttl = ttl
        self.janitor_interval = janitor_interval
        self.info = {"host": socket.gethostname(), "pid": str(os.getpid()), **info}
        self.on_kill = on_kill
        self.current = current
        self._stop = threading.Event()
        self._last_sweep = 0.0

    def register(self) -> None:
        """Announce the worker before it takes any job (the janitor relies on this order)."""
        key = worker_key(self.worker_name)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={**self.info, "started": str(time.time()), "current": ""})
            pipe.expire(key, self.ttl)
            pipe.sadd(WORKERS_SET, self.worker_name)
            pipe.execute()

    def beat(self) -> None:
        key = worker_key(self.worker_name)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={**self.info, "current": self.current(), "beat": str(time.time())})
            pipe.expire(key, self.ttl)
            pipe.execute()

    def unregister(self) -> None:
        with self.connection.pipeline() as pipe:
            pipe.delete(worker_key(self.worker_name), control_key(self.worker_name))
            pipe.srem(WORKERS_SET, self.worker_name)
            pipe.execute()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        ctl = control_key(self.worker_name)
        while not self._stop.is_set():
            try:
                self.beat()
                popped = self.connection.blpop([ctl], timeout=self.interval)
                if popped is not None:
                    self.on_kill(popped[1].decode())
                if time.monotonic() - self._last_sweep >= self.janitor_interval:
                    self._last_sweep = time.monotonic()
                    sweep_abandoned(self.connection)
            except redis.RedisError as exc:
                log.warning("beacon: redis error %s; retrying", exc)
                self._stop.wait(min(self.interval, 1.0))
            except Exception:  # never let the beacon die silently: a dead beacon fails our runs
                log.exception("beacon: unexpected error")
                self._stop.wait(min(self.interval, 1.0))
