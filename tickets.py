"""Voice tickets: short-lived, single-use credentials that keep access tokens out of URLs.

`POST /voice/ticket/{step_id}` (bearer token) returns a ticket valid `TICKET_SECONDS` for that step,
signed with itsdangerous; the socket takes it as `?ticket=`. Spending records the ticket's nonce in
PostgreSQL, so it works once across every instance. A ticket is bound to its user and step; whether
the step is theirs is checked when it is spent, with the socket's other checks.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import JSONResponse

from auth import require_user
from db import queries
from errors import APIError
from settings import Settings

TICKET_SECONDS = 60
_SALT = "coach.voice-ticket.v1"


class InvalidTicket(Exception):
    pass


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.jwt_secret, salt=_SALT)


def issue_ticket(settings: Settings, user_id: uuid.UUID, step_id: uuid.UUID) -> str:
    payload = {"u": str(user_id), "s": str(step_id), "n": secrets.token_urlsafe(12)}
    return str(_serializer(settings).dumps(payload))


async def spend_ticket(
    pool: asyncpg.Pool,
    settings: Settings,
    ticket: str,
    step_id: str,
    *,
    max_age: int = TICKET_SECONDS,
) -> uuid.UUID:
    """The user id of a valid, unspent ticket for this step; spends it. `InvalidTicket` otherwise."""
    try:
        payload: Any = _serializer(settings).loads(ticket, max_age=max_age)
        user_id, ticket_step, nonce = uuid.UUID(payload["u"]), payload["s"], str(payload["n"])
    except (SignatureExpired, BadSignature, KeyError, TypeError, ValueError):
        raise InvalidTicket from None
    if ticket_step != step_id:
        raise InvalidTicket
    if await queries.spend_ticket(pool, nonce=nonce, expires_in=max_age) is None:
        raise InvalidTicket  # already spent
    return user_id


async def create_ticket(request: Request) -> JSONResponse:
    user = await require_user(request)
    try:
        step_id = uuid.UUID(request.path_params["step_id"])
    except ValueError:
        raise APIError(404, "Step not found") from None
    # Ownership is decided where the ticket is spent, by the socket's one query, so that every
    # refusal reaches the caller with the same reasons and codes however they authenticate.
    await queries.forget_expired_tickets(request.state.pool)
    return JSONResponse(
        {
            "ticket": issue_ticket(request.state.settings, user["id"], step_id),
            "expires_in": TICKET_SECONDS,
        },
        headers={"Cache-Control": "no-store"},
    )
