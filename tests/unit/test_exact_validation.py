"""Every pattern that guards input matches the WHOLE value: ``$`` also matches before a final newline, so a
pattern ending in it lets ``"Enter\\n"`` through (which then reached tmux and became a 500)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from tmux_host import engine
from tmuxi.db import migrate
from tmuxi.models import KEY_NAME, InputRequest
from tmuxi.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("key", ["Enter\n", "C-c\n", "F1\n", "a\n", "Enter\r", "Enter\n\n", "\nEnter"])
def test_a_key_name_with_a_line_break_is_refused_naming_the_field(key: str) -> None:
    assert KEY_NAME.match(key) is None and KEY_NAME.fullmatch(key) is None
    with pytest.raises(ValidationError) as info:
        InputRequest(keys=["Up", key])
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("keys",)], errors
    assert "unknown key names" in errors[0]["msg"]


def test_settings_host_id_is_matched_whole() -> None:
    assert Settings(host_id="host-9").host_id == "host-9"
    with pytest.raises(ValidationError, match="host_id"):
        Settings(host_id="host-9\n")


@pytest.mark.parametrize(("pattern", "good", "bad"), [
    (engine.SESSION_NAME, "t" + "a" * 32, "t" + "a" * 32 + "\n"),
    (engine.ACCOUNT_DIR, "a12", "a12\n"),
    (engine._SAFE_PATH, "/tmp/x", "/tmp/x\n"),
    (migrate._NAME, "0001_init.sql", "0001_init.sql\n"),
])
def test_other_guards_match_whole(pattern: re.Pattern[str], good: str, bad: str) -> None:
    assert pattern.match(good) is not None
    assert pattern.match(bad) is None


def test_no_pattern_that_guards_input_ends_in_a_bare_dollar() -> None:
    """A regex source ending in ``$"`` (or ``$')``) anywhere in the services is a trailing-newline hole."""
    offenders = []
    for base in ("layers", "functions", "tmux_host"):
        for path in (ROOT / base).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""r["'][^"']*\$["']""", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
