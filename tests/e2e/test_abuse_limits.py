"""Abuse limits through the local gateway (all test traffic comes from 127.0.0.1, so the per-source limits are
raised for the test stack in ``tests/conftest.py``; they are tested with other source addresses in
``tests/integration/test_throttle.py``): password guessing against one username, exact key-name validation."""
from __future__ import annotations

import time
import uuid
from typing import Any

from tests.conftest import StackHandle
from tmuxi.settings import get_settings


def _failed_login_rows(username: str) -> list[dict[str, Any]]:
    from tmuxi.db.pool import connection

    with connection() as conn:
        return conn.execute(
            "SELECT status, detail FROM audit_events WHERE action = 'auth.token' AND status <> 'ok'"
            " AND detail->>'username' = %s ORDER BY id", (username,)
        ).fetchall()


def test_password_guessing_gets_429_with_growing_retry_after(stack: StackHandle) -> None:
    """The first failures are free; each failure after them locks the username out for twice as long (429 with
    Retry-After); while locked even the right password is refused; after the wait it works and clears the
    count. Audit rows stay few: the first failure and each failure that starts a lockout."""
    name = f"g{uuid.uuid4().hex[:10]}"
    password = "pw-" + name
    stack.create_user(name, password)
    free = get_settings().login_free_failures

    def attempt(pw: str) -> Any:
        return stack.client.post("/auth/token", json={"username": name, "password": pw})

    for _ in range(free):
        r = attempt("wrong")
        assert r.status_code == 401, r.text
    # a guessing run at ~20 guesses a second: every failure starts a longer lockout, guesses meanwhile get 429
    waits: list[int] = []
    statuses: list[int] = []
    deadline = time.monotonic() + 30
    while len(waits) < 3:
        assert time.monotonic() < deadline, (waits, statuses[-20:])
        r = attempt("wrong")
        assert r.status_code in (401, 429), r.text
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited", r.text
            retry_after = int(r.headers["retry-after"])
            if statuses[-1] == 401:
                waits.append(retry_after)
        statuses.append(r.status_code)
        time.sleep(0.05)
    failures = free + statuses.count(401)
    assert statuses[0] == 401, statuses  # the first failure past the free ones is still answered 401 ...
    assert waits[0] >= 1 and waits[0] < waits[1] < waits[2], waits  # ... and each lockout is longer
    assert statuses.count(429) > statuses.count(401)
    # locked: the right password is refused too, without being checked
    locked = attempt(password)
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1, locked.text
    # after the wait it works
    deadline = time.monotonic() + waits[-1] + 10
    while (r := attempt(password)).status_code == 429:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    # ... and the username's count starts over: a failure is free again, the right password works at once
    assert attempt("wrong").status_code == 401
    assert attempt(password).status_code == 200
    rows = _failed_login_rows(name)
    # one row for the first failure of each run and one per lockout, each with the count so far
    assert len(rows) <= 2 + len(waits), rows
    assert len(rows) < failures + 1
    assert max(int(r["detail"]["failures"]) for r in rows) == failures, rows


def test_key_name_with_a_newline_is_422_naming_the_field(stack: StackHandle) -> None:
    _, h = stack.new_user()
    r = stack.client.post("/sessions", json={"name": "keys"}, headers=h)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for keys in (["Enter\n"], ["C-c\n"], ["Up", "Enter\n"], ["Enter\r"], ["F1\n"]):
        r = stack.client.post(f"/sessions/{sid}/input", json={"keys": keys}, headers=h)
        assert r.status_code == 422, (keys, r.text)
        body = r.json()["error"]
        assert body["code"] == "validation_error" and "body.keys" in body["message"], body
        assert [f["field"] for f in body["fields"]] == ["body.keys"], body
    assert stack.client.post(f"/sessions/{sid}/input", json={"keys": ["Enter"]}, headers=h).status_code == 204
    assert stack.client.delete(f"/sessions/{sid}", headers=h).status_code == 204
