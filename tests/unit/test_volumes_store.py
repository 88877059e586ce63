"""sandbox/volumes.py without namespaces: the store's names, tenants and locks, and the tree
copy that never trusts what a run left in a volume."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from sandbox.errors import Conflict, InvalidSpec, VolumeBusy, VolumeError, VolumeNotFound
from sandbox.spec import VolumeMount
from sandbox.volumes import PAGE, TreeError, VolumeStore, copy_tree, remove_tree

MiB = 1 << 20


@pytest.fixture
def store(tmp_path) -> VolumeStore:
    return VolumeStore(str(tmp_path / "volumes"), max_size=64 * MiB, max_per_tenant=3)


def test_create_list_inspect_delete(store: VolumeStore) -> None:
    info = store.create("acme", "data", 5000)
    assert info.name == "data" and info.size == 2 * PAGE  # whole pages
    assert info.used == 0 and info.created_at > 0
    assert [v.name for v in store.list("acme")] == ["data"]
    assert store.inspect("acme", "data") == info
    store.delete("acme", "data")
    assert store.list("acme") == []
    with pytest.raises(VolumeNotFound):
        store.inspect("acme", "data")
    with pytest.raises(VolumeNotFound):
        store.delete("acme", "data")


def test_create_twice_is_a_conflict(store: VolumeStore) -> None:
    store.create("acme", "data", MiB)
    with pytest.raises(Conflict):
        store.create("acme", "data", 2 * MiB)
    assert store.inspect("acme", "data").size == MiB


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "", "A", "-x", "x" * 64, "a\0b",
                                  ".hidden", "data/../../etc", "/abs"])
def test_bad_names_are_refused(store: VolumeStore, name: str) -> None:
    with pytest.raises(InvalidSpec):
        store.create("acme", name, MiB)
    with pytest.raises(InvalidSpec):
        store.inspect("acme", name)
    assert not os.path.exists(os.path.join(store.root, "acme", name or "x"))


@pytest.mark.parametrize("tenant", ["..", ".", "a/b", "", ".x", "a" * 65])
def test_bad_tenants_are_refused(store: VolumeStore, tenant: str) -> None:
    with pytest.raises(InvalidSpec):
        store.create(tenant, "data", MiB)
    with pytest.raises(InvalidSpec):
        store.list(tenant)


def test_size_bounds(store: VolumeStore) -> None:
    with pytest.raises(InvalidSpec):
        store.create("acme", "big", 65 * MiB)
    with pytest.raises(InvalidSpec):
        store.create("acme", "tiny", 1)
    assert store.list("acme") == []


def test_per_tenant_count(store: VolumeStore) -> None:
    for name in ("a", "b", "c"):
        store.create("acme", name, MiB)
    with pytest.raises(VolumeError):
        store.create("acme", "d", MiB)
    store.create("other", "d", MiB)  # the bound is per tenant


def test_tenants_never_see_each_other(store: VolumeStore) -> None:
    store.create("alice", "data", MiB)
    assert store.list("bob") == []
    with pytest.raises(VolumeNotFound):
        store.inspect("bob", "data")
    with pytest.raises(VolumeNotFound):
        store.delete("bob", "data")
    with pytest.raises(VolumeNotFound):
        with store.attach("bob", [VolumeMount(name="data", path="/data")]):
            pass
    assert store.inspect("alice", "data").name == "data"


def test_attach_resolves_and_locks(store: VolumeStore) -> None:
    store.create("acme", "data", MiB)
    with store.attach("acme", [VolumeMount(name="data", path="/data/")]) as binds:
        (vb,) = binds
        assert vb.target == "/data" and not vb.read_only and vb.quota == MiB
        assert vb.root == os.path.join(store.root, "acme", "data")
        with pytest.raises(VolumeBusy):  # a second writer is refused
            with store.attach("acme", [VolumeMount(name="data", path="/d")]):
                pass
        with pytest.raises(VolumeBusy):  # so is a reader while a writer holds it
            with store.attach("acme", [VolumeMount(name="data", path="/d", read_only=True)]):
                pass
        with pytest.raises(VolumeBusy):  # and deleting it
            store.delete("acme", "data")
    with store.attach("acme", [VolumeMount(name="data", path="/d")]):
        pass  # released


def test_readers_share(store: VolumeStore) -> None:
    store.create("acme", "data", MiB)
    ro = [VolumeMount(name="data", path="/d", read_only=True)]
    with store.attach("acme", ro), store.attach("acme", ro):
        with pytest.raises(VolumeBusy):
            with store.attach("acme", [VolumeMount(name="data", path="/d")]):
                pass


def test_waiting_writer_gets_the_volume_when_released(store: VolumeStore) -> None:
    store.create("acme", "data", MiB)
    mounts = [VolumeMount(name="data", path="/d")]
    released = threading.Event()

    def holder() -> None:
        with store.attach("acme", mounts):
            time.sleep(0.3)
        released.set()

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.1)
    with store.attach("acme", mounts, wait=5.0):
        assert released.is_set()
    t.join()


def test_attach_refuses_duplicates_and_reserved_paths(store: VolumeStore) -> None:
    store.create("acme", "a", MiB)
    store.create("acme", "b", MiB)
    for mounts in ([VolumeMount(name="a", path="/x"), VolumeMount(name="a", path="/y")],
                   [VolumeMount(name="a", path="/x"), VolumeMount(name="b", path="/x")],
                   [VolumeMount(name="a", path="/proc/x")], [VolumeMount(name="a", path="/")],
                   [VolumeMount(name="a", path="/dev")], [VolumeMount(name="a", path="rel")],
                   [VolumeMount(name="a", path="/x/../../etc")]):
        with pytest.raises(InvalidSpec):
            with store.attach("acme", mounts):
                pass


def test_volume_replaced_by_symlink_is_not_followed(store: VolumeStore, tmp_path) -> None:
    store.create("acme", "data", MiB)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "lock").touch()
    path = os.path.join(store.root, "acme", "data")
    remove_tree(path)
    os.symlink(elsewhere, path)
    with pytest.raises(VolumeNotFound):
        with store.attach("acme", [VolumeMount(name="data", path="/d")]):
            pass
    assert store.list("acme") == []


# ------------------------------------------------------------------------------- tree copies


def _tree(root) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), stat.S_IMODE(st.st_mode))
    return out


def _copy(src, dst) -> None:
    os.makedirs(dst, exist_ok=True)
    s = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    d = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_tree(s, d, owner=None)
    finally:
        os.close(s)
        os.close(d)


def test_copy_keeps_links_as_links_and_drops_fifos(tmp_path) -> None:
    src, dst, secret = tmp_path / "src", tmp_path / "dst", tmp_path / "secret"
    secret.write_text("host secret")
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"hello")
    os.chmod(src / "sub" / "f", 0o4755)  # setuid bit is not kept
    os.symlink(str(secret), src / "abs-link")
    os.symlink("../../secret", src / "sub" / "rel-link")
    os.symlink(str(tmp_path), src / "dir-link")
    os.mkfifo(src / "fifo")
    _copy(src, dst)
    tree = _tree(dst)
    assert tree == {
        "sub": ("dir",), "sub/f": ("file", b"hello", 0o755),
        "abs-link": ("link", str(secret)), "sub/rel-link": ("link", "../../secret"),
        "dir-link": ("link", str(tmp_path)),
    }
    assert secret.read_text() == "host secret"


def test_copy_keeps_holes_and_hard_links(tmp_path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 40)  # a terabyte of hole
        f.write(b"end")
    (src / "a").write_bytes(b"x" * 10000)
    os.link(src / "a", src / "b")
    _copy(src, dst)
    st = os.stat(dst / "sparse")
    assert st.st_size == (1 << 40) + 3 and st.st_blocks * 512 < MiB
    with open(dst / "sparse", "rb") as f:
        f.seek(1 << 40)
        assert f.read() == b"end"
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino


def test_copy_refuses_absurd_depth(tmp_path) -> None:
    src = tmp_path / "src"
    deep = src
    for _ in range(200):
        deep = deep / "d"
    os.makedirs(deep)
    with pytest.raises(TreeError):
        _copy(src, tmp_path / "dst")


def test_remove_tree_gets_past_read_only_directories(tmp_path) -> None:
    top = tmp_path / "top"
    (top / "ro" / "inner").mkdir(parents=True)
    (top / "ro" / "inner" / "f").write_text("x")
    os.chmod(top / "ro" / "inner", 0o500)
    os.chmod(top / "ro", 0)
    remove_tree(str(top))
    assert not top.exists()
