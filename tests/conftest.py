"""Test worlds: a real PostgreSQL, the app under Hypercorn on a real socket, the Live simulator over TLS.

The database is `DATABASE_URL` when set (a fresh database is created in it and dropped afterwards),
else a throwaway embedded server. Nothing here mocks the database or the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

os.environ.setdefault("JWT_SECRET", "test-secret-" + "x" * 40)

import db
from auth import hash_password, issue_token
from embedded_pg import EmbeddedPostgres
from settings import Settings
from simulator import LiveSimulator

PASSWORD = "correct horse battery staple"
POLL_SECONDS = 0.02

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 5, interval: float = POLL_SECONDS
) -> T:
    """Await `probe()` until it returns something truthy, and return that; TimeoutError at `timeout`.

    For state with no event to wait on (rows, processes, other servers): every wait in the tests is a
    condition with a bound, and this is the one place that polls.
    """
    async with asyncio.timeout(timeout):
        while not (result := await probe()):
            await asyncio.sleep(interval)  # paced: the poll interval of a bounded wait
    return result


_PASSWORD_HASH = hash_password(PASSWORD)  # hashed once: argon2 is slow on purpose


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    # Not pytest's tmp_path: as root the embedded server runs as `nobody`, which must reach its dir.
    root = Path(tempfile.mkdtemp(prefix="coach-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
async def dsn(tmp_root: Path) -> AsyncIterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        name = f"coach_test_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(external)
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(external)
        yield urlunsplit(parts._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
        return
    server = EmbeddedPostgres(tmp_root / "data", throwaway=True)
    dsn = server.start()
    yield dsn
    server.stop()


@pytest.fixture(scope="session")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await db.migrate(dsn)
    pool = await db.create_pool(dsn, max_size=4)
    yield pool
    await pool.close()


@dataclasses.dataclass
class User:
    id: uuid.UUID
    email: str
    full_name: str
    token: str


@dataclasses.dataclass
class Plan:
    impact_id: uuid.UUID
    step_ids: list[uuid.UUID]


@pytest.fixture(scope="session")
def settings(dsn: str, tmp_root: Path) -> Settings:
    return Settings(
        database_url=dsn,
        jwt_secret=os.environ["JWT_SECRET"],
        data_dir=tmp_root / "app-data",
        gemini_api_key="test-key",
        # Every test logs in from 127.0.0.1: only the rate-limit tests set real limits.
        login_attempts_per_email=1000,
        login_attempts_per_address=100_000,
    )


class World:
    """Factories for users and plans, straight into the database."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    async def user(self, name: str = "Sam Tester", data: dict[str, Any] | None = None) -> User:
        email = f"user-{uuid.uuid4().hex[:10]}@example.com"
        user_id = await db.queries.insert_user(
            self.pool,
            email=email,
            password_hash=_PASSWORD_HASH,
            full_name=name,
            user_data=data or {},
        )
        return User(user_id, email, name, issue_token(self.settings, user_id))

    async def plan(
        self, user: User, title: str = "Run a 5K", description: str = "Eight weeks", steps: int = 3
    ) -> Plan:
        impact_id = await db.queries.insert_impact(
            self.pool, user_id=user.id, title=title, description=description
        )
        step_ids = [
            await db.queries.insert_step(
                self.pool,
                impact_id=impact_id,
                step_order=None,
                title=f"Step {n}",
                description=f"Do thing {n}",
                icon="⭐",
            )
            for n in range(1, steps + 1)
        ]
        return Plan(impact_id, step_ids)


@pytest.fixture(scope="session")
def world(pool: asyncpg.Pool, settings: Settings) -> World:
    return World(pool, settings)


@pytest.fixture(scope="session")
async def simulator(tmp_root: Path) -> AsyncIterator[LiveSimulator]:
    async with LiveSimulator(mode="script", cert_dir=str(tmp_root / "sim")) as sim:
        # The SDK reads SSL_CERT_FILE when a client is built: set before any app starts.
        os.environ["SSL_CERT_FILE"] = sim.ca_file
        yield sim


@pytest.fixture(autouse=True)
def _fresh_simulator_cursor(request: pytest.FixtureRequest) -> None:
    """Each test's `simulator.next_session()` starts with the sessions that test opens."""
    if "simulator" in request.fixturenames:
        request.getfixturevalue("simulator").skip_recorded()


@dataclasses.dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    settings: Settings

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")


ServeFactory = Callable[..., contextlib.AbstractAsyncContextManager[Served]]


@pytest.fixture(scope="session")
def serve_app(settings: Settings, simulator: LiveSimulator, pool: asyncpg.Pool) -> ServeFactory:
    """`async with serve_app(**settings_overrides) as served`: the app under Hypercorn, port 0."""

    @contextlib.asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Served]:
        from app import create_app

        app_settings = dataclasses.replace(
            settings, **{"gemini_base_url": simulator.url, **overrides}
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the socket
        config.graceful_timeout = 5
        stop = asyncio.Event()
        app = create_app(app_settings)
        served = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_until_ready(url, served)
            yield Served(url, app_settings)
        finally:
            stop.set()
            await asyncio.wait_for(served, 15)

    return factory


async def _wait_until_ready(url: str, served: asyncio.Task[None]) -> None:
    async with httpx.AsyncClient(base_url=url) as client:

        async def ready() -> bool:
            if served.done():
                served.result()  # start-up failed: raise its error
            with contextlib.suppress(httpx.TransportError):
                return (await client.get("/readyz")).status_code == 200
            return False

        await eventually(ready, timeout=15)


@pytest.fixture(scope="session")
async def service(serve_app: ServeFactory) -> AsyncIterator[Served]:
    """The default app, shared by the tests that need no special settings."""
    async with serve_app() as served:
        yield served


@pytest.fixture
async def http(service: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url) as client:
        yield client
