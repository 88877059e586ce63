"""Nothing outlives a run: processes, mounts, cgroups, scratch directories, runner fds."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from sandbox.cgroups import POOL_SIZE
from sandbox.config import RuntimeSettings
from sandbox.runner import Runtime
from sandbox.spec import Limits, RunSpec, Verdict
from tests.fixtures.containers import helper_cloners, helper_containers
from tests.fixtures.ports import wait_until

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/bin:/bin"}
SUBID_FLOOR = 100000


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], **{"env": PATH, **kw})


def container_processes(marker: str) -> list[int]:
    """Live (non-zombie) host pids of a subordinate uid whose command line has `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if fields["State"].split()[0] == "Z" or int(fields["Uid"].split()[0]) < SUBID_FLOOR:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


def run_cgroups(helper: int) -> set[str]:
    """Names of the helper's run cgroups, over every v1 controller."""
    found = set()
    for ctrl in ("memory", "pids", "cpuacct"):
        base = f"/sys/fs/cgroup/{ctrl}/sbx"
        if os.path.isdir(base):
            found |= {e for e in os.listdir(base) if e.startswith(f"run-{helper}-")}
    return found


def settled(scratch: str) -> bool:
    """Only the /dev template and at most one slot (the spare) in the helper's scratch."""
    entries = set(os.listdir(scratch))
    return "dev" in entries and len(entries - {"dev"}) <= 1


def test_double_forked_orphan_is_killed(runtime, busybox):
    marker = f"sbx-orphan-{os.getpid()}"
    script = f"(setsid sh -c 'sleep 300; echo {marker}' &) ; sleep 0.2; echo started"
    r = runtime.run(sh(script), busybox)
    assert r.verdict is Verdict.OK and r.stdout == b"started\n"
    time.sleep(0.1)
    assert container_processes(marker) == []


def test_two_hundred_runs_leave_nothing_behind(runtime, busybox):
    helper = runtime.helper_pid
    runtime.run(sh("true"), busybox)  # warm: first-run lazies are not leaks
    scratch = f"/proc/{helper}/root{runtime.settings.scratch_dir}"
    wait_until(lambda: settled(scratch), timeout=5, what="the warm-up run's scratch to go")
    fds_before = len(os.listdir("/proc/self/fd"))
    mounts_before = open(f"/proc/{helper}/mountinfo").read().count("\n")
    threads_before = threading.active_count()
    verdicts = set()
    for i in range(200):
        script = ["true", "sleep 5 & echo sbx-200-runs", "exit 2",
                  "head -c 3000000 /dev/zero"][i % 4]
        r = runtime.run(sh(script, limits=Limits(output=1 << 20, wall_time=5)), busybox)
        verdicts.add(r.verdict)
    assert verdicts == {Verdict.OK, Verdict.NONZERO_EXIT, Verdict.OUTPUT_LIMIT}
    # The helper answers before it unmounts the last run's scratch: let it finish.
    wait_until(lambda: open(f"/proc/{helper}/mountinfo").read().count("\n") <= mounts_before,
               timeout=5, what="the last run's mounts to go")
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
    # What may remain: the one spare container the helper keeps cloned for the next run, and
    # a few idle cgroups kept for reuse (bounded), all without a process.
    assert len(helper_containers(helper)) <= 1
    assert container_processes("sbx-200-runs") == []
    assert len(run_cgroups(helper)) <= POOL_SIZE + 1
    assert settled(scratch)


def test_helper_killed_mid_run_fails_the_run_and_recovers(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path)))
    try:
        first_helper = rt.helper_pid
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=rt.run(sh("sleep 30; echo sbx-helper-killed"), busybox)))
        t.start()
        time.sleep(0.5)
        os.kill(first_helper, signal.SIGKILL)
        t.join(10)
        assert not t.is_alive()
        assert result["r"].verdict is Verdict.INTERNAL_ERROR
        time.sleep(0.2)
        # PDEATHSIG took the container down with it
        assert container_processes("sbx-helper-killed") == []
        again = rt.run(sh("echo back"), busybox)
        assert again.verdict is Verdict.OK and again.stdout == b"back\n"
        assert rt.helper_pid != first_helper
    finally:
        rt.close()


def test_cancel_kills_a_running_container(runtime, busybox):
    key = runtime.new_key()
    result = {}
    t = threading.Thread(target=lambda: result.update(
        r=runtime.run(sh("sleep 30"), busybox, key=key)))
    t.start()
    time.sleep(0.3)
    runtime.kill(key)
    t.join(5)
    assert not t.is_alive()
    assert result["r"].signal == signal.SIGKILL and result["r"].message == "cancelled"


def test_close_stops_the_helper(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path)))
    helper = rt.helper_pid
    assert rt.run(sh("true"), busybox).verdict is Verdict.OK
    assert run_cgroups(helper)  # the spare's, at least
    rt.close()
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{helper}/status") or \
        "zombie" in open(f"/proc/{helper}/status").read()
    assert run_cgroups(helper) == set()  # idle pooled cgroups removed on the way out


def test_a_dead_spare_is_replaced_not_reported(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path)))
    try:
        assert rt.run(sh("true"), busybox).verdict is Verdict.OK
        helper = rt.helper_pid
        wait_until(lambda: len(helper_containers(helper)) == 1, timeout=5, what="a spare")
        (spare,) = helper_containers(helper)
        os.kill(spare, signal.SIGKILL)
        time.sleep(0.1)
        r = rt.run(sh("echo fine"), busybox)
        assert r.verdict is Verdict.OK and r.stdout == b"fine\n"
    finally:
        rt.close()


def test_a_dead_cloner_is_restarted_and_containers_stay_the_helpers(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path), warm_spares=0))
    try:
        assert rt.run(sh("true"), busybox).verdict is Verdict.OK
        helper = rt.helper_pid
        (cloner,) = helper_cloners(helper)
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=rt.run(sh("sleep 1; echo sbx-cloned"), busybox)))
        t.start()
        wait_until(lambda: helper_containers(helper), timeout=5, what="the container")
        # The container is the helper's child (CLONE_PARENT), not the cloner's: killing
        # the cloner leaves the run alone.
        os.kill(cloner, signal.SIGKILL)
        t.join(10)
        assert result["r"].verdict is Verdict.OK and result["r"].stdout == b"sbx-cloned\n"
        again = rt.run(sh("echo again"), busybox)  # a new cloner clones this one
        assert again.verdict is Verdict.OK and again.stdout == b"again\n"
        wait_until(lambda: not os.path.exists(f"/proc/{cloner}"), timeout=5,
                   what="the dead cloner to be reaped")
        assert len(helper_cloners(helper)) == 1
    finally:
        rt.close()


def test_single_id_mode_refuses_unmapped_uids_clearly(tmp_path, busybox):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path), userns="single"))
    try:
        assert rt.health()["userns"] == "single"
        r = rt.run(sh("id -u"), busybox)
        assert r.verdict is Verdict.SETUP_ERROR and r.stage == "user"
        assert "not mapped" in r.message and "uid 0" in r.message
        r = rt.run(sh("id -u", uid=0, gid=0), busybox)
        assert r.verdict is Verdict.OK and r.stdout == b"0\n"
    finally:
        rt.close()
