"""Queue names, Redis key layout, the Redis connection factory and enqueueing.

This is the API's only way into the workers: it builds a `workers.protocol` payload and calls
`JobQueue.submit_*`; it reads runs back through `workers.records`. Everything here speaks rq
with the msgpack serializer and the allow-listed job class, so the API and the workers agree
on the format by construction.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from typing import Literal
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.connection import HiredisRespSerializer
from rq import Queue

from sandbox.errors import InvalidSpec, Unavailable
from workers.jobclass import SbxJob
from workers.protocol import PullJob, RunJob, VolumeJob, encode
from workers.serializer import MsgpackSerializer

QUEUE_NAME = "sbx"
"""The rq queue every sbx worker listens on."""
VOLUME_QUEUE = "sbx-volumes"
"""The rq queue of jobs that need the volume host: runs that mount volumes, and volume
operations. Only the workers of the one host that keeps the volumes listen on it."""
VOLUME_HOST_KEY = "sbx:volumes:host"
"""The host name of the volume host, claimed by its first worker (SET NX)."""

RUN_FUNCTION = "workers.tasks.run"
PULL_FUNCTION = "workers.tasks.pull"
VOLUME_FUNCTION = "workers.tasks.volume"

WORKERS_SET = "sbx:workers"
"""Set of worker names that registered; a name is alive while its `worker_key` exists."""

METRICS_VERDICTS = "sbx:metrics:verdicts"
"""Hash verdict -> count of finished runs."""
METRICS_LATENCY = "sbx:metrics:latency"
"""Hash of a Prometheus histogram of seconds from enqueue to end: `le=<bound>`, `sum`, `count`."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the latency histogram; +Inf is implied."""

LOCAL_IMAGES = "sbx:images:local"
"""Hash image name -> msgpack ImageInfo, published by workers for images they hold locally."""

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
"""Run ids are uuid4 hex; anything else is refused before it becomes a Redis key."""


def worker_key(name: str) -> str:
    """Liveness hash of a worker process; expires unless the worker keeps beating."""
    return f"sbx:worker:{name}"


def control_key(name: str) -> str:
    """List a worker process pops control messages from (run ids to kill)."""
    return f"sbx:ctl:{name}"


def cancel_key(run_id: str) -> str:
    """Marker: the run was cancelled by its owner."""
    return f"sbx:cancel:{run_id}"


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL off loopback without a password (no default passwords either)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise InvalidSpec(f"redis url: unsupported scheme {parts.scheme!r}", field="redis_url")
    if parts.scheme != "unix" and not _is_loopback(parts.hostname) and not parts.password:
        raise InvalidSpec(
            "redis url: a Redis server off loopback needs a password in the URL", field="redis_url"
        )


def connect(url: str, *, block_seconds: float = 0.0) -> redis.Redis:
    """A Redis client whose socket timeout stays above the longest blocking call it makes.

    redis-py's default socket timeout would cut a blocking XREAD/BLPOP short and fail late and
    confusingly, so callers pass the longest block they will ask for.
    """
    check_redis_url(url)
    return redis.Redis.from_url(
        url,
        socket_timeout=max(block_seconds, 0.0) + 5.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=False,
    )


def is_ready(connection: redis.Redis) -> bool:
    """Whether Redis answers PING: False while it is down or still loading its dataset."""
    try:
        return bool(connection.ping())
    except redis.exceptions.ConnectionError:  # BusyLoadingError ("LOADING") is one
        return False


def wait_until_ready(connection: redis.Redis, *, timeout: float) -> None:
    """Block until Redis answers PING, at most `timeout` seconds (then Unavailable).

    After a restart Redis replays its append-only file before it serves anything; with a
    result TTL's worth of runs that took ~7 s here, and a worker that started meanwhile died
    on LOADING and was restarted every second."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not is_ready(connection):
        if time.monotonic() >= deadline:
            raise Unavailable(f"Redis did not answer within {timeout:g}s", retry_after=5)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class _HiredisPacking:
    """Commands packed by hiredis, as redis-py's sync client does when hiredis is installed.

    redis-py's asyncio connections pack every command in Python (an encode() and several
    isinstance checks per argument): a sixth of the API's CPU per run under load (cProfile).
    The bytes on the wire are the same; the packing is the sync client's own serializer.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args):
        return self._packer.pack(*args)


class _AsyncTcpConnection(_HiredisPacking, redis.asyncio.Connection):
    pass


class _AsyncUnixConnection(_HiredisPacking, redis.asyncio.UnixDomainSocketConnection):
    pass


_HIREDIS_PACKING = {redis.asyncio.Connection: _AsyncTcpConnection,
                    redis.asyncio.UnixDomainSocketConnection: _AsyncUnixConnection}


def connect_async(url: str, *, block_seconds: float = 0.0) -> redis.asyncio.Redis:
    """The asyncio twin of `connect`, for the API's event loop (same URL policy and timeouts)."""
    check_redis_url(url)
    client = redis.asyncio.Redis.from_url(
        url,
        socket_timeout=max(block_seconds, 0.0) + 5.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=False,
    )
    pool = client.connection_pool  # from_url picks the class by scheme; no connection yet
    pool.connection_class = _HIREDIS_PACKING.get(pool.connection_class, pool.connection_class)
    return client


