"""Files in a session's home: write, read, list. The session's host does the work as the session's OS account
(tmux_host/files.py); here: ownership (another user's session is one that does not exist), the size cap before
anything is sent, the encodings, and the audit record (path and size, never the content)."""
from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from tmuxi.db import repo
from tmuxi.errors import BadRequest, PayloadTooLarge
from tmuxi.host_client import check_path
from tmuxi.models import FileContent, FileEntry, FileList, FileWrite, FileWritten, Principal
from tmuxi.services import sessions as sessions_service
from tmuxi.services.sessions import on_host
from tmuxi.settings import get_settings

AUDIT_PATH_CHARS = 1024
# What JSON escaping does to text, twice over (our answer's JSON, then Lambda's response around it as a string,
# ASCII-only): \n -> \\n (1 byte to 3); a control character -> \\u001b (1 to 7); a non-ASCII character -> \\uXXXX
# (2 to 4 bytes to 6 or 12: at most 3 times its bytes)
_SHORT_ESCAPES = b'\n\r\t\b\f"\\'
_ALL_ESCAPES = bytes(range(0x20)) + b'"\\'
_HIGH = bytes(range(0x80, 0x100))



def _content(body: FileWrite, cap: int) -> bytes:
    if body.content is not None:
        try:
            data = body.content.encode()
        except UnicodeEncodeError:
            raise BadRequest("content is not valid UTF-8 (a lone surrogate); send the bytes as content_b64") from None
        if len(data) > cap:
            raise PayloadTooLarge(f"the file is {len(data)} bytes; the limit is {cap}")
        return data
    raw = body.content_b64 or ""
    if len(raw) > 4 * ((cap + 2) // 3) + 4:
        raise PayloadTooLarge(f"the file is over {cap} bytes; the limit is {cap}")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("content_b64 is not valid base64") from None
    if len(data) > cap:
        raise PayloadTooLarge(f"the file is {len(data)} bytes; the limit is {cap}")
    return data


def _audit_path(path: str) -> str:
    return path[:AUDIT_PATH_CHARS]


def write_file(p: Principal, session_id: UUID, body: FileWrite) -> FileWritten:
    s = get_settings()
    check_path(body.path)
    data = _content(body, s.max_file_bytes)
    mode = f"{int(body.mode, 8):04o}" if body.mode is not None else None
    row, host = sessions_service._active(p, session_id)
    out = on_host(row, lambda: host.write_file(session_id, body.path, data, mode))
    sessions_service._after(repo.record_activity, session_id, p.user_id, "session.file_write",
                            {"path": _audit_path(str(out["path"])), "bytes": len(data)})
    return FileWritten(path=out["path"], size=len(data), mode=out["mode"], sha256=hashlib.sha256(data).hexdigest())


def _as_text(data: bytes, budget: int) -> str | None:
    """The bytes as text if they are UTF-8 and, escaped (above), fit ``budget`` bytes; else None (base64, which
    grows by a third and needs no escaping)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    n = len(data)
    short = n - len(data.translate(None, _SHORT_ESCAPES))
    other = n - len(data.translate(None, _ALL_ESCAPES)) - short
    high = n - len(data.translate(None, _HIGH))
    return text if n + 2 * short + 6 * other + 2 * high <= budget else None


def read_file(p: Principal, session_id: UUID, path: str,
              encoding: Literal["utf-8", "base64"] | None = None) -> FileContent:
    """``encoding``: None answers UTF-8 text when the bytes are UTF-8 (else base64); "base64" always base64."""
    s = get_settings()
    check_path(path)
    row, host = sessions_service._active(p, session_id)
    data, shown, mode = on_host(row, lambda: host.read_file(session_id, path))
    sessions_service._after(repo.record_activity, session_id, p.user_id, "session.file_read",
                            {"path": _audit_path(shown), "bytes": len(data)})
    text = None if encoding == "base64" else _as_text(data, 4 * ((s.max_file_bytes + 2) // 3))
    return FileContent(path=shown, size=len(data), mode=mode, sha256=hashlib.sha256(data).hexdigest(),
                       encoding="utf-8" if text is not None else "base64",
                       content=text if text is not None else base64.b64encode(data).decode("ascii"))


def list_files(p: Principal, session_id: UUID, path: str = ".") -> FileList:
    check_path(path)
    row, host = sessions_service._active(p, session_id)
    out = on_host(row, lambda: host.list_files(session_id, path))
    entries = [FileEntry(name=e["name"], type=e["type"], size=e["size"], mode=e["mode"], mtime=_when(e["mtime"]))
               for e in out["entries"]]
    return FileList(path=out["path"], entries=entries, truncated=bool(out.get("truncated")))


_FIRST, _LAST = datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC)


def _when(mtime: float) -> datetime:
    """A file's mtime, within what a datetime holds (`touch` sets any 64-bit time)."""
    try:
        return datetime.fromtimestamp(mtime, UTC)
    except (OverflowError, OSError, ValueError):
        return _LAST if mtime > 0 else _FIRST
