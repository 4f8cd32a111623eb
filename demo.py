"""The demo user and plan that `make run` and `coach demo` create once, so there is something to try."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import asyncpg

from auth import hash_password
from db import queries

DEMO_EMAIL = "demo@example.com"
# A published, development-only credential (README); `make run` prints it, it is not a secret.
DEMO_PASSWORD = "demo-coach-2026"  # noqa: S105

DEMO_PROFILE = {
    "goal": "run a 5 km race without stopping",
    "experience": "beginner",
    "available_time": "30 minutes, three evenings a week",
}
DEMO_IMPACT = (
    "Run my first 5K",
    "Build up from walking to running 5 km in eight weeks, without injury.",
)
DEMO_STEPS = [
    ("Get the right shoes", "Visit a running shop and get fitted for shoes.", "👟"),
    (
        "Walk-run intervals",
        "Alternate one minute running and two minutes walking for 20 minutes.",
        "⏱️",
    ),
    ("Run 2 km", "Run 2 km at an easy, conversational pace.", "🏃"),
    ("Run 4 km", "Run 4 km, walking breaks allowed.", "🛣️"),
    ("Race day", "Run the 5 km race and enjoy it.", "🏅"),
]


async def ensure_demo(pool: asyncpg.Pool) -> tuple[Any, bool]:
    """(demo user id, created) — creates the demo user and plan only if the user does not exist."""
    existing = await queries.get_user_id_by_email(pool, email=DEMO_EMAIL)
    if existing is not None:
        return existing, False
    password_hash = await anyio.to_thread.run_sync(hash_password, DEMO_PASSWORD)
    try:
        return await _insert_demo(pool, password_hash), True
    except asyncpg.UniqueViolationError:  # another instance seeded it first
        return await queries.get_user_id_by_email(pool, email=DEMO_EMAIL), False


async def _insert_demo(pool: asyncpg.Pool, password_hash: str) -> Any:
    async with pool.acquire() as conn, conn.transaction():
        user_id = await queries.insert_user(
            conn,
            email=DEMO_EMAIL,
            password_hash=password_hash,
            full_name="Alex Demo",
            user_data=DEMO_PROFILE,
        )
        impact_id = await queries.insert_impact(
            conn, user_id=user_id, title=DEMO_IMPACT[0], description=DEMO_IMPACT[1]
        )
        for order, (title, description, icon) in enumerate(DEMO_STEPS, start=1):
            await queries.insert_step(
                conn,
                impact_id=impact_id,
                step_order=order,
                title=title,
                description=description,
                icon=icon,
            )
    return user_id
