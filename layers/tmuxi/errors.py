"""Domain errors. Each carries its HTTP status and a stable machine-readable code; the API maps them to
JSON in one place (``functions/api/app.py``).

What a client is told is about its request, never about how the system is built: for a 4xx the ``message``
says what was wrong with the request; for a 5xx the body carries the class's ``public_message`` ("busy or
unavailable, retry") and the ``message`` -- host ids, addresses, capacities, tmux text, a dependency's own
words -- goes to the log only, with the request id. ``internal`` adds such detail to a 4xx for the log."""
from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # the whole message of a 5xx body: its ``message`` is for the log
    public_message: ClassVar[str] = "internal error"

    def __init__(self, message: str, *, internal: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.internal = internal  # detail for the log only
        self.details = details

    def to_body(self) -> dict[str, Any]:
        if self.status >= 500:
            return {"error": {"code": self.code, "message": self.public_message}}
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class InvalidField(AppError):
    """A field that passed the request model but not this deployment's settings: the same 422 body as a model's
    validation error (``fields`` names it)."""

    status = 422
    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", fields=[{"field": field, "message": message}])

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.details["fields"]}}


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


class ExecNotFound(AppError):
    """No such exec in the session (not a NotFound: that one, from a host, means the session itself is gone)."""

    status = 404
    code = "exec_not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class SessionBusy(Conflict):
    code = "session_busy"


class SessionNotActive(Conflict):
    code = "session_not_active"


class InputBacklog(Conflict):
    """A program in the session is not reading its input and the user's tmux server holds too much of it."""

    code = "input_backlog"


class SessionGone(AppError):
    """The session has ended (deleted, exited, failed, lost) or is being deleted: every terminal operation on it
    answers this, with ``details.state`` and ``details.end_reason``."""

    status = 410
    code = "session_gone"


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
    public_message = "the terminal service is busy or unavailable; retry shortly"


class OutcomeUnknown(HostUnavailable):
    """A request that changes a session (input, exec, resize, a create) reached its host, which did not answer in
    time: it may have taken effect. Not "retry": look (read the screen, list sessions) before sending it again."""

    code = "outcome_unknown"
    public_message = ("the request reached the terminal service but no answer came back: it may have taken "
                      "effect; check the session before you retry")


class DependencyUnavailable(AppError):
    status = 503
    code = "dependency_unavailable"
    public_message = "the service is temporarily unavailable; retry shortly"


class NotAttached(Conflict):
    """A WebSocket connection asked for something that needs an attached session (``detach``) while it has
    none."""

    code = "not_attached"
