"""Load generator for the HTTP API: POST /v1/runs with `wait` at a given concurrency.

    python loadtest/load_api.py --url http://127.0.0.1:8000 --concurrency 8 --seconds 60

Every answer is checked (HTTP 200, status "done", verdict OK, expected stdout). Prints
throughput, p50/p95/p99 latency and the error count; then, unless --no-direct, the same
figures for the same run called directly on the runtime in this process (so the share of
the queue and HTTP in the cost is visible); then checks the service left nothing behind:
queue empty, no run still marked running, workers idle, no container process alive, and
(with --state-dir) no per-run scratch directory left.
Request loops are bounded by --seconds and by --max-requests; traffic goes to --url only,
which must be a loopback address.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[index]


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    busy: float = 0.0
    """Machine-wide busy CPU seconds during the phase (set by the caller)."""

    def report(self, label: str, elapsed: float) -> dict:
        lat = sorted(self.latencies)
        n = len(lat)
        figures = {
            "label": label,
            "requests": n + len(self.errors),
            "ok": n,
            "errors": len(self.errors),
            "seconds": round(elapsed, 2),
            "throughput_per_s": round(n / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(percentile(lat, 50) * 1000, 2),
            "p95_ms": round(percentile(lat, 95) * 1000, 2),
            "p99_ms": round(percentile(lat, 99) * 1000, 2),
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else float("nan"),
            "machine_cpu_ms_per_run": round(self.busy / n * 1000, 2) if n else float("nan"),
        }
        print(
            f"{label:>8}: {figures['ok']} ok, {figures['errors']} errors in {figures['seconds']}s: "
            f"{figures['throughput_per_s']} runs/s, p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, "
            f"p99 {figures['p99_ms']} ms; machine CPU {figures['machine_cpu_ms_per_run']} ms/run"
        )
        for err in self.errors[:5]:
            print(f"          error: {err}")
        return figures


def check_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"load_api: refusing to load a non-loopback address {host}")
    return host, parts.port or 80


def http_load(url: str, key: str, body: dict, expect_stdout: str, concurrency: int, seconds: float,
              max_requests: int) -> tuple[Stats, float]:
    host, port = check_loopback(url)
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    stats = Stats()
    deadline = time.monotonic() + seconds
    issued = 0
    issued_lock = threading.Lock()

    def worker() -> None:
        nonlocal issued
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while time.monotonic() < deadline:
            with issued_lock:
                if issued >= max_requests:
                    return
                issued += 1
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/runs", body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                took = time.perf_counter() - started
                answer = json.loads(raw)
                problem = None
                if response.status != 200:
                    problem = f"HTTP {response.status}: {raw[:200]!r}"
                elif answer.get("status") != "done":
                    problem = f"status {answer.get('status')}"
                elif answer["result"]["verdict"] != "OK":
                    problem = f"verdict {answer['result']['verdict']}: {answer['result'].get('message')}"
                elif answer["result"]["stdout"] != expect_stdout:
                    problem = f"stdout {answer['result']['stdout'][:100]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                took = time.perf_counter() - started
                problem = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                time.sleep(0.1)  # the server is down or refusing: do not spin
            with stats.lock:
                if problem:
                    stats.errors.append(problem)
                else:
                    stats.latencies.append(took)
        conn.close()

    return stats, run_threads(worker, concurrency, stats)


def run_threads(worker, concurrency: int, stats: "Stats") -> float:
    """Run `worker` in `concurrency` threads; record the machine's busy CPU seconds in
    stats.busy and return the elapsed seconds."""
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started, busy = time.monotonic(), machine_busy_seconds()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats.busy = machine_busy_seconds() - busy
    return time.monotonic() - started


def direct_load(image: str, cmd: list[str], concurrency: int, seconds: float, max_requests: int,
                state_dir: str | None, rootfs_dir: str | None) -> tuple[Stats, float]:
    """The same run on the runtime in this process (threads share one Runtime, as a worker does)."""
    sys.path.insert(0, str(REPO))
    from sandbox.config import RuntimeSettings
    from sandbox.runner import Runtime
    from sandbox.spec import Rootfs, RunSpec, Verdict

    overrides = {"state_dir": state_dir} if state_dir else {}
    settings = RuntimeSettings.from_env(**overrides)
    if rootfs_dir:
        rootfs, env = Rootfs(layers=(rootfs_dir,)), {}
    else:
        from sandbox.oci.pull import Puller

        image_info = Puller(settings).ensure(image)
        rootfs, env = image_info.rootfs, image_info.config.env_dict()
    spec = RunSpec(cmd=cmd, env=env)
    stats = Stats()
    deadline = time.monotonic() + seconds
    issued = 0
    lock = threading.Lock()
    with Runtime(settings) as runtime:
        runtime.run(spec, rootfs)  # warm up

        def worker() -> None:
            nonlocal issued
            while time.monotonic() < deadline:
                with lock:
                    if issued >= max_requests:
                        return
                    issued += 1
                t0 = time.perf_counter()
                result = runtime.run(spec, rootfs)
                took = time.perf_counter() - t0
                with stats.lock:
                    if result.verdict == Verdict.OK:
                        stats.latencies.append(took)
                    else:
                        stats.errors.append(f"verdict {result.verdict.value}: {result.message}")

        return stats, run_threads(worker, concurrency, stats)


def leftovers(url: str, key: str, state_dir: str | None, subuid_base: int) -> list[str]:
    """What a finished load left behind; empty when clean."""
    host, port = check_loopback(url)
    problems: list[str] = []
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/v1/health")
            health = json.loads(conn.getresponse().read())
            conn.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return [f"health check failed: {type(exc).__name__}: {exc}"]
        busy = [w["name"] for w in health.get("workers", []) if w.get("current")]
        if (health.get("queue_depth") == 0 and not busy) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if health.get("queue_depth"):
        problems.append(f"queue depth {health['queue_depth']}")
    if busy:
        problems.append(f"workers still busy: {busy}")
    if not health.get("workers_alive"):
        problems.append("no worker alive after the load")
    worker_pids = {w.get("pid") for w in health.get("workers", []) if w.get("host") == os.uname().nodename}
    containers: list[str] = []
    for _attempt in range(25):  # a container that just ended may take a moment to be reaped
        containers = container_processes(worker_pids, subuid_base)
        if not containers:
            break
        time.sleep(0.2)
    if containers:
        problems.append(f"{len(containers)} container processes still alive: {containers[:10]}")
    if state_dir:
        scratch = Path(state_dir) / "scratch"
        left = sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []
        if left:
            problems.append(f"{len(left)} scratch entries left in {scratch}: {left[:5]}")
    return problems


def container_processes(worker_pids: set, subuid_base: int) -> list[str]:
    """Processes below the workers (their runtime helpers' children) running as a subuid: the
    containers. Other users' processes on a shared machine are not counted."""
    parent: dict[int, int] = {}
    uid_of: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            parent[int(pid)] = int(fields["PPid"].split()[0])
            uid_of[int(pid)] = int(fields["Uid"].split()[0])
        except (OSError, KeyError, ValueError):
            continue
    found = []
    for pid, uid in uid_of.items():
        if not (subuid_base and subuid_base <= uid < subuid_base + 65536):
            continue
        ancestor, hops = parent.get(pid, 0), 0
        while ancestor > 1 and ancestor not in worker_pids and hops < 64:
            ancestor, hops = parent.get(ancestor, 0), hops + 1
        if ancestor in worker_pids:
            found.append(str(pid))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), kernel threads included:
    user, nice, system, irq and softirq. Not steal (a VM's time the host gave to others,
    large on a shared host) and not guest (already inside user)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (
            int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def subuid_base(user: str) -> int:
    try:
        for line in Path("/etc/subuid").read_text().splitlines():
            name, start, _count = line.split(":")
            if name == user:
                return int(start)
    except (OSError, ValueError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=os.environ.get("SBX_API_KEY", ""))
    p.add_argument("--key-file", help="read the API key from this file (e.g. STATE/api-key)")
    p.add_argument("--concurrency", "-c", type=int, default=1)
    p.add_argument("--seconds", "-t", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--image", default="busybox")
    p.add_argument("--state-dir", help="the workers' state dir, to check scratch leftovers")
    p.add_argument("--rootfs", help="for the direct comparison: a root filesystem directory instead of --image")
    p.add_argument("--no-direct", action="store_true", help="skip the direct runtime comparison")
    p.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    p.add_argument("cmd", nargs="*", default=["true"])
    args = p.parse_args(argv)
    key = args.key or (Path(args.key_file).read_text().strip() if args.key_file else "")
    cmd = args.cmd or ["true"]
    expect = ""
    if cmd[0] == "echo":
        expect = " ".join(cmd[1:]) + "\n"
    body = {"image": args.image, "cmd": cmd, "wait": True}
    print(f"load: POST /v1/runs image={args.image} cmd={cmd} wait=true concurrency={args.concurrency} "
          f"for {args.seconds:.0f}s against {args.url}")
    http_stats, http_elapsed = http_load(args.url, key, body, expect, args.concurrency, args.seconds,
                                         args.max_requests)
    figures = [http_stats.report("http", http_elapsed)]
    if not args.no_direct:
        direct_stats, direct_elapsed = direct_load(args.image, cmd, args.concurrency,
                                                   min(args.seconds, 10.0), args.max_requests,
                                                   args.state_dir, args.rootfs)
        figures.append(direct_stats.report("direct", direct_elapsed))
        h, d = figures
        if d["p50_ms"] and d["throughput_per_s"]:
            print(f"   ratio: http/direct p50 {h['p50_ms'] / d['p50_ms']:.2f}x, "
                  f"throughput {h['throughput_per_s'] / d['throughput_per_s']:.2f}x "
                  f"(queue + HTTP add {h['p50_ms'] - d['p50_ms']:.2f} ms at p50)")
    problems = leftovers(args.url, key, args.state_dir, subuid_base(os.environ.get("SBX_USER") or "sbx"))
    for problem in problems:
        print(f"leftover: {problem}")
    if not problems:
        print("leftovers: none (queue empty, workers idle, no container process, no scratch)")
    if args.json:
        print(json.dumps(figures))
    return 1 if http_stats.errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
