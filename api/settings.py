"""API settings: one frozen object passed to `create_app(settings)`.

Only the entrypoint (api/serve.py) reads the environment, through `Settings.from_env()`;
tests build `Settings(...)` directly. Checks that make a configuration unsafe (open access
off loopback, a limit default above its maximum) fail at `create_app` time, not per request.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import msgspec
from msgspec import Meta

from sandbox.spec import GiB, Limits, MiB

DEFAULT_MAX_LIMITS = Limits(
    cpu_time=30.0,
    wall_time=60.0,
    memory=2 * GiB,
    pids=256,
    output=16 * MiB,
    file_size=256 * MiB,
    open_files=1024,
    stack=64 * MiB,
    disk=1 * GiB,
)
"""Server maxima: a request asking for more than these is refused with 400."""

OPEN_TENANT = "anonymous"
"""The tenant of every request when open access is on."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    """Address the API listens on; open access requires a loopback address."""
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    api_keys: dict[str, str] = {}
    """API key -> tenant name. Each key is a tenant; a tenant sees only its own runs."""
    open_access: bool = False
    """Accept requests without a key (tenant "anonymous"); only allowed bound to loopback."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = 8 * MiB
    """Largest request body; larger ones get 413."""
    max_wait: Annotated[float, Meta(ge=0, le=3600)] = 60.0
    """Longest a request may block waiting for a run (seconds); after it the answer is 202."""
    default_limits: Limits = Limits()
    max_limits: Limits = DEFAULT_MAX_LIMITS
    result_ttl: Annotated[int, Meta(ge=1)] = 3600
    """Seconds a finished run (and its output) is kept."""
    queued_ttl: Annotated[int, Meta(ge=1)] = 3600
    """Seconds a run may wait in the queue before it expires unrun."""
    max_queue: Annotated[int, Meta(ge=1)] = 1000
    """Queue depth at which new runs are refused with 503 and Retry-After."""
    registry: str = "127.0.0.1:5000"
    """The registry /v1/health and /v1/images look at (host:port, plain HTTP on loopback)."""
    registry_scheme: str = "http"
    pull_wait: Annotated[float, Meta(ge=0, le=3600)] = 120.0
    """Longest POST /v1/images/pull waits for the worker's pull."""
    job_margin: Annotated[int, Meta(ge=0)] = 60
    """Seconds added to a run's wall-time limit to bound how long a worker may hold its job."""

    def check(self) -> None:
        """Refuse unsafe or inconsistent settings (called by create_app)."""
        if self.open_access and not is_loopback(self.host):
            raise ValueError(f"open access is only allowed bound to loopback, not {self.host!r}")
        if not self.open_access and not self.api_keys:
            raise ValueError("no API keys configured (set SBX_API_KEY or SBX_API_KEYS, or open access on loopback)")
        for key, tenant in self.api_keys.items():
            if len(key) < 16:
                raise ValueError(f"API key of tenant {tenant!r} is shorter than 16 characters")
        for name in Limits.__struct_fields__:
            if getattr(self.default_limits, name) > getattr(self.max_limits, name):
                raise ValueError(f"default limit {name} is above its maximum")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """SBX_* variables: SBX_API_KEY (one key, tenant "default"), SBX_API_KEYS
        ("tenant:key,tenant:key"), SBX_API_KEYS_FILE (one "tenant:key" a line), SBX_OPEN_ACCESS=1,
        SBX_API_HOST, SBX_API_PORT, REDIS_URL/SBX_REDIS_URL, SBX_REGISTRY, SBX_RESULT_TTL,
        SBX_MAX_QUEUE, SBX_MAX_BODY, SBX_MAX_WAIT."""
        env = os.environ if environ is None else environ
        values: dict = {}
        keys: dict[str, str] = {}
        pairs: list[str] = []
        if env.get("SBX_API_KEYS_FILE"):
            with open(env["SBX_API_KEYS_FILE"], encoding="utf-8") as fh:
                pairs += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        if env.get("SBX_API_KEYS"):
            pairs += [p.strip() for p in env["SBX_API_KEYS"].split(",") if p.strip()]
        for pair in pairs:
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant or not key:
                raise ValueError("SBX_API_KEYS entries look like tenant:key")
            keys[key] = tenant
        if env.get("SBX_API_KEY"):
            keys[env["SBX_API_KEY"]] = keys.get(env["SBX_API_KEY"], "default")
        values["api_keys"] = keys
        url = env.get("SBX_REDIS_URL") or env.get("REDIS_URL")
        if url:
            values["redis_url"] = url
        simple = {
            "SBX_API_HOST": ("host", str),
            "SBX_API_PORT": ("port", int),
            "SBX_REGISTRY": ("registry", str),
            "SBX_RESULT_TTL": ("result_ttl", int),
            "SBX_MAX_QUEUE": ("max_queue", int),
            "SBX_MAX_BODY": ("max_body_bytes", int),
            "SBX_MAX_WAIT": ("max_wait", float),
        }
        for var, (name, kind) in simple.items():
            if env.get(var):
                values[name] = kind(env[var])
        if env.get("SBX_OPEN_ACCESS", "").lower() in ("1", "true", "yes"):
            values["open_access"] = True
        values.update(overrides)
        return msgspec.convert(values, cls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
