"""Layer extraction refuses hostile tars and turns OCI whiteouts into overlayfs xattr whiteouts."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest

from sandbox.errors import ImageVerifyError
from sandbox.oci import model
from sandbox.oci.extract import (XATTR_OPAQUE, XATTR_WHITEOUT, ExtractLimits, split_name,
                                 unpack_layer)


def make_tar(entries, path, gz=True) -> str:
    """entries: (name, kind, payload) with kind in file/dir/sym/link/chr/fifo; returns diff_id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, *extra in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_000_000
            ti.mode = extra[0] if extra else (0o755 if kind == "dir" else 0o644)
            data = None
            if kind == "file":
                data = payload
                ti.size = len(payload)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                ti.type = tarfile.CHRTYPE
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if gz else raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.fixture
def sandbox_dirs(tmp_path):
    dest = tmp_path / "store" / "layer"
    dest.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    return tmp_path, dest, outside


def test_regular_layer(sandbox_dirs):
    tmp, dest, _ = sandbox_dirs
    blob = tmp / "l.tgz"
    diff_id = make_tar([
        ("./", "dir", None, 0o755),
        ("bin", "dir", None),
        ("bin/tool", "file", b"#!x\n", 0o4755),
        ("bin/alias", "link", "bin/tool"),
        ("bin/sh", "sym", "/bin/tool"),
        ("etc/deep/conf", "file", b"a=1"),
        ("dev/null", "chr", None),
        ("fifo", "fifo", None),
        ("ro", "dir", None, 0o555),
        ("ro/f", "file", b"in read-only dir"),
    ], blob)
    got, stats = unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest), diff_id=diff_id)
    assert got == diff_id
    st = os.stat(dest / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o755  # setuid dropped
    assert os.stat(dest / "bin/alias").st_ino == st.st_ino
    assert os.readlink(dest / "bin/sh") == "/bin/tool"
    assert (dest / "etc/deep/conf").read_bytes() == b"a=1"
    assert not os.path.lexists(dest / "dev/null") and not os.path.lexists(dest / "fifo")
    assert sorted(stats.skipped) == ["dev/null", "fifo"]
    assert (dest / "ro/f").read_text() == "in read-only dir"
    assert int(os.stat(dest / "bin/tool").st_mtime) == 1_000_000


def test_diff_id_mismatch_refused(sandbox_dirs):
    tmp, dest, _ = sandbox_dirs
    blob = tmp / "l.tar"
    make_tar([("a", "file", b"x")], blob, gz=False)
    with pytest.raises(ImageVerifyError, match="config says"):
        unpack_layer(str(blob), model.OCI_LAYER_TAR, str(dest), diff_id="sha256:" + "0" * 64)


@pytest.mark.parametrize("entries, match", [
    ([("../victim", "file", b"pwned")], "escapes"),
    ([("a/../../outside/victim", "file", b"pwned")], "escapes"),
    ([("/abs", "file", b"pwned")], "absolute"),
    ([("esc", "sym", "../../outside"), ("esc/victim", "file", b"pwned")], "symlink"),
    ([("esc", "sym", "/"), ("esc/tmp/x", "dir", None)], "symlink"),
    ([("f", "file", b"1"), ("f/x", "file", b"2")], "through a file"),
    ([("h", "link", "../outside/victim")], "escapes"),
    ([("s", "sym", "/etc/passwd"), ("h", "link", "s")], "outside this layer"),
    ([("h", "link", "nothere")], "outside this layer"),
])
def test_hostile_tars_refused(sandbox_dirs, entries, match):
    tmp, dest, outside = sandbox_dirs
    blob = tmp / "evil.tgz"
    make_tar(entries, blob)
    with pytest.raises(ImageVerifyError, match=match):
        unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest))
    assert (outside / "victim").read_text() == "original"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert sorted(os.listdir(tmp)) == ["evil.tgz", "outside", "store"]


def test_symlink_replaced_not_followed(sandbox_dirs):
    tmp, dest, outside = sandbox_dirs
    blob = tmp / "l.tgz"
    make_tar([("v", "sym", str(outside / "victim")), ("v", "file", b"new")], blob)
    unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest))
    assert (dest / "v").read_bytes() == b"new" and not os.path.islink(dest / "v")
    assert (outside / "victim").read_text() == "original"


def test_huge_declared_size_refused(sandbox_dirs):
    tmp, dest, _ = sandbox_dirs
    ti = tarfile.TarInfo("big")
    ti.size = 1 << 40  # header claims 1 TiB; the data is not there
    header = ti.tobuf(format=tarfile.GNU_FORMAT)
    blob = tmp / "big.tgz"
    blob.write_bytes(gzip.compress(header + b"\0" * 4096))
    with pytest.raises(ImageVerifyError, match="cap"):
        unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest))
    assert os.listdir(dest) == []
    make_tar([("a", "file", b"x" * 100), ("b", "file", b"y" * 100)], blob)
    with pytest.raises(ImageVerifyError, match="exceed"):
        unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest),
                     limits=ExtractLimits(max_entry_size=150, max_layer_size=150))


def test_corrupt_gzip_refused(sandbox_dirs):
    tmp, dest, _ = sandbox_dirs
    blob = tmp / "c.tgz"
    make_tar([("a", "file", b"x" * 10000)], blob)
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageVerifyError, match="corrupt"):
        unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest))


def test_whiteouts_become_overlay_xattrs(sandbox_dirs):
    tmp, dest, _ = sandbox_dirs
    blob = tmp / "w.tgz"
    make_tar([
        ("etc/.wh.passwd", "file", b""),
        ("opq/.wh..wh..opq", "file", b""),
        ("opq/.wh.ignored", "file", b""),
        ("opq/new", "file", b"n"),
        (".wh.gone", "file", b""),
        (".wh.redo", "file", b""),
        ("redo", "dir", None),
        ("redo/f", "file", b"r"),
    ], blob)
    _, stats = unpack_layer(str(blob), model.OCI_LAYER_GZIP, str(dest))
    assert os.getxattr(dest / "etc/passwd", XATTR_WHITEOUT) == b"y"
    assert (dest / "etc/passwd").stat().st_size == 0
    assert os.getxattr(dest / "etc", XATTR_OPAQUE) == b"x"
    assert os.getxattr(dest / "gone", XATTR_WHITEOUT) == b"y"
    assert os.getxattr(dest, XATTR_OPAQUE) == b"x"
    assert os.getxattr(dest / "opq", XATTR_OPAQUE) == b"y"
    assert sorted(os.listdir(dest / "opq")) == ["new"]
    assert os.getxattr(dest / "redo", XATTR_OPAQUE) == b"y"
    assert stats.whiteouts == 2 and stats.opaque_dirs == 1
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(dest) for n in fs)


def test_split_name():
    lim = ExtractLimits()
    assert split_name("./a//b/./c", lim) == ("a", "b", "c")
    assert split_name("./", lim) == ()
    for bad in ("/a", "a/../../b", "..", "a\0b"):
        with pytest.raises(ImageVerifyError):
            split_name(bad, lim)
