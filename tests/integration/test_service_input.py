"""Bad input never reaches a worker and never yields a 5xx: each case gets a 4xx naming the
field; a full queue and a Redis outage get 503 with Retry-After, and the API recovers alone."""

from __future__ import annotations

import pytest
import redis
from litestar.testing import TestClient

from api.app import create_app
from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    client,
    make_settings,
    private_redis,
)
from workers.queues import QUEUE_NAME

GOOD = {"image": "busybox", "cmd": ["true"]}


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (b'{"image": "busybox", "cmd": ["true"]', 400, None, "JSON"),
        (b'{"image": "busybox", "cmd": ["true"], "bogus": 1}', 400, None, "unknown field `bogus`"),
        (b'{"image": 5, "cmd": ["true"]}', 400, "image", "Expected `str`"),
        (b'{"image": "busybox"}', 400, None, "missing required field `cmd`"),
        (b'{"image": "busybox", "cmd": []}', 400, "cmd", "length >= 1"),
        (b'{"image": "busybox", "cmd": ["true"], "limits": {"memory": "big"}}', 400, "limits.memory", "Expected `int`"),
        (b'{"image": "busybox", "cmd": ["true"], "limits": {"memory": 8589934592}}', 400, "limits.memory", "server maximum"),
        (b'{"image": "busybox", "cmd": ["true"], "limits": {"cpu_time": 100000}}', 400, "limits.cpu_time", "<= 600"),
        (b'{"image": "busybox", "cmd": ["true"], "limits": {"wall_time": 61}}', 400, "limits.wall_time", "server maximum"),
        (b'{"image": "busybox", "cmd": ["true"], "limits": {"nope": 1}}', 400, "limits", "unknown field `nope`"),
        (b'{"image": "busybox", "cmd": ["true"], "files": [{"path": "../x", "content": ""}]}', 400, "files[0].path", ".."),
        (b'{"image": "busybox", "cmd": ["true"], "files": [{"path": "/etc/x", "content": ""}]}', 400, "files[0].path", "relative"),
        (b'{"image": "busybox", "cmd": ["true"], "files": [{"path": "a\\u0000b", "content": ""}]}', 400, "files[0].path", "NUL"),
        (b'{"image": "busybox", "cmd": ["true"], "files": [{"path": "a", "content": "!!", "encoding": "base64"}]}', 400, "files[0].content", "base64"),
        (b'{"image": "busybox", "cmd": ["true"], "files": [{"path": "a", "content": "", "encoding": "latin1"}]}', 400, "files[0].encoding", "Invalid enum value"),
        (b'{"image": "busybox", "cmd": ["a\\u0000b"]}', 400, "cmd[0]", "NUL"),
        (b'{"image": "busybox", "cmd": ["true"], "workdir": "relative"}', 400, "workdir", "absolute"),
        (b'{"image": "busybox", "cmd": ["true"], "workdir": "/a/../b"}', 400, "workdir", ".."),
        (b'{"image": "busybox", "cmd": ["true"], "env": {"A=B": "c"}}', 400, "env", "regex"),
        (b'{"image": "bad image!", "cmd": ["true"]}', 400, "image", "regex"),
        (b'{"image": "busybox", "cmd": ["true"], "wait": "yes"}', 400, "wait", "Expected"),
        (b'{"image": "busybox", "cmd": ["true"], "stdin": "??", "stdin_encoding": "base64"}', 400, "stdin", "base64"),
        (b'[1, 2]', 400, None, "Expected `object`"),
        (b'"\xff\xfe"', 400, None, "malformed JSON body"),
        (b'{"image": "\xff", "cmd": ["true"]}', 400, None, ""),
        (b"", 400, None, ""),
    ],
)
def test_bad_bodies_are_4xx_naming_the_field(client, redis_url, body, status, field, words):
    r = client.post("/v1/runs", content=body, headers={**ALICE, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] in ("invalid_request", "invalid_spec", "bad_request")
    if field is not None:
        assert err["field"] == field, err
        if "." in field or "[" in field or field in ("image", "cmd", "workdir", "wait", "limits", "env"):
            assert field.split("[")[0].split(".")[0] in err["message"], err
    assert words in err["message"], err
    # nothing was queued
    assert redis.Redis.from_url(redis_url).llen(f"rq:queue:{QUEUE_NAME}") == 0


def test_body_over_the_cap_is_413(redis_url):
    app = create_app(make_settings(redis_url, max_body_bytes=4096))
    with TestClient(app) as c:
        big = {"image": "busybox", "cmd": ["true"], "stdin": "x" * 5000}
        r = c.post("/v1/runs", json=big, headers=ALICE)
        assert r.status_code == 413
        assert r.json()["error"] == "body_too_large"
        assert c.post("/v1/runs", json=GOOD, headers=ALICE).status_code == 202


def test_queue_full_is_503_with_retry_after(redis_url):
    app = create_app(make_settings(redis_url, max_queue=2))
    with TestClient(app) as c:
        assert c.post("/v1/runs", json=GOOD, headers=ALICE).status_code == 202
        assert c.post("/v1/runs", json=GOOD, headers=ALICE).status_code == 202
        r = c.post("/v1/runs", json=GOOD, headers=ALICE)
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "queue full" in r.json()["message"]


def test_redis_down_is_503_then_recovers_without_restart(private_redis):
    app = create_app(make_settings(private_redis.url))
    with TestClient(app) as c:
        first = c.post("/v1/runs", json=GOOD, headers=ALICE)
        assert first.status_code == 202
        private_redis.stop()
        for path in ("/v1/runs", f"/v1/runs/{first.json()['id']}", "/v1/health", "/metrics"):
            r = c.post(path, json=GOOD, headers=ALICE) if path == "/v1/runs" else c.get(path, headers=ALICE)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["retry-after"]
        private_redis.start()  # same port, empty data
        again = c.post("/v1/runs", json=GOOD, headers=ALICE)
        assert again.status_code == 202, again.text
        assert c.get(f"/v1/runs/{again.json()['id']}", headers=ALICE).json()["status"] == "queued"
        assert c.get("/v1/health").json()["redis"]["ok"] is True


def test_open_access_only_on_loopback(redis_url):
    with pytest.raises(ValueError, match="loopback"):
        create_app(make_settings(redis_url, api_keys={}, open_access=True, host="0.0.0.0"))
    with pytest.raises(ValueError, match="API keys"):
        create_app(make_settings(redis_url, api_keys={}))
    app = create_app(make_settings(redis_url, api_keys={}, open_access=True, host="127.0.0.1"))
    with TestClient(app) as c:
        r = c.post("/v1/runs", json=GOOD)
        assert r.status_code == 202
        assert c.get(f"/v1/runs/{r.json()['id']}").status_code == 200
        assert c.post("/v1/runs", json=GOOD, headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
