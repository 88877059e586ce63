"""Egress through slirp4netns: the allow-list, and the host's loopback out of reach.

No test here needs the internet. The allow-list tests build a small world of their own: an
"outside" network namespace O (where slirp4netns runs, as it runs in the host's namespace
in production) and a "test host" namespace T behind a veth, both made inside the runtime's
user namespace (the test user owns it, so it may enter it with nsenter). Servers in T stand
for the internet; servers on O's loopback and O's own address stand for the host's Redis
and API. Every server reports each connection it accepts, so "blocked" means the packet
never reached it, not just that the client saw an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import InvalidSpec
from sandbox.jobs import Service, run_job
from sandbox.runner import Runtime
from sandbox.spec import Limits, RunSpec, Verdict
from tests.fixtures.containers import helper_fds, settled_helper_fds
from tests.fixtures.ports import wait_until

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = r"""
import os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from sandbox import syscalls as sc

def run(*argv):
    import subprocess
    subprocess.run(argv, check=True)

def serve(addr, port, name):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port)); srv.listen()
    def loop():
        while True:
            conn, peer = srv.accept()
            print(f"HIT {name} from {peer[0]}", flush=True)
            conn.sendall(f"{name}\n".encode()); conn.close()
    threading.Thread(target=loop, daemon=True).start()

sc.unshare(sc.CLONE_NEWNET)                       # O: where slirp4netns runs ("the host")
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:                                       # T: the test host ("the internet")
    sc.unshare(sc.CLONE_NEWNET)
    os.write(ready_w, b"1")
    os.read(go_r, 1)
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "192.0.2.10/24", "dev", "t0")
    run("ip", "addr", "add", "198.51.100.10/24", "dev", "t0")
    run("ip", "link", "set", "t0", "up")
    serve("192.0.2.10", 8080, "T-allowed")
    serve("192.0.2.10", 8081, "T-other-port")
    serve("198.51.100.10", 8080, "T-other-net")
    os.write(ready_w, b"2")
    os.read(0, 1)  # until the test closes our stdin
    os._exit(0)
os.read(ready_r, 1)
run("ip", "link", "set", "lo", "up")
run("ip", "link", "add", "o0", "type", "veth", "peer", "name", "t0", "netns", str(pid))
run("ip", "addr", "add", "192.0.2.1/24", "dev", "o0")
run("ip", "link", "set", "o0", "up")
os.write(go_w, b"1")
os.read(ready_r, 1)
run("ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.10")
serve("127.0.0.1", 6379, "O-loopback")
serve("192.0.2.1", 8080, "O-own-address")
print(f"READY {os.getpid()}", flush=True)
os.read(0, 1)
"""


class World:
    def __init__(self, proc: subprocess.Popen, pid: int) -> None:
        self.proc = proc
        self.pid = pid
        self.hits: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("HIT "):
                self.hits.append(line.split()[1])


@pytest.fixture(scope="module")
def egress_runtime(tmp_path_factory):
    state = tmp_path_factory.mktemp("sbx-egress")
    outside = state / "outside-netns"
    settings = RuntimeSettings(state_dir=str(state / "state"), egress=True,
                               egress_allow=("192.0.2.0/24:8080",), egress_netns=str(outside))
    rt = Runtime(settings)
    proc = subprocess.Popen(
        ["nsenter", f"--user=/proc/{rt.helper_pid}/ns/user", "--", sys.executable, "-c", WORLD,
         REPO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"test world did not start: {line!r}"
        pid = int(line.split()[1])
        os.symlink(f"/proc/{pid}/ns/net", outside)
        world = World(proc, pid)
        yield rt, world
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        rt.close()


PROBE = """
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); out[f"{host}:{port}"] = s.recv(100).decode().strip() or "open"
    except OSError as exc:
        out[f"{host}:{port}"] = f"error {exc.errno}"
    s.close()
