"""Private job networks in real rootless runs: names, isolation from the host, teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sandbox.config import RuntimeSettings
from sandbox.jobs import Service, run_job
from sandbox.protocol import NetAttach
from sandbox.runner import Runtime
from sandbox.spec import FileIn, Limits, RunSpec, Verdict
from tests.fixtures.containers import (children, helper_containers, helper_fds,
                                       settled_helper_fds, user_ns)
from tests.fixtures.ports import wait_until

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def py(code: str, **kw) -> RunSpec:
    return RunSpec(cmd=["python3", "-c", textwrap.dedent(code)], **{"env": PATH, **kw})


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], **{"env": PATH, **kw})


WEB = py("""
    import http.server, socketserver
    class H(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    socketserver.TCPServer(("0.0.0.0", 8080), H).serve_forever()
""", files=[FileIn(path="hello.txt", content=b"hello from web\n")],
    limits=Limits(wall_time=60))


def test_two_containers_reach_each_other_by_name(runtime, python):
    client = py("""
        import socket, urllib.request
        print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))
        print("web is", socket.gethostbyname("web"))
        print(urllib.request.urlopen("http://web:8080/hello.txt", timeout=5).read().decode(), end="")
    """, network="private", hostname="main")
    r = run_job(runtime, client, python, services=[Service(name="web", spec=WEB, rootfs=python,
                                                           port=8080)])
    assert r.verdict is Verdict.OK, (r.stderr, r.message, r.stage)
    assert r.stdout.decode().splitlines() == [
        "main 10.88.0.3", "web is 10.88.0.2", "hello from web"]
    assert 0 < r.setup_time < 30


def test_services_reach_each_other_and_the_main_container(runtime, busybox):
    # Two services; the second asks the first, the main container asks the second.
    echo = Service(name="echo", rootfs=busybox, port=7000,
                   spec=sh("while true; do echo from-echo | nc -l -p 7000; done",
                           limits=Limits(wall_time=60)))
    relay = Service(name="relay", rootfs=busybox, port=7001,
                    spec=sh("while true; do nc -l -p 7001 -e /work/ask-echo; done",
                            files=[FileIn(path="ask-echo", mode=0o755,
                                          content=b"#!/bin/sh\nnc echo 7000 </dev/null\n")],
                            limits=Limits(wall_time=60)))
    main = sh("nc relay 7001 </dev/null", network="private", hostname="client")
    r = run_job(runtime, main, busybox, services=[echo, relay])
    assert r.verdict is Verdict.OK, (r.stderr, r.message)
    assert r.stdout == b"from-echo\n"


def test_read_only_root_still_gets_hosts(runtime, python):
    r = run_job(runtime, py("print(open('/etc/hosts').read())", network="private",
                            hostname="ro", read_only_root=True), python,
                services=[Service(name="web", spec=WEB, rootfs=python, port=8080)])
    assert r.verdict is Verdict.OK, (r.stderr, r.message)
    assert "10.88.0.2\tweb" in r.stdout.decode() and "10.88.0.3\tro" in r.stdout.decode()


def _host_ipv4() -> list[str]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True)
    return [a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


PROBE = """
import json, socket, sys
results = {}
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(); s.settimeout(2)
    try:
        results[f"{host}:{port}"] = s.connect_ex((host, port))
    except OSError as exc:
        results[f"{host}:{port}"] = exc.errno
    s.close()
print(json.dumps(results))
"""


@pytest.fixture
def host_listener():
    """A TCP server on the host's loopback that records every connection it gets."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    accepted: list = []

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=loop, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()


