"""cgroup drivers against directory trees shaped like v1 and v2 hierarchies.

The v1 path also runs for real in the integration tests on this machine; the v2 path has no
delegated v2 controllers here, so these tests are what exercise its file protocol.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.errors import SetupError


def make_v2(root: Path) -> Path:
    tree = root / "sbx"
    tree.mkdir(parents=True)
    (tree / "cgroup.controllers").write_text("cpu memory pids\n")
    (tree / "cgroup.subtree_control").write_text("")
    return tree


def fake_v2_run_files(path: Path) -> None:
    """What the kernel would create in a new v2 cgroup (the fake has to create them)."""
    for name, text in {"memory.max": "max", "memory.swap.max": "max", "pids.max": "max",
                       "memory.peak": "7340032\n", "cgroup.procs": "",
                       "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
                       "pids.events": "max 4\n",
                       "cpu.stat": "usage_usec 1500000\nuser_usec 1000000\n"}.items():
        (path / name).write_text(text)


def test_v2_detect_enter_create_stats_remove(tmp_path, monkeypatch):
    tree = make_v2(tmp_path)
    leaf = tree / f"helper-{os.getpid()}"  # as the kernel would populate it on mkdir
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    driver = cgroups.detect("auto", v2_root=str(tree), v1_root=str(tmp_path / "none"), name="sbx")
    assert isinstance(driver, cgroups.CgroupV2)
    assert (tree / f"helper-{os.getpid()}" / "cgroup.procs").read_text() == "0"
    assert (tree / "cgroup.subtree_control").read_text() == "+memory +pids"

    real_mkdir = os.mkdir
    monkeypatch.setattr(cgroups.os, "mkdir",
                        lambda p, *a: (real_mkdir(p, *a), fake_v2_run_files(Path(p))))
    cg = driver.create(memory=64 << 20, pids=33)
    path = Path(cg.dirs["unified"])
    assert path.parent == tree and path.name.startswith(f"run-{os.getpid()}-")
    assert (path / "memory.max").read_text() == str(64 << 20)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == "33"
    assert cg.procs_files == [str(path / "cgroup.procs")]
    fds_before = len(os.listdir("/proc/self/fd"))
    stats = cg.stats()
    assert stats == cgroups.CgroupStats(memory_peak=7340032, oom_kills=1, pids_limit_hits=4,
                                        cpu_time=1.5)
    # The files read stay open, and every read sees what the file says now.
    assert len(os.listdir("/proc/self/fd")) > fds_before
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert cg.stats() == cgroups.CgroupStats(memory_peak=7340032, oom_kills=2,
                                             pids_limit_hits=4, cpu_time=2.5)
    for f in path.iterdir():  # a real cgroup's files vanish with rmdir
        f.unlink()
    cg.remove()
    assert not path.exists()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # removing closed them


def make_v1(root: Path, controllers=("memory", "pids", "cpu,cpuacct")) -> Path:
    for ctrl in controllers:
        (root / ctrl / "sbx").mkdir(parents=True)
    return root


def test_v1_detect_finds_comounted_cpuacct(tmp_path):
    v1 = make_v1(tmp_path)
    driver = cgroups.detect("auto", v2_root=str(tmp_path / "no-v2"), v1_root=str(v1), name="sbx")
    assert isinstance(driver, cgroups.CgroupV1)
    assert driver.cpuacct_root == str(v1 / "cpu,cpuacct" / "sbx")


def test_v1_stats_parse(tmp_path):
    v1 = make_v1(tmp_path)
    driver = cgroups.CgroupV1(str(v1 / "memory/sbx"), str(v1 / "pids/sbx"),
                              str(v1 / "cpu,cpuacct/sbx"))
    dirs = {"memory": v1 / "memory/sbx/r", "pids": v1 / "pids/sbx/r",
            "cpuacct": v1 / "cpu,cpuacct/sbx/r"}
    for d in dirs.values():
        d.mkdir()
    (dirs["memory"] / "memory.max_usage_in_bytes").write_text("1048576\n")
    (dirs["memory"] / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (dirs["pids"] / "pids.events").write_text("max 0\n")
    (dirs["cpuacct"] / "cpuacct.usage").write_text("250000000\n")
    cg = cgroups.RunCgroup(driver, {k: str(v) for k, v in dirs.items()})
    assert cg.stats() == cgroups.CgroupStats(memory_peak=1048576, oom_kills=2,
                                             pids_limit_hits=0, cpu_time=0.25)


def test_nothing_writable_means_rlimits(tmp_path):
    assert cgroups.detect("auto", v2_root=str(tmp_path / "x"), v1_root=str(tmp_path / "y"),
                          name="sbx") is None
    with pytest.raises(SetupError, match="v1"):
        cgroups.detect("v1", v2_root=str(tmp_path / "x"), v1_root=str(tmp_path), name="sbx")


def test_stale_cgroups_of_dead_helpers_are_removed(tmp_path):
    v1 = make_v1(tmp_path, controllers=("memory", "pids"))
    driver = cgroups.CgroupV1(str(v1 / "memory/sbx"), str(v1 / "pids/sbx"), None)
    dead = 2 ** 22 + 1  # above pid_max: never alive
    for ctrl in ("memory", "pids"):
        (v1 / ctrl / "sbx" / f"run-{dead}-1").mkdir()
        (v1 / ctrl / "sbx" / f"run-{os.getpid()}-1").mkdir()
        (v1 / ctrl / "sbx" / "unrelated").mkdir()
    assert driver.clean_stale() == 2
    for ctrl in ("memory", "pids"):
        assert sorted(os.listdir(v1 / ctrl / "sbx")) == [f"run-{os.getpid()}-1", "unrelated"]


def fake_v1_run_files(path: Path) -> None:
    """What the kernel would create in a new v1 cgroup, per controller."""
    files = {"cgroup.procs": "", "memory.limit_in_bytes": "", "memory.max_usage_in_bytes": "0",
             "memory.usage_in_bytes": "0", "memory.oom_control": "oom_kill 0\n",
             "pids.max": "max", "pids.events": "max 0\n", "cpuacct.usage": "0"}
    for name, text in files.items():
        (path / name).write_text(text)


def test_v1_pool_reuses_with_counters_rebased(tmp_path, monkeypatch):
    v1 = make_v1(tmp_path, controllers=("memory", "pids", "cpuacct"))
    driver = cgroups.CgroupV1(str(v1 / "memory/sbx"), str(v1 / "pids/sbx"), str(v1 / "cpuacct/sbx"))
    real_mkdir = os.mkdir
    monkeypatch.setattr(cgroups.os, "mkdir",
                        lambda p, *a: (real_mkdir(p, *a), fake_v1_run_files(Path(p))))
    cg = driver.acquire(memory=64 << 20, pids=9)
    mem, pids, cpu = (Path(cg.dirs[c]) for c in ("memory", "pids", "cpuacct"))
    # a first run: 5 MiB peak, an OOM kill, a pids hit, 2 s of CPU
    (mem / "memory.max_usage_in_bytes").write_text(str(5 << 20))
    (mem / "memory.usage_in_bytes").write_text(str(300 << 10))  # kernel objects left over
    (mem / "memory.oom_control").write_text("oom_kill 1\n")
    (pids / "pids.events").write_text("max 2\n")
    (cpu / "cpuacct.usage").write_text(str(2 * 10**9))
    assert cg.stats() == cgroups.CgroupStats(memory_peak=5 << 20, oom_kills=1,
                                             pids_limit_hits=2, cpu_time=2.0)
    driver.release(cg)
    assert driver.free == [cg]
    again = driver.acquire(memory=32 << 20, pids=5)
    assert again is cg and driver.free == []
    assert (mem / "memory.limit_in_bytes").read_text() == str(32 << 20)
    assert (pids / "pids.max").read_text() == "5"
    assert (mem / "memory.max_usage_in_bytes").read_text() == "0"  # peak reset requested
    (mem / "memory.max_usage_in_bytes").write_text(str(1 << 20))  # the kernel's answer + run
    (cpu / "cpuacct.usage").write_text(str(2_500_000_000))
    assert cg.stats() == cgroups.CgroupStats(memory_peak=(1 << 20) - (300 << 10), oom_kills=0,
                                             pids_limit_hits=0, cpu_time=0.5)
    assert cg.cpu_time() == 0.5


def test_pool_is_bounded_and_busy_cgroups_are_not_kept(tmp_path, monkeypatch):
    v1 = make_v1(tmp_path, controllers=("memory", "pids"))
    driver = cgroups.CgroupV1(str(v1 / "memory/sbx"), str(v1 / "pids/sbx"), None)
    real_mkdir = os.mkdir
    monkeypatch.setattr(cgroups.os, "mkdir",
                        lambda p, *a: (real_mkdir(p, *a), fake_v1_run_files(Path(p))))
    removed = []
    monkeypatch.setattr(cgroups.RunCgroup, "remove", lambda self: removed.append(self))
    busy = driver.acquire(memory=8 << 20, pids=4)
    Path(busy.dirs["pids"], "cgroup.procs").write_text("4242\n")
    driver.release(busy)
    assert removed == [busy] and driver.free == []
    many = [driver.acquire(memory=8 << 20, pids=4) for _ in range(cgroups.POOL_SIZE + 2)]
    for cg in many:
        driver.release(cg)
    assert len(driver.free) == cgroups.POOL_SIZE and len(removed) == 3
    driver.close()
    assert driver.free == [] and len(removed) == 3 + cgroups.POOL_SIZE
