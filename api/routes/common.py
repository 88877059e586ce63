"""Pieces shared by the route modules: documented error responses, wait bounds."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio.to_thread
from litestar.openapi import ResponseSpec
from litestar.di import NamedDependency

from api.schemas import ErrorOut

Tenant = NamedDependency[str]
"""The caller's tenant, provided by api.auth from the API key."""

ERROR_RESPONSES = {
    400: ResponseSpec(data_container=ErrorOut, description="Invalid request; `field` names the input at fault"),
    401: ResponseSpec(data_container=ErrorOut, description="Missing or unknown API key"),
    404: ResponseSpec(data_container=ErrorOut, description="No such run or image for this tenant"),
    413: ResponseSpec(data_container=ErrorOut, description="Request body over the size cap"),
    503: ResponseSpec(data_container=ErrorOut, description="Queue full or Redis down; see Retry-After"),
}


def wait_seconds(wait: bool | float, bound: float) -> float:
    """How long to block for a request's `wait` value, never above the server's bound."""
    if wait is True:
        return bound
    if wait is False or wait is None:
        return 0.0
    return max(0.0, min(float(wait), bound))


T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """Run a blocking Redis-bound function off the event loop (anyio's thread pool).

    Handlers are `async def` and hop to a thread explicitly: Litestar's sync_to_thread wraps
    a handler twice when GET and DELETE share a path, returning an un-awaited coroutine.
    """
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
