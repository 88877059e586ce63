"""`sbx up` on one machine with no configuration: everything starts, a run works through the
API and `sbx submit`, and SIGTERM stops every part (Redis keeping its data on disk)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from tests.fixtures.ports import free_port
from tests.integration.test_service_support import PrivateRedis

REPO = Path(__file__).resolve().parents[2]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _get_run(api: str, key: str, run_id: str) -> dict:
    request = urllib.request.Request(f"{api}/v1/runs/{run_id}",
                                     headers={"Authorization": f"Bearer {key}"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def _status_on_disk(redis_dir: Path, run_id: str) -> bytes | None:
    """The rq status of a run as Redis reloads it from sbx up's append-only file."""
    server = PrivateRedis(redis_dir, "--appendonly", "yes")  # the last --appendonly wins
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        return client.hget(f"rq:job:{run_id}", "status")
    finally:
        client.close()
        server.stop()


def test_up_starts_everything_serves_runs_and_stops_cleanly(tmp_path: Path):
    state = tmp_path / "state"
    ports = {"SBX_API_PORT": free_port(), "SBX_REDIS_PORT": free_port(), "registry": free_port()}
    registry = f"127.0.0.1:{ports['registry']}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "SBX_STATE_DIR": str(state),
           "SBX_API_PORT": str(ports["SBX_API_PORT"]), "SBX_REDIS_PORT": str(ports["SBX_REDIS_PORT"]),
           "SBX_REGISTRY": registry, "SBX_INSECURE_REGISTRIES": registry}
    for var in ("SBX_API_KEY", "SBX_API_KEYS", "REDIS_URL", "SBX_REDIS_URL", "SBX_OPEN_ACCESS"):
        env.pop(var, None)
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--workers", "1", "--images", "busybox"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while b"API on" not in (tmp_path / "up.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        key = (state / "api-key").read_text().strip()
        assert len(key) >= 32 and (state / "api-key").stat().st_mode & 0o077 == 0
        api = f"http://127.0.0.1:{ports['SBX_API_PORT']}"
        deadline = time.monotonic() + 60
        while True:  # the worker registers after its self-test
            health = json.loads(urllib.request.urlopen(f"{api}/v1/health", timeout=5).read())
            if health["workers_alive"] == 1:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["status"] == "ok" and health["registry"]["ok"]
        request = urllib.request.Request(
            f"{api}/v1/runs", method="POST",
            data=json.dumps({"image": "busybox", "cmd": ["echo", "up"], "wait": True}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["status"] == "done" and answer["result"]["stdout"] == "up\n"
        submit = subprocess.run([sys.executable, "-m", "cli.main", "submit", "--url", api, "busybox", "echo", "cli"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0 and submit.stdout == "cli\n", submit.stderr
        children = _descendants(proc.pid)
        assert len(children) >= 4  # redis, registry, api, worker supervisor (+ worker, helper)
        # A run still going when sbx up is told to stop: the worker finishes and records it
        # before Redis goes (it is there after a restart).
        request = urllib.request.Request(
            f"{api}/v1/runs", method="POST",
            data=json.dumps({"image": "busybox", "cmd": ["sh", "-c", "sleep 1.5; echo late"]}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        late = json.loads(urllib.request.urlopen(request, timeout=60).read())["id"]
        deadline = time.monotonic() + 30
        while _get_run(api, key, late)["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()
    time.sleep(0.5)
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"left running after SIGTERM: {alive}"
    # Workers stopped before Redis: they unregistered cleanly, and the late run was recorded.
    workers_log = (state / "logs" / "workers.log").read_text()
    assert "could not unregister" not in workers_log and "redis error" not in workers_log, workers_log
    assert _status_on_disk(state / "redis", late) == b"finished"
    # Persistence on disk: the append-only file, and no RDB snapshot (sbx up turns those off).
    assert any((state / "redis" / "appendonlydir").iterdir())
    assert not (state / "redis" / "dump.rdb").exists()
