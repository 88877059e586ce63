"""sandbox/spec.py: the bounds on the types, unknown fields, and the path/env checks that
validate_spec adds on top of msgspec."""

from __future__ import annotations

import msgspec
import pytest

from sandbox.errors import InvalidSpec, SandboxError
from sandbox.spec import (
    GiB,
    MiB,
    FileIn,
    Limits,
    RunResult,
    RunSpec,
    Verdict,
    VolumeMount,
    check_absolute_path,
    check_relative_path,
    validate_spec,
)


def decode(data: dict, type_=RunSpec):
    """Decode as the API does: JSON bytes in, a typed Struct out."""
    return msgspec.json.decode(msgspec.json.encode(data), type=type_)


# ----------------------------------------------------------------------- decoding and bounds


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = decode({"cmd": ["/bin/true"]})
    assert spec.cmd == ["/bin/true"]
    assert spec.workdir == "/work"
    assert (spec.uid, spec.gid) == (1000, 1000)
    assert spec.network == "none" and spec.seccomp == "default"
    assert spec.limits == Limits()
    assert spec.limits.memory == 256 * MiB and spec.limits.pids == 64
    validate_spec(spec)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cmd": ["x"], "bogus": 1}, "bogus"),
        ({"cmd": ["x"], "limits": {"cpu_tme": 1}}, "cpu_tme"),
        ({"cmd": ["x"], "files": [{"path": "a", "content": "", "owner": 0}]}, "owner"),
    ],
)
def test_unknown_field_is_rejected_and_named(data: dict, field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"unknown field `{field}`"):
        decode(data)


def test_unknown_field_error_says_where() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode({"cmd": ["x"], "limits": {"cpu_tme": 1}})
    assert "$.limits" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("cpu_time", 601.0, "$.limits.cpu_time"),
        ("cpu_time", 0, "$.limits.cpu_time"),  # gt=0
        ("wall_time", 3601.0, "$.limits.wall_time"),
        ("memory", 64 * GiB + 1, "$.limits.memory"),
        ("memory", 4 * MiB - 1, "$.limits.memory"),
        ("pids", 32769, "$.limits.pids"),
        ("pids", 0, "$.limits.pids"),
        ("output", 1 * GiB + 1, "$.limits.output"),
        ("file_size", 16 * GiB + 1, "$.limits.file_size"),
        ("open_files", 15, "$.limits.open_files"),
        ("open_files", 65537, "$.limits.open_files"),
        ("stack", 1 * GiB + 1, "$.limits.stack"),
        ("disk", 64 * GiB + 1, "$.limits.disk"),
    ],
)
def test_limit_out_of_bounds_is_rejected(field: str, value, path: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode({"cmd": ["x"], "limits": {field: value}})
    assert path in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("cpu_time", 600.0), ("wall_time", 3600.0), ("memory", 64 * GiB), ("memory", 4 * MiB),
     ("pids", 32768), ("pids", 1), ("output", 0), ("open_files", 16), ("disk", 1 * MiB)],
)
def test_limit_at_the_bound_is_accepted(field: str, value) -> None:
    spec = decode({"cmd": ["x"], "limits": {field: value}})
    assert getattr(spec.limits, field) == value