@pytest.mark.redis
@pytest.mark.parametrize("network", ["none", "private"])
def test_host_loopback_services_are_unreachable(runtime, python, host_listener, redis_server,
                                                network):
    port, accepted = host_listener
    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    targets = [("127.0.0.1", port), ("127.0.0.1", redis_port), ("10.0.2.2", port),
               ("10.88.0.1", port), ("10.88.0.1", redis_port)]
    targets += [(ip, p) for ip in _host_ipv4() for p in (port, redis_port)]
    targets = list(dict.fromkeys(targets))
    spec = RunSpec(cmd=["python3", "-c", PROBE, json.dumps(targets)], env=PATH,
                   network=network)
    r = runtime.run(spec, python)
    assert r.verdict is Verdict.OK, (r.stderr, r.message)
    results = json.loads(r.stdout)
    assert len(results) == len(targets)
    assert all(code != 0 for code in results.values()), results
    # From inside, 127.0.0.1 is the container's own loopback: refused, not the host's.
    assert results[f"127.0.0.1:{redis_port}"] == 111  # ECONNREFUSED
    assert accepted == []
    # The same probe from the host does reach the listener: the test can tell.
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.close()
    wait_until(lambda: len(accepted) == 1, timeout=5, what="host listener")


def test_a_crashing_service_fails_the_job_cleanly(runtime, busybox):
    crash = Service(name="crash", rootfs=busybox, port=9000,
                    spec=sh("echo starting; kill -SEGV $$"))
    r = run_job(runtime, sh("echo never", network="private"), busybox, services=[crash])
    assert r.verdict is Verdict.SETUP_ERROR and r.stage == "services"
    assert "'crash' ended (SIGNALED)" in r.message and "starting" in r.message
    assert b"never" not in r.stdout


def test_a_crashing_main_container_still_stops_its_services(runtime, busybox):
    started = time.monotonic()
    svc = Service(name="svc", rootfs=busybox, port=9001,
                  spec=sh("nc -l -p 9001; sleep 600", limits=Limits(wall_time=600)))
    r = run_job(runtime, sh("kill -SEGV $$", network="private"), busybox, services=[svc])
    assert r.verdict is Verdict.SIGNALED and r.signal == signal.SIGSEGV
    assert time.monotonic() - started < 10  # the service was killed, not waited for


def test_private_needs_an_existing_network(runtime, busybox):
    r = runtime.run(sh("true", network="private"), busybox,
                    network=NetAttach("no-such-network", "x"))
    assert r.verdict is Verdict.SETUP_ERROR and r.stage == "network"


# --------------------------------------------------------------------------- teardown


def _tree(pid: int) -> list[int]:
    out = [pid]
    for child in children(pid):
        out += _tree(child)
    return out


def _netns_refs(pids) -> set[str]:
    """Every network namespace these processes are in or hold an fd of (other sessions of
    this user run their own tests on the machine, so never scan all of /proc)."""
    refs: set[str] = set()
    for pid in pids:
        try:
            refs.add(os.readlink(f"/proc/{pid}/ns/net"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("net:["):
                    refs.add(target)
        except OSError:
            continue
    return refs


def _set_netns_limit(helper_pid: int, value: int) -> None:
    """Write max_net_namespaces of the helper's user namespace (we own it, so we may)."""
    subprocess.run(["nsenter", f"--user=/proc/{helper_pid}/ns/user", "--", "sh", "-c",
                    f"echo {value} > /proc/sys/user/max_net_namespaces"], check=True)


@pytest.mark.slow
def test_hundred_jobs_leave_no_namespace_interface_or_process(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path / "state"), warm_spares=0))
    try:
        helper = rt.helper_pid
        svc = Service(name="svc", rootfs=busybox, port=9100,
                      spec=sh("while true; do echo pong | nc -l -p 9100; done",
                              limits=Limits(wall_time=60)))
        run_job(rt, sh("nc svc 9100 </dev/null", network="private"), busybox, services=[svc])
        fds_before, refs_before = settled_helper_fds(helper), _netns_refs(_tree(helper))
        inodes, setup = [], []
        for _ in range(100):
            net = rt.create_network(["svc", "main"])
            inodes.append(f"net:[{net.netns}]")
            rt.remove_network(net.id)
            r = run_job(rt, sh("nc svc 9100 </dev/null", network="private"), busybox,
                        services=[svc])
            assert r.verdict is Verdict.OK and r.stdout == b"pong\n", (r.stderr, r.message)
            setup.append(r.setup_time)
        wait_until(lambda: not helper_containers(helper), timeout=10,
                   what="helper children to exit")
        # The helper answers before it tears a run down: its fds come back shortly after.
        wait_until(lambda: helper_fds(helper) == fds_before, timeout=10, what="helper fds back")
        assert _netns_refs(_tree(helper)) <= refs_before
        assert not set(inodes) & _netns_refs(_tree(helper))
        # The kernel's own count: allow exactly the namespaces one job needs (its network,
        # the service, the main container). Had any job leaked one, the next job could not
        # get all three. Namespaces are freed asynchronously, hence the retry.
        _set_netns_limit(helper, 3)
        try:
            def one_job_fits() -> bool:
                r = run_job(rt, sh("nc svc 9100 </dev/null", network="private"), busybox,
                            services=[svc])
                return r.verdict is Verdict.OK

            wait_until(one_job_fits, timeout=10, what="a job within 3 network namespaces")
            _set_netns_limit(helper, 2)  # and the limit does bite: 2 are not enough
            r = None
            try:
                r = run_job(rt, sh("true", network="private"), busybox, services=[svc])
            except Exception as exc:  # noqa: BLE001 - the network itself may be refused
                assert "No space left" in str(exc) or "network" in str(exc).lower()
            if r is not None:
                assert r.verdict is Verdict.SETUP_ERROR
        finally:
            _set_netns_limit(helper, 2147483647)
        print(f"setup_time median {sorted(setup)[50] * 1000:.1f} ms")
    finally:
        rt.close()


