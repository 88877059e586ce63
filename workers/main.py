"""Worker entrypoint: `sbx worker` / `python -m workers.main`.

The parent process is a small supervisor: it refuses to run as root unless it can drop to the
unprivileged service user first, starts N worker processes (one per core by default), restarts
one that dies unexpectedly, and on SIGINT/SIGTERM asks them all to stop (each finishes its
current run, then exits) and waits for them.

Each worker process owns one `Runtime` (its helper process holds the user namespace and is
reused for every job), one `ImageResolver`, one `Beacon` thread (liveness, cancel delivery,
janitor) and one `SbxWorker` loop. It self-tests before taking jobs: a trivial container must
run OK, or the process exits non-zero and takes nothing from the queue.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import uuid

from workers.settings import WorkerSettings

log = logging.getLogger("sbx.worker")

RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds the supervisor waits before restarting a worker that died, by consecutive deaths."""
REDIS_WAIT = 300.0
"""Seconds a starting worker waits for Redis to answer (it may be replaying its data)."""


def drop_privileges(user: str) -> None:
    """If running as root, become `user` (its uid, gid and groups); refuse if that fails."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SystemExit(f"sbx worker: refusing to run as root and no user {user!r} to drop to")
    if entry.pw_uid == 0:
        raise SystemExit(f"sbx worker: refusing to run as root (user {user!r} is uid 0)")
    os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = entry.pw_name
    if os.geteuid() == 0 or os.getuid() == 0:
        raise SystemExit("sbx worker: could not drop root privileges")


def make_runtime(settings: WorkerSettings):
    from sandbox.runner import Runtime  # the runtime is only ever loaded in worker processes

    return Runtime(settings.runtime)


def make_store(settings: WorkerSettings):
    """The image store adapter, or None when sandbox.oci has no store yet."""
    try:
        from workers.store_adapter import StoreAdapter
    except ImportError:
        return None
    return StoreAdapter(settings.runtime)


def worker_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def run_one(settings: WorkerSettings, *, burst: bool = False) -> int:
    """One worker process: runtime, self-test, beacon, rq loop. Returns an exit status."""
    from workers import tasks
    from workers.images import ImageResolver
    from workers.liveness import Beacon
    from workers.queues import (LOCAL_IMAGES, QUEUE_NAME, VOLUME_QUEUE, connect, is_ready,
                                wait_until_ready)
    from workers.worker import WORKER_TTL, SbxWorker
    from workers.protocol import encode

    name = worker_name()
    runtime = make_runtime(settings)
    try:
        images = ImageResolver(settings.local_images, store=make_store(settings))
        if settings.self_test:
            problem = tasks.self_test(runtime, images, settings.self_test_image, settings.self_test_cmd)
            if problem:
                log.error("worker %s: %s; not taking jobs", name, problem)
                return 3
        health = runtime.health() if hasattr(runtime, "health") else {}
        connection = connect(settings.redis_url, block_seconds=WORKER_TTL)
        beacon_conn = connect(settings.redis_url, block_seconds=settings.heartbeat_interval + 1)
        if not is_ready(connection):
            log.warning("worker %s: waiting for Redis (down, or loading its data)", name)
            wait_until_ready(connection, timeout=REDIS_WAIT)
        context = tasks.WorkerContext(
            name=name,
            connection=connection,
            runtime=runtime,
            images=images,
            max_outcome_bytes=settings.max_output_bytes,
            defer_metrics=True,
        )
        queues = [QUEUE_NAME]
        if settings.volume_host and claim_volume_host(connection):
            from sandbox.volumes import VolumeStore

            context.volumes = VolumeStore.from_settings(settings.runtime)
            context.volume_wait = settings.runtime.volume_wait
            queues.insert(0, VOLUME_QUEUE)
        beacon = Beacon(
            beacon_conn,
            name,
            interval=settings.heartbeat_interval,
            ttl=settings.liveness_ttl,
            janitor_interval=settings.janitor_interval,
            info={"limits_mode": str(health.get("limits_mode", "unknown"))},
            on_kill=context.kill,
            current=context.current,
        )
        beacon.register()
        for info in images.local_images():
            connection.hset(LOCAL_IMAGES, info.name, encode(info))
        beacon.start()
        tasks.bind(context)
        try:
            worker = SbxWorker(queues, connection=connection, name=name)
            worker.on_finish = context.flush_metrics
            worker.work(burst=burst, logging_level="WARNING")
        finally:
            beacon.stop()
            tasks.bind(None)
            try:
                beacon.unregister()
            except Exception:
                log.warning("worker %s: could not unregister", name)
        return 0
    finally:
        close = getattr(runtime, "close", None)
        if close is not None:
            close()


def claim_volume_host(connection) -> bool:
    """Volumes live on one host: claim that role for this host, or find it is another's."""
    from workers.queues import VOLUME_HOST_KEY

    host = socket.gethostname()
    connection.set(VOLUME_HOST_KEY, host, nx=True)
    holder = (connection.get(VOLUME_HOST_KEY) or b"").decode()
    if holder != host:
        log.warning("volumes live on host %r, not here (%s): not taking volume jobs; delete "
                    "Redis key %s to move them", holder, host, VOLUME_HOST_KEY)
        return False
    return True


def supervise(count: int, argv: list[str]) -> int:
    """Run `count` worker processes until SIGINT/SIGTERM; restart those that die."""
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    command = [sys.executable, "-m", "workers.main", "--single", *argv]
    procs: dict[int, subprocess.Popen] = {}
    deaths: dict[int, int] = {}
    for slot in range(count):
        procs[slot] = subprocess.Popen(command)
    status = 0
    while procs:
        time.sleep(0.2)
        for slot, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del procs[slot]
            if stopping:
                continue
            if code == 3:
                log.error("worker slot %d failed its self-test; not restarting it", slot)
                status = 3
                continue
            deaths[slot] = deaths.get(slot, 0) + 1
            delay = RESTART_BACKOFF[min(deaths[slot], len(RESTART_BACKOFF)) - 1]
            log.warning("worker slot %d exited with %s; restarting in %.0fs", slot, code, delay)
            time.sleep(delay)
            if not stopping:
                procs[slot] = subprocess.Popen(command)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbx worker", description="Run sbx queue workers")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", "-n", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--no-self-test", action="store_true", help="skip the start-up container self-test")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = WorkerSettings.from_env()
    drop_privileges(settings.user)
    overrides = {}
    if args.no_self_test:
        overrides["self_test"] = False
    if overrides:
        import msgspec

        settings = msgspec.structs.replace(settings, **overrides)
    count = args.processes if args.processes is not None else (settings.processes or os.cpu_count() or 1)
    if args.single or count == 1:
        return run_one(settings, burst=args.burst)
    passthrough = (["--burst"] if args.burst else []) + (["--no-self-test"] if args.no_self_test else [])
    return supervise(count, passthrough)


if __name__ == "__main__":
    sys.exit(main())
