"""Builder: per-instruction layer cache, reproducible output, Dockerfile subset parsing.

RUN steps use a recording stand-in for sandbox.runner.Runtime here (same interface); the real
runtime builds images in tests/integration/test_images_build.py.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError, InvalidSpec
from sandbox.oci.build import Builder
from sandbox.oci.dockerfile import parse
from sandbox.spec import RunResult, Verdict


class FakeRuntime:
    """Writes a diff tar holding /ran.txt = the command; records every run."""

    def __init__(self):
        self.runs = []

    def run(self, spec, rootfs, *, diff_tar=None):
        self.runs.append((spec, rootfs))
        if diff_tar is None:  # the image test
            return RunResult(verdict=Verdict.OK, stdout=spec.stdin)
        if "fail" in " ".join(spec.cmd):
            return RunResult(verdict=Verdict.NONZERO_EXIT, exit_code=3, stderr=b"boom")
        data = " ".join(spec.cmd).encode()
        with tarfile.open(diff_tar, "w") as tar:
            ti = tarfile.TarInfo("ran.txt")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        return RunResult(verdict=Verdict.OK)


DOCKERFILE = """\
# test image
FROM scratch
COPY a.txt /data/a.txt
RUN echo one
ENV GREETING=hi
COPY b.txt /data/
RUN echo two
CMD ["/bin/sh"]
"""


def make_context(tmp_path, dockerfile=DOCKERFILE):
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / "a.txt").write_text("A")
    (ctx / "b.txt").write_text("B")
    (ctx / "image.toml").write_text('[test]\ncmd = ["/bin/sh"]\nstdin = "x\\n"\nexpect = "x\\n"\n')
    return ctx


def builder(tmp_path, name="state"):
    settings = RuntimeSettings(state_dir=str(tmp_path / name), registry="r:5000")
    fake = FakeRuntime()
    return Builder(settings, runtime_factory=lambda s: fake), fake


def built_steps(result):
    return [s.text for s in result.steps if s.layer and not s.cached]


def test_cache_rebuilds_only_changed_step_and_later(tmp_path):
    ctx = make_context(tmp_path)
    b, fake = builder(tmp_path)
    first = b.build(str(ctx), tag="demo:1")
    assert (first.built, first.cached) == (4, 0)
    assert first.test_output == b"x\n"
    again = b.build(str(ctx), tag="demo:1")
    assert (again.built, again.cached) == (0, 4) and again.digest == first.digest
    (ctx / "b.txt").write_text("B changed")
    changed = b.build(str(ctx), tag="demo:1")
    assert built_steps(changed) == ["COPY b.txt /data/", "RUN echo two"]
    assert changed.digest != first.digest
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("ENV GREETING=hi", "ENV GREETING=hello"))
    env_changed = b.build(str(ctx), tag="demo:1")
    assert built_steps(env_changed) == ["COPY b.txt /data/", "RUN echo two"]
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("RUN echo one", "RUN echo uno"))
    run_changed = b.build(str(ctx), tag="demo:1")
    assert built_steps(run_changed) == ["RUN echo uno", "COPY b.txt /data/", "RUN echo two"]
    # RUN saw the layers below it, bottom first, and the ENV set before it
    spec, rootfs = fake.runs[-2]
    assert spec.env["GREETING"] == "hi" and spec.cmd == ["/bin/sh", "-c", "echo two"]
    assert len(rootfs.layers) == 3 and spec.uid == 0


def test_output_is_reproducible_and_standard(tmp_path):
    ctx = make_context(tmp_path)
    b1, _ = builder(tmp_path, "s1")
    b2, _ = builder(tmp_path, "s2")
    r1 = b1.build(str(ctx), tag="demo:1")
    os.utime(ctx / "a.txt", (12345, 12345))  # mtimes do not matter
    r2 = b2.build(str(ctx), tag="demo:1")
    assert r1.digest == r2.digest
    rec = b1.store.lookup("demo:1")
    manifest = json.loads(b1.store.read_blob(rec.digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    cfg = json.loads(b1.store.read_blob(manifest["config"]["digest"]))
    assert cfg["config"]["Env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                    "GREETING=hi"]
    assert cfg["config"]["Cmd"] == ["/bin/sh"]
    assert len(cfg["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 4
    assert [h.get("empty_layer", False) for h in cfg["history"]] == [False, False, True, False, False, True]
    image = b1.store.resolve(rec)
    assert open(os.path.join(image.rootfs.layers[0], "data/a.txt")).read() == "A"
    assert open(os.path.join(image.rootfs.layers[1], "ran.txt")).read() == "/bin/sh -c echo one"
    with open(b1.store.blob_path(manifest["layers"][0]["digest"]), "rb") as f:
        head = f.read(10)
    assert head[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_host_copy_only_through_build_arg(tmp_path):
    host = tmp_path / "hostfile"
    host.write_text("H")
    ctx = make_context(tmp_path, f"FROM scratch\nCOPY {host} /h\n")
    b, _ = builder(tmp_path)
    with pytest.raises(InvalidSpec, match="build ARG"):
        b.build(str(ctx), run_test=False)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY ../hostfile /h\n")
    with pytest.raises(InvalidSpec, match="outside the build context"):
        b.build(str(ctx), run_test=False)
    (ctx / "Dockerfile").write_text("ARG SRC=/nonexistent\nFROM scratch\nCOPY --chmod=0700 ${SRC} /h\n")
    result = b.build(str(ctx), run_test=False, build_args={"SRC": str(host)})
    layer = b.store.resolve(b.store.lookup(result.reference)).rootfs.layers[0]
    assert open(os.path.join(layer, "h")).read() == "H"
    assert os.stat(os.path.join(layer, "h")).st_mode & 0o777 == 0o700


def test_failed_run_and_failed_test_are_errors(tmp_path):
    ctx = make_context(tmp_path, "FROM scratch\nRUN fail now\n")
    b, _ = builder(tmp_path)
    with pytest.raises(ImageError, match="NONZERO_EXIT"):
        b.build(str(ctx))
    assert b.store.list_refs() == []
    ctx = make_context(tmp_path, "FROM scratch\nCOPY a.txt /a\n")
    (ctx / "image.toml").write_text('[test]\ncmd = ["x"]\nstdin = "in"\nexpect = "other"\n')
    with pytest.raises(ImageError, match="image test"):
        b.build(str(ctx))


def test_parse_subset():
    ins = parse("ARG V=1\nFROM scratch\nDEBIAN bookworm python3,dash\nRUN a \\\n  b\nCMD [\"x\", \"y\"]\n")
    assert [i.keyword for i in ins] == ["ARG", "FROM", "DEBIAN", "RUN", "CMD"]
    assert ins[3].args == "a    b" and ins[4].exec_form == ("x", "y")
    for bad in ("RUN x\n", "FROM a\nFROM b\n", "FROM scratch\nADD x y\n",
                "FROM scratch\nCOPY a b\nDEBIAN bookworm x\n", "FROM scratch\nCOPY --from=x a b\n"):
        with pytest.raises(InvalidSpec):
            parse(bad)
