"""HTTP/1.1 for the distribution protocol: pooled keep-alive connections, redirects, retries.

Built on the stdlib's http.client. Idempotent requests (GET, HEAD) are retried with exponential
backoff on 5xx/429 answers and on dropped connections; other requests are retried only when the
connection failed before anything was sent back. Redirects (blob GETs are often sent to object
storage) are followed, and the Authorization header is dropped when the host changes.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from typing import BinaryIO, Callable, Iterator

from sandbox.errors import ImageError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth another try after a pause."""
NETWORK_ERRORS = (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError, OSError)
"""Exceptions that mean the connection broke, not that the server said no."""
CHUNK = 1024 * 1024
"""Bytes read from a response body at a time."""


class Response:
    """A response whose body is read by the caller; `close()` returns the connection to the pool."""

    def __init__(self, raw: http.client.HTTPResponse, url: str, release: Callable[[bool], None]):
        self.raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.url = url
        self._release = release
        self._done = False

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def iter_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        while True:
            chunk = self.raw.read(size)
            if not chunk:
                break
            yield chunk

    def read(self, limit: int) -> bytes:
        """The whole body, refusing one larger than `limit` bytes."""
        data = self.raw.read(limit + 1)
        if len(data) > limit:
            self.close(reuse=False)
            raise ImageError(f"response from {self.url} is larger than {limit} bytes")
        return data

    def close(self, reuse: bool = True) -> None:
        if self._done:
            return
        self._done = True
        ok = reuse and not self.raw.will_close
        if ok:
            try:  # drain a small remainder so the connection can be reused
                rest = self.raw.read(64 * 1024)
                ok = not rest or self.raw.isclosed()
            except NETWORK_ERRORS:
                ok = False
        self._release(ok)

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close(reuse=exc[0] is None)


class Transport:
    """A small pool of keep-alive connections per (scheme, host)."""

    def __init__(self, *, timeout: float = 60.0, retries: int = 4, backoff: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, netloc))
            if idle:
                return idle.pop()
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self.ssl_context)
        if scheme == "http":
            return http.client.HTTPConnection(netloc, timeout=self.timeout)
        raise ImageError(f"unsupported URL scheme {scheme!r}")

    def _releaser(self, key: tuple[str, str], conn: http.client.HTTPConnection):
        def release(reuse: bool) -> None:
            if reuse:
                with self._lock:
                    self._idle.setdefault(key, []).append(conn)
            else:
                conn.close()
        return release

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                body: bytes | BinaryIO | None = None, *, body_length: int | None = None,
                follow_redirects: bool = True, retry: bool | None = None) -> Response:
        """Send one request (following redirects, retrying per policy) and return the response.

        A 5xx answer that survives every retry is returned to the caller as is.
        """
        idempotent = method in ("GET", "HEAD") if retry is None else retry
        headers = dict(headers or {})
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(6):
            resp = self._send_with_retries(method, url, headers, body, body_length, idempotent)
            if follow_redirects and resp.status in (301, 302, 303, 307, 308):
                location = resp.header("Location")
                resp.close()
                if not location:
                    raise ImageError(f"redirect from {url} without a Location")
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).netloc != origin:
                    headers.pop("Authorization", None)
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp
        raise ImageError(f"too many redirects from {url}")

    def _send_with_retries(self, method, url, headers, body, body_length, idempotent) -> Response:
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        attempt = 0
        while True:
            conn = self._connect(*key)
            fresh = conn.sock is None
            try:
                if hasattr(body, "seek"):
                    body.seek(0)
                send_headers = dict(headers)
                if body is not None and body_length is not None:
                    send_headers["Content-Length"] = str(body_length)
                elif body is None and method in ("PUT", "POST", "PATCH"):
                    send_headers["Content-Length"] = "0"
                conn.request(method, target, body=body, headers=send_headers)
                raw = conn.getresponse()
            except NETWORK_ERRORS as exc:
                conn.close()
                if not fresh and attempt == 0:
                    attempt += 1  # a stale pooled connection: retry at once on a new one
                    continue
                if not idempotent or attempt >= self.retries:
                    raise ImageError(f"{method} {url} failed: {exc}") from None
                self.sleep(self.backoff * (2 ** attempt))
                attempt += 1
                continue
            resp = Response(raw, url, self._releaser(key, conn))
            if method == "HEAD":
                resp.close()
            if idempotent and resp.status in RETRY_STATUSES and attempt < self.retries:
                resp.close(reuse=False)
                delay = self.backoff * (2 ** attempt)
                retry_after = resp.header("Retry-After")
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 30.0))
                self.sleep(delay)
                attempt += 1
                continue
            return resp