print(json.dumps(out))
"""


def probe(rt, python, targets, network="egress"):
    r = rt.run(RunSpec(cmd=["python3", "-c", PROBE, json.dumps(targets)], env=PATH,
                       network=network, limits=Limits(wall_time=60)), python)
    assert r.verdict is Verdict.OK, (r.stderr, r.message, r.stage)
    return json.loads(r.stdout)


def test_allow_list_is_enforced(egress_runtime, python):
    rt, world = egress_runtime
    before = len(world.hits)
    out = probe(rt, python, [["192.0.2.10", 8080], ["192.0.2.10", 8081],
                             ["198.51.100.10", 8080], ["192.0.2.1", 8080],
                             ["10.0.2.2", 6379], ["127.0.0.1", 6379]])
    assert out["192.0.2.10:8080"] == "T-allowed"  # egress works where it is allowed
    for blocked in ("192.0.2.10:8081", "198.51.100.10:8080", "192.0.2.1:8080", "10.0.2.2:6379",
                    "127.0.0.1:6379"):
        assert out[blocked].startswith("error"), (blocked, out)
    time.sleep(0.5)
    # Only the allowed server ever saw a connection, and it came through slirp4netns from O.
    assert world.hits[before:] == ["T-allowed"]


def test_egress_is_not_on_without_the_operator(runtime, busybox):
    with pytest.raises(InvalidSpec):
        runtime.run(RunSpec(cmd=["true"], network="egress"), busybox)


def test_egress_processes_go_away_with_the_run(egress_runtime, python):
    rt, _ = egress_runtime
    helper = rt.helper_pid

    def slirps() -> list[str]:
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if os.path.basename(f.read().split(b"\0")[0]) == b"slirp4netns":
                        out.append(pid)
            except OSError:
                continue
        return out

    fds = settled_helper_fds(helper)
    for _ in range(5):
        assert probe(rt, python, [["192.0.2.10", 8080]])["192.0.2.10:8080"] == "T-allowed"
    wait_until(lambda: not slirps(), timeout=5, what="slirp4netns to exit")
    # The helper answers before it tears a run down, so its fds come back shortly after.
    wait_until(lambda: helper_fds(helper) == fds, timeout=5, what=f"helper fds back to {fds}")


def test_ruleset_puts_the_never_list_before_the_allow_list():
    from sandbox.network import egress_ruleset, parse_allow

    rules = egress_ruleset(parse_allow(["0.0.0.0/0", "192.0.2.0/24:80-90"]), ["203.0.113.5/32"])
    lines = [line.strip() for line in rules.splitlines()]
    deny = next(i for i, line in enumerate(lines) if line.startswith("ip daddr {"))
    allow = lines.index("ip daddr 0.0.0.0/0 accept")
    assert deny < allow
    for net in ("127.0.0.0/8", "10.0.2.0/24", "169.254.0.0/16", "203.0.113.5/32"):
        assert net in lines[deny]
    assert "ip daddr 192.0.2.0/24 tcp dport 80-90 accept" in lines
    assert not any("dport 53" in line for line in lines)  # no DNS unless named
    with_dns = egress_ruleset(parse_allow(["10.0.2.3:53"]), [])
    assert "ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept" in with_dns
    for bad in ("nonsense", "10.0.0.0/8:0", "10.0.0.0/8:9-1", "::1/128"):
        with pytest.raises(InvalidSpec):
            parse_allow([bad])


@pytest.mark.redis
def test_host_loopback_is_unreachable_through_real_slirp(tmp_path, python, redis_server):
    """Egress from the real host namespace, allow-list wide open: the host's loopback (the
    test's Redis, a listener of the test) and the host's own addresses stay out of reach."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True)
    host_ips = [a["local"] for link in json.loads(out.stdout) for a in link["addr_info"]
                if a.get("family") == "inet" and not a["local"].startswith("127.")]
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path), egress=True,
                                 egress_allow=("0.0.0.0/0",)))
    try:
        targets = [["10.0.2.2", port], ["10.0.2.2", redis_port], ["127.0.0.1", redis_port]]
        targets += [[ip, p] for ip in host_ips for p in (port, redis_port)]
        result = probe(rt, python, targets)
    finally:
        rt.close()
    assert all(v.startswith("error") for v in result.values()), result
    with pytest.raises(socket.timeout):
        srv.accept()  # nothing ever reached the host's loopback listener
    srv.close()


def test_services_and_egress_do_not_mix(egress_runtime, busybox):
    rt, _ = egress_runtime
    svc = Service(name="svc", spec=RunSpec(cmd=["true"]), rootfs=busybox, port=1)
    with pytest.raises(InvalidSpec):
        run_job(rt, RunSpec(cmd=["true"], network="egress"), busybox, services=[svc])
