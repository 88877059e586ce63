"""The queue's safety rules without Redis: serializer, job allow-list, Redis URL policy."""

from __future__ import annotations

import pickle

import pytest
import redis
from rq.job import Callback

from sandbox.errors import InvalidSpec
from workers.jobclass import ALLOWED_FUNCTIONS, JobRefused, SbxJob
from workers.queues import check_redis_url
from workers.serializer import MsgpackSerializer


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_serializer_round_trips_plain_data_only():
    data = ["workers.tasks.run", None, [b"\x00payload"], {}]
    assert MsgpackSerializer.loads(MsgpackSerializer.dumps(tuple(data))) == data
    with pytest.raises(TypeError):
        MsgpackSerializer.dumps(Evil())
    with pytest.raises(Exception):
        MsgpackSerializer.loads(pickle.dumps(Evil()))


NO_REDIS = redis.Redis(host="127.0.0.1", port=1)
"""A client that is never used: creating and inspecting jobs needs no server."""


def job(func: str, *args, **kwargs) -> SbxJob:
    return SbxJob.create(func, args=list(args) or [b"payload"], serializer=MsgpackSerializer,
                         connection=NO_REDIS, **kwargs)


def test_only_sbx_functions_resolve():
    assert job("workers.tasks.run").refusal() is None
    assert job("workers.tasks.pull").refusal() is None
    for name in ("os.system", "subprocess.run", "builtins.eval", "workers.tasks._ctx", "workers.tasks"):
        j = job(name)
        assert "not one of sbx's job functions" in j.refusal()
        with pytest.raises(JobRefused):
            j.func
    assert job("workers.tasks.run").func.__name__ == "run"
    assert ALLOWED_FUNCTIONS == {"workers.tasks.run", "workers.tasks.pull", "workers.tasks.volume"}


def test_callbacks_arguments_and_dependencies_are_refused():
    assert "callbacks" in job("workers.tasks.run", on_success=Callback("os.system")).refusal()
    assert "callbacks" in job("workers.tasks.run", on_failure=Callback("os.system")).refusal()
    assert "exactly one encoded payload" in job("workers.tasks.run", "a", "b").refusal()
    assert "exactly one encoded payload" in job("workers.tasks.run", "not-bytes").refusal()
    assert "dependencies" in job("workers.tasks.run", depends_on=["x" * 32]).refusal()
    with pytest.raises(JobRefused):
        job("workers.tasks.run", on_success=Callback("os.system")).success_callback


def test_undecodable_job_data_is_refused():
    j = SbxJob(connection=NO_REDIS, serializer=MsgpackSerializer)
    j.data = pickle.dumps(("os.system", None, ["id"], {}))
    assert "cannot be decoded" in j.refusal()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://localhost/0", "redis://[::1]:6379",
                                 "redis://:secret@10.0.0.5:6379/0", "unix:///run/redis.sock"])
def test_redis_urls_allowed(url):
    check_redis_url(url)


@pytest.mark.parametrize("url", ["redis://10.0.0.5:6379/0", "redis://redis.example:6379", "http://127.0.0.1"])
def test_redis_off_loopback_needs_a_password(url):
    with pytest.raises(InvalidSpec):
        check_redis_url(url)


def test_staged_enqueue_is_rqs_own_commands_without_io():
    """The API's async submit replays what rq's enqueue would send: the job hash, its queue
    entry, and the depth read last. Staging sends nothing (this client has no server)."""
    from sandbox.spec import RunSpec
    from workers.protocol import RunJob, encode
    from workers.queues import RUN_FUNCTION, JobQueue

    queue = JobQueue(NO_REDIS)
    queue.rq.redis_server_version = (7, 0, 0)
    payload = encode(RunJob(tenant="t", image="busybox", spec=RunSpec(cmd=["true"])))
    run_id, staged = queue._stage(RUN_FUNCTION, payload, tenant="t", kind="run", timeout=60, queue=queue.rq)
    commands = [args[0] for args, _options in staged]
    assert commands[-1] == "LLEN" and staged[-1][0][1] == queue.rq.key
    assert ("RPUSH", queue.rq.key, run_id) in [args[:3] for args, _ in staged]
    hset = next(args for args, _ in staged if args[0] == "HSET" and args[1] == f"rq:job:{run_id}"
                and "data" in args)
    fields = dict(zip(hset[2::2], hset[3::2]))
    job = SbxJob(run_id, connection=NO_REDIS, serializer=MsgpackSerializer)
    def wire(value):  # what redis-py's encoder sends for each value
        if isinstance(value, bytes):
            return value
        return value.encode() if isinstance(value, str) else str(value).encode()

    job.restore({k.encode(): wire(v) for k, v in fields.items()})
    assert job.func_name == RUN_FUNCTION and job.args == [payload] and job.refusal() is None
    assert job.meta == {"tenant": "t", "kind": "run"}


def test_async_connections_pack_commands_as_redis_py_does():
    """The API's asyncio Redis connections pack with hiredis; the wire bytes are redis-py's."""
    import asyncio

    import redis.asyncio

    from workers.queues import connect_async

    commands = [("SET", "k", "välue"), ("HSET", b"rq:job:x", "n", 7, "f", 1.5),
                ("CONFIG GET", "maxmemory"), (b"CLIENT SETNAME", "api"),
                ("XREAD", "BLOCK", 1000, "STREAMS", "s", "0-0"),
                ("SET", "m", memoryview(b"bytes")), ("SET", "b", bytearray(b"ba"))]
    for url, plain in (("redis://127.0.0.1:1/0", redis.asyncio.Connection),
                       ("unix:///tmp/none.sock?db=0", redis.asyncio.UnixDomainSocketConnection)):
        client = connect_async(url)
        pool = client.connection_pool
        fast = pool.connection_class(**pool.connection_kwargs)
        reference = plain(**pool.connection_kwargs)
        assert type(fast) is not plain and isinstance(fast, plain)
        for cmd in commands:
            assert b"".join(fast.pack_command(*cmd)) == b"".join(
                bytes(p) for p in reference.pack_command(*cmd)), cmd
        asyncio.run(client.aclose())
