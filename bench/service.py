"""The service under test as deployed, in its own process; its throwaway database; the simulator process.

- `BenchDatabase`: a fresh `coach_bench_<random>` database on the machine's PostgreSQL, seeded with one
  user (and one impact and step) per caller after the app has applied its migrations; dropped after.
- `Service`: `python -m serve` when the app has `serve.py`, else Hypercorn with `hypercorn.toml`, or
  Uvicorn (`--ws websockets`, with or without `--ws-per-message-deflate false`); start-up is timed from
  spawn to the first `/readyz` 200.
- `SimulatorProcess`: `simulator.py --mode bench` standalone, when the simulator gets its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from jose import jwt

SERVERS = ("hypercorn", "uvicorn", "uvicorn-nodeflate")
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM when the bench process dies, however it dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Caller:
    user_id: uuid.UUID
    step_id: uuid.UUID
    token: str


class BenchDatabase:
    """`coach_bench_<hex>` in the admin DSN's server; `async with` creates and drops it."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"coach_bench_{secrets.token_hex(4)}"
        self.dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{self.name}"))

    async def __aenter__(self) -> BenchDatabase:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def seed(self, count: int, secret: str) -> list[Caller]:
        """`count` users, each with one impact of one step, and a token each (HS256, 4 h)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                """
                WITH u AS (
                    INSERT INTO users (email, password_hash, full_name, user_data)
                    SELECT 'bench-' || g || '@example.com', 'x', 'Bench Caller ' || g,
                           '{"goal": "talk for a benchmark"}'::jsonb
                    FROM generate_series(1, $1) g
                    RETURNING id
                ), i AS (
                    INSERT INTO impacts (user_id, title, description)
                    SELECT id, 'Run a 5K', 'Eight weeks' FROM u
                    RETURNING id, user_id
                )
                INSERT INTO steps (user_id, impact_id, step_order, title, description, icon)
                SELECT user_id, id, 1, 'Warm up', 'Ten minutes of easy jogging', '*' FROM i
                RETURNING user_id, id
                """,
                count,
            )
        finally:
            await conn.close()
        now = int(time.time())
        return [
            Caller(
                r["user_id"],
                r["id"],
                jwt.encode(
                    {"sub": str(r["user_id"]), "iat": now, "exp": now + 4 * 3600},
                    secret,
                    algorithm="HS256",
                ),
            )
            for r in rows
        ]


def service_command(server: str, app_dir: Path, python: str, port: int) -> list[str]:
    if server == "hypercorn":
        if (app_dir / "serve.py").is_file():
            return [python, "-m", "serve"]
        return [python, "-m", "hypercorn", "--config", "hypercorn.toml",
                "--bind", f"127.0.0.1:{port}", "app:app"]  # fmt: skip
    if server in ("uvicorn", "uvicorn-nodeflate"):
        cmd = [python, "-m", "uvicorn", "app:app", "--ws", "websockets",
               "--host", "127.0.0.1", "--port", str(port),
               # uvicorn's default loop ("auto": uvloop when installed, as serve.py does for
               # Hypercorn); h11 as Hypercorn (httptools is not installed either way)
               "--loop", "auto", "--http", "h11",
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
        if server == "uvicorn-nodeflate":
            cmd += ["--ws-per-message-deflate", "false"]
        return cmd
    raise ValueError(f"server must be one of {SERVERS}")


class Service:
    """The app in its own process, as deployed; `await start()` returns the seconds to ready."""

    def __init__(
        self,
        server: str,
        app_dir: Path,
        python: str,
        env: dict[str, str],
        log_path: Path,
        cpus: set[int] | None,
    ) -> None:
        self.server = server
        self.app_dir = app_dir
        self.python = python
        self.port = free_port()
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.log_path = log_path
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> float:
        self.command = service_command(self.server, self.app_dir, self.python, self.port)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.command)}\n".encode())
        log.flush()
        started = time.monotonic()
        cpus = self.cpus

        def preexec() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            self.command,
            cwd=self.app_dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
        log.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.server} exited with {self.proc.returncode} during start-up; "
                    f"see {self.log_path}"
                )
            if await http_status(self.port, "/readyz") == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.01)
        raise TimeoutError(f"{self.server} not ready after {timeout} s; see {self.log_path}")

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the service drains), then its exit code."""
        await _stop(self.proc, signal.SIGTERM, timeout)
        return self.proc.returncode if self.proc else None


