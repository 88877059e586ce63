"""The shipped image definitions build with RUN steps in real sbx containers, prove themselves
with their echo program, push to the real registry, and run again after a fresh pull.

busybox builds in seconds and runs by default. python and gcc (mmdebstrap + Debian's mirror)
are @slow; their build state is kept outside the repo, keyed by the definition's content, so a
re-run only re-tests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from sandbox.config import RuntimeSettings
from sandbox.oci.build import Builder
from sandbox.oci.pull import Puller
from sandbox.spec import RunSpec, Verdict
from tests.fixtures.rootfs import build_cache_base
from tests.integration.test_images_registry import umoci_image

pytestmark = [pytest.mark.rootless, pytest.mark.registry]

IMAGES = Path(__file__).resolve().parents[2] / "images"


def definition_hash(name: str) -> str:
    h = hashlib.sha256()
    for path in sorted((IMAGES / name).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(IMAGES)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return build_cache_base() / "image-builds"


def settings(state: Path, registry: str) -> RuntimeSettings:
    return RuntimeSettings(state_dir=str(state), registry=registry,
                           insecure_registries=(registry,))


def build_push_pull_run(name: str, state: Path, registry: str, tmp_path: Path):
    builder = Builder(settings(state, registry))
    result = builder.build(str(IMAGES / name), tag=f"{registry}/{name}:test")
    import tomllib
    test = tomllib.loads((IMAGES / name / "image.toml").read_text())["test"]
    assert result.test_output == test["expect"].encode()
    Puller(builder.settings, builder.store).push(result.reference)
    fresh = Puller(settings(tmp_path / "fresh", registry))
    image = fresh.pull(result.reference)
    assert image.digest == result.digest
    from sandbox.runner import Runtime
    with Runtime(fresh.settings) as rt:
        r = rt.run(RunSpec(cmd=test["cmd"], stdin=test["stdin"].encode(),
                           env=image.config.env_dict()), image.rootfs)
    assert r.verdict is Verdict.OK, r
    assert r.stdout == test["expect"].encode()
    return builder, result


def test_busybox_image_builds_runs_and_rebuilds_from_cache(registry_server, tmp_path):
    builder, first = build_push_pull_run("busybox", tmp_path / "state", registry_server, tmp_path)
    assert (first.built, first.cached) == (4, 0)
    again = builder.build(str(IMAGES / "busybox"), tag=f"{registry_server}/busybox:test")
    assert (again.built, again.cached, again.digest) == (0, 4, first.digest)
    layer = builder.store.resolve(builder.store.get_ref(first.reference)).rootfs.layers[1]
    assert os.readlink(os.path.join(layer, "bin", "sh")) == "/bin/busybox"  # made by RUN


def test_umoci_image_from_registry_runs_with_whiteouts(registry_server, busybox_rootfs, tmp_path):
    layout = umoci_image(tmp_path)
    ref = f"{registry_server}/interop/umoci-run:1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:img",
                    f"docker://{ref}"], check=True, capture_output=True)
    image = Puller(settings(tmp_path / "state", registry_server)).pull(ref)
    from sandbox.runner import Runtime
    from sandbox.spec import Rootfs
    with Runtime(settings(tmp_path / "rt", registry_server)) as rt:
        r = rt.run(RunSpec(cmd=["/bin/sh", "-c", "cd / && find t | sort"],
                           env={"PATH": "/bin"}),
                   Rootfs((str(busybox_rootfs), *image.rootfs.layers)))
    assert r.verdict is Verdict.OK, r
    assert r.stdout.decode().split() == ["t", "t/b", "t/o", "t/o/new"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["python", "gcc"])
def test_debian_images_build_and_run(name, registry_server, tmp_path):
    state = cache_root() / f"{name}-{definition_hash(name)}"
    state.mkdir(parents=True, exist_ok=True)
    builder, result = build_push_pull_run(name, state, registry_server, tmp_path)
    assert result.built + result.cached == 2
