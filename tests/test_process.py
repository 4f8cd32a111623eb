"""The service as operators run it: real processes, the embedded database, signals, the CLI, the logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from conftest import PASSWORD, World, eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from simulator import LiveSimulator

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(120)
SERVE_COMMAND = ["-m", "serve"]  # after the interpreter; the container's CMD is the same


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "COACH_DEV"}}
    env.update(extra)
    return env


@contextlib.contextmanager
def service_process(
    tmp: Path, env: dict[str, str], name: str = "svc", *, cwd: Path = PROJECT
) -> Iterator[Process]:
    """`python -m serve` (Hypercorn with hypercorn.toml) in `cwd`, as `make run` and the image run
    it, on a free loopback port; its output goes to `tmp/name.log`."""
    port = free_port()
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [str(BIN / "python"), *SERVE_COMMAND],
            cwd=cwd,
            env={**env, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Process(popen, f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(popen)


def stop_process(popen: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


async def wait_ready(process: Process, timeout: float = 30) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=process.url) as client:

        async def ready() -> bool:
            assert process.popen.poll() is None, process.output()
            with contextlib.suppress(httpx.TransportError):
                return (await client.get("/readyz")).status_code == 200
            return False

        await eventually(ready, timeout=timeout)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def fresh_database(dsn: str) -> AsyncIterator[str]:
    name = f"coach_fresh_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def coach(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_in_project(str(BIN / "coach"), *args, env=env)


def run_in_project(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_two_instances_starting_at_once_apply_the_schema_exactly_once(
    dsn: str, tmp_path: Path
) -> None:
    async with fresh_database(dsn) as database_url:
        env = base_env(DATABASE_URL=database_url)
        with service_process(tmp_path, env, "a") as a, service_process(tmp_path, env, "b") as b:
            ready = await asyncio.gather(wait_ready(a), wait_ready(b))
            conn = await asyncpg.connect(database_url)
            try:
                names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
            finally:
                await conn.close()
        print(f"both ready in {ready[0]:.2f} s and {ready[1]:.2f} s")
    files = sorted(p.name for p in (PROJECT / "migrations").glob("*.sql"))
    assert sorted(names) == files  # the primary key also forbids a second row per file


async def test_missing_jwt_secret_stops_startup_with_one_line(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL="postgresql://unused@127.0.0.1:1/x")
    env.pop("JWT_SECRET", None)
    result = run_in_project(str(BIN / "python"), "-c", "import app", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "configuration error: JWT_SECRET is required (set COACH_DEV=1 for a generated one)"
    ]


async def test_cli_is_scriptable_and_errors_are_one_line(dsn: str, tmp_path: Path) -> None:
    async with fresh_database(dsn) as database_url:
        env = base_env(DATABASE_URL=database_url)
        user = coach(
            "user",
            "add",
            "cli@example.com",
            "--name",
            "Cli User",
            "--password",
            "pw1",
            "--data",
            '{"goal": "sleep more"}',
            env=env,
        )
        assert user.returncode == 0, user.stderr
        user_id = user.stdout.strip()
        impact = coach("impact", "add", "--user", "cli@example.com", "--title", "Sleep", env=env)
        impact_id = impact.stdout.strip()
        first = coach("step", "add", "--impact", impact_id, "--title", "Dim lights", env=env)
        second = coach("step", "add", "--impact", impact_id, "--title", "No screens", env=env)
        token = coach("token", "cli@example.com", env=env)
        ids = [user_id, impact_id, first.stdout.strip(), second.stdout.strip()]
        for value in ids:
            assert len(value) == 36 and value.count("-") == 4, value  # a UUID alone on stdout
        conn = await asyncpg.connect(database_url)
        try:
            orders = [
                r["step_order"]
                for r in await conn.fetch(
                    "SELECT step_order FROM steps WHERE impact_id = $1 ORDER BY step_order",
                    __import__("uuid").UUID(impact_id),
                )
            ]
        finally:
            await conn.close()
        assert orders == [1, 2]
        assert token.returncode == 0 and token.stdout.count(".") == 2
        failures = {
            "duplicate email": coach(
                "user", "add", "CLI@example.com", "--name", "X", "--password", "p", env=env
            ),
            "bad json": coach(
                "user",
                "add",
                "new@example.com",
                "--name",
                "X",
                "--password",
                "p",
                "--data",
                "{nope",
                env=env,
            ),
            "unknown user": coach(
                "impact", "add", "--user", "ghost@example.com", "--title", "T", env=env
            ),
            "unknown impact": coach(
                "step",
                "add",
                "--impact",
                "00000000-0000-0000-0000-000000000000",
                "--title",
                "T",
                env=env,
            ),
            "bad impact id": coach("step", "add", "--impact", "zzz", "--title", "T", env=env),
            "taken order": coach(
                "step", "add", "--impact", impact_id, "--title", "T", "--order", "1", env=env
            ),
            "no such command": coach("frobnicate", env=env),
        }
        for name, result in failures.items():
            assert result.returncode != 0, name
            assert result.stdout == "", name
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("coach: "), (name, result.stderr)
        demo_twice = [coach("demo", env=env), coach("demo", env=env)]
        assert [r.returncode for r in demo_twice] == [0, 0]
        assert "created" in demo_twice[0].stdout and "already present" in demo_twice[1].stdout


async def test_logs_never_carry_passwords_or_tokens(dsn: str, tmp_path: Path, world: World) -> None:
    user = await world.user()
    plan = await world.plan(user)
    env = base_env(
        DATABASE_URL=dsn,
        GEMINI_API_KEY="secret-gemini-key-123",
        GEMINI_BASE_URL="https://127.0.0.1:1",
        LOG_LEVEL="DEBUG",
    )
    with service_process(tmp_path, env) as svc:
        await wait_ready(svc)
        async with httpx.AsyncClient(base_url=svc.url) as client:
            ok = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
            token = ok.json()["access_token"]
            await client.post("/auth/login", json={"email": user.email, "password": "wrong-pw-9"})
            await client.get("/me", headers={"Authorization": f"Bearer {token}"})
            await client.get(f"/me?token={token}")
            issued = await client.post(
                f"/voice/ticket/{plan.step_ids[0]}", headers={"Authorization": f"Bearer {token}"}
            )
            ticket = issued.json()["ticket"]
        ws_base = svc.url.replace("http", "ws") + f"/voice/stream/{plan.step_ids[0]}"
        for query in [f"token={token}", f"ticket={ticket}", f"ticket={ticket}"]:  # spent, refused
            async with connect(f"{ws_base}?{query}") as ws:
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(15):
                        await ws.recv()
        svc.popen.send_signal(signal.SIGTERM)
        assert svc.popen.wait(20) == 0
    output = svc.output()
    assert "GET /voice/stream/" in output  # the access log is on, and was written
    for secret in [
        token,
        ticket,
        PASSWORD,
        "wrong-pw-9",
        env["JWT_SECRET"],
        "secret-gemini-key-123",
    ]:
        assert secret not in output
    assert token.split(".")[2] not in output  # not even the signature alone


async def test_embedded_database_survives_kill_9(tmp_path: Path, tmp_root: Path) -> None:
    data_dir = tmp_root / f"kill9-{secrets.token_hex(4)}"  # reachable by the server's own user
    env = base_env(DATA_DIR=str(data_dir), COACH_DEV="1")
    with service_process(tmp_path, env, "first") as first:
        cold = await wait_ready(first)
        added = coach(
            "user", "add", "kept@example.com", "--name", "Kept", "--password", "pw", env=env
        )
        assert added.returncode == 0, added.stderr
        first.popen.kill()
        first.popen.wait()
    with service_process(tmp_path, env, "second") as second:
        warm = await wait_ready(second)
        token = coach("token", "kept@example.com", env=env)
        assert token.returncode == 0, token.stderr
        async with httpx.AsyncClient(base_url=second.url) as client:
            me = await client.get(
                "/me", headers={"Authorization": f"Bearer {token.stdout.strip()}"}
            )
        assert me.json()["email"] == "kept@example.com"
        second.popen.send_signal(signal.SIGTERM)
        assert second.popen.wait(20) == 0
    assert not _postgres_running_on(data_dir)
    print(f"embedded: first start ready in {cold:.2f} s, after kill -9 ready in {warm:.2f} s")


def _postgres_running_on(data_dir: Path) -> bool:
    result = subprocess.run(
        ["pgrep", "-f", f"postgres -D {data_dir}"],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


async def test_sigterm_drains_then_exits_zero(
    dsn: str, tmp_path: Path, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    env = base_env(
        DATABASE_URL=dsn,
        GEMINI_API_KEY="k",
        GEMINI_BASE_URL=simulator.url,
        SSL_CERT_FILE=simulator.ca_file,
        DRAIN_SECONDS="2",
    )
    with service_process(tmp_path, env) as svc:
        await wait_ready(svc)
        ws_base = svc.url.replace("http", "ws") + "/voice/stream/"
        async with (
            connect(f"{ws_base}{plan.step_ids[0]}?token={user.token}") as live,
            httpx.AsyncClient(base_url=svc.url) as http,
        ):
            upstream = await simulator.next_session()
            await live.send(b"\x01\x00" * 100)
            await upstream.wait_audio(200)
            signalled = time.monotonic()
            svc.popen.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await http.get("/readyz")).status_code == 503

            await eventually(not_ready, timeout=2, interval=0.005)
            not_ready_after = time.monotonic() - signalled
            # New sockets are refused while draining; the live one keeps relaying meanwhile.
            async with connect(f"{ws_base}{plan.step_ids[1]}?token={user.token}") as late:
                with pytest.raises(ConnectionClosed) as refused:
                    async with asyncio.timeout(2):
                        await late.recv()
            assert refused.value.rcvd is not None
            assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (
                1012,
                "Server restarting",
            )
            await upstream.send_audio(b"\x02\x00" * 100)
            assert await live.recv() == b"\x02\x00" * 100
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    await live.recv()
            closed_after = time.monotonic() - signalled
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "Server restarting")
        assert svc.popen.wait(15) == 0
        exited_after = time.monotonic() - signalled
    row = await world.pool.fetchrow(
        "SELECT close_code, close_reason, ended_at FROM voice_sessions WHERE user_id = $1"
        " AND step_id = $2",
        user.id,
        plan.step_ids[0],
    )
    assert (row["close_code"], row["close_reason"]) == (1012, "Server restarting")
    assert row["ended_at"] is not None
    assert 1.8 < closed_after < 4
    print(
        f"drain: /readyz 503 after {not_ready_after * 1000:.0f} ms, live session closed 1012 "
        f"after {closed_after:.2f} s (DRAIN_SECONDS=2), exit 0 after {exited_after:.2f} s"
    )
