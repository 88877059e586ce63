"""The API end to end: HTTP (Litestar test client) -> Redis -> real worker -> real runtime."""

from __future__ import annotations

import base64
import time

import redis
from litestar.testing import TestClient

from api.app import create_app
from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    BOB,
    client,
    make_settings,
    worker,
    worker_factory,
)
from workers.queues import QUEUE_NAME


def run(client, body, headers=ALICE):
    return client.post("/v1/runs", json=body, headers=headers)


def test_echo_with_wait_returns_result_and_timestamps(client, worker):
    r = run(client, {"image": "busybox", "cmd": ["echo", "hi"], "wait": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "done"
    res = body["result"]
    assert res["verdict"] == "OK" and res["exit_code"] == 0 and res["signal"] is None
    assert res["stdout"] == "hi\n" and res["stderr"] == ""
    assert res["wall_time"] > 0 and res["memory"] >= 0 and res["limits_mode"]
    assert body["created_at"] <= body["started_at"] <= body["finished_at"]


def test_files_stdin_env_workdir_reach_the_container(client, worker):
    script = "cat main.txt; cat; echo \"$GREETING\"; pwd; cat bin.dat | od -An -tx1"
    r = run(
        client,
        {
            "image": "busybox",
            "cmd": ["sh", "-c", script],
            "stdin": "from-stdin\n",
            "files": [
                {"path": "main.txt", "content": "file-text\n"},
                {"path": "bin.dat", "content": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"},
            ],
            "env": {"GREETING": "hello"},
            "workdir": "/work",
            "limits": {"wall_time": 5.0, "memory": 64 * 1024 * 1024},
            "wait": True,
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()["result"]["stdout"].splitlines()
    assert out[:4] == ["file-text", "from-stdin", "hello", "/work"]
    assert out[4].split() == ["00", "ff"]


def test_without_wait_202_then_get_finds_the_result(client, worker):
    r = run(client, {"image": "busybox", "cmd": ["echo", "later"]})
    assert r.status_code == 202
    run_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/runs/{run_id}"
    got = client.get(f"/v1/runs/{run_id}", params={"wait": 10}, headers=ALICE)
    assert got.status_code == 200
    assert got.json()["status"] == "done"
    assert got.json()["result"]["stdout"] == "later\n"


def test_a_wait_that_runs_out_answers_202_and_a_later_wait_gets_the_result(redis_url, worker):
    with TestClient(create_app(make_settings(redis_url, max_wait=0.5))) as short:
        started = time.monotonic()
        r = run(short, {"image": "busybox", "cmd": ["sh", "-c", "sleep 2; echo slow"],
                        "wait": True})
        waited = time.monotonic() - started
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running"), r.text
        assert 0.4 < waited < 1.9  # the server's bound, not the run, ended the wait
        run_id = r.json()["id"]
        got = short.get(f"/v1/runs/{run_id}", params={"wait": 0.2}, headers=ALICE)
        assert got.status_code == 200 and got.json()["status"] in ("queued", "running"), got.text
        deadline = time.monotonic() + 20
        while (got := short.get(f"/v1/runs/{run_id}", params={"wait": 10}, headers=ALICE)
               ).json()["status"] != "done":
            assert time.monotonic() < deadline, got.text
    assert got.status_code == 200 and got.json()["result"]["stdout"] == "slow\n"


def test_nonzero_exit_and_binary_output_base64(client, worker):
    r = run(
        client,
        {"image": "busybox", "cmd": ["sh", "-c", "printf '\\377\\000ok'; exit 3"], "wait": True,
         "output_encoding": "base64"},
    )
    res = r.json()["result"]
    assert res["verdict"] == "NONZERO_EXIT" and res["exit_code"] == 3
    assert res["output_encoding"] == "base64"
    assert base64.b64decode(res["stdout"]) == b"\xff\x00ok"
    text = client.get(f"/v1/runs/{r.json()['id']}", headers=ALICE).json()["result"]
    assert text["stdout"] == "\ufffd\x00ok"


def test_unknown_image_is_404_naming_the_image(client, worker_factory, registry_server):
    worker_factory(SBX_REGISTRY=registry_server, SBX_INSECURE_REGISTRIES=registry_server)
    r = run(client, {"image": "no-such-image-here", "cmd": ["true"], "wait": True})
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["status"] == "failed"
    assert body["error"]["field"] == "image"
    assert "no-such-image-here" in body["error"]["message"]


def test_tenants_see_only_their_runs(client, worker):
    r = run(client, {"image": "busybox", "cmd": ["echo", "secret"], "wait": True})
    run_id = r.json()["id"]
    assert client.get(f"/v1/runs/{run_id}", headers=ALICE).status_code == 200
    assert client.get(f"/v1/runs/{run_id}", headers=BOB).status_code == 404
    assert client.delete(f"/v1/runs/{run_id}", headers=BOB).status_code == 404
    assert client.get(f"/v1/runs/{run_id}").status_code == 401
    bad = client.get(f"/v1/runs/{run_id}", headers={"Authorization": "Bearer not-a-key-at-all-xx"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Bearer")


def test_cancel_queued_run_never_runs(client, redis_url):
    # No worker: the run stays queued until cancelled.
    r = run(client, {"image": "busybox", "cmd": ["echo", "never"]})
    run_id = r.json()["id"]
    d = client.delete(f"/v1/runs/{run_id}", headers=ALICE)
    assert d.status_code == 200 and d.json()["status"] == "cancelled"
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen(f"rq:queue:{QUEUE_NAME}") == 0
    again = client.delete(f"/v1/runs/{run_id}", headers=ALICE)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_running_run_kills_the_container(client, worker):
    r = run(client, {"image": "busybox", "cmd": ["sleep", "30"], "limits": {"wall_time": 60.0}})
    run_id = r.json()["id"]
    deadline = time.monotonic() + 20
    while client.get(f"/v1/runs/{run_id}", headers=ALICE).json()["status"] != "running":
        assert time.monotonic() < deadline, "run never started"
        time.sleep(0.05)
    time.sleep(0.3)  # let the container start
    deadline = time.monotonic() + 10  # the worker's beacon reports the run it holds
    while [w["current"] for w in client.get("/v1/health").json()["workers"]] != [run_id]:
        assert time.monotonic() < deadline, client.get("/v1/health").json()
        time.sleep(0.1)
    started = time.monotonic()
    d = client.delete(f"/v1/runs/{run_id}", headers=ALICE)
    assert d.status_code == 200, d.text
    assert d.json()["status"] == "cancelled"
    assert time.monotonic() - started < 6
    res = d.json()["result"]
    assert res is None or res["verdict"] in ("SIGNALED", "WALL_TIME_LIMIT", "INTERNAL_ERROR")
    # The worker is free again at once.
    assert run(client, {"image": "busybox", "cmd": ["true"], "wait": True}).json()["status"] == "done"


def test_delete_of_finished_run_is_conflict(client, worker):
    run_id = run(client, {"image": "busybox", "cmd": ["true"], "wait": True}).json()["id"]
    d = client.delete(f"/v1/runs/{run_id}", headers=ALICE)
    assert d.status_code == 409 and d.json()["error"] == "conflict"


def test_health_and_metrics_report_workers_and_verdicts(client, worker):
    run(client, {"image": "busybox", "cmd": ["true"], "wait": True})
    run(client, {"image": "busybox", "cmd": ["false"], "wait": True})
    h = client.get("/v1/health")
    assert h.status_code == 200
    body = h.json()
    assert body["redis"]["ok"] is True
    assert body["workers_alive"] == 1
    assert body["limits_modes"][0] in ("cgroup-v1", "cgroup-v2", "rlimit")
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'sbx_runs_total{verdict="OK"} 1' in text
    assert 'sbx_runs_total{verdict="NONZERO_EXIT"} 1' in text
    assert "sbx_run_latency_seconds_count 2" in text
    assert 'sbx_run_latency_seconds_bucket{le="+Inf"} 2' in text
    assert "sbx_queue_depth 0" in text and "sbx_workers_alive 1" in text


def test_images_lists_local_images_and_pull_confirms_them(client, worker_factory, registry_server):
    worker_factory(SBX_REGISTRY=registry_server, SBX_INSECURE_REGISTRIES=registry_server)
    images = client.get("/v1/images", headers=ALICE)
    assert images.status_code == 200
    names = {(i["name"], i["source"]) for i in images.json()["images"]}
    assert ("busybox", "local") in names
    pulled = client.post("/v1/images/pull", json={"image": "busybox"}, headers=ALICE)
    assert pulled.status_code == 200, pulled.text
    assert pulled.json()["image"]["name"] == "busybox"
    missing = client.post("/v1/images/pull", json={"image": "nope-not-here"}, headers=ALICE)
    assert missing.status_code == 404
    assert missing.json()["error"]["field"] == "image"


def test_openapi_schema_has_operation_ids(client):
    schema = client.get("/schema/openapi.json").json()
    ops = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert {"createRun", "getRun", "cancelRun", "listImages", "pullImage", "getHealth", "getMetrics"} <= ops
    assert schema["paths"]["/v1/runs"]["post"]["description"]
