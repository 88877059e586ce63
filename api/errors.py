"""The one place errors become HTTP responses.

`error_response` is registered for every exception: SandboxError subclasses carry their
status and field; msgspec validation failures keep msgspec's message and its location
("... - at `$.limits.memory`"); a body that is not JSON or not UTF-8 is a 400; Redis being
down (or slow) is a 503 with Retry-After, and the next request simply tries again. Anything
else is an internal error: logged with its traceback, answered 500 without details.
"""

from __future__ import annotations

import logging

import msgspec
import redis
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    SerializationException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from api.schemas import ErrorOut
from sandbox.errors import SandboxError, Unavailable

log = logging.getLogger("sbx.api")

REDIS_RETRY_AFTER = 2
"""Seconds clients are told to wait when Redis is unreachable."""

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def _json(body: ErrorOut, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, headers=headers or {}, media_type="application/json")


def _validation(exc: ValidationException) -> Response:
    problems = exc.extra if isinstance(exc.extra, list) else []
    if problems and isinstance(problems[0], dict):
        first = problems[0]
        key = str(first.get("key") or "")
        where = "$" if key in ("", "data") else f"$.{key}"
        field = None if key in ("", "data") else key
        message = f"{first.get('message', 'invalid value')} - at `{where}`"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        return _json(ErrorOut(error="invalid_request", message=message, field=field), 400)
    return _json(ErrorOut(error="invalid_request", message=str(exc.detail)), 400)


def error_response(request: Request, exc: Exception) -> Response:
    """Map any exception raised while serving `request` to a JSON error response."""
    if isinstance(exc, SandboxError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        status = exc.status if 400 <= exc.status < 600 else 500
        if status >= 500 and not isinstance(exc, Unavailable):
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return _json(ErrorOut(error=exc.code, message=exc.message, field=exc.field), status, headers)
    if isinstance(exc, ValidationException):
        return _validation(exc)
    if isinstance(exc, NotAuthorizedException):
        return _json(
            ErrorOut(error="unauthorized", message=str(exc.detail)),
            401,
            {"WWW-Authenticate": 'Bearer realm="sbx"'},
        )
    if isinstance(exc, HTTPException) and isinstance(exc.__cause__, SerializationException):
        return _json(ErrorOut(error="invalid_request", message=f"malformed JSON body: {exc.detail}"), 400)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.detail)
        code = _HTTP_CODES.get(status, "http_error")
        return _json(ErrorOut(error=code, message=str(exc.detail)), status, dict(exc.headers or {}))
    if isinstance(exc, (UnicodeDecodeError, msgspec.DecodeError, SerializationException)):
        return _json(ErrorOut(error="invalid_request", message=f"malformed JSON body: {exc}"), 400)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
        log.warning("%s %s: redis unavailable: %s", request.method, request.url.path, exc)
        return _json(
            ErrorOut(error="unavailable", message="the queue (Redis) is unavailable; retry later"),
            503,
            {"Retry-After": str(REDIS_RETRY_AFTER)},
        )
    if isinstance(exc, redis.RedisError):
        log.error("%s %s: redis error: %s", request.method, request.url.path, exc)
        return _json(
            ErrorOut(error="unavailable", message=f"the queue (Redis) failed: {type(exc).__name__}"),
            503,
            {"Retry-After": str(REDIS_RETRY_AFTER)},
        )
    log.exception("%s %s: internal error", request.method, request.url.path, exc_info=exc)
    return _json(ErrorOut(error="internal_error", message="internal error"), HTTP_500_INTERNAL_SERVER_ERROR)

