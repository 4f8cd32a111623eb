"""Abuse limits that hold across instances (counted in PostgreSQL), and who the client is.

Login attempts are counted per email and per client address in fixed windows; past either limit the
answer is 429 with `Retry-After`. The client address is the socket's peer, or the `X-Forwarded-For`
entry added by the nearest proxy, but only when that peer is a configured trusted proxy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

import asyncpg

from db import queries
from errors import APIError
from settings import Settings


def client_address(scope: Mapping[str, Any], settings: Settings) -> str:
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not settings.trusted_proxies or not _is_trusted(peer, settings):
        return str(peer)
    forwarded = [
        value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name == b"x-forwarded-for"
    ]
    hops = [hop.strip() for hop in ",".join(forwarded).split(",") if hop.strip()]
    # Walk back from the nearest hop; the first one not ours is the client.
    for hop in reversed(hops):
        if not _is_trusted(hop, settings):
            return hop
    return hops[0] if hops else str(peer)


def _is_trusted(address: str, settings: Settings) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.trusted_proxies)


async def check_login_rate(
    pool: asyncpg.Pool, settings: Settings, email: str, address: str
) -> None:
    """Counts this attempt; raises 429 when the email or the address is over its limit."""
    window = settings.login_window_seconds
    limits = {
        f"email:{email.lower()}": settings.login_attempts_per_email,
        f"addr:{address}": settings.login_attempts_per_address,
    }
    retry_after = 0
    for key, limit in limits.items():
        row = await queries.count_login_attempt(pool, key=key, window_seconds=window)
        if row["attempts"] > limit:
            retry_after = max(retry_after, math.ceil(row["seconds_left"]))
    if random.random() < 0.01:
        await queries.forget_old_login_attempts(pool)
    if retry_after:
        raise APIError(
            429,
            "Too many login attempts; try again later",
            {"Retry-After": str(max(1, retry_after))},
        )
