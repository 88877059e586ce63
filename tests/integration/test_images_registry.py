"""sbx against a real registry (Debian's docker-registry): roundtrip, interop with skopeo,
hostile content refused, concurrent pulls sharing one download, warm pulls offline.

A small loopback proxy in front of the registry counts requests and can tamper with blob bodies
(flip a byte, or cut them short), which is how the digest-mismatch and truncation cases and
the "each blob once" count are observed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageNotFound, ImageVerifyError
from sandbox.oci import model
from sandbox.oci.build import Builder
from sandbox.oci.pull import Puller
from sandbox.oci.registry import RegistryClient

pytestmark = pytest.mark.registry

REPO_ROOT = Path(__file__).resolve().parents[2]


class TamperProxy:
    """Forwards to the registry; counts (method, path); `mode` = None | corrupt | truncate."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.counts: Counter = Counter()
        self.mode: str | None = None
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def forward(self):
                with proxy.lock:
                    proxy.counts[(self.command, self.path.split("?")[0])] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                is_blob = "/blobs/sha256:" in self.path and self.command == "GET"
                if is_blob and resp.status == 200 and proxy.mode == "corrupt":
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-length", "transfer-encoding", "connection"):
                        continue
                    if k.lower() == "location":
                        v = v.replace(proxy.upstream, proxy.addr)
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if is_blob and resp.status == 200 and proxy.mode == "stall":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    proxy.stalled.set()
                    proxy.release.wait(30)
                    self.close_connection = True
                    return
                if is_blob and resp.status == 200 and proxy.mode == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def blob_gets(self) -> Counter:
        return Counter({p: n for (m, p), n in self.counts.items()
                        if m == "GET" and "/blobs/" in p})

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(registry_server):
    p = TamperProxy(registry_server)
    yield p
    p.close()


def settings_for(tmp_path: Path, name: str, registry: str) -> RuntimeSettings:
    return RuntimeSettings(state_dir=str(tmp_path / name), registry=registry,
                           insecure_registries=(registry,),
                           docker_config=str(tmp_path / "no-docker-config.json"))


def make_context(tmp_path: Path, files: dict[str, str], name="ctx") -> Path:
    """A COPY-only definition (no RUN), so these tests need no container runtime."""
    ctx = tmp_path / name
    (ctx / "files").mkdir(parents=True)
    for rel, content in files.items():
        (ctx / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / "files" / rel).write_text(content)
    (ctx / "Dockerfile").write_text(
        "FROM scratch\nCOPY files/ /srv/\nENV APP_MODE=test\nCOPY files/one.txt /etc/one\n"
        "WORKDIR /srv\nUSER 1000\nCMD [\"/bin/app\", \"--serve\"]\n")
    return ctx


def build_and_push(tmp_path: Path, registry: str, tag: str, files=None) -> tuple[Builder, str]:
    settings = settings_for(tmp_path, "builder-state", registry)
    builder = Builder(settings)
    result = builder.build(str(make_context(tmp_path, files or {"one.txt": "1", "sub/two.txt": "2"},
                                            name=f"ctx-{tag}")),
                           tag=f"{registry}/{tag}", run_test=False)
    digest = Puller(settings, builder.store).push(result.reference)
    assert digest == result.digest
    return builder, result.reference


def test_push_pull_roundtrip_and_skopeo_reads_our_config(registry_server, tmp_path):
    _, ref = build_and_push(tmp_path, registry_server, "sbx/roundtrip:1")
    image = Puller(settings_for(tmp_path, "fresh", registry_server)).pull(ref)
    merged = {}
    for layer in image.rootfs.layers:
        for root, _dirs, files in os.walk(layer):
            for f in files:
                p = os.path.join(root, f)
                merged[os.path.relpath(p, layer)] = open(p).read()
    assert merged == {"srv/one.txt": "1", "srv/sub/two.txt": "2", "etc/one": "1"}
    assert image.config.env == ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                "APP_MODE=test")
    assert (image.config.cmd, image.config.workdir, image.config.user) == (
        ("/bin/app", "--serve"), "/srv", "1000")

    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{ref}"],
                         check=True, capture_output=True, text=True).stdout
    cfg = json.loads(out)
    assert cfg["config"]["Cmd"] == ["/bin/app", "--serve"]
    assert "APP_MODE=test" in cfg["config"]["Env"] and cfg["config"]["WorkingDir"] == "/srv"
    assert len(cfg["rootfs"]["diff_ids"]) == 2
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{layout}:copied"], check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest  # byte-identical manifest


