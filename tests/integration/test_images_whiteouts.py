"""OCI whiteouts give the right merged view in a real overlay root, unprivileged.

Layers are unpacked by the store (whiteouts -> user.overlay.* xattrs), then stacked (a) by a
plain `mount -t overlay -o userxattr` in `unshare -Urm`, and (b) by the sbx runtime in a run.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile

import pytest

from sandbox.config import RuntimeSettings
from sandbox.oci import model
from sandbox.oci.store import ImageStore
from sandbox.spec import Rootfs, RunSpec, Verdict

pytestmark = pytest.mark.rootless

LOWER = [("t/a", b"a"), ("t/b", b"b"), ("t/o/x", b"x"), ("t/o/sub/y", b"y"), ("t/d/k", b"k"),
         ("t/keep/z", b"z")]
UPPER = [("t/.wh.a", b""), ("t/o/.wh..wh..opq", b""), ("t/o/new", b"new"), ("t/.wh.d", b""),
         ("t/keep/.wh.nothing-here", b"")]
EXPECTED = ["t", "t/b", "t/keep", "t/keep/z", "t/o", "t/o/new"]


def unpack(store: ImageStore, entries) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    digest = store.put_blob(gzip.compress(raw, mtime=0))
    diff_id = model.sha256_digest(raw)
    store.ensure_layer(diff_id, digest, model.OCI_LAYER_GZIP)
    return store.layer_path(diff_id)


@pytest.fixture
def layers(tmp_path):
    store = ImageStore(RuntimeSettings(state_dir=str(tmp_path / "state")))
    return unpack(store, LOWER), unpack(store, UPPER)


def test_overlay_mount_in_user_namespace(layers, tmp_path):
    lower, upper = layers
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t overlay -o userxattr,lowerdir={upper}:{lower} none {mnt} && "
              f"cd {mnt} && find t | sort && cat t/o/new")
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [*EXPECTED, "new"]


def test_runtime_run_sees_merged_view(layers, busybox_rootfs, tmp_path):
    from sandbox.runner import Runtime
    lower, upper = layers
    settings = RuntimeSettings(state_dir=str(tmp_path / "rt"))
    with Runtime(settings) as rt:
        r = rt.run(RunSpec(cmd=["/bin/sh", "-c", "cd / && find t | sort; cat t/b"],
                           env={"PATH": "/bin:/usr/bin"}),
                   Rootfs((str(busybox_rootfs), lower, upper)))
    assert r.verdict is Verdict.OK, r
    assert r.stdout.decode().split() == [*EXPECTED, "b"]
