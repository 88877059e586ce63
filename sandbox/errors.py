"""The one error tree of sbx.

Every failure the runtime, the image store, the volume store or the queue can report is a
`SandboxError`. Each class carries a stable machine-readable `code` and an HTTP-ish `status`
hint, so the API maps the whole tree to responses in one place (api/errors.py) and the CLI
prints the same message.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every sbx error. `field` names the input at fault, when there is one."""

    code = "sandbox_error"
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"error": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class InvalidSpec(SandboxError):
    """The request itself is wrong: a bad path, a limit out of range, an unknown option."""

    code = "invalid_spec"
    status = 400


class NotFound(SandboxError):
    """A named object (run, image, volume) does not exist for this caller."""

    code = "not_found"
    status = 404


class Conflict(SandboxError):
    """The object exists but is in a state that forbids the request (busy, already exists)."""

    code = "conflict"
    status = 409


class Unavailable(SandboxError):
    """A dependency is down or the service is at capacity; retrying later may succeed."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after: int = 1, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class ImageError(SandboxError):
    """Pulling, verifying, unpacking or building an image failed."""

    code = "image_error"
    status = 502


class ImageNotFound(ImageError, NotFound):
    """The registry (or the local store) has no image by that reference."""

    code = "image_not_found"
    status = 404


class ImageVerifyError(ImageError):
    """Content did not match its digest, was truncated, or was malicious; nothing was kept."""

    code = "image_verify_failed"
    status = 502


class RegistryAuthError(ImageError):
    """The registry refused our credentials."""

    code = "registry_auth"
    status = 502


class SetupError(SandboxError):
    """A container could not be set up; `stage` names the start-order step that failed."""

    code = "setup_error"
    status = 500

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.detail = message


class VolumeError(SandboxError):
    """A named volume could not be created, attached or removed."""

    code = "volume_error"
    status = 400


class VolumeNotFound(VolumeError, NotFound):
    code = "volume_not_found"
    status = 404


class VolumeBusy(VolumeError, Conflict):
    """A read-write volume is attached to another run."""

    code = "volume_busy"
    status = 409


class NetworkError(SandboxError):
    """A job network could not be set up or torn down."""

    code = "network_error"
    status = 500
