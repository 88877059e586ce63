"""Volumes in real rootless runs: persistence, quota, read-only, concurrency, tenants, links."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import VolumeBusy, VolumeNotFound
from sandbox.runner import Runtime
from sandbox.spec import Limits, RunSpec, Verdict, VolumeMount
from sandbox.volumes import VolumeStore

pytestmark = pytest.mark.rootless

MiB = 1 << 20
PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], **{"env": PATH, **kw})


@pytest.fixture(scope="module")
def vol_runtime(tmp_path_factory):
    """A runtime of its own, so volumes_dir is known to the test (and empty at first)."""
    settings = RuntimeSettings(state_dir=str(tmp_path_factory.mktemp("sbx-vol-state")))
    rt = Runtime(settings)
    yield rt
    rt.close()


@pytest.fixture
def store(vol_runtime):
    store = VolumeStore.from_settings(vol_runtime.settings)
    yield store
    for tenant in os.listdir(store.root) if os.path.isdir(store.root) else ():
        for info in store.list(tenant):
            store.delete(tenant, info.name)


def run_with(rt, store, busybox, tenant, mounts, script, **kw):
    with store.attach(tenant, mounts) as binds:
        return rt.run(sh(script, **kw), busybox, volumes=binds)


def test_data_survives_runs_and_container_deletion(vol_runtime, store, busybox):
    store.create("acme", "data", 4 * MiB)
    rw = [VolumeMount(name="data", path="/data")]
    r = run_with(vol_runtime, store, busybox, "acme", rw,
                 "mkdir -p /data/sub && echo first > /data/sub/f && echo $(id -u) > /data/uid")
    assert r.verdict is Verdict.OK, (r.stderr, r.message)
    # A different container (the first one's root, upper dir and namespaces are all gone).
    r = run_with(vol_runtime, store, busybox, "acme", rw,
                 "cat /data/sub/f /data/uid && echo second >> /data/sub/f")
    assert r.verdict is Verdict.OK and r.stdout == b"first\n1000\n"
    r = run_with(vol_runtime, store, busybox, "acme", rw, "cat /data/sub/f; ls -ln /data/sub")
    assert r.stdout.startswith(b"first\nsecond\n")
    assert b" 1000 " in r.stdout  # the run sees its volume as its own
    info = store.inspect("acme", "data")
    assert 0 < info.used <= 4 * MiB
    # On the host the files are plain files of the runtime user.
    data = os.path.join(store.root, "acme", "data", "data", "sub", "f")
    assert open(data).read() == "first\nsecond\n"
    assert os.stat(data).st_uid == os.getuid()


def test_a_run_over_quota_fails_and_changes_nothing(vol_runtime, store, busybox):
    store.create("acme", "small", 1 * MiB)
    rw = [VolumeMount(name="small", path="/data")]
    r = run_with(vol_runtime, store, busybox, "acme", rw, "echo keep > /data/keep")
    assert r.verdict is Verdict.OK
    before = store.inspect("acme", "small")
    r = run_with(vol_runtime, store, busybox, "acme", rw,
                 "rm /data/keep; head -c 3000000 /dev/zero > /data/big; echo wrote $?",
                 limits=Limits(file_size=64 * MiB))
    assert r.verdict is Verdict.VOLUME_QUOTA, (r.verdict, r.stderr, r.message)
    assert "quota" in r.message and "small" in r.message
    assert r.stdout == b"wrote 1\n"  # the write itself failed (ENOSPC): enforced while writing
    after = store.inspect("acme", "small")
    assert after.used == before.used <= after.size
    # Nothing of the failed run was kept: not its write, not its deletion.
    r = run_with(vol_runtime, store, busybox, "acme", rw, "ls /data; cat /data/keep")
    assert r.stdout == b"keep\nkeep\n"
    files = os.listdir(os.path.join(store.root, "acme", "small", "data"))
    assert files == ["keep"]


def test_exactly_the_quota_is_allowed(vol_runtime, store, busybox):
    store.create("acme", "exact", 1 * MiB)
    r = run_with(vol_runtime, store, busybox, "acme", [VolumeMount(name="exact", path="/d")],
                 "head -c 1048576 /dev/zero > /d/full && echo ok")
    assert r.verdict is Verdict.OK and r.stdout == b"ok\n", (r.stderr, r.message)
    assert store.inspect("acme", "exact").used == 1 * MiB


def test_a_run_stopped_by_a_limit_saves_nothing(vol_runtime, store, busybox):
    store.create("acme", "tx", 1 * MiB)
    mounts = [VolumeMount(name="tx", path="/d")]
    r = run_with(vol_runtime, store, busybox, "acme", mounts, "echo half > /d/f; sleep 30",
                 limits=Limits(wall_time=0.5))
    assert r.verdict is Verdict.WALL_TIME_LIMIT
    r = run_with(vol_runtime, store, busybox, "acme", mounts, "ls /d | wc -l")
    assert r.stdout.strip() == b"0"


def test_read_only_mount_cannot_be_written(vol_runtime, store, busybox):
    store.create("acme", "ro", 1 * MiB)
    run_with(vol_runtime, store, busybox, "acme", [VolumeMount(name="ro", path="/d")],
             "echo original > /d/f")
    r = run_with(vol_runtime, store, busybox, "acme",
                 [VolumeMount(name="ro", path="/d", read_only=True)],
                 "cat /d/f; echo changed > /d/f; echo new > /d/g; rm /d/f; "
                 "mount -o remount,rw /d 2>&1; true", uid=0, gid=0)
    assert r.verdict is Verdict.OK
    assert r.stdout.startswith(b"original\n")
    assert r.stderr.count(b"Read-only file system") >= 3
    r = run_with(vol_runtime, store, busybox, "acme", [VolumeMount(name="ro", path="/d")],
                 "ls /d; cat /d/f")
    assert r.stdout == b"f\noriginal\n"


def test_second_writer_is_refused_while_readers_share(vol_runtime, store, busybox):
    store.create("acme", "shared", 1 * MiB)
    rw = [VolumeMount(name="shared", path="/d")]
    ro = [VolumeMount(name="shared", path="/d", read_only=True)]
    run_with(vol_runtime, store, busybox, "acme", rw, "echo v1 > /d/v")
    started = threading.Event()
    results = {}

    def writer():
        with store.attach("acme", rw) as binds:
            started.set()
            results["w"] = vol_runtime.run(sh("sleep 1; echo v2 > /d/v"), busybox, volumes=binds)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(5)
    with pytest.raises(VolumeBusy):
        run_with(vol_runtime, store, busybox, "acme", rw, "echo v3 > /d/v")
    with pytest.raises(VolumeBusy):
        run_with(vol_runtime, store, busybox, "acme", ro, "cat /d/v")
    t.join()
    assert results["w"].verdict is Verdict.OK
    # Two readers at once, both see the writer's committed state.
    outs = []

    def reader():
        outs.append(run_with(vol_runtime, store, busybox, "acme", ro, "sleep 0.5; cat /d/v"))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    t0 = time.monotonic()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert [o.stdout for o in outs] == [b"v2\n", b"v2\n"]
    assert time.monotonic() - t0 < 3  # they did not take turns on an exclusive lock


def test_waiting_writer_runs_after_the_first(vol_runtime, store, busybox):
    store.create("acme", "queue", 1 * MiB)
    rw = [VolumeMount(name="queue", path="/d")]
    outs = []

    def writer(tag: str):
        with store.attach("acme", rw, wait=20) as binds:
            outs.append(vol_runtime.run(sh(f"v=$(cat /d/n 2>/dev/null || echo 0); sleep 0.3; "
                                           f"echo $((v+1)) > /d/n"), busybox, volumes=binds))

    threads = [threading.Thread(target=writer, args=(str(i),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.verdict is Verdict.OK for o in outs)
    r = run_with(vol_runtime, store, busybox, "acme", rw, "cat /d/n")
    assert r.stdout == b"3\n"  # no lost update: each writer saw the one before


def test_tenants_cannot_reach_each_others_volumes(vol_runtime, store, busybox):
    store.create("alice", "secret", 1 * MiB)
    run_with(vol_runtime, store, busybox, "alice", [VolumeMount(name="secret", path="/d")],
             "echo alice-data > /d/f")
    with pytest.raises(VolumeNotFound):
        run_with(vol_runtime, store, busybox, "bob", [VolumeMount(name="secret", path="/d")],
                 "cat /d/f")
    assert [v.name for v in store.list("bob")] == []
    with pytest.raises(VolumeNotFound):
        store.delete("bob", "secret")
    # bob's own volume of the same name is a different one
    store.create("bob", "secret", 1 * MiB)
    r = run_with(vol_runtime, store, busybox, "bob", [VolumeMount(name="secret", path="/d")],
                 "cat /d/f 2>&1; ls /d | wc -l")
    assert b"alice-data" not in r.stdout and r.stdout.endswith(b"0\n")


def test_links_a_run_leaves_are_never_followed_by_the_host(vol_runtime, store, busybox,
                                                           tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("host secret\n")
    target_dir = tmp_path / "host-dir"
    target_dir.mkdir()
    store.create("acme", "links", 1 * MiB)
    mounts = [VolumeMount(name="links", path="/d")]
    r = run_with(vol_runtime, store, busybox, "acme", mounts,
                 f"ln -s {secret} /d/abs; ln -s ../../../../../../../../{secret} /d/rel; "
                 f"ln -s {target_dir} /d/dir; mkfifo /d/fifo; echo ok")
    assert r.verdict is Verdict.OK, r.stderr
    data = os.path.join(store.root, "acme", "links", "data")
    assert sorted(os.listdir(data)) == ["abs", "dir", "rel"]  # the FIFO was not kept
    assert os.readlink(os.path.join(data, "abs")) == str(secret)
    # Next run: the links come back as links (copy-in did not read through them), and
    # writing through them inside the container reaches nothing of the host.
    r = run_with(vol_runtime, store, busybox, "acme", mounts,
                 "cat /d/abs 2>&1; echo pwned > /d/dir/x 2>&1; readlink /d/abs; true")
    assert b"host secret" not in r.stdout
    assert str(secret).encode() in r.stdout
    assert os.listdir(target_dir) == []
    assert secret.read_text() == "host secret\n"
    assert store.inspect("acme", "links").used <= 1 * MiB
