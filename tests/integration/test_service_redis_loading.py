"""A Redis that is still loading its dataset (after a restart it replays its append-only
file): workers and `sbx up` wait for it instead of dying on LOADING."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from sandbox.errors import Unavailable
from tests.fixtures.ports import wait_until
from tests.integration.test_service_support import PrivateRedis, WorkerProcess, live_workers
from workers.queues import is_ready, wait_until_ready

KEYS = 40_000
LOAD_DELAY_US = 150
"""Redis's own test knob: microseconds of delay per key loaded, so loading lasts ~6 s: well
over a worker's start-up (runtime and self-test, 1-2 s) before it first asks Redis."""


@pytest.fixture
def loading_redis(tmp_path: Path):
    """A private Redis with KEYS keys, and a function that starts a DEBUG RELOAD (save, then
    load: the server answers LOADING meanwhile) and returns once LOADING was seen."""
    server = PrivateRedis(tmp_path, "--enable-debug-command", "local",
                          "--loading-process-events-interval-bytes", "1024")
    server.start()
    admin = redis.Redis.from_url(server.url, socket_timeout=60)
    admin.execute_command("DEBUG", "POPULATE", KEYS)
    admin.config_set("key-load-delay", LOAD_DELAY_US)
    reloads: list[threading.Thread] = []

    def start_reload() -> threading.Thread:
        thread = threading.Thread(target=admin.execute_command, args=("DEBUG", "RELOAD"))
        thread.start()
        reloads.append(thread)
        probe = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            wait_until(lambda: not is_ready(probe), timeout=10, what="Redis to start loading")
        finally:
            probe.close()
        return thread

    yield server, start_reload
    for thread in reloads:
        thread.join(timeout=60)
    admin.close()
    server.stop()


def test_wait_until_ready_outlasts_loading_and_times_out_on_request(loading_redis):
    server, start_reload = loading_redis
    reload = start_reload()
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        with pytest.raises(Unavailable):
            wait_until_ready(client, timeout=0.2)
        assert reload.is_alive()  # still loading: the timeout, not the load, ended the wait
        wait_until_ready(client, timeout=60)
        assert client.dbsize() == KEYS
    finally:
        client.close()


def test_a_worker_started_while_redis_loads_waits_then_registers(loading_redis, busybox_rootfs,
                                                                 tmp_path_factory):
    server, start_reload = loading_redis
    reload = start_reload()
    worker = WorkerProcess(server.url, busybox_rootfs, tmp_path_factory.mktemp("worker-state"),
                           known=set())
    try:
        assert not reload.is_alive()  # it registered only once loading was over
        assert worker.name in live_workers(server.url)
        log = worker.log()
        assert "waiting for Redis" in log and "Traceback" not in log, log
    finally:
        worker.stop()
