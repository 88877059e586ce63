"""`sbx images` commands on a local store (no registry): ls, inspect, rm, prune, build."""

from __future__ import annotations

import io
import json
import os

import pytest

from cli.images_cmd import ProgressPrinter
from cli.main import main
from sandbox.oci.pull import ProgressEvent


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SBX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SBX_REGISTRY", "127.0.0.1:5999")
    ctx = tmp_path / "demo"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\nCMD [\"cat\"]\n")
    (ctx / "hello.txt").write_text("hi")
    return tmp_path, ctx


def test_build_ls_inspect_rm_prune(env, capsys):
    tmp, ctx = env
    assert main(["images", "build", str(ctx), "--no-test"]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:5999/demo:latest sha256:" in out and "(1 built, 0 cached)" in out
    assert main(["images", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["reference"] for i in listed] == ["127.0.0.1:5999/demo:latest"]
    assert main(["images", "inspect", "demo"]) == 0
    info = json.loads(capsys.readouterr().out)[0]
    assert info["config"]["Cmd"] == ["cat"] and len(info["layers"]) == 1
    layer_path = info["layers"][0]["path"]
    assert open(os.path.join(layer_path, "hello.txt")).read() == "hi"
    assert main(["images", "rm", "demo"]) == 0
    assert main(["images", "prune", "--all"]) == 0
    assert "1 layers" in capsys.readouterr().out
    assert not os.path.exists(layer_path)
    assert main(["images", "inspect", "demo"]) == 2
    assert "demo is not in the local store" in capsys.readouterr().err


def test_progress_plain_lines_and_bars():
    plain = io.StringIO()
    p = ProgressPrinter(plain, tty=False)
    for done in (0, 500_000, 1_000_000):
        p(ProgressEvent("download", "abc", done, 1_000_000))
    p(ProgressEvent("done", "r:1/x:latest"))
    assert plain.getvalue().splitlines() == ["download abc start 0.0MB/1.0MB",
                                             "download abc done 1.0MB/1.0MB", "done r:1/x:latest"]
    bar = io.StringIO()
    ProgressPrinter(bar, tty=True)(ProgressEvent("download", "abc", 500_000, 1_000_000))
    assert bar.getvalue().startswith("\rdownload abc [###############---------------]")
