"""Passwords (scrypt) and access tokens (JWT, RFC 8725: one pinned algorithm, explicit ``typ``, and exp, nbf,
iat, aud, iss, sub and jti required and checked)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Any

import jwt

from tmuxi.errors import Unauthorized
from tmuxi.settings import get_settings

ALGORITHM = "HS256"  # pinned: the only algorithm ever accepted
TOKEN_TYPE = "at+jwt"  # noqa: S105 - RFC 9068 access-token type, checked on every token
_REQUIRED = ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


# What an unknown user's login is checked against, so that it costs one scrypt like a known user's. A constant: the
# password it hashes was random and thrown away (and verify_password refuses it anyway). Computing one here cost
# every cold start ~45 ms (scrypt, measured: tmuxi.auth was 47 ms *self* in `-X importtime`) and put a random salt
# made before a SnapStart snapshot into every restored copy.
_DUMMY_HASH = "scrypt$RZh4PIvmv31vanZ7BEb9EQ==$7lvtufyRm2jgpB6jVvU7chFlyZAt7T2x892T8KXC5k0="  # noqa: S105


def verify_password(password: str, stored: str | None) -> bool:
    """Constant work whether or not the user exists (pass ``None`` for an unknown user)."""
    scheme, salt_b64, digest_b64 = (stored or _DUMMY_HASH).split("$")
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt_b64), dklen=32, **_SCRYPT)
    return hmac.compare_digest(digest, base64.b64decode(digest_b64)) and stored is not None


def issue_token(user_id: uuid.UUID, username: str, role: str, epoch: int | None = None) -> tuple[str, int]:
    """A token for a user as read from PostgreSQL. ``epoch``: the user's ``token_epoch`` read with ``role`` (the
    token is refused once it changes: services/auth.py); when not given it is read here, which leaves a window
    (between the caller's read and this one) in which a new password or "end all tokens" is not seen by it."""
    s = get_settings()
    now = int(time.time())
    if epoch is None:
        epoch = _current_epoch(user_id)
    claims = {
        "sub": str(user_id), "name": username, "role": role, "epoch": epoch, "jti": uuid.uuid4().hex,
        "iat": now, "nbf": now, "exp": now + s.jwt_ttl_s, "iss": s.jwt_issuer, "aud": s.jwt_audience,
    }
    token = jwt.encode(claims, s.require_jwt_secret(), algorithm=ALGORITHM, headers={"typ": TOKEN_TYPE})
    return token, s.jwt_ttl_s


def _current_epoch(user_id: uuid.UUID) -> int:
    from tmuxi.db import repo  # here: tokens are made and checked without a database otherwise

    row = repo.get_user_state(user_id)
    return int(row["token_epoch"]) if row is not None else 0


def decode_token(token: str) -> dict[str, Any]:
    """Verify a token; raise Unauthorized with the reason (logged, never returned to callers verbatim)."""
    s = get_settings()
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != TOKEN_TYPE:
            raise Unauthorized("wrong token type", reason="typ")
        claims: dict[str, Any] = jwt.decode(
            token, s.require_jwt_secret(), algorithms=[ALGORITHM], audience=s.jwt_audience, issuer=s.jwt_issuer,
            options={"require": _REQUIRED, "strict_aud": True}, leeway=5,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired", reason="expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise Unauthorized("token not yet valid", reason="not_yet_valid") from exc
    except jwt.InvalidAudienceError as exc:
        raise Unauthorized("wrong audience", reason="audience") from exc
    except jwt.InvalidIssuerError as exc:
        raise Unauthorized("wrong issuer", reason="issuer") from exc
    except jwt.InvalidSignatureError as exc:
        raise Unauthorized("bad signature", reason="signature") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise Unauthorized("algorithm not allowed", reason="algorithm") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("malformed token", reason="malformed") from exc
    if claims.get("role") not in ("user", "admin") or not isinstance(claims.get("name"), str):
        raise Unauthorized("malformed token", reason="claims")
    epoch = claims.setdefault("epoch", 0)  # tokens issued before epochs existed: 0, every user's first epoch
    if type(epoch) is not int or epoch < 0:
        raise Unauthorized("malformed token", reason="claims")
    try:
        uuid.UUID(claims["sub"])
    except (ValueError, TypeError) as exc:
        raise Unauthorized("malformed token", reason="sub") from exc
    return claims