async def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of `GET path` on 127.0.0.1:port, or None if it cannot be had within `timeout`."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
            return int(line.split()[1])
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class SimulatorProcess:
    """`simulator.py --mode bench --port 0` in its own process; `url` and `ca_file` once started."""

    def __init__(
        self,
        app_dir: Path,
        python: str,
        cpus: set[int] | None,
        log_path: Path,
        uvloop: bool = False,
    ) -> None:
        self.uvloop = uvloop
        self.app_dir = app_dir
        self.python = python
        self.cpus = cpus
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.ca_file = ""
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-sim-")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 20.0) -> None:
        ca_out = Path(self._tmp.name) / "ca.pem"
        cpus = self.cpus

        def preexec() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        out = Path(self._tmp.name) / "stdout"
        argv = ["--mode", "bench", "--port", "0", "--ca-out", str(ca_out)]
        if os.environ.get("BENCH_SIM_TRANSCRIPTS"):  # replies carry transcription fragments too
            argv.append("--transcripts")
        if self.uvloop:  # the harness only: the same simulator code on a faster event loop
            command = [self.python, "-c",
                       "import gc, sys, uvloop; uvloop.install(); sys.path.insert(0, '.'); "
                       "import simulator; gc.collect(); gc.freeze(); "
                       f"sys.exit(simulator.main({argv!r}))"]  # fmt: skip
        else:
            command = [self.python, str(self.app_dir / "simulator.py"), *argv]
        self.proc = subprocess.Popen(
            command,
            cwd=self.app_dir,
            stdin=subprocess.DEVNULL,
            stdout=open(out, "wb"),  # noqa: SIM115
            stderr=open(self.log_path, "ab"),  # noqa: SIM115
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = out.read_text() if out.exists() else ""
            m = re.search(r"GEMINI_BASE_URL=(\S+) SSL_CERT_FILE=(\S+)", text)
            if m:
                self.url, self.ca_file = m[1], m[2]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}")
            await asyncio.sleep(0.05)
        raise TimeoutError("simulator did not start")

    async def stop(self) -> None:
        await _stop(self.proc, signal.SIGTERM)
        self._tmp.cleanup()


async def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 5.0) -> None:
    """Send `sig`, give the process `timeout` seconds to exit, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # paced: polling a child's exit, bounded
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def python_of_venv() -> str:
    return sys.executable


NGINX_CONF = """
worker_processes 1;
error_log {tmp}/error.log crit;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            # as deploy/nginx.conf
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            {strip}
        }}
    }}
}}
"""
# The one line that turns permessage-deflate off between browsers and Hypercorn: the offer never
# reaches the app server, so it accepts no extension, and the browser then sends and expects plain
# frames (nginx itself does not implement the extension; it relays the upgraded bytes).
STRIP_DEFLATE = 'proxy_set_header Sec-WebSocket-Extensions "";'


class NginxProxy:
    """nginx in front of the service, as in deploy/nginx.conf; `strip` drops the deflate offer."""

    def __init__(self, upstream_port: int, strip: bool, cpus: set[int] | None) -> None:
        self.upstream_port = upstream_port
        self.strip = strip
        self.cpus = cpus
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-nginx-")

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        tmp = self._tmp.name
        os.chmod(tmp, 0o755)
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=tmp,
                port=self.port,
                upstream_port=self.upstream_port,
                strip=STRIP_DEFLATE if self.strip else "",
            )
        )
        cpus = self.cpus

        def preexec() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            ["nginx", "-p", tmp, "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}; see {tmp}/error.log")
            if await http_status(self.port, "/readyz") == 200:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("nginx did not start")

    def pids(self) -> list[int]:
        """The master and its workers."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    out += [int(x) for x in f.read().split()]
        return out

    async def stop(self) -> None:
        await _stop(self.proc, signal.SIGQUIT)  # nginx: a fast shutdown
        self._tmp.cleanup()
