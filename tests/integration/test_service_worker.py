"""Workers under attack and under failure: jobs that are not sbx's are refused without running
anything, and a worker SIGKILLed mid-run leaves a failed run (never "running"), no container."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import redis
from rq import Queue
from rq.job import Callback, Job
from rq.serializers import DefaultSerializer

from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    client,
    worker,
    worker_factory,
)
from workers.jobclass import SbxJob
from workers.queues import QUEUE_NAME
from workers.records import RunStatus, load
from workers.serializer import MsgpackSerializer


def _wait_status(conn, job_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        record = load(conn, job_id)
        if record is not None and record.status in statuses:
            return record
        assert time.monotonic() < deadline, f"run {job_id} still {record and record.status}"
        time.sleep(0.05)


def _enqueue(conn, job: Job) -> None:
    Queue(QUEUE_NAME, connection=conn, serializer=MsgpackSerializer).enqueue_job(job)


def test_job_naming_os_system_is_refused(worker, redis_url, tmp_path: Path):
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)
    job = Job.create("os.system", args=[f"touch {marker}"], connection=conn, serializer=MsgpackSerializer, id=uuid.uuid4().hex,
                     meta={"tenant": "alice", "kind": "run"})
    _enqueue(conn, job)
    record = _wait_status(conn, job.id, {RunStatus.FAILED})
    assert "refused" in record.reason and "os.system" in record.reason
    time.sleep(0.2)
    assert not marker.exists()
    assert worker.proc.poll() is None  # the worker survived and keeps working


def test_callbacks_and_pickled_payloads_are_refused(worker, redis_url, tmp_path: Path):
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "pwned-cb"
    os.chmod(tmp_path, 0o777)
    with_callback = Job.create(
        "workers.tasks.run", args=[b"x"], connection=conn, serializer=MsgpackSerializer, id=uuid.uuid4().hex,
        on_success=Callback("os.system"), meta={"tenant": "alice"},
    )
    _enqueue(conn, with_callback)
    # A job written with rq's default (pickle) serializer: must never be unpickled.
    pickled = Job.create("os.system", args=[f"touch {marker}"], connection=conn, serializer=DefaultSerializer)
    Queue(QUEUE_NAME, connection=conn, serializer=DefaultSerializer).enqueue_job(pickled)
    record = _wait_status(conn, with_callback.id, {RunStatus.FAILED})
    assert "callbacks are not accepted" in record.reason
    deadline = time.monotonic() + 20
    while SbxJob.fetch(pickled.id, connection=conn, serializer=MsgpackSerializer).get_status() != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not marker.exists()
    assert worker.proc.poll() is None


def _container_pids(token: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if token.encode() in args and args[0].endswith(b"sleep"):
            pids.append(int(entry))
    return pids


def test_worker_sigkilled_mid_run_fails_the_run_and_leaves_no_container(client, worker, redis_url):
    conn = redis.Redis.from_url(redis_url)
    token = "41.2345"
    r = client.post("/v1/runs", json={"image": "busybox", "cmd": ["sleep", token], "limits": {"wall_time": 60}},
                    headers=ALICE)
    run_id = r.json()["id"]
    _wait_status(conn, run_id, {RunStatus.RUNNING})
    deadline = time.monotonic() + 10
    while not _container_pids(token):
        assert time.monotonic() < deadline, "container never started"
        time.sleep(0.05)
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker only, not its process group
    worker.proc.wait(timeout=10)
    got = client.get(f"/v1/runs/{run_id}", headers=ALICE)
    deadline = time.monotonic() + 15
    while got.json()["status"] == "running":
        assert time.monotonic() < deadline, "run stayed running after its worker died"
        time.sleep(0.2)
        got = client.get(f"/v1/runs/{run_id}", headers=ALICE)
    body = got.json()
    assert body["status"] == "failed"
    assert "stopped responding" in body["error"]["message"]
    assert body["finished_at"] is not None
    deadline = time.monotonic() + 15
    while _container_pids(token):
        assert time.monotonic() < deadline, "the dead worker's container is still running"
        time.sleep(0.2)


def test_other_worker_sweeps_a_dead_workers_run(worker_factory, redis_url, client):
    conn = redis.Redis.from_url(redis_url)
    doomed = worker_factory()
    r = client.post("/v1/runs", json={"image": "busybox", "cmd": ["sleep", "40.5"], "limits": {"wall_time": 60}},
                    headers=ALICE)
    run_id = r.json()["id"]
    _wait_status(conn, run_id, {RunStatus.RUNNING})
    survivor = worker_factory()
    os.kill(doomed.proc.pid, signal.SIGKILL)
    # Nobody reads the run through the API: the surviving worker's janitor must fail it.
    deadline = time.monotonic() + 15
    while SbxJob.fetch(run_id, connection=conn, serializer=MsgpackSerializer).get_status() != "failed":
        assert time.monotonic() < deadline, "janitor did not fail the abandoned run"
        time.sleep(0.1)
    assert survivor.proc.poll() is None
    done = client.post("/v1/runs", json={"image": "busybox", "cmd": ["echo", "ok"], "wait": True}, headers=ALICE)
    assert done.json()["result"]["stdout"] == "ok\n"