def umoci_image(tmp_path: Path) -> Path:
    """An OCI layout made by umoci: a file layer, then a layer deleting one file (umoci writes
    the .wh. whiteout), then a raw layer making a directory opaque."""
    layout, bundle = tmp_path / "umoci-layout", tmp_path / "bundle"

    def umoci(*args):
        subprocess.run(["umoci", *args], check=True, capture_output=True)
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:img")
    umoci("unpack", "--rootless", "--image", f"{layout}:img", str(bundle))
    root = bundle / "rootfs"
    (root / "t/o").mkdir(parents=True)
    (root / "t/a").write_text("a")
    (root / "t/b").write_text("b")
    (root / "t/o/x").write_text("x")
    umoci("repack", "--refresh-bundle", "--image", f"{layout}:img", str(bundle))
    (root / "t/a").unlink()
    umoci("repack", "--image", f"{layout}:img", str(bundle))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("t/o/.wh..wh..opq", b""), ("t/o/new", b"new")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    raw_layer = tmp_path / "opaque.tar"
    raw_layer.write_bytes(buf.getvalue())
    umoci("raw", "add-layer", "--image", f"{layout}:img", str(raw_layer))
    umoci("config", "--image", f"{layout}:img", "--config.cmd", "/bin/true",
          "--config.env", "FROM_UMOCI=1")
    return layout


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_pull_image_pushed_by_skopeo_from_umoci_layout(registry_server, tmp_path, fmt):
    layout = umoci_image(tmp_path)
    ref = f"{registry_server}/interop/umoci:{fmt}"
    argv = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:img", f"docker://{ref}"]
    if fmt == "v2s2":
        argv[2:2] = ["--format", "v2s2"]
    subprocess.run(argv, check=True, capture_output=True)
    puller = Puller(settings_for(tmp_path, "state", registry_server))
    image = puller.pull(ref)
    rec = puller.store.get_ref(ref)
    assert rec.media_type == (model.DOCKER_MANIFEST if fmt == "v2s2" else model.OCI_MANIFEST)
    assert "FROM_UMOCI=1" in image.config.env and image.config.cmd == ("/bin/true",)
    assert len(image.rootfs.layers) == 3
    l1, l2, l3 = (Path(p) for p in image.rootfs.layers)
    assert (l1 / "t/a").read_text() == "a"
    assert os.getxattr(l2 / "t/a", "user.overlay.whiteout") == b"y"
    assert os.getxattr(l3 / "t/o", "user.overlay.opaque") == b"y"


def test_unknown_image_names_the_reference(registry_server, tmp_path):
    puller = Puller(settings_for(tmp_path, "state", registry_server))
    with pytest.raises(ImageNotFound) as info:
        puller.pull("no/such-image:v9")
    assert f"{registry_server}/no/such-image:v9" in info.value.message
    assert puller.store.list_refs() == []


def _store_is_clean(puller: Puller) -> None:
    root = puller.store.root
    assert puller.store.list_refs() == []
    assert os.listdir(os.path.join(root, "layers", "sha256")) == []
    assert os.listdir(os.path.join(root, "tmp")) == []


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_tampered_blobs_are_refused_and_not_cached(registry_server, proxy, tmp_path, mode):
    _, ref = build_and_push(tmp_path, registry_server, f"sbx/tamper-{mode}:1",
                            files={"one.txt": "1" * 5000})
    puller = Puller(settings_for(tmp_path, "state", proxy.addr))
    puller.client.sleep = puller.client.transport.sleep = lambda s: None
    proxy.mode = mode
    with pytest.raises(ImageVerifyError, match="does not match" if mode == "corrupt"
                       else "truncated|dropped"):
        puller.pull(ref.replace(registry_server, proxy.addr))
    _store_is_clean(puller)
    assert os.listdir(os.path.join(puller.store.root, "blobs", "sha256")) != []  # manifest only
    for name in os.listdir(os.path.join(puller.store.root, "blobs", "sha256")):
        data = open(os.path.join(puller.store.root, "blobs", "sha256", name), "rb").read()
        assert hashlib.sha256(data).hexdigest() == name  # whatever was kept is verified
    proxy.mode = None
    assert puller.pull(ref.replace(registry_server, proxy.addr)).digest