def test_limit_of_wrong_type_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.limits\.pids"):
        decode({"cmd": ["x"], "limits": {"pids": "64"}})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.limits\.pids"):
        decode({"cmd": ["x"], "limits": {"pids": 1.5}})


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"cmd": []}, "$.cmd"),
        ({"cmd": ["x"] * 4097}, "$.cmd"),
        ({"cmd": ["x"], "uid": 65536}, "$.uid"),
        ({"cmd": ["x"], "gid": -1}, "$.gid"),
        ({"cmd": ["x"], "hostname": "-leading-dash"}, "$.hostname"),
        ({"cmd": ["x"], "hostname": "a" * 64}, "$.hostname"),
        ({"cmd": ["x"], "network": "host"}, "$.network"),
        ({"cmd": ["x"], "seccomp": "off"}, "$.seccomp"),
        ({"cmd": ["x"], "copy_out": ["f"] * 257}, "$.copy_out"),
        ({"cmd": ["x"], "files": [{"path": "a", "content": "", "mode": 0o1000}]}, "$.files[0].mode"),
    ],
)
def test_other_bounds_are_enforced(data: dict, path: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode(data)
    assert path in str(info.value)


def test_cmd_is_required() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `cmd`"):
        decode({})


def test_volume_name_pattern() -> None:
    assert decode({"name": "data_1.v-2", "path": "/data"}, VolumeMount).name == "data_1.v-2"
    for bad in ("", "Upper", "-x", "a" * 64, "a/b"):
        with pytest.raises(msgspec.ValidationError, match=r"\$\.name"):
            decode({"name": bad, "path": "/data"}, VolumeMount)


def test_structs_are_frozen() -> None:
    spec = RunSpec(cmd=["x"])
    with pytest.raises(AttributeError):
        spec.uid = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.limits.memory = 1  # type: ignore[misc]


def test_bytes_fields_round_trip_as_base64() -> None:
    spec = RunSpec(cmd=["cat"], stdin=b"\x00\xffhello", files=[FileIn(path="a.bin", content=b"\x01")])
    again = decode(msgspec.to_builtins(spec))
    assert again == spec
    result = RunResult(verdict=Verdict.OK, stdout=b"\x00out")
    assert msgspec.json.decode(msgspec.json.encode(result), type=RunResult) == result


def test_verdict_values_are_their_names() -> None:
    assert {v.value for v in Verdict} == {v.name for v in Verdict}
    assert Verdict("TIME_LIMIT") is Verdict.TIME_LIMIT
    assert msgspec.json.encode(Verdict.MEMORY_LIMIT) == b'"MEMORY_LIMIT"'


# ------------------------------------------------------------------------------ path checks


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", "a"),
        ("a/b/c.txt", "a/b/c.txt"),
        ("./a//b/./c", "a/b/c"),
        ("a/", "a"),
        ("..a/b..", "..a/b.."),  # dots inside names are fine
    ],
)
def test_relative_path_is_normalised(path: str, expected: str) -> None:
    assert check_relative_path(path, field="f") == expected


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "/", "..", "../x", "a/../../x", "a/..", "a/b/../c", "a\0b", ".", "./", "//x",
     "x" * 1025],
)
def test_relative_path_rejects_unsafe(path: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        check_relative_path(path, field="files[3].path")
    assert info.value.field == "files[3].path"
    assert info.value.code == "invalid_spec" and info.value.status == 400
    assert info.value.message.startswith("files[3].path:")


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/work", "/work"), ("/work/", "/work"), ("//a/./b", "/a/b"), ("/a/b/c", "/a/b/c")],
)
def test_absolute_path_is_normalised(path: str, expected: str) -> None:
    assert check_absolute_path(path, field="workdir") == expected


@pytest.mark.parametrize("path", ["work", "", "./work", "/work/../etc", "/..", "/a\0", "/", "/./"])
def test_absolute_path_rejects_relative_dotdot_nul_and_root(path: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        check_absolute_path(path, field="workdir")
    assert info.value.field == "workdir"


# ----------------------------------------------------------------------------- validate_spec


def test_invalid_spec_is_a_sandbox_error() -> None:
    assert issubclass(InvalidSpec, SandboxError)
    assert InvalidSpec("x", field="env").to_dict() == {
        "error": "invalid_spec", "message": "x", "field": "env"
    }


@pytest.mark.parametrize("workdir", ["work", "relative/dir", "/work/../..", "/", "/tmp/\0"])
def test_workdir_must_be_a_safe_absolute_path(workdir: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_spec(RunSpec(cmd=["x"], workdir=workdir))
    assert info.value.field == "workdir"


@pytest.mark.parametrize("path", ["../escape", "/abs", "", "a/\0", "."])
def test_file_paths_must_be_safe_relative(path: str) -> None:
    spec = RunSpec(cmd=["x"], files=[FileIn(path="ok.txt", content=b""), FileIn(path=path, content=b"")])
    with pytest.raises(InvalidSpec) as info:
        validate_spec(spec)
    assert info.value.field == "files[1].path"


@pytest.mark.parametrize("path", ["../escape", "/etc/shadow", ""])
def test_copy_out_paths_must_be_safe_relative(path: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_spec(RunSpec(cmd=["x"], copy_out=["out.txt", path]))
    assert info.value.field == "copy_out[1]"


@pytest.mark.parametrize(
    "env",
    [{"": "v"}, {"A=B": "v"}, {"A\0": "v"}, {"OK": "v", "BAD": "nul\0inside"}],
)
def test_env_names_and_values_are_checked(env: dict[str, str]) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_spec(RunSpec(cmd=["x"], env=env))
    assert info.value.field == "env"


def test_ordinary_env_is_accepted() -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "EMPTY": "", "lower_case": "a=b"}
    validate_spec(RunSpec(cmd=["x"], env=env))


def test_nul_in_command_argument_is_rejected() -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_spec(RunSpec(cmd=["/bin/echo", "ok", "bad\0arg"]))
    assert info.value.field == "cmd[2]"


def test_a_full_valid_spec_passes() -> None:
    spec = decode({
        "cmd": ["/usr/bin/python3", "main.py"],
        "env": {"PYTHONUNBUFFERED": "1"},
        "stdin": "aGVsbG8=",
        "workdir": "/work/sub",
        "files": [{"path": "main.py", "content": "cHJpbnQoMSk=", "mode": 0o755},
                  {"path": "pkg/data.txt", "content": ""}],
        "copy_out": ["out/result.json"],
        "limits": {"cpu_time": 1.5, "memory": 64 * MiB, "pids": 8},
        "uid": 0, "gid": 0, "hostname": "judge-1", "read_only_root": True,
        "network": "private", "seccomp": "strict",
    })
    validate_spec(spec)
    assert spec.stdin == b"hello"
    assert spec.files[0].content == b"print(1)"
