"""List cursors: what encode_cursor writes decode_cursor reads back exactly; anything else is refused with
ValueError("invalid cursor") (the route's 422), never another exception."""
from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tmuxi.pagination import Cursor, decode_cursor, encode_cursor


@pytest.mark.parametrize("at", [
    datetime(2026, 11, 28, 11, 45, 0, 123456, tzinfo=UTC),
    datetime(2026, 11, 28, 11, 45, tzinfo=UTC),  # no fraction
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 6, 1, 13, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),  # as PostgreSQL's session zone gives it
    datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
])
def test_a_cursor_decodes_to_exactly_the_position_it_was_made_from(at: datetime) -> None:
    sid = uuid.uuid4()
    text = encode_cursor(at, sid)
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")  # URL-safe, no "="
    assert decode_cursor(text) == Cursor(at, sid) and decode_cursor(text).created_at == at


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_HEX = uuid.uuid4().hex
_GOOD = encode_cursor(datetime(2026, 1, 1, tzinfo=UTC), uuid.UUID(_HEX))


@pytest.mark.parametrize("text", [
    "", " ", "not a cursor", "a+b/c", _GOOD + "=", _GOOD + "A", _GOOD[:-1], _GOOD[:-3], _GOOD[2:], "A" * 97,
    "A" * 10_000, "é", _b64(b""), _b64(b"\xff\xfe"), _b64(f"1.{_HEX}\n".encode()), _b64(f" 1.{_HEX}".encode()),
    _b64(f"-1.{_HEX}".encode()), _b64(f"+1.{_HEX}".encode()), _b64(f"01.{_HEX}".encode()),
    _b64(f"1.{_HEX[:-1]}".encode()), _b64(f"1.{_HEX}0".encode()), _b64(f"1.{_HEX.upper()}".encode()),
    _b64(f"1,{_HEX}".encode()), _b64(f"1.5.{_HEX}".encode()), _b64(f"{10**18 - 1}.{_HEX}".encode()),
    _b64(f"{10**30}.{_HEX}".encode()), _b64(f"1.{uuid.UUID(_HEX)}".encode()), _b64(f"\u0661.{_HEX}".encode()),
])
def test_anything_else_is_an_invalid_cursor(text: str) -> None:
    with pytest.raises(ValueError, match="^invalid cursor$"):
        decode_cursor(text)
