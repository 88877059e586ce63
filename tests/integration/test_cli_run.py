"""`sbx run`: the CLI contract other tools rely on (flags, --json keys, exit status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.rootless

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sbx(state_dir, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "SBX_STATE_DIR": str(state_dir), "PYTHONPATH": REPO,
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], input=stdin, env=env,
                          capture_output=True, timeout=60)


def test_json_result_has_contract_keys(tmp_path, busybox_rootfs):
    proc = sbx(tmp_path, "run", "--rootfs", str(busybox_rootfs), "--json", "--env", "X=42",
               "--", "sh", "-c", "echo $X; echo e >&2; exit 3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("verdict", "exit_code", "signal", "stdout", "stderr", "cpu_time", "wall_time",
                "memory"):
        assert key in out
    assert out["verdict"] == "NONZERO_EXIT" and out["exit_code"] == 3
    assert out["stdout"] == "42\n" and out["stderr"] == "e\n"


def test_plain_output_and_limits_flags(tmp_path, busybox_rootfs):
    stdin = tmp_path / "in.txt"
    stdin.write_bytes(b"from a file\n")
    proc = sbx(tmp_path, "run", "--rootfs", str(busybox_rootfs), "--stdin-file", str(stdin),
               "--memory", "64M", "--pids", "16", "--cpu-time", "2", "--output", "1K",
               "--workdir", "/srv", "--", "sh", "-c", "cat; pwd")
    assert proc.returncode == 0
    assert proc.stdout == b"from a file\n/srv\n"


def test_limit_verdict_is_reported_but_run_happened(tmp_path, busybox_rootfs):
    proc = sbx(tmp_path, "run", "--rootfs", str(busybox_rootfs), "--wall-time", "0.3", "--",
               "sleep", "5")
    assert proc.returncode == 0
    assert b"WALL_TIME_LIMIT" in proc.stderr


def test_bad_limit_names_the_field_and_fails(tmp_path, busybox_rootfs):
    proc = sbx(tmp_path, "run", "--rootfs", str(busybox_rootfs), "--memory", "1K", "--", "true")
    assert proc.returncode == 2
    assert b"$.memory" in proc.stderr


def test_setup_failure_is_nonzero_with_stage(tmp_path, busybox_rootfs):
    proc = sbx(tmp_path, "run", "--rootfs", str(busybox_rootfs), "--workdir", "/bin/busybox",
               "--", "true")
    assert proc.returncode == 2
    assert b"SETUP_ERROR (rootfs: mount target" in proc.stderr


def test_missing_rootfs_is_a_clear_error(tmp_path):
    proc = sbx(tmp_path, "run", "--rootfs", str(tmp_path / "nope"), "--", "true")
    assert proc.returncode == 2 and b"not a directory" in proc.stderr
