"""Keyset pagination cursors. A list is ordered by ``(created_at DESC, id DESC)``; a cursor is the position of
the last row of a page: its ``created_at`` (microseconds since the epoch, PostgreSQL's own precision) and ``id``,
as URL-safe base64 with no padding. Opaque to clients, not signed: it only positions a walk within what the
caller may see anyway (every query applies the caller's filter whatever the cursor says)."""
from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from uuid import UUID

MAX_PAGE = 1000  # the most rows one page may hold (?limit=)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH) // _US  # Python's datetime ends there
_TEXT = re.compile(r"[A-Za-z0-9_-]{1,96}\Z")
_PAYLOAD = re.compile(rb"(0|[1-9][0-9]{0,17})\.([0-9a-f]{32})\Z")


class Cursor(NamedTuple):
    """Where a page ended: the next page holds the rows strictly after this one."""

    created_at: datetime
    id: UUID


def encode_cursor(created_at: datetime, id: UUID) -> str:  # noqa: A002 - the column's name
    us = (created_at - _EPOCH) // _US
    raw = f"{us}.{id.hex}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(text: str) -> Cursor:
    """The position a cursor from ``encode_cursor`` names. ValueError("invalid cursor") for anything else
    (garbage, a truncated or altered cursor, a time out of range)."""
    if not _TEXT.match(text):
        raise ValueError("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("invalid cursor") from None
    m = _PAYLOAD.match(raw)
    if m is None or int(m.group(1)) > _MAX_US:
        raise ValueError("invalid cursor")
    return Cursor(_EPOCH + int(m.group(1)) * _US, UUID(hex=m.group(2).decode()))
