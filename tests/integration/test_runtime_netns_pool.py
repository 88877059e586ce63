"""Pooled network namespaces (sandbox.netns_pool): reused only as made, never shared.

Runs with network "none" are cloned into a loopback-only namespace the cloner keeps. These
tests prove the pool is used at all, that two live containers never share one, that a
container (even its root) cannot change one, and that a run which left a socket or sent a
packet never hands its namespace on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from sandbox.config import RuntimeSettings
from sandbox.runner import Runtime
from sandbox.spec import RunSpec, Verdict
from tests.fixtures.containers import helper_cloners, helper_containers
from tests.fixtures.ports import wait_until

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
SO_NETNS_COOKIE = 71
NETNS_COOKIE = f"""
import socket, struct
with socket.socket() as s:
    print(struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, {SO_NETNS_COOKIE}, 8))[0])
"""
"""A network namespace's cookie: unlike its inode number (which a new namespace may get
again once the old one is freed) it is never handed out twice."""


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], **{"env": PATH, **kw})


def py(code: str) -> RunSpec:
    return RunSpec(cmd=["python3", "-c", code], env=PATH)


def netns_of(runtime: Runtime, python, then: str = "") -> int:
    """The cookie of the namespace a run is in (after which the run does `then`)."""
    r = runtime.run(py(NETNS_COOKIE + then), python)
    assert r.verdict is Verdict.OK, (r.stderr, r.message)
    return int(r.stdout.decode().splitlines()[0])


def test_quiet_runs_reuse_a_namespace(runtime, python):
    seen = [netns_of(runtime, python) for _ in range(6)]
    # The run's and the spare's (cloned while the run runs), and a third when a spare is
    # cloned before the last run's namespace has come back; a fresh one per run gives six.
    assert len(set(seen)) <= 3, seen
    ours = int(subprocess.run([sys.executable, "-c", NETNS_COOKIE], capture_output=True,
                              check=True, text=True).stdout)
    assert ours not in seen


def test_without_a_pool_every_run_gets_a_fresh_namespace(tmp_path, python):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path / "state"), netns_pool=0))
    try:
        seen = [netns_of(rt, python) for _ in range(4)]
    finally:
        rt.close()
    assert len(set(seen)) == 4, seen


def test_live_containers_never_share_a_namespace(runtime, python):
    results: dict[int, int] = {}

    def go(i: int) -> None:
        # Each holds its namespace until all four have started.
        results[i] = netns_of(runtime, python, "import time; time.sleep(0.5)")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results.values())) == 4, results


def test_a_dead_cloners_loan_never_comes_back(tmp_path, python):
    """Loan ids restart with each cloner process: a run lent a namespace by a cloner that
    died must not give back the new cloner's namespace of the same id (a live one's)."""
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path / "state"), warm_spares=0))
    try:
        helper = rt.helper_pid
        cookies: dict[str, int] = {}

        def go(name: str, seconds: float) -> None:
            cookies[name] = netns_of(rt, python, f"import time; time.sleep({seconds})")

        first = threading.Thread(target=go, args=("first", 1.0))
        first.start()  # lent namespace 1 by the first cloner
        wait_until(lambda: len(helper_containers(helper)) == 1, timeout=5, what="first run")
        (cloner,) = helper_cloners(helper)
        os.kill(cloner, signal.SIGKILL)
        second = threading.Thread(target=go, args=("second", 3.0))
        second.start()  # lent namespace 1 by the next cloner
        wait_until(lambda: len(helper_containers(helper)) == 2, timeout=5, what="second run")
        first.join(10)
        third = netns_of(rt, python)  # while the second still runs
        second.join(10)
        assert third != cookies["second"], cookies
    finally:
        rt.close()


def test_container_root_cannot_change_a_pooled_namespace(runtime, busybox):
    script = ("ifconfig lo down; echo down=$?; ip addr add 10.9.9.9/32 dev lo; echo addr=$?; "
              "ip -o addr show lo")
    for _ in range(3):  # the run's namespace and the spare's, whichever the pool hands out
        r = runtime.run(sh(script, uid=0, gid=0), busybox)
        lines = r.stdout.decode().splitlines()
        assert "down=0" not in lines and "addr=0" not in lines, (r.stdout, r.stderr)
        assert r.stderr.count(b"Operation not permitted") == 2, r.stderr
        assert "10.9.9.9" not in r.stdout.decode()
    for _ in range(3):
        r = runtime.run(sh("ifconfig lo; ip -o addr show lo"), busybox)
        assert b"UP" in r.stdout and b"LOOPBACK" in r.stdout
        assert b"10.9.9.9" not in r.stdout


TIME_WAIT_ON_PORT = """
import socket
srv = socket.socket(); srv.bind(("127.0.0.1", 5555)); srv.listen()
cli = socket.create_connection(("127.0.0.1", 5555))
conn, _ = srv.accept()
conn.close()  # the server's end closes first: its port 5555 is left in TIME_WAIT
cli.close(); srv.close()
"""
UDP_PACKET_ONLY = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"x", ("127.0.0.1", 9))  # no socket survives the run; loopback's counters moved
s.close()
"""
BIND_AGAIN = """
import socket
s = socket.socket(); s.bind(("127.0.0.1", 5555)); s.listen(); print("bound")
"""


@pytest.mark.parametrize("code", [TIME_WAIT_ON_PORT, UDP_PACKET_ONLY],
                         ids=["time-wait", "udp-packet"])
def test_a_namespace_that_carried_traffic_is_not_reused(runtime, python, code):
    first = netns_of(runtime, python, code)
    later = []
    for _ in range(4):
        r = runtime.run(py(NETNS_COOKIE + BIND_AGAIN), python)
        # Port 5555 in TIME_WAIT would refuse this bind (no SO_REUSEADDR) in `first`.
        assert r.verdict is Verdict.OK and r.stdout.endswith(b"bound\n"), r.stderr
        later.append(int(r.stdout.decode().splitlines()[0]))
    assert first not in later, (first, later)
    assert len(set(later)) < len(later)  # while the quiet ones are reused