def new_run_id() -> str:
    return uuid.uuid4().hex


class JobQueue:
    """Enqueues sbx jobs on the rq queue, refusing work when the queue is full."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        max_depth: int = 1000,
        result_ttl: int = 3600,
        queued_ttl: int = 3600,
        name: str = QUEUE_NAME,
    ) -> None:
        self.connection = connection
        self.max_depth = max_depth
        self.result_ttl = result_ttl
        self.queued_ttl = queued_ttl
        self.rq = Queue(name, connection=connection, job_class=SbxJob, serializer=MsgpackSerializer)
        self.volume_rq = Queue(VOLUME_QUEUE, connection=connection, job_class=SbxJob,
                               serializer=MsgpackSerializer)

    def depth(self) -> int:
        """Jobs waiting to be taken by a worker."""
        return int(self.connection.llen(self.rq.key))

    def submit_run(self, job: RunJob, *, timeout: int) -> str:
        """Enqueue a run; `timeout` (seconds) bounds how long a worker may hold it."""
        return self._submit(RUN_FUNCTION, encode(job), tenant=job.tenant, kind="run", timeout=timeout,
                            queue=self.volume_rq if job.volumes else None)

    def submit_volume(self, job: VolumeJob, *, timeout: int = 120) -> str:
        """Enqueue a volume operation for the volume host."""
        return self._submit(VOLUME_FUNCTION, encode(job), tenant=job.tenant, kind="volume",
                            timeout=timeout, queue=self.volume_rq)

    def submit_pull(self, job: PullJob, *, tenant: str, timeout: int = 600) -> str:
        return self._submit(PULL_FUNCTION, encode(job), tenant=tenant, kind="pull", timeout=timeout)

    async def submit_run_async(self, aconn: redis.asyncio.Redis, job: RunJob, *, timeout: int) -> str:
        """`submit_run` for the event loop: rq builds the job, asyncio Redis sends it."""
        queue = self.volume_rq if job.volumes else self.rq
        if queue.redis_server_version is None:  # rq asks once per queue; ask without blocking
            version = (await aconn.info("server"))["redis_version"]
            queue.redis_server_version = tuple(int(part) for part in str(version).split(".")[:3])
        run_id, staged = self._stage(RUN_FUNCTION, encode(job), tenant=job.tenant, kind="run",
                                     timeout=timeout, queue=queue)
        async with aconn.pipeline(transaction=True) as pipe:
            for args, options in staged:
                pipe.execute_command(*args, **options)
            depth = (await pipe.execute())[-1] - 1
        if depth >= self.max_depth:
            async with aconn.pipeline(transaction=True) as pipe:
                pipe.lrem(queue.key, 1, run_id)
                pipe.delete(f"{SbxJob.redis_job_namespace_prefix}{run_id}")
                await pipe.execute()
            raise Unavailable(f"queue full ({depth} jobs waiting); retry later", retry_after=2)
        return run_id

    def _stage(
        self, func: str, payload: bytes, *, tenant: str, kind: Literal["run", "pull", "volume"],
        timeout: int, queue: Queue,
    ) -> tuple[str, list[tuple[tuple, dict]]]:
        """rq's own enqueue, recorded instead of sent: the commands (ending with LLEN of the
        queue) that `_submit` runs in one transaction, for any client to send."""
        run_id = new_run_id()
        pipe = self.connection.pipeline()
        try:
            self._enqueue(queue, func, payload, run_id, tenant=tenant, kind=kind, timeout=timeout, pipe=pipe)
            pipe.llen(queue.key)
            return run_id, list(pipe.command_stack)
        finally:
            pipe.reset()

    def _enqueue(self, queue: Queue, func: str, payload: bytes, run_id: str, *, tenant: str, kind: str,
                 timeout: int, pipe) -> None:
        queue.enqueue_call(
            func,
            args=(payload,),
            job_id=run_id,
            timeout=timeout,
            result_ttl=self.result_ttl,
            failure_ttl=self.result_ttl,
            ttl=self.queued_ttl,
            meta={"tenant": tenant, "kind": kind},
            pipeline=pipe,
        )

    def _submit(
        self, func: str, payload: bytes, *, tenant: str, kind: Literal["run", "pull", "volume"],
        timeout: int, queue: Queue | None = None,
    ) -> str:
        queue = queue or self.rq
        run_id = new_run_id()
        # One round trip: the depth is read in the same transaction that enqueues; a job that
        # found the queue full is taken back out (rare, and only then costs a second trip).
        with self.connection.pipeline() as pipe:
            self._enqueue(queue, func, payload, run_id, tenant=tenant, kind=kind, timeout=timeout, pipe=pipe)
            pipe.llen(queue.key)
            depth = pipe.execute()[-1] - 1  # jobs that were waiting before this one
        if depth >= self.max_depth:
            with self.connection.pipeline() as pipe:
                pipe.lrem(queue.key, 1, run_id)
                pipe.delete(f"{SbxJob.redis_job_namespace_prefix}{run_id}")
                pipe.execute()
            raise Unavailable(f"queue full ({depth} jobs waiting); retry later", retry_after=2)
        return run_id
