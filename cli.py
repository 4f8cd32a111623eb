"""The `coach` admin command: migrations, users, impacts, steps, tokens and the demo data.

Scriptable: each `add` prints the new id alone on stdout (`id=$(coach user add ...)`); an error prints
one line on stderr and exits 1. With no `DATABASE_URL`, it uses (or briefly starts) the embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
import asyncpg

import db
from auth import hash_password, issue_token
from demo import DEMO_EMAIL, DEMO_PASSWORD, ensure_demo
from settings import Settings, SettingsError


class CommandError(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(dev_default=True)
        with db.database_dsn(settings) as dsn:
            output = asyncio.run(_run(args.handler, dsn, settings, args))
    except (CommandError, SettingsError) as exc:
        sys.exit(f"coach: {exc}")
    except (OSError, asyncpg.PostgresError) as exc:
        sys.exit(f"coach: database error: {exc}".splitlines()[0])
    if output:
        print(output)


async def _run(
    handler: Callable[..., Awaitable[str]], dsn: str, settings: Settings, args: Any
) -> str:
    await db.migrate(dsn)
    if handler is _migrate:
        return ""
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        return await handler(pool, settings, args)
    finally:
        await pool.close()


async def _migrate(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    return ""


async def _user_add(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise CommandError(f"--data is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise CommandError("--data must be a JSON object")
    password = args.password or _ask_password()
    password_hash = await anyio.to_thread.run_sync(hash_password, password)
    try:
        user_id = await db.queries.insert_user(
            pool,
            email=args.email,
            password_hash=password_hash,
            full_name=args.name,
            user_data=data,
        )
    except asyncpg.UniqueViolationError:
        raise CommandError(f"a user with email {args.email} already exists") from None
    return str(user_id)


async def _impact_add(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    user_id = await db.queries.get_user_id_by_email(pool, email=args.user)
    if user_id is None:
        raise CommandError(f"no user with email {args.user}")
    impact_id = await db.queries.insert_impact(
        pool, user_id=user_id, title=args.title, description=args.description
    )
    return str(impact_id)


async def _step_add(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    try:
        impact_id = uuid.UUID(args.impact)
    except ValueError:
        raise CommandError(f"no impact with id {args.impact}") from None
    if args.order is not None and args.order < 1:
        raise CommandError("--order must be 1 or more")
    try:
        step_id = await db.queries.insert_step(
            pool,
            impact_id=impact_id,
            step_order=args.order,
            title=args.title,
            description=args.description,
            icon=args.icon,
        )
    except asyncpg.UniqueViolationError:
        raise CommandError(f"impact {impact_id} already has a step {args.order}") from None
    if step_id is None:
        raise CommandError(f"no impact with id {args.impact}")
    return str(step_id)


async def _token(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    user_id = await db.queries.get_user_id_by_email(pool, email=args.email)
    if user_id is None:
        raise CommandError(f"no user with email {args.email}")
    return issue_token(settings, user_id)


async def _demo(pool: asyncpg.Pool, settings: Settings, args: Any) -> str:
    _, created = await ensure_demo(pool)
    state = "created" if created else "already present"
    return f"demo data {state}; log in as {DEMO_EMAIL} / {DEMO_PASSWORD}"


def _ask_password() -> str:
    if not sys.stdin.isatty():
        raise CommandError("--password is required when not run from a terminal")
    password = getpass.getpass("Password: ")
    if not password:
        raise CommandError("empty password")
    return password


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.exit(f"coach: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coach", description="Administer the voice coach relay.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    commands.add_parser("migrate", help="apply database migrations").set_defaults(handler=_migrate)

    user = commands.add_parser("user", help="manage users").add_subparsers(required=True)
    user_add = user.add_parser("add", help="create a user; prints its id")
    user_add.add_argument("email")
    user_add.add_argument("--name", required=True)
    user_add.add_argument("--password", help="asked for when omitted on a terminal")
    user_add.add_argument("--data", default="{}", help="profile as a JSON object")
    user_add.set_defaults(handler=_user_add)

    impact = commands.add_parser("impact", help="manage impacts (plans)").add_subparsers(
        required=True
    )
    impact_add = impact.add_parser("add", help="create an impact; prints its id")
    impact_add.add_argument("--user", required=True, metavar="EMAIL")
    impact_add.add_argument("--title", required=True)
    impact_add.add_argument("--description", default="")
    impact_add.set_defaults(handler=_impact_add)

    step = commands.add_parser("step", help="manage steps").add_subparsers(required=True)
    step_add = step.add_parser("add", help="create a step; prints its id")
    step_add.add_argument("--impact", required=True, metavar="IMPACT_ID")
    step_add.add_argument("--title", required=True)
    step_add.add_argument("--description", default="")
    step_add.add_argument("--icon", default="")
    step_add.add_argument("--order", type=int, help="defaults to the next free one")
    step_add.set_defaults(handler=_step_add)

    token = commands.add_parser("token", help="print an access token for a user")
    token.add_argument("email")
    token.set_defaults(handler=_token)

    commands.add_parser("demo", help="create the demo user and plan (idempotent)").set_defaults(
        handler=_demo
    )
    return parser


if __name__ == "__main__":
    main()
