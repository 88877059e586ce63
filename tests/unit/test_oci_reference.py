"""Image references parse like Docker's, with the operator's default registry."""

import pytest

from sandbox.errors import InvalidSpec
from sandbox.oci.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32
LOCAL = "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, default, expected",
    [
        ("busybox", LOCAL, Reference(LOCAL, "busybox", "latest")),
        ("python:3.11", LOCAL, Reference(LOCAL, "python", "3.11")),
        ("busybox", "docker.io", Reference("docker.io", "library/busybox", "latest")),
        ("docker.io/busybox", LOCAL, Reference("docker.io", "library/busybox", "latest")),
        ("index.docker.io/foo/bar:1", LOCAL, Reference("docker.io", "foo/bar", "1")),
        ("host:5000/ns/name:tag", LOCAL, Reference("host:5000", "ns/name", "tag")),
        ("localhost/name", "docker.io", Reference("localhost", "name", "latest")),
        ("ns/name", LOCAL, Reference(LOCAL, "ns/name", "latest")),
        (f"name@{D}", LOCAL, Reference(LOCAL, "name", None, D)),
        (f"h.example:1/a/b:t@{D}", LOCAL, Reference("h.example:1", "a/b", "t", D)),
        ("ns/a.b-c__d-e", LOCAL, Reference(LOCAL, "ns/a.b-c__d-e", "latest")),
    ],
)
def test_parse(text, default, expected):
    assert parse_reference(text, default) == expected


def test_str_and_version_roundtrip():
    ref = parse_reference(f"host:5000/ns/name:tag@{D}", LOCAL)
    assert str(ref) == f"host:5000/ns/name:tag@{D}"
    assert ref.version == D
    assert parse_reference("x", LOCAL).version == "latest"
    assert parse_reference("busybox", "docker.io").api_host == "registry-1.docker.io"
    assert parse_reference("busybox", LOCAL).api_host == LOCAL
    assert str(parse_reference("python", LOCAL)) == f"{LOCAL}/python:latest"


@pytest.mark.parametrize(
    "text",
    ["", "UPPER", "name:", "name@sha256:abc", "name@md5:" + "a" * 32, "a//b", "-a", "a:b:c/d",
     "name:" + "t" * 200, " busybox", "../x", "a/../b", "na me", "h:99999999/x"],
)
def test_invalid(text):
    with pytest.raises(InvalidSpec) as info:
        parse_reference(text, LOCAL)
    assert info.value.field == "image"
