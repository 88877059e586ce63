"""Worker settings: one frozen object, built from the environment only by the entrypoint."""

from __future__ import annotations

import os

import msgspec

from sandbox.config import RuntimeSettings


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Where the queue lives. Off loopback the URL must carry a password."""
    runtime: RuntimeSettings = RuntimeSettings()
    """Passed unchanged to the runtime (state dir, cgroups, registry)."""
    processes: int = 0
    """Worker processes on this host; 0 means one per CPU core."""
    local_images: dict[str, str] = {}
    """Image name -> host directory holding an unpacked root filesystem ("local images")."""
    heartbeat_interval: float = 2.0
    """Seconds between liveness beats; a worker silent for 3 beats counts as dead."""
    janitor_interval: float = 5.0
    """Seconds between sweeps for runs whose worker died."""
    max_output_bytes: int = 64 * 1024 * 1024
    """Bound on one encoded job outcome; a larger one is replaced by an error."""
    self_test: bool = True
    """Run a trivial container at start and refuse to take jobs if it fails."""
    self_test_image: str = "busybox"
    self_test_cmd: tuple[str, ...] = ("true",)
    volume_host: bool = True
    """This host keeps the named volumes: its workers also take the volume queue (runs with
    volumes, volume operations). Exactly one host may; the first to start claims it in Redis."""
    user: str = "sbx"
    """The unprivileged user a worker started as root switches to."""

    @property
    def liveness_ttl(self) -> int:
        return max(2, int(self.heartbeat_interval * 3 + 0.999))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "WorkerSettings":
        """Read SBX_* variables (and REDIS_URL); the runtime's own are read by RuntimeSettings."""
        env = os.environ if environ is None else environ
        values: dict = {"runtime": RuntimeSettings.from_env(dict(env))}
        url = env.get("SBX_REDIS_URL") or env.get("REDIS_URL")
        if url:
            values["redis_url"] = url
        if env.get("SBX_WORKERS"):
            values["processes"] = int(env["SBX_WORKERS"])
        if env.get("SBX_LOCAL_IMAGES"):
            # name=dir,name=dir
            pairs = [item.split("=", 1) for item in env["SBX_LOCAL_IMAGES"].split(",") if "=" in item]
            values["local_images"] = {name: path for name, path in pairs}
        if env.get("SBX_SELF_TEST") in ("0", "false", "no"):
            values["self_test"] = False
        if env.get("SBX_SELF_TEST_IMAGE"):
            values["self_test_image"] = env["SBX_SELF_TEST_IMAGE"]
        if env.get("SBX_HEARTBEAT_INTERVAL"):
            values["heartbeat_interval"] = float(env["SBX_HEARTBEAT_INTERVAL"])
        if env.get("SBX_JANITOR_INTERVAL"):
            values["janitor_interval"] = float(env["SBX_JANITOR_INTERVAL"])
        if env.get("SBX_VOLUME_HOST") in ("0", "false", "no"):
            values["volume_host"] = False
        if env.get("SBX_USER"):
            values["user"] = env["SBX_USER"]
        values.update(overrides)
        return msgspec.convert(values, cls)
