"""Worker models compared: rq's forking Worker, rq's SimpleWorker, and sbx's SbxWorker.

    python loadtest/bench_queue.py [--jobs 400] [--rounds 3] [--redis-url URL]

Each round enqueues the same no-op sbx job (`workers.tasks.run` with a runtime that returns
OK at once, so only the queue's cost is measured) and lets one worker of each kind drain it in
burst mode, interleaved (A B C, A B C, ...) because this machine is shared and noisy. Prints,
per model, the median jobs/s, CPU ms per job (worker process and its children) and Redis
commands per job (from INFO commandstats), and the ratios to SbxWorker.
Without --redis-url a private redis-server is started on a free loopback port.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rq import SimpleWorker, Worker  # noqa: E402

from sandbox.spec import RunResult, RunSpec, Verdict  # noqa: E402
from workers import tasks  # noqa: E402
from workers.images import ImageResolver  # noqa: E402
from workers.jobclass import SbxJob  # noqa: E402
from workers.protocol import RunJob  # noqa: E402
from workers.queues import QUEUE_NAME, JobQueue, connect  # noqa: E402
from workers.serializer import MsgpackSerializer  # noqa: E402
from workers.worker import SbxWorker  # noqa: E402


class NullRuntime:
    """Returns OK without running anything: the benchmark measures the queue alone."""

    def run(self, spec, rootfs, *, key=None):
        return RunResult(verdict=Verdict.OK, exit_code=0)


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            if connect(url).ping():
                return proc, url
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def commands(conn) -> int:
    return sum(v["calls"] for v in conn.info("commandstats").values())


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_round(kind: str, url: str, jobs: int) -> dict:
    conn = connect(url, block_seconds=60)
    conn.flushdb()
    queue = JobQueue(conn, max_depth=jobs + 10)
    payload = RunJob(tenant="bench", image="busybox", spec=RunSpec(cmd=["true"]))
    for _ in range(jobs):
        queue.submit_run(payload, timeout=60)
    if kind == "Worker (fork)":
        worker = Worker([QUEUE_NAME], connection=conn, job_class=SbxJob, serializer=MsgpackSerializer)
    elif kind == "SimpleWorker":
        worker = SimpleWorker([QUEUE_NAME], connection=conn, job_class=SbxJob, serializer=MsgpackSerializer)
    else:
        worker = SbxWorker([QUEUE_NAME], connection=conn, name=f"bench-{time.monotonic_ns()}")
    before_cmds, before_cpu, started = commands(conn), cpu_seconds(), time.perf_counter()
    worker.work(burst=True, logging_level="ERROR")
    elapsed = time.perf_counter() - started
    cpu, cmds = cpu_seconds() - before_cpu, commands(conn) - before_cmds - 1
    done = sum(1 for key in conn.scan_iter("rq:job:*") if conn.hget(key, "status") == b"finished")
    if done != jobs:
        raise SystemExit(f"{kind}: only {done} of {jobs} jobs finished")
    return {"jobs_per_s": jobs / elapsed, "cpu_ms": cpu / jobs * 1000, "cmds": cmds / jobs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-"))
    proc = None
    url = args.redis_url
    if not url:
        proc, url = start_redis(tmp)
    tasks.bind(tasks.WorkerContext(name="bench", connection=connect(url), runtime=NullRuntime(),
                                   images=ImageResolver({"busybox": str(tmp)})))
    kinds = ["Worker (fork)", "SimpleWorker", "SbxWorker"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for _ in range(args.rounds):
            for kind in kinds:
                results[kind].append(one_round(kind, url, args.jobs))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.jobs} no-op sbx jobs per round, {args.rounds} rounds interleaved, burst mode, medians:")
    base = {m: statistics.median(r[m] for r in results["SbxWorker"]) for m in ("jobs_per_s", "cpu_ms", "cmds")}
    for kind in kinds:
        med = {m: statistics.median(r[m] for r in results[kind]) for m in ("jobs_per_s", "cpu_ms", "cmds")}
        print(f"  {kind:<14} {med['jobs_per_s']:7.0f} jobs/s ({med['jobs_per_s'] / base['jobs_per_s']:.2f}x)  "
              f"{med['cpu_ms']:5.2f} ms CPU/job  {med['cmds']:5.1f} Redis commands/job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