KILLED_WORKER = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from sandbox.config import RuntimeSettings
from sandbox.protocol import NetAttach
from sandbox.runner import Runtime
from sandbox.spec import Limits, Rootfs, RunSpec
rt = Runtime(RuntimeSettings(state_dir=sys.argv[2], warm_spares=0))
bb = Rootfs(layers=(sys.argv[3],))
net = rt.create_network(["svc", "main"])
for name in ("svc", "main"):
    spec = RunSpec(cmd=["/bin/sh", "-c", "nc -l -p 9200; sleep 600"], env={"PATH": "/bin"},
                   network="private", hostname=name, limits=Limits(wall_time=600))
    threading.Thread(target=rt.run, args=(spec, bb), daemon=True,
                     kwargs={"network": NetAttach(net.id, name), "key": name}).start()
while rt.probe("svc", 9200) != "listening" or rt.probe("main", 9200) != "listening":
    time.sleep(0.01)
import os
print(json.dumps({"helper": rt.helper_pid, "netns": net.netns,
                  "userns": os.readlink(f"/proc/{rt.helper_pid}/ns/user")}), flush=True)
time.sleep(600)
"""


def test_killed_worker_takes_its_networks_with_it(tmp_path, busybox_rootfs):
    """SIGKILL the process that owns the runtime mid-job: the helper, the job's containers
    and its network namespace all go, with nothing left to clean up on the next start."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, REPO, str(tmp_path / "st"),
                             str(busybox_rootfs)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        helper, job_netns = info["helper"], f"net:[{info['netns']}]"
        containers = set(helper_containers(helper))
        assert len(containers) == 2  # the two containers, both up and listening
        targets = [os.readlink(f"/proc/{helper}/fd/{fd}") for fd in helper_fds(helper)]
        assert sum(t.startswith("socket:") for t in targets) >= 2  # runtime + job netlink
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{helper}"), timeout=10, what="helper exit")
    wait_until(lambda: not any(os.path.exists(f"/proc/{c}") for c in containers), timeout=10,
               what="containers to die")
    assert job_netns not in _netns_refs([os.getpid()])
    # Nothing of the helper's user namespace is left: no process is in it.
    leftovers = [pid for pid in filter(str.isdigit, os.listdir("/proc"))
                 if user_ns(pid) == info["userns"]]
    assert not leftovers
