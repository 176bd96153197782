"""Request validation: what reaches the services is well-formed, and what cannot be sent safely is refused."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from tmuxi.models import InputRequest, ResizeRequest, SessionCreate


@pytest.mark.parametrize("name", ["a;b", "#{session_name}", "-t x", "it's \"quoted\"", "$(rm -rf /)", "ünï 名"])
def test_session_names_with_metacharacters_are_kept_verbatim(name: str) -> None:
    assert SessionCreate(name=name).name == name


@pytest.mark.parametrize("name", ["line\nbreak", "tab\there", "esc\x1b[31m", "nul\x00"])
def test_session_names_with_control_characters_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        SessionCreate(name=name)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="shell"):
        SessionCreate.model_validate({"name": "x", "shell": "/bin/evil"})


@pytest.mark.parametrize("body", [{}, {"text": "a", "keys": ["Enter"]}, {"text": "a", "data_b64": "YQ=="}])
def test_input_needs_exactly_one_kind(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        InputRequest.model_validate(body)


@pytest.mark.parametrize("key", ["Enter", "C-c", "M-x", "C-M-Left", "F12", "PageUp", "a", "BSpace"])
def test_known_keys_accepted(key: str) -> None:
    assert InputRequest(keys=[key]).keys == [key]


@pytest.mark.parametrize("key", ["Enter;kill-server", "-t", "#{pane_id}", "C-c C-c", "F13", "", "\\;", "$x"])
def test_anything_but_a_key_name_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="unknown key names"):
        InputRequest(keys=[key])


def test_resize_bounds() -> None:
    with pytest.raises(ValidationError, match="cols"):
        ResizeRequest(cols=5, rows=20)
    assert ResizeRequest(cols=80, rows=24).rows == 24
