"""Running execs: list them, read their output from a cursor, feed them input, signal and stop them.

An exec that outlives its request's wait goes on in the session (``exec_command`` answers with its ``exec_id``);
these calls reach it on the session's host. Ownership is the session's: another user's exec is their session's,
and answers 404 like it."""
from __future__ import annotations

import base64
import binascii
from uuid import UUID

from tmuxi.db import repo
from tmuxi.errors import BadRequest, InvalidField, PayloadTooLarge
from tmuxi.models import ExecInput, ExecList, ExecResult, Principal, SignalName
from tmuxi.services.sessions import _active, _after, audited, on_host
from tmuxi.settings import get_settings


def list_execs(p: Principal, session_id: UUID) -> ExecList:
    row, host = _active(p, session_id)
    return ExecList.model_validate({"execs": on_host(row, lambda: host.list_execs(session_id))})


def poll(p: Principal, session_id: UUID, exec_id: str, cursor: str, wait_s: float) -> ExecResult:
    limit = get_settings().exec_timeout_max_s
    if not 0 <= wait_s <= limit:
        raise InvalidField("query.wait_s", f"must be between 0 and {limit:g} (this deployment's "
                                           "TMUXI_EXEC_TIMEOUT_MAX_S)")
    row, host = _active(p, session_id)
    return on_host(row, lambda: host.poll_exec(session_id, exec_id, cursor, wait_s))


def send_input(p: Principal, session_id: UUID, exec_id: str, body: ExecInput) -> None:
    limit = get_settings().max_input_bytes
    if body.data_b64 is not None:
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("data_b64 is not valid base64") from exc
    else:
        data = (body.text or "").encode()
    if body.enter:
        data += b"\r"
    if len(data) > limit:
        raise PayloadTooLarge(f"input is {len(data)} bytes; the limit is {limit}")
    row, host = _active(p, session_id)
    audited(p, session_id, row, "session.exec_input", {"exec_id": exec_id, "bytes": len(data), "eof": body.eof},
            host, lambda h: h.exec_input(session_id, exec_id, data, body.eof))


def signal(p: Principal, session_id: UUID, exec_id: str, name: SignalName) -> None:
    row, host = _active(p, session_id)
    audited(p, session_id, row, "session.exec_signal", {"exec_id": exec_id, "signal": name},
            host, lambda h: h.signal_exec(session_id, exec_id, name))


def stop(p: Principal, session_id: UUID, exec_id: str, grace_s: float) -> ExecResult:
    if not 0 <= grace_s <= 20:
        raise InvalidField("query.grace_s", "must be between 0 and 20 seconds")
    row, host = _active(p, session_id)
    result = on_host(row, lambda: host.stop_exec(session_id, exec_id, grace_s))
    _after(repo.record_activity, session_id, p.user_id, "session.exec_stop",
           {"exec_id": exec_id, "exit_code": result.exit_code})
    return result
