"""Shared pieces of the service tests: real worker processes, an API client, a private Redis.

Workers run as `python -m workers.main --single` subprocesses (the real entrypoint, the real
runtime, a busybox root filesystem as the local image "busybox"); the API runs in-process
through Litestar's test client against the same Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from litestar.testing import TestClient

from api.app import create_app
from api.settings import Settings
from tests.fixtures.ports import free_port, wait_until
from tests.fixtures.procs import ServerProcess
from workers.queues import WORKERS_SET, worker_key

REPO = Path(__file__).resolve().parents[2]
KEY_ALICE = "alice-key-0123456789abcdef"
KEY_BOB = "bob-key-0123456789abcdef0"
ALICE = {"Authorization": f"Bearer {KEY_ALICE}"}
BOB = {"Authorization": f"Bearer {KEY_BOB}"}


def live_workers(url: str) -> list[str]:
    conn = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return [n.decode() for n in conn.smembers(WORKERS_SET) if conn.exists(worker_key(n.decode()))]
    finally:
        conn.close()


class WorkerProcess:
    """One `workers.main --single` process with its own state directory."""

    def __init__(self, url: str, rootfs: Path, state_dir: Path, *,
                 known: set[str] | None = None, **env: str) -> None:
        """`known`: the workers already registered, when Redis cannot be asked yet."""
        self.url = url
        before = set(live_workers(url)) if known is None else known
        environ = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "SBX_REDIS_URL": url,
            "SBX_STATE_DIR": str(state_dir),
            "SBX_LOCAL_IMAGES": f"busybox={rootfs}",
            "SBX_HEARTBEAT_INTERVAL": "0.5",
            "SBX_JANITOR_INTERVAL": "0.5",
            **env,
        }
        self.log_path = state_dir / "worker.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.main", "--single"],
            cwd=REPO,
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.name = ""

        def registered() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.log()}")
            new = set(live_workers(url)) - before
            if new:
                self.name = new.pop()
            return bool(self.name)

        wait_until(registered, timeout=60, what="sbx worker")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def worker_factory(redis_url: str, busybox_rootfs: Path, tmp_path_factory) -> Iterator:
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        state = tmp_path_factory.mktemp("worker-state")
        w = WorkerProcess(redis_url, busybox_rootfs, state, **env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def worker(worker_factory) -> WorkerProcess:
    return worker_factory()


def make_settings(url: str, **overrides) -> Settings:
    values = dict(redis_url=url, api_keys={KEY_ALICE: "alice", KEY_BOB: "bob"}, max_wait=20.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(redis_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url))) as c:
        yield c


class PrivateRedis:
    """A redis-server the test may stop and start again on the same port."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server: ServerProcess | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.server = ServerProcess(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *self.extra_args],
            log_path=self.workdir / f"redis-{time.monotonic_ns()}.log",
        )

        def up() -> bool:
            c = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(c.ping())
            finally:
                c.close()

        wait_until(up, timeout=15, what="private redis")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def test_worker_process_registers_with_limits_mode(worker, redis_url):
    """The worker entrypoint self-tests, registers, and reports its limits mode in Redis."""
    conn = redis.Redis.from_url(redis_url)
    info = conn.hgetall(worker_key(worker.name))
    assert info[b"limits_mode"].decode() in ("cgroup-v1", "cgroup-v2", "rlimit")
    assert int(info[b"pid"]) == worker.proc.pid
    assert conn.ttl(worker_key(worker.name)) > 0
