"""Who the caller is: password hashing, access tokens, `POST /auth/login`, and `user_from_token`.

The only module that imports jose. Tokens are HS256 JWTs with `sub` (user id), `iat` and `exp`; every
decode names the algorithm, so `alg: none` and algorithm-confusion tokens are refused.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from jose import JWTError, jwt
from starlette.requests import Request
from starlette.responses import JSONResponse

from db import queries
from errors import APIError
from limits import check_login_rate, client_address
from settings import Settings

ALGORITHM = "HS256"
MAX_LOGIN_BODY_BYTES = 16 * 1024
INVALID_CREDENTIALS = "Invalid email or password"

_hasher = PasswordHasher()  # argon2id with the library's current recommended cost
# Checked against when the email is unknown, so both failures cost the same time.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class InvalidToken(Exception):
    pass


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def issue_token(settings: Settings, user_id: uuid.UUID) -> str:
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + settings.access_token_ttl}
    return str(jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM))


def verify_token(settings: Settings, token: str) -> uuid.UUID:
    """The user id a valid token names; `InvalidToken` for anything else."""
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[ALGORITHM],
            options={"require_sub": True, "require_exp": True, "require_iat": True},
        )
        return uuid.UUID(str(claims["sub"]))
    except (JWTError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidToken(type(exc).__name__) from None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


async def user_from_token(pool: asyncpg.Pool, settings: Settings, token: str | None) -> Any:
    """The user row for a valid token, or None (bad token, or a user since deleted)."""
    if not token:
        return None
    try:
        user_id = verify_token(settings, token)
    except InvalidToken:
        return None
    return await queries.get_user(pool, user_id=user_id)


async def require_user(request: Request) -> Any:
    user = await user_from_token(
        request.state.pool, request.state.settings, bearer_token(request.headers)
    )
    if user is None:
        raise APIError(401, "Not authenticated", {"WWW-Authenticate": "Bearer"})
    return user


async def login(request: Request) -> JSONResponse:
    email, password = _credentials(await _read_body(request), request.headers.get("content-type"))
    settings: Settings = request.state.settings
    await check_login_rate(
        request.state.pool, settings, email, client_address(request.scope, settings)
    )
    row = await queries.get_user_for_login(request.state.pool, email=email)
    # argon2 is CPU-bound by design: keep it off the event loop that relays audio.
    ok = await anyio.to_thread.run_sync(
        password_matches, row["password_hash"] if row else None, password
    )
    if row is None or not ok:
        raise APIError(401, INVALID_CREDENTIALS)
    return JSONResponse(
        {
            "access_token": issue_token(settings, row["id"]),
            "token_type": "bearer",
            "expires_in": settings.access_token_ttl,
        },
        headers={"Cache-Control": "no-store"},
    )


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_LOGIN_BODY_BYTES:
        raise APIError(413, "Request body too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY_BYTES:
            raise APIError(413, "Request body too large")
    return bytes(body)


def _credentials(body: bytes, content_type: str | None) -> tuple[str, str]:
    """(email, password) from JSON `{email, password}` or a form's `username`/`password`."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    fields: dict[str, Any]
    if media_type == "application/json":
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise APIError(400, "Malformed JSON body") from None
        if not isinstance(parsed, dict):
            raise APIError(400, "Expected a JSON object with email and password")
        fields = parsed
        email = fields.get("email", fields.get("username"))
    elif media_type == "application/x-www-form-urlencoded":
        try:
            fields = dict(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False))
        except UnicodeDecodeError:
            raise APIError(400, "Malformed form body") from None
        email = fields.get("username", fields.get("email"))
    else:
        raise APIError(415, "Send JSON {email, password} or a form with username and password")
    password = fields.get("password")
    if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
        raise APIError(422, "Both email and password are required")
    if len(email) > 320 or len(password) > 1024:
        raise APIError(422, "Email or password too long")
    return email.strip(), password
