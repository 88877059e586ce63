"""Local store: once-only ingestion under locks, nothing trusted after a failure, prune."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import threading
import time

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageNotFound, ImageVerifyError
from sandbox.oci import model
from sandbox.oci.store import ImageStore, RefRecord


def layer_blob(files: dict[str, bytes]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), model.sha256_digest(raw)


def add_image(store: ImageStore, ref: str, layers: list[dict[str, bytes]]) -> RefRecord:
    descs, diff_ids = [], []
    for files in layers:
        blob, diff_id = layer_blob(files)
        digest = store.put_blob(blob)
        store.ensure_layer(diff_id, digest, model.OCI_LAYER_GZIP)
        descs.append({"mediaType": model.OCI_LAYER_GZIP, "digest": digest, "size": len(blob)})
        diff_ids.append(diff_id)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"], "Cmd": ["sh"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cfg_d = store.put_blob(cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": model.OCI_MANIFEST,
                      "config": {"mediaType": model.OCI_CONFIG, "digest": cfg_d, "size": len(cfg)},
                      "layers": descs}).encode()
    rec = RefRecord(ref, store.put_blob(man), cfg_d, model.OCI_MANIFEST)
    store.set_ref(rec)
    return rec


@pytest.fixture
def store(tmp_path):
    return ImageStore(RuntimeSettings(state_dir=str(tmp_path), registry="r:1"))


def test_ingest_once_across_threads(store):
    calls = []
    data = b"blob" * 1000
    digest = model.sha256_digest(data)

    def fetch(tmp):
        calls.append(1)
        time.sleep(0.2)
        with open(tmp, "wb") as f:
            f.write(data)
    threads = [threading.Thread(target=store.ingest_blob, args=(digest, fetch)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    with open(store.blob_path(digest), "rb") as f:
        assert f.read() == data


def test_failed_fetch_and_bad_layer_leave_nothing(store):
    digest = "sha256:" + "a" * 64

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise ImageVerifyError("truncated")
    with pytest.raises(ImageVerifyError):
        store.ingest_blob(digest, broken)
    assert not store.has_blob(digest)
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    blob, diff_id = layer_blob({"a": b"1"})
    d = store.put_blob(blob)
    with pytest.raises(ImageVerifyError):
        store.ensure_layer("sha256:" + "b" * 64, d, model.OCI_LAYER_GZIP)
    assert not store.has_layer("sha256:" + "b" * 64)
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    with pytest.raises(ImageVerifyError):
        store.put_blob(b"x", expected="sha256:" + "c" * 64)


def test_resolve_shares_layers_and_prune(store):
    a = add_image(store, "r:1/a:latest", [{"base": b"B"}, {"a": b"A"}])
    b = add_image(store, "r:1/b:latest", [{"base": b"B"}, {"b": b"b"}])
    ra, rb = store.resolve(a), store.resolve(b)
    assert ra.rootfs.layers[0] == rb.rootfs.layers[0]
    assert ra.rootfs.layers[1] != rb.rootfs.layers[1]
    assert ra.config.env == ("A=1",) and ra.config.cmd == ("sh",)
    assert store.lookup("a").digest == a.digest
    assert store.lookup(f"a@{a.digest}").digest == a.digest
    os.makedirs(os.path.join(store.root, "tmp", "leftover.1.x", "ro"))
    os.chmod(os.path.join(store.root, "tmp", "leftover.1.x"), 0o500)
    first = store.prune()
    assert (first.blobs, first.layers, first.tmp) == (0, 0, 1)
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    store.remove_ref("r:1/a:latest")
    report = store.prune()
    assert report.layers == 1 and report.blobs == 3  # a's layer blob, config, manifest
    assert os.path.isdir(rb.rootfs.layers[0]) and not os.path.exists(ra.rootfs.layers[1])
    assert store.resolve(b).rootfs == rb.rootfs
    with pytest.raises(ImageNotFound):
        store.remove_ref("r:1/a:latest")
    inspect = store.inspect(b)
    assert [l["diff_id"] for l in inspect["layers"]] == store.config_file(b.config).rootfs.diff_ids
