"""The one exception -> response mapping, auth and settings checks."""

from __future__ import annotations

import msgspec
import pytest
import redis
from litestar import Litestar, get
from litestar.testing import TestClient

from api.auth import KeyRing
from api.errors import error_response
from api.settings import Settings
from sandbox.errors import ImageNotFound, InvalidSpec, SetupError, Unavailable

RAISE: list[Exception] = []


@get("/boom", sync_to_thread=False)
def boom() -> str:
    raise RAISE[0]


def answer(exc: Exception):
    RAISE[:] = [exc]
    app = Litestar([boom], exception_handlers={Exception: error_response}, debug=False)
    with TestClient(app) as c:
        return c.get("/boom")


def test_sandbox_errors_keep_status_code_and_field():
    r = answer(InvalidSpec("files[0].path: bad", field="files[0].path"))
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_spec", "message": "files[0].path: bad", "field": "files[0].path", "id": None}
    r = answer(ImageNotFound("image 'x' not found", field="image"))
    assert r.status_code == 404 and r.json()["error"] == "image_not_found"


def test_unavailable_carries_retry_after():
    r = answer(Unavailable("queue full", retry_after=7))
    assert r.status_code == 503 and r.headers["retry-after"] == "7"


@pytest.mark.parametrize("exc", [redis.ConnectionError("refused"), redis.TimeoutError("slow"),
                                 redis.BusyLoadingError("loading")])
def test_redis_outage_is_503_not_500(exc):
    r = answer(exc)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "Redis" in r.json()["message"]


def test_internal_errors_are_500_without_details():
    r = answer(KeyError("secret-internal-detail"))
    assert r.status_code == 500
    assert "secret" not in r.text
    r = answer(SetupError("mount failed", stage="rootfs"))
    assert r.status_code == 500 and r.json()["error"] == "setup_error"


def test_decode_errors_are_400():
    assert answer(msgspec.DecodeError("bad")).status_code == 400
    assert answer(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")).status_code == 400


def test_keyring_tenants_and_refusals():
    ring = KeyRing(Settings(api_keys={"a" * 20: "alice", "b" * 20: "bob"}))
    assert ring.tenant(f"Bearer {'a' * 20}") == "alice"
    assert ring.tenant(f"bearer   {'b' * 20}  ") == "bob"
    for bad in (None, "", "Bearer", f"Basic {'a' * 20}", "Bearer wrong", f"Bearer {'a' * 19}"):
        with pytest.raises(Exception) as err:
            ring.tenant(bad)
        assert getattr(err.value, "status_code", None) == 401
    open_ring = KeyRing(Settings(api_keys={}, open_access=True))
    assert open_ring.tenant(None) == "anonymous"


def test_settings_refuse_unsafe_configurations():
    with pytest.raises(ValueError, match="loopback"):
        Settings(open_access=True, host="0.0.0.0").check()
    with pytest.raises(ValueError, match="no API keys"):
        Settings().check()
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_keys={"short": "t"}).check()
    Settings(open_access=True, host="::1").check()


def test_settings_from_env_reads_keys_and_redis():
    s = Settings.from_env({"SBX_API_KEY": "x" * 20, "SBX_API_KEYS": "alice:" + "a" * 20 + ",bob:" + "b" * 20,
                           "REDIS_URL": "redis://127.0.0.1:7000/1", "SBX_MAX_QUEUE": "5"})
    assert s.api_keys == {"x" * 20: "default", "a" * 20: "alice", "b" * 20: "bob"}
    assert s.redis_url == "redis://127.0.0.1:7000/1" and s.max_queue == 5
    with pytest.raises(ValueError, match="tenant:key"):
        Settings.from_env({"SBX_API_KEYS": "nocolon"})
