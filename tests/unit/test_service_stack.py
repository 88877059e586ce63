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


STACK_OWNER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from cli.service_cmd import Stack
proc = Stack(Path(sys.argv[2])).start("redis", ["sleep", "60"])
print(proc.pid, flush=True)
time.sleep(60)
"""


def test_children_get_sigterm_when_sbx_up_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", STACK_OWNER, str(repo), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        child = int(owner.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
    finally:
        owner.send_signal(signal.SIGKILL)  # no stop(): only the death signal can reach it
        owner.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and _state(child) != "Z":
        assert time.monotonic() < deadline, "the stack's child outlived sbx up"
        time.sleep(0.05)
