"""`sbx run`: one container on this machine through the runtime, no service needed.

Prints the program's output (and exits 0 whatever the verdict, since the run itself happened),
or with --json one object with the result's fields. Exit status 2 with a message when the run
could not be set up.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys

import msgspec

from sandbox.config import RuntimeSettings
from sandbox.errors import InvalidSpec
from sandbox.spec import Limits, Rootfs, RunResult, RunSpec, Verdict

SIZE = re.compile(r"^(\d+)([kmgKMG]?)[iI]?[bB]?$")
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_size(text: str) -> int:
    """'268435456', '256M', '1g', '64KiB' -> bytes."""
    match = SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M or 1048576)")
    return int(match.group(1)) * UNITS[match.group(2).lower()]


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSpec(f"--env expects KEY=VALUE, got {item!r}", field="env")
        env[key] = value
    return env


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a command in a fresh rootless container",
                              description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image reference; pulled if missing")
    src.add_argument("--rootfs", help="an unpacked root filesystem directory")
    p.add_argument("--cpu-time", type=float, help="CPU seconds, all processes together")
    p.add_argument("--wall-time", type=float, help="wall-clock seconds")
    p.add_argument("--memory", type=parse_size, help="bytes, or with a unit: 256M")
    p.add_argument("--pids", type=int, help="processes and threads at once")
    p.add_argument("--output", type=parse_size, help="bytes kept per stream")
    p.add_argument("--file-size", type=parse_size, help="largest file written")
    p.add_argument("--disk", type=parse_size, help="bytes writable in root, workdir and /tmp")
    p.add_argument("--stdin-file", help="file whose bytes are the program's stdin ('-': ours)")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", help="working directory inside the container (default /work)")
    p.add_argument("--user", type=int, dest="uid", help="uid (and gid) inside the container")
    p.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    p.add_argument("--seccomp", choices=("default", "strict"), default="default")
    p.add_argument("--copy-out", action="append", default=[], metavar="PATH",
                   help="file of the workdir to return (with --json)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # -- networks and volumes (issue 5) --
    p.add_argument("--network", choices=("none", "private", "egress"),
                   help="none (default), private (default with --service), egress")
    p.add_argument("--service", action="append", default=[], metavar="NAME=IMAGE:PORT[,CMD]",
                   help="start IMAGE (a reference or a rootfs directory) as host NAME on the "
                        "run's private network first, and wait until PORT listens; CMD "
                        "(shell-split) replaces the image's command")
    p.add_argument("--volume", action="append", default=[], metavar="NAME:/PATH[:ro]",
                   help="mount the named volume (see `sbx volumes`)")
    p.add_argument("--tenant", help="owner of the volumes (default $SBX_TENANT or 'local')")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=run_command)


def _limits(args: argparse.Namespace) -> Limits:
    given = {name: getattr(args, name) for name in
             ("cpu_time", "wall_time", "memory", "pids", "output", "file_size", "disk")
             if getattr(args, name) is not None}
    try:
        return msgspec.convert(given, Limits)
    except msgspec.ValidationError as exc:
        raise InvalidSpec(f"limits: {exc}", field="limits") from exc


def build_spec(args: argparse.Namespace, image_env: dict[str, str], image_cmd: list[str],
               image_workdir: str) -> RunSpec:
    cmd = [c for c in args.cmd if c != "--"] if args.cmd[:1] == ["--"] else list(args.cmd)
    cmd = cmd or image_cmd
    if not cmd:
        raise InvalidSpec("no command given and the image has none", field="cmd")
    stdin = b""
    if args.stdin_file == "-":
        stdin = sys.stdin.buffer.read()
    elif args.stdin_file:
        with open(args.stdin_file, "rb") as f:
            stdin = f.read()
    env = {"PATH": DEFAULT_PATH, **image_env, **parse_env(args.env)}
    uid = args.uid if args.uid is not None else 1000
    try:
        return msgspec.convert(dict(
            cmd=cmd, env=env, stdin=stdin, workdir=args.workdir or image_workdir or "/work",
            limits=_limits(args), uid=uid, gid=uid, read_only_root=args.read_only,
            seccomp=args.seccomp, copy_out=args.copy_out,
            network=args.network or ("private" if args.service else "none")),
            RunSpec, from_attributes=True)
    except msgspec.ValidationError as exc:
        raise InvalidSpec(str(exc)) from exc


def result_json(result: RunResult) -> bytes:
    """The result as JSON: stdout/stderr as text, plus base64 when not valid UTF-8."""
    out = msgspec.to_builtins(result)
    for name in ("stdout", "stderr"):
        raw: bytes = getattr(result, name)
        try:
            out[name] = raw.decode()
        except UnicodeDecodeError:
            out[name] = raw.decode(errors="replace")
            out[f"{name}_base64"] = base64.b64encode(raw).decode()
    out["files"] = {k: base64.b64encode(v).decode() for k, v in result.files.items()}
    return msgspec.json.encode(out)


def parse_volume(text: str):
    """'data:/data' or 'data:/data:ro' -> VolumeMount."""
    from sandbox.spec import VolumeMount

    name, sep, rest = text.partition(":")
    path, _, mode = rest.partition(":")
    if not sep or not path.startswith("/") or mode not in ("", "ro", "rw"):
        raise InvalidSpec(f"--volume expects NAME:/PATH[:ro], got {text!r}", field="volumes")
    return VolumeMount(name=name, path=path, read_only=mode == "ro")


def parse_service(text: str, settings: RuntimeSettings, main: RunSpec):
    """'web=IMAGE:8080' or 'web=IMAGE:8080,CMD ARGS' -> sandbox.jobs.Service."""
    import shlex

    from sandbox.jobs import Service

    name, sep, rest = text.partition("=")
    where, _, cmd_text = rest.partition(",")
    ref, _, port = where.rpartition(":")
    if not sep or not ref or not port.isdigit():
        raise InvalidSpec(f"--service expects NAME=IMAGE:PORT[,CMD], got {text!r}",
                          field="services")
    env: dict[str, str] = {}
    cmd = shlex.split(cmd_text)
    if os.path.isdir(ref):
        rootfs = Rootfs(layers=(os.path.abspath(ref),))
    else:
        from sandbox.oci.pull import Puller

        image = Puller(settings).ensure(ref)
        rootfs, env = image.rootfs, image.config.env_dict()
        cmd = cmd or [*image.config.entrypoint, *image.config.cmd]
    if not cmd:
        raise InvalidSpec(f"--service {name}: no command given and the image has none",
                          field="services")
    wall = main.limits.wall_time + 35  # killed when the run ends; this is only a backstop
    spec = RunSpec(cmd=cmd, env={"PATH": DEFAULT_PATH, **env}, network="private", hostname=name,
                   limits=msgspec.structs.replace(main.limits, wall_time=min(wall, 3600)))
    return Service(name=name, spec=spec, rootfs=rootfs, port=int(port))


def _run_job(runtime, settings, spec, rootfs, services, mounts, args) -> RunResult:
    from cli.volumes_cmd import tenant_of
    from sandbox.jobs import run_job
    from sandbox.volumes import VolumeStore

    if not mounts:
        return run_job(runtime, spec, rootfs, services=services)
    store = VolumeStore.from_settings(settings)
    with store.attach(tenant_of(args), mounts, wait=settings.volume_wait) as binds:
        return run_job(runtime, spec, rootfs, services=services, volumes=binds)


def run_command(args: argparse.Namespace) -> int:
    from sandbox.runner import Runtime  # imported here: `sbx images ...` need not load it

    settings = RuntimeSettings.from_env()
    image_env: dict[str, str] = {}
    image_cmd: list[str] = []
    image_workdir = ""
    if args.rootfs:
        if not os.path.isdir(args.rootfs):
            raise InvalidSpec(f"--rootfs {args.rootfs}: not a directory", field="rootfs")
        rootfs = Rootfs(layers=(os.path.abspath(args.rootfs),))
    else:
        from sandbox.oci.pull import Puller

        image = Puller(settings).ensure(args.image)
        rootfs = image.rootfs
        image_env = image.config.env_dict()
        image_cmd = [*image.config.entrypoint, *image.config.cmd]
        image_workdir = image.config.workdir
    spec = build_spec(args, image_env, image_cmd, image_workdir)
    services = [parse_service(text, settings, spec) for text in args.service]
    mounts = [parse_volume(text) for text in args.volume]
    with Runtime(settings) as runtime:
        if services or mounts:
            result = _run_job(runtime, settings, spec, rootfs, services, mounts, args)
        else:
            result = runtime.run(spec, rootfs)
    if args.json:
        sys.stdout.buffer.write(result_json(result) + b"\n")
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stderr.buffer.write(result.stderr)
        if result.verdict not in (Verdict.OK, Verdict.NONZERO_EXIT):
            detail = f" ({result.stage}: {result.message})" if result.stage else ""
            print(f"sbx: {result.verdict.value}{detail}", file=sys.stderr)
    sys.stdout.flush()
    if result.verdict is Verdict.SETUP_ERROR:
        return 2
    return 0
