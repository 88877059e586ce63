"""Test-suite wiring: fixture plugins and the refusal to test the runtime as root.

Fixtures (see tests/fixtures/): redis_server, redis_url, registry_server, registry_with_auth,
busybox_rootfs, python_rootfs, runtime_settings. Helpers: tests.fixtures.ports.free_port,
tests.fixtures.ports.wait_until, tests.fixtures.procs.ServerProcess.
"""

from __future__ import annotations

import os

import pytest

from tests.fixtures.ports import free_port  # noqa: F401  (re-exported for convenience)

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.registry",
    "tests.fixtures.rootfs",
    "tests.fixtures.settings",
    "tests.fixtures.runtime",
]


def pytest_configure(config: pytest.Config) -> None:
    # The runtime must prove it works unprivileged; as root, namespace and cgroup tests
    # would pass for the wrong reason.
    if os.geteuid() == 0 and os.environ.get("SBX_ALLOW_ROOT_TESTS") != "1":
        raise pytest.UsageError(
            "sbx tests must not run as root: use ./dev test (it runs pytest as the sbx user), "
            "or set SBX_ALLOW_ROOT_TESTS=1 to override"
        )
