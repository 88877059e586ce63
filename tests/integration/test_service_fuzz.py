"""Schemathesis against the OpenAPI schema the API serves (real uvicorn on loopback, real
Redis, a real worker): whatever the generated request, the answer is never a 5xx.

The default run is small and bounded (a few examples per operation); `-m slow` runs a longer
one. A request that must be answered 503 (queue full, Redis down) cannot happen here: the queue
bound is far above what the run enqueues and Redis stays up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.app import create_app
from tests.fixtures.ports import free_port, wait_until
from tests.integration.test_service_support import (  # noqa: F401  (fixtures)
    ALICE,
    make_settings,
    worker_factory,
)


class LiveServer:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_until(lambda: httpx.get(f"{self.url}/v1/health", timeout=1).status_code < 600, timeout=15,
                   what="uvicorn")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_api(redis_url: str, worker_factory, registry_server: str) -> Iterator[LiveServer]:
    # A healthy service: a real registry, so generated image names are simply unknown (404).
    worker_factory(SBX_REGISTRY=registry_server, SBX_INSECURE_REGISTRIES=registry_server)
    app = create_app(make_settings(redis_url, max_wait=0.5, pull_wait=2.0, max_queue=100_000,
                                   max_body_bytes=256 * 1024, registry=registry_server))
    with LiveServer(app) as server:
        yield server


def _fuzz(live: LiveServer, examples: int) -> int:
    """Fuzz every operation of the served schema, positive and negative cases; return the
    number of requests made. Fails on the first 5xx (or a request hanging over 10 s)."""
    schema = schemathesis.openapi.from_url(f"{live.url}/schema/openapi.json")
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/runs", "/v1/runs/{run_id}", "/v1/images/pull"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=live.url, headers=ALICE, checks=[not_a_server_error], timeout=10)

            check()
    return calls


def test_no_server_errors_for_generated_requests(live_api):
    calls = _fuzz(live_api, examples=8)
    assert calls >= 40


@pytest.mark.slow
def test_no_server_errors_long_run(live_api):
    assert _fuzz(live_api, examples=300) >= 1000