def _push_raw_image(registry: str, tmp_path: Path, repo: str, tar_bytes: bytes) -> str:
    """Push a one-layer image whose layer is exactly `tar_bytes` (gzipped, valid digests)."""
    client = RegistryClient(settings_for(tmp_path, "raw", registry))
    from sandbox.oci.reference import parse_reference
    ref = parse_reference(f"{registry}/{repo}", registry)
    blob = gzip.compress(tar_bytes, mtime=0)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [model.sha256_digest(tar_bytes)]}}).encode()
    for data in (blob, cfg):
        p = tmp_path / "upload"
        p.write_bytes(data)
        client.push_blob(ref, model.sha256_digest(data), str(p))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": model.OCI_MANIFEST,
                           "config": {"mediaType": model.OCI_CONFIG,
                                      "digest": model.sha256_digest(cfg), "size": len(cfg)},
                           "layers": [{"mediaType": model.OCI_LAYER_GZIP,
                                       "digest": model.sha256_digest(blob), "size": len(blob)}]})
    client.put_manifest(ref, model.OCI_MANIFEST, manifest.encode())
    return str(ref)


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            if kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
                tar.addfile(ti)
            else:
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("case", ["traversal", "symlink-then-write", "huge"])
def test_malicious_layers_are_refused(registry_server, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    if case == "traversal":
        tar = _tar([("../../../../../../../../" + str(outside / "victim").lstrip("/"), "file", b"pwned")])
    elif case == "symlink-then-write":
        tar = _tar([("escape", "sym", str(outside)), ("escape/victim", "file", b"pwned")])
    else:
        ti = tarfile.TarInfo("big")
        ti.size = 1 << 40  # declares 1 TiB, carries nothing
        tar = ti.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024
    ref = _push_raw_image(registry_server, tmp_path, f"evil/{case}:1", tar)
    puller = Puller(settings_for(tmp_path, "state", registry_server))
    with pytest.raises(ImageVerifyError):
        puller.pull(ref)
    _store_is_clean(puller)
    assert (outside / "victim").read_text() == "original"
    assert sorted(os.listdir(outside)) == ["victim"]


def test_four_concurrent_pulls_fetch_each_blob_once(registry_server, proxy, tmp_path):
    files = {"one.txt": "1", **{f"f{i}.bin": os.urandom(200_000).hex() for i in range(3)}}
    _, ref = build_and_push(tmp_path, registry_server, "sbx/concurrent:1", files=files)
    ref = ref.replace(registry_server, proxy.addr)
    state = tmp_path / "shared-state"
    env = {**os.environ, "SBX_STATE_DIR": str(state), "SBX_REGISTRY": proxy.addr,
           "SBX_INSECURE_REGISTRIES": proxy.addr, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "images", "pull", ref],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    digests = {o[0].decode().split()[-1] for o in outs}
    assert len(digests) == 1
    gets = proxy.blob_gets()
    assert len(gets) == 3  # config + 2 layers
    assert set(gets.values()) == {1}, gets
    # a warm ensure() asks the registry nothing at all
    before = sum(proxy.counts.values())
    settings = RuntimeSettings(state_dir=str(state), registry=proxy.addr,
                               insecure_registries=(proxy.addr,))
    image = Puller(settings).ensure(ref)
    assert sum(proxy.counts.values()) == before and image.digest in digests


def test_basic_auth_registry_with_docker_config(registry_with_auth, tmp_path):
    from sandbox.errors import RegistryAuthError
    host = registry_with_auth.host
    config = registry_with_auth.write_docker_config(tmp_path / "docker-config.json")
    authed = RuntimeSettings(state_dir=str(tmp_path / "b"), registry=host,
                             insecure_registries=(host,), docker_config=str(config))
    builder = Builder(authed)
    result = builder.build(str(make_context(tmp_path, {"one.txt": "1"})), tag=f"{host}/auth/img:1",
                           run_test=False)
    Puller(authed, builder.store).push(result.reference)
    image = Puller(RuntimeSettings(state_dir=str(tmp_path / "c"), registry=host,
                                   insecure_registries=(host,), docker_config=str(config))
                   ).pull(result.reference)
    assert image.digest == result.digest
    anonymous = Puller(settings_for(tmp_path, "d", host))
    with pytest.raises(RegistryAuthError):
        anonymous.pull(result.reference)


def test_pull_killed_half_way_leaves_nothing_trusted(registry_server, proxy, tmp_path):
    _, ref = build_and_push(tmp_path, registry_server, "sbx/crash:1",
                            files={"one.txt": os.urandom(300_000).hex()})
    ref = ref.replace(registry_server, proxy.addr)
    state = tmp_path / "state"
    env = {**os.environ, "SBX_STATE_DIR": str(state), "SBX_REGISTRY": proxy.addr,
           "SBX_INSECURE_REGISTRIES": proxy.addr, "PYTHONDONTWRITEBYTECODE": "1"}
    proxy.mode = "stall"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "images", "pull", ref],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proxy.stalled.wait(30), "the pull never reached a blob"
    deadline = time.monotonic() + 10
    while not os.listdir(state / "images" / "tmp") and time.monotonic() < deadline:
        time.sleep(0.02)  # until the half-written download exists on disk
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    proxy.mode = None
    proxy.release.set()
    puller = Puller(RuntimeSettings(state_dir=str(state), registry=proxy.addr,
                                    insecure_registries=(proxy.addr,)))
    assert puller.store.list_refs() == []
    assert os.listdir(state / "images" / "layers" / "sha256") == []
    for name in os.listdir(state / "images" / "blobs" / "sha256"):  # only verified content
        assert hashlib.sha256((state / "images" / "blobs" / "sha256" / name).read_bytes()
                              ).hexdigest() == name
    assert os.listdir(state / "images" / "tmp") != []  # the partial download, never trusted
    image = puller.pull(ref)  # the lock died with the process: no deadlock
    assert image.rootfs.layers and puller.store.prune().tmp >= 1
    assert os.listdir(state / "images" / "tmp") == []
