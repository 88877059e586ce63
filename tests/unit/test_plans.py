"""The helper -> init plan format and init's status line, without a container."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandbox.cloner import BOOT, SANDBOX_PARENT
from sandbox.container import _report, plan_view
from sandbox.ifconfig import netmask
from sandbox.plans import (Bind, ContainerPlan, PayloadPlan, RootfsPlan, StatusMessage, for_init,
                           read_status)
from sandbox.rootfs import root_dir


def _rootfs(**changes) -> RootfsPlan:
    fields = dict(run_dir="/state/runs/r1", dev_template="/state/dev", layers=("/l/a", "/l/b"),
                  binds=(Bind("/state/runs/r1/box", "/work"), Bind("/v", "/data", True)),
                  tmp_size=0, read_only_root=False)
    fields.update(changes)
    return RootfsPlan(**fields)


def _plan() -> ContainerPlan:
    payload = PayloadPlan(argv=("python3", "-c", "print(1)"), env=(("PATH", "/bin"), ("K", "a=b")),
                          workdir="/work", uid=1000, gid=1000, rlimits=((7, 64, 64),),
                          hostname="sbx", net_address="10.88.0.2")
    return ContainerPlan(_rootfs(), payload, "default", "/state/runs/r1/stdin")


def test_init_reads_every_field_of_the_plan():
    plan = _plan()
    view = plan_view(for_init(plan))
    assert view.profile == "default" and view.stdin_path == plan.stdin_path
    assert view.payload.argv == ("python3", "-c", "print(1)")
    assert dict(view.payload.env) == {"PATH": "/bin", "K": "a=b"}
    assert view.payload.rlimits == ((7, 64, 64),)
    assert (view.payload.uid, view.payload.last_cap, view.payload.net_prefixlen) == (1000, 40, 24)
    assert view.rootfs.layers == ("/l/a", "/l/b")
    assert [(b.source, b.target, b.read_only) for b in view.rootfs.binds] == [
        ("/state/runs/r1/box", "/work", False), ("/v", "/data", True)]
    assert root_dir(view.rootfs) == plan.rootfs.root == "/state/runs/r1/root"


def test_views_of_roots_compare_by_value():
    # A spare's mounted guess is checked against the plan's root by equality of views.
    assert plan_view(for_init(_rootfs())) == plan_view(for_init(_rootfs()))
    assert plan_view(for_init(_rootfs())) != plan_view(for_init(_rootfs(layers=("/l/a",))))
    assert plan_view(for_init(_rootfs())) != plan_view(for_init(
        _rootfs(binds=(Bind("/state/runs/r1/box", "/src"),))))
    assert plan_view(for_init(None)) is None


@pytest.mark.parametrize("message,decoded", [
    ("plain", "plain"), ('quote " and \\ backslash', 'quote " and \\ backslash'),
    ("new\nline\ttab\0nul", "new\nline\ttab\0nul"), ("naïve ✓ 日本", "naïve ✓ 日本"),
    ("not utf-8 \udcff", "not utf-8 \\udcff")])
def test_init_status_lines_decode_in_the_helper(message, decoded):
    r, w = os.pipe()
    try:
        _report(w, "setup_error", stage="rootfs", message=message)
        _report(w, "exit", wait_status=9, cpu_time=0.125, max_rss=1 << 20)
        os.close(w)
        data = os.read(r, 1 << 16)
    finally:
        os.close(r)
    assert read_status(data) == [
        StatusMessage("setup_error", stage="rootfs", message=decoded),
        StatusMessage("exit", wait_status=9, cpu_time=0.125, max_rss=1 << 20)]


def test_a_garbled_status_line_is_skipped():
    assert read_status(b'{"kind":"exit","wait_status":0}\nnot json\n') == [StatusMessage("exit")]


@pytest.mark.parametrize("prefix,mask", [(0, "0.0.0.0"), (8, "255.0.0.0"), (24, "255.255.255.0"),
                                         (30, "255.255.255.252"), (32, "255.255.255.255")])
def test_netmask(prefix, mask):
    assert netmask(prefix) == mask


def test_netmask_refuses_a_bad_prefix():
    with pytest.raises(ValueError):
        netmask(33)


def test_the_cloner_process_imports_only_what_init_runs():
    # Every module the cloner holds is copied into each container and torn down with it:
    # msgspec, typing and subprocess doubled its anonymous memory (see sandbox.plans).
    probe = BOOT.replace("from sandbox.cloner_process import main; main(int(sys.argv[2]))",
                         "import sandbox.cloner_process; print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe, SANDBOX_PARENT], check=True,
                         capture_output=True, text=True).stdout.split()
    assert "sandbox.cloner_process" in out and "sandbox.container" in out
    heavy = {"msgspec", "typing", "subprocess", "json", "re", "ipaddress", "site", "threading"}
    assert heavy.isdisjoint(out), heavy.intersection(out)
