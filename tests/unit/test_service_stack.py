"""`sbx up`'s process stack: which child's exit is a failure, and that none stays a zombie."""

from __future__ import annotations

import os
import time

from cli.service_cmd import Stack


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_finished_oneshot_child_is_reaped_and_not_a_failure(tmp_path):
    stack = Stack(tmp_path)
    proc = stack.start("publish", ["true"], oneshot=True)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{proc.pid}") and _state(proc.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert stack.dead() is None
    assert not os.path.exists(f"/proc/{proc.pid}")  # reaped, not left a zombie


def test_a_long_running_child_that_exits_is_reported(tmp_path):
    stack = Stack(tmp_path)
    proc = stack.start("api", ["false"])
    proc.wait()
    problem = stack.dead()
    assert problem is not None and problem.startswith("api exited with 1")
