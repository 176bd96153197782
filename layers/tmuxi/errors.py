"""Domain errors. Each carries its HTTP status and a stable machine-readable code; the API maps them to
JSON in one place (``functions/api/app.py``)."""
from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"

    def to_body(self) -> dict[str, Any]:
        # the precise reason (signature, audience, ...) is for logs and metrics, not for the caller
        return {"error": {"code": self.code, "message": self.message}}


class Forbidden(AppError):
    status = 403
    code = "forbidden"


class NotFound(AppError):
    status = 404
    code = "not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class SessionBusy(Conflict):
    code = "session_busy"


class SessionNotActive(Conflict):
    code = "session_not_active"


class SessionEnded(Conflict):
    code = "session_ended"


class InputBacklog(Conflict):
    """A program in the session is not reading its input and the user's tmux server holds too much of it."""

    code = "input_backlog"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"


class QuotaExceeded(AppError):
    status = 429
    code = "quota_exceeded"


class RateLimited(AppError):
    status = 429
    code = "rate_limited"


class HostUnavailable(AppError):
    status = 503
    code = "host_unavailable"


class DependencyUnavailable(AppError):
    status = 503
    code = "dependency_unavailable"
