"""API keys: `Authorization: Bearer KEY`, each key a tenant.

Keys are compared by their SHA-256 digest (a dict lookup on a digest leaks nothing useful
about the key through timing). With open access on (loopback only, checked by Settings),
requests without a key belong to the tenant "anonymous"; a wrong key is still refused.
"""

from __future__ import annotations

import hashlib

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException

from api.settings import OPEN_TENANT, Settings


class KeyRing:
    """Resolves the Authorization header of a request to its tenant."""

    def __init__(self, settings: Settings) -> None:
        self._tenants = {self._digest(key): tenant for key, tenant in settings.api_keys.items()}
        self._open = settings.open_access

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    def tenant(self, authorization: str | None) -> str:
        if not authorization:
            if self._open:
                return OPEN_TENANT
            raise NotAuthorizedException("missing API key: send Authorization: Bearer KEY")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise NotAuthorizedException("Authorization must be 'Bearer KEY'")
        tenant = self._tenants.get(self._digest(key.strip()))
        if tenant is None:
            raise NotAuthorizedException("unknown API key")
        return tenant


def provide_tenant(request: ASGIConnection) -> str:
    """Litestar dependency `tenant`: the caller's tenant, or 401."""
    ring: KeyRing = request.app.state.keyring
    return ring.tenant(request.headers.get("authorization"))
