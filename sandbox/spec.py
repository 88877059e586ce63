"""What a run is and what it returns: frozen msgspec Structs with their bounds on the type.

`RunSpec` is the runtime's input (bytes, host-independent paths), `RunResult` its output.
The API's wire schemas (api/schemas.py) reuse `Limits`, `Verdict` and the result fields, so
`sbx run --json` and `POST /v1/runs` speak the same names. Path checks live here too, because
a path that passes `check_relative_path` is the only kind the runtime ever joins to a root.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sandbox.errors import InvalidSpec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

Seconds = Annotated[float, Meta(gt=0, le=3600)]
Bytes = Annotated[int, Meta(ge=0, le=1 << 40)]
ContainerId = Annotated[int, Meta(ge=0, le=65535)]
Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


class Verdict(str, enum.Enum):
    """How a run ended, most specific first. A superset of isolate's, Judge0's and Piston's."""

    OK = "OK"
    NONZERO_EXIT = "NONZERO_EXIT"
    SIGNALED = "SIGNALED"
    TIME_LIMIT = "TIME_LIMIT"
    WALL_TIME_LIMIT = "WALL_TIME_LIMIT"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    FILE_SIZE_LIMIT = "FILE_SIZE_LIMIT"
    PROCESS_LIMIT = "PROCESS_LIMIT"
    SYSCALL_BLOCKED = "SYSCALL_BLOCKED"
    VOLUME_QUOTA = "VOLUME_QUOTA"
    """A read-write volume was written past its quota; the run's changes to it were dropped."""
    SETUP_ERROR = "SETUP_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Resource limits of one run. Every field is bounded; the server may lower the maxima."""

    cpu_time: Annotated[float, Meta(gt=0, le=600)] = 5.0
    """CPU seconds of all processes of the run together."""
    wall_time: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    """Seconds from exec to the end of the run, sleeping included."""
    memory: Annotated[int, Meta(ge=4 * MiB, le=64 * GiB)] = 256 * MiB
    """Peak bytes of memory (cgroup) or address space (rlimit fallback)."""
    pids: Annotated[int, Meta(ge=1, le=32768)] = 64
    """Processes and threads alive at once."""
    output: Annotated[int, Meta(ge=0, le=1 * GiB)] = 1 * MiB
    """Bytes kept per stream (stdout, stderr); more kills the run with OUTPUT_LIMIT."""
    file_size: Annotated[int, Meta(ge=0, le=16 * GiB)] = 16 * MiB
    """Largest file a process may write (RLIMIT_FSIZE)."""
    open_files: Annotated[int, Meta(ge=16, le=65536)] = 256
    """RLIMIT_NOFILE."""
    stack: Annotated[int, Meta(ge=64 * KiB, le=1 * GiB)] = 8 * MiB
    """RLIMIT_STACK."""
    disk: Annotated[int, Meta(ge=1 * MiB, le=64 * GiB)] = 128 * MiB
    """Bytes the run may write to its root, work directory and /tmp together (a tmpfs)."""


class FileIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A file placed in the work directory before the run. `path` is relative to it."""

    path: str
    content: bytes
    mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o644


class VolumeMount(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named volume (already resolved to a host directory by sandbox.volumes) at `path`."""

    name: Name
    path: str
    read_only: bool = False


class RunSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One container run. The rootfs (image layers) is passed beside it, already resolved."""

    cmd: Annotated[list[str], Meta(min_length=1, max_length=4096)]
    env: dict[str, str] = {}
    stdin: bytes = b""
    workdir: str = "/work"
    files: list[FileIn] = []
    copy_out: Annotated[list[str], Meta(max_length=256)] = []
    limits: Limits = Limits()
    uid: ContainerId = 1000
    gid: ContainerId = 1000
    hostname: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$")] = "sbx"
    read_only_root: bool = False
    network: Literal["none", "private", "egress"] = "none"
    seccomp: Literal["default", "strict"] = "default"


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """What happened. Times in seconds, memory in bytes; `stage` is set on SETUP_ERROR."""

    verdict: Verdict
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time: float = 0.0
    wall_time: float = 0.0
    memory: int = 0
    stage: str | None = None
    message: str = ""
    files: dict[str, bytes] = {}
    limits_mode: str = ""
    setup_time: float = 0.0
    """Seconds spent before this container started on the job's network and services."""


def check_relative_path(path: str, *, field: str) -> str:
    """Return `path` normalised if it is a safe relative path (no '..', not absolute, no NUL)."""
    if not path or "\0" in path or path.startswith("/") or len(path) > 1024:
        raise InvalidSpec(f"{field}: path must be relative, non-empty and without NUL", field=field)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise InvalidSpec(f"{field}: path may not contain '..' or be empty", field=field)
    return "/".join(parts)


def check_absolute_path(path: str, *, field: str) -> str:
    """Return an absolute container path normalised; refuse '..', NUL and the root itself."""
    if not path.startswith("/"):
        raise InvalidSpec(f"{field}: path must be absolute", field=field)
    return "/" + check_relative_path(path.lstrip("/") or ".", field=field)


def validate_spec(spec: RunSpec) -> None:
    """Checks msgspec cannot express on the type: paths and environment names."""
    check_absolute_path(spec.workdir, field="workdir")
    for i, f in enumerate(spec.files):
        check_relative_path(f.path, field=f"files[{i}].path")
    for i, p in enumerate(spec.copy_out):
        check_relative_path(p, field=f"copy_out[{i}]")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidSpec(f"env: bad variable name or value {key!r}", field="env")
    for i, arg in enumerate(spec.cmd):
        if "\0" in arg:
            raise InvalidSpec(f"cmd[{i}]: NUL byte in argument", field=f"cmd[{i}]")


class Rootfs(msgspec.Struct, frozen=True):
    """Host directories stacked as the container's read-only lower layers, bottom first."""

    layers: tuple[str, ...]
