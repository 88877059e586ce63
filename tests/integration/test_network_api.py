"""Networks through the service: services on a private network, and the host's loopback
(this test's own API server and Redis) out of reach from none, private and egress."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
import uvicorn

from api.app import create_app
from tests.fixtures.ports import free_port, wait_until
from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    client,
    make_settings,
    worker_factory,
)

pytestmark = [pytest.mark.redis, pytest.mark.rootless]

WEB = {"name": "web", "image": "busybox", "port": 8080,
       "cmd": ["sh", "-c", "while true; do echo hello-from-web | nc -l -p 8080; done"]}


def run(client, body):
    return client.post("/v1/runs", json={"image": "busybox", "wait": True, **body}, headers=ALICE)


def test_run_with_a_service_reaches_it_by_name(client, worker_factory):
    worker_factory()
    r = run(client, {"cmd": ["nc", "web", "8080"], "services": [WEB]})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["verdict"] == "OK" and result["stdout"] == "hello-from-web\n", result
    assert 0 < result["setup_time"] < 30


def test_service_that_never_listens_fails_the_run(client, worker_factory):
    worker_factory()
    broken = {**WEB, "cmd": ["sh", "-c", "echo cannot start >&2; exit 1"]}
    r = run(client, {"cmd": ["true"], "services": [broken]})
    result = r.json()["result"]
    assert result["verdict"] == "SETUP_ERROR" and result["stage"] == "services"
    assert "cannot start" in result["message"]


@pytest.mark.parametrize("body", [
    {"services": [WEB], "network": "none"},
    {"services": [WEB], "network": "egress"},
    {"services": [WEB, WEB]},
    {"services": [{**WEB, "name": "Web_1"}]},
    {"services": [{**WEB, "port": 0}]},
    {"network": "internet"},
])
def test_bad_network_requests_are_400(client, body):
    r = run(client, {"cmd": ["true"], **body})
    assert r.status_code == 400, r.text


def test_egress_is_refused_unless_the_worker_allows_it(client, worker_factory):
    worker_factory()
    r = run(client, {"cmd": ["true"], "network": "egress"})
    assert r.status_code == 400 and "egress" in r.json()["error"]["message"], r.text


@pytest.fixture
def api_server(redis_url):
    """The API on a real loopback port, as in production (uvicorn in a thread)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(make_settings(redis_url)), host="127.0.0.1",
                                           port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, what="uvicorn")
    yield port
    server.should_exit = True
    thread.join(timeout=10)


HTTP = "GET /v1/health HTTP/1.0\\r\\n\\r\\n"
PING = "PING\\r\\n"


def _probe_script(targets) -> str:
    """Busybox sh: send each (host, port) its request (HTTP or Redis); print the answer."""
    lines = []
    for host, port, request in targets:
        lines.append(f"(r=$( (printf '{request}'; sleep 1) | nc -w 2 {host} {port} 2>&1 "
                     f"| head -c 200 | tr -d '\\r\\n'); echo \"$r <{host}:{port}>\") &")
    return "\n".join(lines) + "\nwait"


def _host_ipv4() -> list[str]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True)
    return [a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


@pytest.mark.parametrize("network", ["none", "private", "egress"])
def test_own_api_and_redis_are_unreachable(client, worker_factory, api_server, redis_url,
                                           busybox_rootfs, network):
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    targets = [(ip, p, req) for ip in ["10.0.2.2", "10.88.0.1", *_host_ipv4()]
               for p, req in ((api_server, HTTP), (redis_port, PING))]
    targets = list(dict.fromkeys(targets))
    script = _probe_script(targets)
    # The probe works: run on the host, it reaches both.
    host = subprocess.run([str(busybox_rootfs / "bin/busybox"), "sh", "-c",
                           _probe_script([("127.0.0.1", api_server, HTTP),
                                          ("127.0.0.1", redis_port, PING)])],
                          capture_output=True, text=True, timeout=20).stdout
    assert "HTTP/1.1" in host and "+PONG" in host, host
    # Egress wide open (0.0.0.0/0): only the runtime's never-list stands in the way.
    worker_factory(SBX_EGRESS="1", SBX_EGRESS_ALLOW="0.0.0.0/0")
    body = {"cmd": ["sh", "-c", script], "network": network, "limits": {"wall_time": 60}}
    if network == "private":
        body["services"] = [WEB]
    r = run(client, body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["verdict"] == "OK", result
    out = result["stdout"]
    assert out.count(" <") == len(targets)
    assert "HTTP/" not in out and "PONG" not in out, out
