"""Distribution client against a scripted loopback registry: auth flows, verification, retries."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageNotFound, ImageVerifyError, RegistryAuthError
from sandbox.oci import model
from sandbox.oci.auth import load_credentials, parse_challenge
from sandbox.oci.reference import parse_reference
from sandbox.oci.registry import RegistryClient

BLOB = b"layer-bytes" * 1000
BLOB_D = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
CONFIG_D = "sha256:" + hashlib.sha256(CONFIG).hexdigest()


def manifest_bytes(layer_digest=BLOB_D, size=len(BLOB)) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": model.OCI_MANIFEST,
        "config": {"mediaType": model.OCI_CONFIG, "digest": CONFIG_D, "size": len(CONFIG)},
        "layers": [{"mediaType": model.OCI_LAYER_GZIP, "digest": layer_digest, "size": size}],
    }).encode()


class FakeRegistry:
    """Scripted /v2/ server. `mode` picks the auth: none, basic or bearer."""

    def __init__(self, mode="none"):
        self.mode = mode
        self.blobs = {BLOB_D: BLOB, CONFIG_D: CONFIG}
        self.manifests = {}
        self.fail_next = 0
        self.drop_next = 0
        self.log = []
        self.uploads = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status, body=b"", headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def authorized(self):
                got = self.headers.get("Authorization", "")
                if fake.mode == "none":
                    return True
                if fake.mode == "basic":
                    if got == "Basic " + base64.b64encode(b"alice:s3cret").decode():
                        return True
                    self.send(401, b"", {"WWW-Authenticate": 'Basic realm="r"'})
                    return False
                if got == "Bearer tok-123":
                    return True
                host = self.headers["Host"]
                self.send(401, b"", {"WWW-Authenticate":
                          f'Bearer realm="http://{host}/token",service="fake",scope="x"'})
                return False

            def handle_any(self):
                fake.log.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.startswith("/token"):
                    ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(
                        b"alice:s3cret").decode()
                    fake.token_query = self.path
                    return self.send(200 if ok else 401, json.dumps({"token": "tok-123"}).encode())
                if fake.fail_next:
                    fake.fail_next -= 1
                    return self.send(503, b"busy")
                if not self.authorized():
                    return
                parts = self.path.split("?")[0].split("/")
                if self.path == "/v2/":
                    return self.send(200, b"{}")
                kind, ver = parts[-2], parts[-1]
                if kind == "manifests" and self.command == "PUT":
                    fake.manifests[ver] = body
                    return self.send(201, b"", {"Docker-Content-Digest":
                                                "sha256:" + hashlib.sha256(body).hexdigest()})
                if kind == "manifests":
                    data = fake.manifests.get(ver)
                    if data is None:
                        return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                    return self.send(200, data, {"Content-Type": json.loads(data)["mediaType"]})
                if kind == "blobs" and ver in fake.blobs:
                    data = fake.blobs[ver]
                    if fake.drop_next and self.command == "GET":
                        fake.drop_next -= 1
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.close_connection = True
                        return
                    return self.send(200, data)
                if kind == "blobs":
                    return self.send(404)
                if self.command == "POST" and parts[-1] == "":
                    return self.send(202, b"", {"Location": "/v2/upload/abc?state=1"})
                if self.command == "PUT" and "/upload/" in self.path:
                    digest = self.path.split("digest=")[1].replace("%3A", ":")
                    fake.blobs[digest] = body
                    return self.send(201)
                return self.send(400)

            do_GET = do_HEAD = do_PUT = do_POST = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(request):
    reg = FakeRegistry(getattr(request, "param", "none"))
    reg.manifests["v1"] = manifest_bytes()
    yield reg
    reg.close()


def client_for(fake, tmp_path, auths=None):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": auths or {}}))
    settings = RuntimeSettings(registry=fake.addr, insecure_registries=(fake.addr,),
                               docker_config=str(cfg))
    c = RegistryClient(settings)
    c.sleep = c.transport.sleep = lambda s: None
    return c, settings


def test_resolve_and_fetch_anonymous(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    ref = parse_reference("app:v1", s.registry)
    res = c.resolve(ref)
    assert res.digest == model.sha256_digest(fake.manifests["v1"])
    assert res.manifest.layers[0].digest == BLOB_D
    c.fetch_blob(ref, res.manifest.layers[0], str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == BLOB


def test_index_picks_linux_amd64(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    m = fake.manifests["v1"]
    d = model.sha256_digest(m)
    other = manifest_bytes(layer_digest="sha256:" + "0" * 64)
    fake.manifests[d] = m
    fake.manifests[model.sha256_digest(other)] = other
    fake.manifests["multi"] = json.dumps({"schemaVersion": 2, "mediaType": model.DOCKER_LIST,
        "manifests": [
            {"mediaType": model.OCI_MANIFEST, "digest": model.sha256_digest(other),
             "size": len(other), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": model.OCI_MANIFEST, "digest": d, "size": len(m),
             "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    res = c.resolve(parse_reference("app:multi", s.registry))
    assert res.digest == d and res.index_digest is not None
    with pytest.raises(ImageNotFound):
        c.resolve(parse_reference("app:multi", s.registry), platform=("linux", "s390x"))


def test_unknown_image_names_reference(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    with pytest.raises(ImageNotFound) as info:
        c.resolve(parse_reference("nothere:9", s.registry))
    assert f"{fake.addr}/nothere:9" in str(info.value)


def test_manifest_digest_mismatch_refused(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    wrong = "sha256:" + "1" * 64
    fake.manifests[wrong] = fake.manifests["v1"]
    with pytest.raises(ImageVerifyError):
        c.resolve(parse_reference(f"app@{wrong}", s.registry))


def test_blob_digest_mismatch_and_oversize_refused(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    ref = parse_reference("app:v1", s.registry)
    fake.blobs[BLOB_D] = BLOB[:-1] + b"X"
    with pytest.raises(ImageVerifyError, match="does not match"):
        c.fetch_blob(ref, model.Descriptor(model.OCI_LAYER_GZIP, BLOB_D, len(BLOB)), str(tmp_path / "b"))
    with pytest.raises(ImageVerifyError, match="larger than"):
        c.fetch_blob(ref, model.Descriptor(model.OCI_LAYER_GZIP, BLOB_D, 10), str(tmp_path / "b"))
    with pytest.raises(ImageVerifyError, match="cap"):
        c.fetch_blob(ref, model.Descriptor(model.OCI_LAYER_GZIP, BLOB_D, len(BLOB)),
                     str(tmp_path / "b"), max_size=100)


def test_retries_5xx_and_dropped_connection(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    ref = parse_reference("app:v1", s.registry)
    fake.fail_next = 2
    res = c.resolve(ref)
    fake.drop_next = 2
    c.fetch_blob(ref, res.manifest.layers[0], str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == BLOB
    assert sum(1 for m, p in fake.log if p.endswith(BLOB_D)) == 3
    fake.drop_next = 99
    with pytest.raises(ImageVerifyError, match="dropped|truncated"):
        c.fetch_blob(ref, res.manifest.layers[0], str(tmp_path / "b"))


@pytest.mark.parametrize("fake", ["basic", "bearer"], indirect=True)
def test_auth_flows_with_docker_config(fake, tmp_path):
    auths = {f"http://{fake.addr}": {"auth": base64.b64encode(b"alice:s3cret").decode()}}
    c, s = client_for(fake, tmp_path, auths)
    res = c.resolve(parse_reference("app:v1", s.registry))
    assert res.manifest.layers[0].digest == BLOB_D
    if fake.mode == "bearer":
        assert "service=fake" in fake.token_query and "scope=repository%3Aapp%3Apull" in fake.token_query


@pytest.mark.parametrize("fake", ["basic", "bearer"], indirect=True)
def test_auth_without_credentials_fails_clearly(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    with pytest.raises(RegistryAuthError):
        c.resolve(parse_reference("app:v1", s.registry))


def test_push_skips_existing_blobs(fake, tmp_path):
    c, s = client_for(fake, tmp_path)
    ref = parse_reference("app:new", s.registry)
    p = tmp_path / "blob"
    p.write_bytes(BLOB)
    assert c.push_blob(ref, BLOB_D, str(p)) is False
    data = b"fresh blob"
    p.write_bytes(data)
    d = model.sha256_digest(data)
    assert c.push_blob(ref, d, str(p)) is True
    assert fake.blobs[d] == data
    digest = c.put_manifest(ref, model.OCI_MANIFEST, fake.manifests["v1"])
    assert fake.manifests["new"] == fake.manifests["v1"] and digest == model.sha256_digest(fake.manifests["v1"])


def test_credentials_formats(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
        "reg.example:5000": {"username": "u", "password": "p"}}}))
    assert load_credentials("docker.io", str(cfg)).username == "hub"
    assert load_credentials("reg.example:5000", str(cfg)).password == "p"
    assert load_credentials("other", str(cfg)) is None
    assert load_credentials("x", str(tmp_path / "missing.json")) is None


def test_parse_challenge():
    scheme, p = parse_challenge('Bearer realm="https://a/t",service="reg",scope="repository:a/b:pull,push"')
    assert scheme == "bearer" and p == {"realm": "https://a/t", "service": "reg",
                                        "scope": "repository:a/b:pull,push"}
