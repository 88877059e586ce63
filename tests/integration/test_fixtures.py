"""Smoke tests of the shared fixtures: each server answers, each root filesystem is usable."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import urllib.request

import pytest
import redis

from tests.fixtures.registry import v2_status
from tests.fixtures.rootfs import is_static_elf


@pytest.mark.redis
def test_redis_server_answers_ping(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        assert client.dbsize() == 0  # redis_url hands out an empty database
        client.set("sbx:probe", b"1")
        assert client.get("sbx:probe") == b"1"
    finally:
        client.close()


@pytest.mark.redis
def test_redis_url_is_flushed_between_tests(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get("sbx:probe") is None
    finally:
        client.close()


@pytest.mark.registry
def test_registry_server_serves_v2_and_stores_blobs(registry_server: str) -> None:
    assert v2_status(registry_server) == 200
    blob = b"sbx registry fixture probe\n"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    start = urllib.request.Request(
        f"http://{registry_server}/v2/sbx-test/probe/blobs/uploads/", method="POST"
    )
    with urllib.request.urlopen(start, timeout=5) as response:
        assert response.status == 202
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry_server}{location}"
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{sep}digest={digest}", data=blob, method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=5) as response:
        assert response.status == 201
    with urllib.request.urlopen(
        f"http://{registry_server}/v2/sbx-test/probe/blobs/{digest}", timeout=5
    ) as response:
        assert response.read() == blob


@pytest.mark.registry
def test_registry_with_auth_wants_credentials(registry_with_auth) -> None:
    reg = registry_with_auth
    assert v2_status(reg.host) == 401
    assert v2_status(reg.host, reg.auth_header) == 200
    wrong = type(reg)(reg.host, reg.username, "wrong")
    assert v2_status(reg.host, wrong.auth_header) == 401


def test_busybox_rootfs_has_static_busybox_and_applets(busybox_rootfs) -> None:
    busybox = busybox_rootfs / "bin/busybox"
    assert busybox.is_file() and not busybox.is_symlink()
    assert os.access(busybox, os.X_OK)
    assert is_static_elf(busybox)
    assert os.readlink(busybox_rootfs / "bin/sh") == "busybox"
    assert (busybox_rootfs / "usr/bin/env").resolve() == busybox.resolve()
    for d in ("tmp", "proc", "dev", "work"):
        assert (busybox_rootfs / d).is_dir() and not any((busybox_rootfs / d).iterdir())
    assert "runner:x:1000:1000:" in (busybox_rootfs / "etc/passwd").read_text()
    assert (busybox_rootfs / "etc/group").read_text().startswith("root:x:0:")
    assert busybox.stat().st_uid == os.geteuid()
    # Static, so it runs from the host as well; through an applet link, as a container would.
    out = subprocess.run(
        [str(busybox_rootfs / "bin/sh"), "-c", "echo $((6 * 7))"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout == "42\n"


@pytest.mark.rootless
def test_python_rootfs_is_a_debian_tree_with_python(python_rootfs) -> None:
    python = python_rootfs / "usr/bin/python3.11"
    assert python.is_file() and os.access(python, os.X_OK)
    assert os.readlink(python_rootfs / "usr/bin/python3") == "python3.11"
    assert (python_rootfs / "bin/dash").is_file()
    assert (python_rootfs / "bin/busybox").is_file()
    assert (python_rootfs / "usr/lib/python3.11/os.py").is_file()
    assert "runner:x:1000:1000:" in (python_rootfs / "etc/passwd").read_text()
    for d in ("tmp", "proc", "dev", "sys", "work"):
        assert (python_rootfs / d).is_dir()
    # No device nodes or fifos were unpacked, and everything belongs to the test user.
    for dirpath, dirnames, filenames in os.walk(python_rootfs):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode))
            assert st.st_uid == os.geteuid()


@pytest.mark.rootless
def test_python_rootfs_runs_python_in_a_user_namespace(python_rootfs) -> None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.fail("bubblewrap is not installed: run ./dev install")
    out = subprocess.run(
        [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", str(python_rootfs), "/",
         "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv",
         "/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 11)"
