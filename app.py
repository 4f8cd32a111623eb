"""The application: `create_app()`, its lifespan (database, migrations, AI client), routes and static page.

`python -m serve` runs it (Hypercorn with `hypercorn.toml`, draining on SIGTERM). Settings are read
once, when the app is created; a missing or malformed one stops start-up with one line naming it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

import auth
import db
import gemini
from demo import DEMO_EMAIL, DEMO_PASSWORD, ensure_demo
from errors import APIError
from lifecycle import Lifecycle
from logs import configure_logging
from metrics import Metrics
from settings import PROJECT_DIR, Settings, SettingsError
from tickets import create_ticket
from transcripts import list_conversations
from voice_ws import VoiceStream

log = logging.getLogger(__name__)

READINESS_TIMEOUT = 2.0
STATIC_DIR = PROJECT_DIR / "static"


def create_app(settings: Settings | None = None) -> Starlette:
    if settings is None:
        settings = _settings_or_exit()
    configure_logging(settings.log_level, settings.log_format)
    lifecycle = Lifecycle(settings.drain_seconds)
    metrics = Metrics()
    metrics.active_sessions.set_function(lambda: lifecycle.active_sessions)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        with db.database_dsn(settings) as dsn:
            await db.migrate(dsn)
            pool = await db.create_pool(dsn)
            try:
                if settings.dev_mode:
                    await _announce_demo(pool, settings)
                yield {
                    "settings": settings,
                    "pool": pool,
                    "coach_ai": gemini.connector_from_settings(
                        settings, on_connect=metrics.upstream_connect_seconds.observe
                    ),
                    "lifecycle": lifecycle,
                    "metrics": metrics,
                }
            finally:
                await pool.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics.endpoint),
            Route("/auth/login", auth.login, methods=["POST"]),
            Route("/me", me),
            Route("/impacts", impacts),
            Route("/steps/{step_id}/conversations", list_conversations),
            Route("/voice/ticket/{step_id}", create_ticket, methods=["POST"]),
            WebSocketRoute("/voice/stream/{step_id}", VoiceStream),
            Route("/", test_page),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.lifecycle = lifecycle  # for the entry point, which drains it on SIGTERM
    return app


async def test_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if request.state.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await request.state.pool.fetchval("SELECT 1", timeout=READINESS_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def me(request: Request) -> Response:
    user = await auth.require_user(request)
    return JSONResponse(
        {
            "id": str(user["id"]),
            "email": user["email"],
            "full_name": user["full_name"],
            "user_data": user["user_data"],
        }
    )


async def impacts(request: Request) -> Response:
    user = await auth.require_user(request)
    rows = [
        row
        async for row in db.queries.list_impacts_with_steps(request.state.pool, user_id=user["id"])
    ]
    return JSONResponse(
        [
            {
                "id": str(r["id"]),
                "title": r["title"],
                "description": r["description"],
                "steps": r["steps"],
            }
            for r in rows
        ]
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _announce_demo(pool: asyncpg.Pool, settings: Settings) -> None:
    _, created = await ensure_demo(pool)
    base = f"http://{settings.host}:{settings.port}"
    # Printed, not logged: a banner for the person at the terminal of `make run`.
    print(
        f"\n  Test page: {base}/\n"
        f"  Demo login{' (created)' if created else ''}: {DEMO_EMAIL} / {DEMO_PASSWORD}\n"
        f"  Token: curl -s -X POST {base}/auth/login -H 'Content-Type: application/json' "
        f'-d \'{{"email":"{DEMO_EMAIL}","password":"{DEMO_PASSWORD}"}}\'\n',
        file=sys.stderr,
        flush=True,
    )


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


app = create_app()
