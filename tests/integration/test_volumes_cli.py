"""`sbx volumes ...` and `sbx run --volume/--service/--network` on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.rootless

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sbx(state_dir, *args, tenant: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "SBX_STATE_DIR": str(state_dir), "PYTHONPATH": REPO,
           "PYTHONDONTWRITEBYTECODE": "1"}
    if tenant:
        env["SBX_TENANT"] = tenant
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env,
                          capture_output=True, timeout=60)


def test_volume_lifecycle_and_runs(tmp_path, busybox_rootfs):
    rootfs = str(busybox_rootfs)
    created = sbx(tmp_path, "volumes", "create", "data", "--size", "1M")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["size"] == 1 << 20
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--volume", "data:/data", "--",
            "sh", "-c", "echo kept > /data/f")
    assert r.returncode == 0, r.stderr
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--volume", "data:/data:ro", "--",
            "sh", "-c", "cat /data/f; touch /data/g")
    assert r.stdout == b"kept\n" and b"Read-only" in r.stderr
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--json", "--volume", "data:/data", "--",
            "sh", "-c", "head -c 2000000 /dev/zero > /data/big")
    out = json.loads(r.stdout)
    assert out["verdict"] == "VOLUME_QUOTA" and "quota" in out["message"]
    info = json.loads(sbx(tmp_path, "volumes", "inspect", "data").stdout)
    assert 0 < info["used"] <= info["size"]
    listed = json.loads(sbx(tmp_path, "volumes", "ls", "--json").stdout)
    assert [v["name"] for v in listed] == ["data"]
    # Another tenant sees none of it.
    assert json.loads(sbx(tmp_path, "volumes", "ls", "--json", tenant="other").stdout) == []
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--volume", "data:/data", "--", "true",
            tenant="other")
    assert r.returncode == 2 and b"not found" in r.stderr
    assert sbx(tmp_path, "volumes", "rm", "data").returncode == 0
    assert json.loads(sbx(tmp_path, "volumes", "ls", "--json").stdout) == []


@pytest.mark.parametrize("args", [["volumes", "create", "../x", "--size", "1M"],
                                  ["volumes", "inspect", "nope"],
                                  ["run", "--rootfs", "/", "--volume", "data", "--", "true"],
                                  ["run", "--rootfs", "/", "--service", "web", "--", "true"]])
def test_bad_volume_and_service_arguments_fail_clearly(tmp_path, args):
    r = sbx(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.startswith(b"sbx: "), r.stderr


def test_service_flag_starts_a_service_on_a_private_network(tmp_path, busybox_rootfs):
    rootfs = str(busybox_rootfs)
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--json",
            "--service", f"web={rootfs}:8080,sh -c 'echo hi-from-web | nc -l -p 8080'",
            "--", "nc", "web", "8080")
    out = json.loads(r.stdout)
    assert out["verdict"] == "OK" and out["stdout"] == "hi-from-web\n", out
    assert out["setup_time"] > 0
    r = sbx(tmp_path, "run", "--rootfs", rootfs, "--network", "egress", "--", "true")
    assert r.returncode == 2 and b"egress" in r.stderr  # off unless the operator enables it
