"""Volumes through the service: HTTP -> Redis -> the volume host's worker -> runtime."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from tests.fixtures.ports import wait_until
from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    BOB,
    client,
    worker,
    worker_factory,
)
from workers.queues import VOLUME_HOST_KEY, VOLUME_QUEUE

pytestmark = [pytest.mark.redis, pytest.mark.rootless]

MiB = 1 << 20


def run(client, body, headers=ALICE):
    return client.post("/v1/runs", json={"image": "busybox", "wait": True, **body}, headers=headers)


def test_create_list_inspect_delete_per_tenant(client, worker):
    r = client.post("/v1/volumes", json={"name": "data", "size": MiB}, headers=ALICE)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "data" and r.json()["size"] == MiB and r.json()["used"] == 0
    assert client.post("/v1/volumes", json={"name": "data", "size": MiB},
                       headers=ALICE).status_code == 409
    assert [v["name"] for v in client.get("/v1/volumes", headers=ALICE).json()["volumes"]] == ["data"]
    # Bob sees nothing of Alice's, cannot inspect, delete or mount it.
    assert client.get("/v1/volumes", headers=BOB).json()["volumes"] == []
    assert client.get("/v1/volumes/data", headers=BOB).status_code == 404
    assert client.delete("/v1/volumes/data", headers=BOB).status_code == 404
    r = run(client, {"cmd": ["ls", "/d"], "volumes": [{"name": "data", "path": "/d"}]}, headers=BOB)
    assert r.status_code == 404 and r.json()["error"]["error"] == "volume_not_found", r.text
    assert client.get("/v1/volumes/data", headers=ALICE).json()["name"] == "data"
    assert client.delete("/v1/volumes/data", headers=ALICE).status_code == 204
    assert client.get("/v1/volumes/data", headers=ALICE).status_code == 404


@pytest.mark.parametrize("body", [{"name": "../etc", "size": MiB}, {"name": "Data", "size": MiB},
                                  {"name": "data", "size": 10}, {"name": "data"},
                                  {"name": "data", "size": MiB, "extra": 1}])
def test_bad_volume_requests_are_400(client, worker, body):
    r = client.post("/v1/volumes", json=body, headers=ALICE)
    assert r.status_code == 400, r.text


def test_data_persists_across_runs_and_quota_is_a_verdict(client, worker):
    client.post("/v1/volumes", json={"name": "work", "size": MiB}, headers=ALICE)
    vol = [{"name": "work", "path": "/data"}]
    r = run(client, {"cmd": ["sh", "-c", "echo one > /data/f"], "volumes": vol})
    assert r.status_code == 200 and r.json()["result"]["verdict"] == "OK", r.text
    r = run(client, {"cmd": ["cat", "/data/f"], "volumes": [{**vol[0], "read_only": True}]})
    assert r.json()["result"]["stdout"] == "one\n"
    r = run(client, {"cmd": ["sh", "-c", "echo x > /data/g"],
                     "volumes": [{**vol[0], "read_only": True}]})
    assert r.json()["result"]["verdict"] == "NONZERO_EXIT"
    assert "Read-only" in r.json()["result"]["stderr"]
    r = run(client, {"cmd": ["sh", "-c", "head -c 2000000 /dev/zero > /data/big"], "volumes": vol,
                     "limits": {"file_size": 8 * MiB}})
    result = r.json()["result"]
    assert result["verdict"] == "VOLUME_QUOTA" and "quota" in result["message"], result
    info = client.get("/v1/volumes/work", headers=ALICE).json()
    assert 0 < info["used"] <= info["size"] == MiB
    r = run(client, {"cmd": ["ls", "/data"], "volumes": vol})
    assert r.json()["result"]["stdout"] == "f\n"


def test_busy_volume_cannot_be_deleted_or_written_twice(client, worker_factory, tmp_path):
    # Two worker processes of one host (one state directory), so two jobs can be in flight.
    worker_factory(SBX_STATE_DIR=str(tmp_path))
    worker_factory(SBX_STATE_DIR=str(tmp_path))
    client.post("/v1/volumes", json={"name": "busy", "size": MiB}, headers=ALICE)
    vol = [{"name": "busy", "path": "/d"}]
    first = client.post("/v1/runs", json={"image": "busybox", "cmd": ["sleep", "3"],
                                          "volumes": vol}, headers=ALICE).json()["id"]
    wait_until(lambda: client.get(f"/v1/runs/{first}", headers=ALICE).json()["status"] == "running",
               timeout=20, what="first run to start")
    time.sleep(0.5)
    assert client.delete("/v1/volumes/busy", headers=ALICE).status_code == 409
    r = run(client, {"cmd": ["true"], "volumes": vol})
    assert r.status_code == 409 and r.json()["error"]["error"] == "volume_busy", r.text
    done = client.get(f"/v1/runs/{first}", params={"wait": 20}, headers=ALICE).json()
    assert done["result"]["verdict"] == "OK"
    assert client.delete("/v1/volumes/busy", headers=ALICE).status_code == 204


def test_runs_with_volumes_go_only_to_the_volume_host(client, worker_factory, redis_url):
    """Volumes live on one host. A worker elsewhere (here: told it is not the volume host)
    takes ordinary runs but never a run that mounts a volume."""
    elsewhere = worker_factory(SBX_VOLUME_HOST="0")
    plain = run(client, {"cmd": ["echo", "ok"]})
    assert plain.json()["result"]["stdout"] == "ok\n"
    r = client.post("/v1/runs", json={"image": "busybox", "cmd": ["ls", "/d"],
                                      "volumes": [{"name": "x", "path": "/d"}]}, headers=ALICE)
    run_id = r.json()["id"]
    time.sleep(1.5)
    assert client.get(f"/v1/runs/{run_id}", headers=ALICE).json()["status"] == "queued"
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen(f"rq:queue:{VOLUME_QUEUE}") == 1
    assert conn.get(VOLUME_HOST_KEY) is None  # nobody claimed to keep volumes
    worker_factory()  # the volume host comes up and takes it
    done = client.get(f"/v1/runs/{run_id}", params={"wait": 20}, headers=ALICE).json()
    assert done["status"] == "failed" and done["error"]["error"] == "volume_not_found", done
    assert conn.get(VOLUME_HOST_KEY) is not None
    assert elsewhere.proc.poll() is None


def test_a_second_host_does_not_take_volume_jobs(client, worker_factory, redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.set(VOLUME_HOST_KEY, "some-other-machine")
    w = worker_factory()  # would be a volume host, but another machine holds the role
    r = client.post("/v1/runs", json={"image": "busybox", "cmd": ["true"],
                                      "volumes": [{"name": "x", "path": "/d"}]}, headers=ALICE)
    time.sleep(1.5)
    assert client.get(f"/v1/runs/{r.json()['id']}", headers=ALICE).json()["status"] == "queued"
    assert "volumes live on host 'some-other-machine'" in w.log()
