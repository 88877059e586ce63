"""Warm spares: a container cloned before its request, and the root it may mount ahead.

After two runs with the same root (image, work directory, read-only flag) the helper's next
spare mounts that root while it waits. These tests prove it does, and that a spare's root
never reaches a run that asked for something else: another image, or the same layer path
after the layer was replaced (pruned and pulled again).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.config import RuntimeSettings
from sandbox.runner import Runtime
from sandbox.spec import Rootfs, RunSpec, Verdict
from tests.fixtures.containers import helper_containers
from tests.fixtures.ports import wait_until

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/bin:/bin"}
WHICH = RunSpec(cmd=["/bin/sh", "-c", "cat /etc/which 2>/dev/null || echo none"], env=PATH)


def spare_overlay_lowers(helper: int) -> list[str] | None:
    """The lowerdir of the overlay the helper's waiting spare has mounted, or None when the
    spare has none (or there is no single spare right now)."""
    spares = helper_containers(helper)
    if len(spares) != 1:
        return None
    try:
        with open(f"/proc/{spares[0]}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" - ", 1)[1].split()
        if fields[0] == "overlay":
            options = dict(o.split("=", 1) for o in fields[2].split(",") if "=" in o)
            return options["lowerdir"].split(":")
    return None


def layer(path: Path, text: str) -> str:
    (path / "etc").mkdir(parents=True)
    (path / "etc/which").write_text(text + "\n")
    return str(path)


def mount_ahead(runtime: Runtime, image: Rootfs, which: str) -> None:
    """Run `image` (its /etc/which says `which`) twice, then wait for the spare that has its
    root mounted ahead."""
    for _ in range(2):
        assert runtime.run(WHICH, image).stdout == f"{which}\n".encode()
    wait_until(lambda: spare_overlay_lowers(runtime.helper_pid) == list(reversed(image.layers)),
               timeout=5, what="a spare with the image's root mounted")


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(RuntimeSettings(state_dir=str(tmp_path / "state")))
    yield rt
    rt.close()


def test_the_spare_mounts_the_root_of_repeated_runs_ahead(runtime, busybox_rootfs, tmp_path):
    image = Rootfs(layers=(str(busybox_rootfs), layer(tmp_path / "a", "a")))
    mount_ahead(runtime, image, "a")
    r = runtime.run(WHICH, image)
    assert r.verdict is Verdict.OK and r.stdout == b"a\n"


def test_a_spare_mounted_for_one_image_never_serves_another(runtime, busybox_rootfs, tmp_path):
    a = Rootfs(layers=(str(busybox_rootfs), layer(tmp_path / "a", "a")))
    b = Rootfs(layers=(str(busybox_rootfs), layer(tmp_path / "b", "b")))
    plain = Rootfs(layers=(str(busybox_rootfs),))
    mount_ahead(runtime, a, "a")
    assert runtime.run(WHICH, b).stdout == b"b\n"
    assert runtime.run(WHICH, plain).stdout == b"none\n"
    # Other shapes of the same image: another work directory, a read-only root.
    mount_ahead(runtime, a, "a")
    r = runtime.run(RunSpec(cmd=["/bin/sh", "-c", "pwd; cat /etc/which"], env=PATH,
                            workdir="/elsewhere"), a)
    assert r.stdout == b"/elsewhere\na\n"
    mount_ahead(runtime, a, "a")
    r = runtime.run(RunSpec(cmd=["/bin/sh", "-c", "touch /x"], env=PATH, read_only_root=True),
                    a)
    assert r.verdict is Verdict.NONZERO_EXIT and b"Read-only" in r.stderr


def test_a_replaced_layer_is_not_served_from_the_old_mount(runtime, busybox_rootfs, tmp_path):
    top = tmp_path / "top"
    image = Rootfs(layers=(str(busybox_rootfs), layer(top, "old")))
    mount_ahead(runtime, image, "old")
    os.rename(top, tmp_path / "pruned")  # what the store's prune does, then a new pull
    layer(top, "new")
    r = runtime.run(WHICH, image)
    assert r.verdict is Verdict.OK and r.stdout == b"new\n"


def test_a_root_that_cannot_be_mounted_ahead_still_gets_its_own_error(runtime, busybox_rootfs,
                                                                      tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tmp").symlink_to("/etc")  # a planted link where a mount point goes
    image = Rootfs(layers=(str(busybox_rootfs), str(bad)))
    for _ in range(4):  # the third and fourth are served by spares that tried to mount ahead
        r = runtime.run(WHICH, image)
        assert r.verdict is Verdict.SETUP_ERROR and r.stage == "rootfs", (r.message, r.stage)
        assert "/tmp" in r.message
    assert runtime.run(WHICH, Rootfs(layers=(str(busybox_rootfs),))).stdout == b"none\n"


def test_a_layer_gone_since_the_guess_is_the_runs_error_not_the_helpers(runtime, busybox_rootfs,
                                                                        tmp_path):
    top = tmp_path / "top"
    image = Rootfs(layers=(str(busybox_rootfs), layer(top, "a")))
    mount_ahead(runtime, image, "a")
    os.rename(top, tmp_path / "pruned")  # pruned, not pulled again
    r = runtime.run(WHICH, image)
    assert r.verdict is Verdict.SETUP_ERROR and r.stage == "rootfs", (r.verdict, r.message)
    assert runtime.run(WHICH, Rootfs(layers=(str(busybox_rootfs),))).stdout == b"none\n"
