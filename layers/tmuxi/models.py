"""Typed request and response bodies shared by the REST API, the services and the host client."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tmuxi.routes import EXEC_TIMEOUT_MAX_S, WS_STREAM_ID

# creating -> active -> (deleting -> deleted | exited | lost), or creating -> failed: migration 0006
SessionState = Literal["creating", "active", "deleting", "deleted", "failed", "lost", "exited"]
# what GET /sessions lists: "live" (creating or active), "all", or sessions in one state
SessionFilter = Literal["live", "all", "creating", "active", "deleting", "deleted", "failed", "lost", "exited"]
Role = Literal["user", "admin"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# tmux key names accepted in `keys` (anything else is refused, so a key can never act on tmux). Anchored with \Z,
# not $ (which also matches before a final newline: "Enter\n" would pass), so .match() is a whole match too.
KEY_NAME = re.compile(
    r"^(?:(?:C|M|S)-)*(?:[A-Za-z0-9]|Enter|Escape|Tab|BTab|BSpace|Space|Up|Down|Left|Right|Home|End|"
    r"PageUp|PageDown|PPage|NPage|IC|DC|Insert|Delete|F(?:[1-9]|1[0-2]))\Z"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- auth ------------------------------------------------------------------------------------------
class TokenRequest(_Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    expires_in: int


class Principal(BaseModel):
    """Who is calling: built by the authorizer from a validated token."""

    user_id: UUID
    username: str
    role: Role
    jti: str
    exp: int
    epoch: int = 0  # the user's token epoch when the token was issued (services/auth.py)


class ValidateResponse(BaseModel):
    valid: Literal[True] = True
    user_id: UUID
    username: str
    role: Role
    expires_at: datetime


# --- sessions --------------------------------------------------------------------------------------
class SessionCreate(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    cols: int | None = Field(default=None, ge=10, le=1000)
    rows: int | None = Field(default=None, ge=5, le=500)

    @field_validator("name")
    @classmethod
    def _no_control_chars(cls, v: str | None) -> str | None:
        if v is not None and _CONTROL.search(v):
            raise ValueError("must not contain control characters (newlines, tabs, escapes)")
        return v


class Session(BaseModel):
    id: UUID
    name: str | None
    owner_id: UUID
    state: SessionState
    host_id: str | None
    cols: int
    rows: int
    created_at: datetime
    last_active_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = Field(default=None, description="why it ended: deleted, exited, failed or lost")


class SessionList(BaseModel):
    """One page, newest first (``created_at``, then ``id``, descending)."""

    sessions: list[Session]
    next_cursor: str | None = Field(
        default=None,
        description="pass as ?cursor= for the next page; null: this page is the last",
    )


class InputRequest(_Strict):
    """Exactly one of ``text`` (UTF-8), ``data_b64`` (raw bytes, base64) or ``keys`` (tmux key names)."""

    text: str | None = None
    data_b64: str | None = None
    keys: list[str] | None = Field(default=None, max_length=256)
    enter: bool = False

    @field_validator("keys")
    @classmethod
    def _key_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            bad = [k for k in v if not KEY_NAME.fullmatch(k)]
            if bad:
                raise ValueError(f"unknown key names: {bad[:5]}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> InputRequest:
        given = [n for n in ("text", "data_b64", "keys") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, data_b64 or keys")
        return self


class ScreenResponse(BaseModel):
    text: str
    cols: int
    rows: int
    cursor_x: int
    cursor_y: int
    escapes: bool


class ResizeRequest(_Strict):
    cols: int = Field(ge=10, le=1000)
    rows: int = Field(ge=5, le=500)


class ExecRequest(_Strict):
    command: str = Field(min_length=1)
    timeout_s: float | None = Field(
        default=None, gt=0, le=EXEC_TIMEOUT_MAX_S,
        description=f"seconds (default 20); at most {EXEC_TIMEOUT_MAX_S:g}: the REST API answers within "
                    "API Gateway's 29 s integration timeout",
    )


class ExecResult(BaseModel):
    exit_code: int | None  # 128+n for a command a signal ended (130: Ctrl-C); None when timed out or unknown
    output: str
    timed_out: bool
    truncated: bool
    duration_ms: float
    session_ended: bool = False  # the command ended the session's shell (exit, exec, set -e): the session is over


# --- users (admin) ---------------------------------------------------------------------------------
class User(BaseModel):
    id: UUID
    username: str
    role: Role
    disabled: bool
    deleted: bool = False
    created_at: datetime


class UserUpdate(_Strict):
    role: Role


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "down"]
    checks: dict[str, str]
    version: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- live terminals over WebSocket (docs/websocket.md) ------------------------------------------------------
class WsTicket(BaseModel):
    """A connect ticket: single-use, for the ``ticket`` query parameter of the WebSocket URL."""

    ticket: str
    expires_in: int = Field(description="seconds until it expires")


class ShareTicketRequest(_Strict):
    share_token: str = Field(min_length=1, max_length=256)


class ShareTicket(WsTicket):
    """A connect ticket redeemed from a share token: it attaches only ``session_id``, read-only."""

    session_id: UUID
    read_only: Literal[True] = True


class ShareCreate(_Strict):
    # the upper bound is this deployment's TMUXI_WS_SHARE_MAX_TTL_S (checked by services/live.py)
    expires_in_s: int = Field(default=3600, ge=60, description="seconds until the share expires")


class ShareCreated(BaseModel):
    id: UUID
    token: str = Field(description="shown once: only its hash is kept")
    expires_at: datetime


class Share(BaseModel):
    id: UUID
    session_id: UUID
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


class ShareList(BaseModel):
    """Newest first; expired and revoked shares included (``expires_at``, ``revoked_at`` say which)."""

    shares: list[Share]


class Recording(BaseModel):
    name: str
    size: int
    modified: datetime


class RecordingList(BaseModel):
    recordings: list[Recording]


# WebSocket messages the ws function takes (the hosts take the others). Strict: a string is not a bool, a float
# is not a sequence number; unknown fields are refused, so a misspelt ``read_only`` never attaches read-write.
_STREAM = re.compile(WS_STREAM_ID)


class AttachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["attach"] = "attach"
    session_id: UUID
    read_only: bool = False
    stream: str | None = Field(default=None, description="resume: the stream of last_seq")
    last_seq: int | None = Field(default=None, ge=0, le=2**63 - 1, description="resume: the position reached")

    @field_validator("stream")
    @classmethod
    def _stream_id(cls, v: str | None) -> str | None:
        if v is not None and not _STREAM.fullmatch(v):
            raise ValueError("must be the `stream` of an `attached` message (1 to 32 hex digits)")
        return v

    @model_validator(mode="after")
    def _resume_needs_both(self) -> AttachRequest:
        if (self.stream is None) != (self.last_seq is None):
            raise ValueError("stream and last_seq go together (resume), or neither")
        return self


class DetachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["detach"] = "detach"
