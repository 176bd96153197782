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


class WaitSpec(_Strict):
    until: Literal["prompt", "quiet", "pattern"]
    quiet_ms: int = Field(default=300, ge=10, le=20000, description="until=quiet: no output for this long")
    pattern: str | None = Field(default=None, min_length=1, max_length=1000,
                                description="until=pattern: a regular expression searched in the screen")
    timeout_s: float = Field(default=10.0, gt=0, le=EXEC_TIMEOUT_MAX_S)

    @model_validator(mode="after")
    def _pattern(self) -> WaitSpec:
        if (self.until == "pattern") != (self.pattern is not None):
            raise ValueError("give a pattern exactly when until is 'pattern'")
        return self


def _unicode(v: str | None) -> str | None:
    """Text to type is sent as UTF-8: a lone surrogate (JSON's "\\ud800") has no UTF-8 form."""
    if v is not None:
        try:
            v.encode()
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode (a lone surrogate such as \\ud800): send bytes that are not "
                             "text as data_b64") from None
    return v


class InputRequest(_Strict):
    """Exactly one of ``text`` (UTF-8), ``data_b64`` (raw bytes, base64) or ``keys`` (tmux key names)."""

    text: str | None = None
    data_b64: str | None = None
    keys: list[str] | None = Field(default=None, max_length=256)
    enter: bool = False
    wait: WaitSpec | None = Field(default=None, description="then wait (for the prompt, for quiet, for a pattern) "
                                                            "and answer with the screen")

    _text = field_validator("text")(_unicode)

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
        description=f"seconds this request waits for the command (default 20; at most {EXEC_TIMEOUT_MAX_S:g}, "
                    "within API Gateway's 29 s). A command still running then goes on (see on_timeout): the answer "
                    "carries its exec_id, to poll, feed and stop it",
    )
    on_timeout: Literal["background", "kill"] = Field(
        default="background", description="background: the command goes on, poll GET /execs/{exec_id}; kill: "
                                          "Ctrl-C, then SIGTERM, then SIGKILL, and the answer is final")
    background: bool = Field(default=False, description="run as a background job of the shell (several may run at "
                                                        "once); its stdin is fed through /execs/{exec_id}/input")
    streams: Literal["split", "merged"] = Field(
        default="split", description="split: stdout and stderr apart; merged: both in `output`, in order")
    encoding: Literal["utf-8", "base64"] = Field(
        default="utf-8", description="utf-8: text, bytes that are not UTF-8 become U+FFFD and `lossy` is true; "
                                     "base64: the bytes exactly")
    max_output_bytes: int | None = Field(
        default=None, ge=1024, description="per stream: the first and last halves are kept, the middle is counted "
                                           "and marked (default and maximum: the deployment's)")


class ExecResult(BaseModel):
    exec_id: str = ""
    running: bool = False  # still running: poll GET /sessions/{id}/execs/{exec_id}?cursor=...
    exit_code: int | None  # 128+n for a command a signal ended (130: Ctrl-C); None while running or unknown
    timed_out: bool  # the wait ended before the command did
    stdout: str = ""
    stderr: str = ""
    output: str | None = None  # streams=merged: stdout and stderr together, in order
    encoding: Literal["utf-8", "base64"] = "utf-8"
    lossy: bool = False  # some bytes were not UTF-8 (shown as U+FFFD): ask with encoding=base64 for them exactly
    stdout_bytes: int = 0  # written in all, so far
    stderr_bytes: int = 0
    truncated: bool = False  # a middle part was left out (marked in place with the count)
    cursor: str = ""  # pass to GET /execs/{exec_id}?cursor= for only what comes after this answer
    duration_ms: float
    session_ended: bool = False  # the command ended the session's shell (exit, exec, set -e): the session is over


class ExecInfo(BaseModel):
    exec_id: str
    command: str  # its first 200 characters
    background: bool
    running: bool
    exit_code: int | None
    started_at: datetime


class ExecList(BaseModel):
    execs: list[ExecInfo]


class ExecInput(_Strict):
    """Input for a running exec: to the terminal for one in the foreground, to its stdin for a background one."""

    text: str | None = None
    data_b64: str | None = None
    enter: bool = False
    eof: bool = Field(default=False, description="then end its input (Ctrl-D at a terminal)")

    _text = field_validator("text")(_unicode)

    @model_validator(mode="after")
    def _one(self) -> ExecInput:
        if self.text is not None and self.data_b64 is not None:
            raise ValueError("give text or data_b64, not both")
        if self.text is None and self.data_b64 is None and not self.eof and not self.enter:
            raise ValueError("give text, data_b64, enter or eof")
        return self


SignalName = Literal["INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2", "CONT", "STOP"]


class ExecSignal(_Strict):
    signal: SignalName


class InputWaitResult(BaseModel):
    matched: bool  # the condition was met (False: the timeout came first)
    waited_ms: float
    screen: ScreenResponse


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


# --- files in a session's home (PUT/GET /sessions/{id}/files, GET /sessions/{id}/files/list) -------------------
FILE_MODE = r"0?[0-7]{3}"  # octal permission bits only (no setuid, setgid or sticky bit); a whole match
_PATH_DOC = "relative to the home directory, or absolute inside it; one that leaves the home is refused (400)"


class FileWrite(_Strict):
    """Exactly one of ``content`` (UTF-8 text, written as its UTF-8 bytes) or ``content_b64`` (the bytes,
    base64)."""

    path: str = Field(description=_PATH_DOC)
    content: str | None = None
    content_b64: str | None = None
    mode: str | None = Field(default=None, pattern=f"^{FILE_MODE}$", description="octal, e.g. \"0644\" (default: an "
                             "existing file's own, 0644 for a new one)")

    @model_validator(mode="after")
    def _exactly_one(self) -> FileWrite:
        if (self.content is None) == (self.content_b64 is None):
            raise ValueError("give exactly one of content or content_b64")
        return self


class FileWritten(BaseModel):
    path: str = Field(description="relative to the home directory")
    size: int
    mode: str
    sha256: str


class FileContent(BaseModel):
    path: str = Field(description="relative to the home directory")
    size: int
    mode: str
    encoding: Literal["utf-8", "base64"] = Field(
        description="utf-8: content is the text; base64: the bytes are not UTF-8 (or base64 was asked for, or the "
                    "text escaped for JSON would not fit the answer)")
    content: str
    sha256: str


class FileEntry(BaseModel):
    name: str
    type: Literal["file", "dir", "link", "other"]
    size: int
    mode: str
    mtime: datetime


class FileList(BaseModel):
    """A directory's entries by name (a link is listed as itself, not followed)."""

    path: str = Field(description="relative to the home directory")
    entries: list[FileEntry]
    truncated: bool = Field(default=False, description="the directory holds more entries than one answer lists")
