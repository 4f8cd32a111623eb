"""The container topology, proved without a container engine: two `python -m serve` instances (the
image's CMD, run from a copy of exactly the files the Dockerfile copies) behind nginx running
`deploy/nginx.conf` (only its addresses and temp paths rewritten), one database, the Live simulator.

Proves: calls relay byte-exact through nginx and land on both replicas; the per-user session limit
holds across replicas; SIGTERM drains one replica (readiness 503 at once, new calls closed 1012 or
served by the other, the live call closed 1012 after DRAIN_SECONDS, its row finalised, exit 0) while
the other keeps serving. Needs Debian's nginx: `apt-get install nginx-light` (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import PASSWORD, World, eventually
from test_process import (
    SERVE_COMMAND,
    Process,
    base_env,
    free_port,
    service_process,
    stop_process,
    wait_ready,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from lifecycle import FINALISE_TIMEOUT
from settings import Settings
from simulator import LiveSimulator, SimSession

PROJECT = Path(__file__).resolve().parent.parent
DOCKERFILE = PROJECT / "Dockerfile"
NGINX_CONF = PROJECT / "deploy" / "nginx.conf"
DRAIN_SECONDS = 3
GRACEFUL_TIMEOUT = tomllib.loads((PROJECT / "hypercorn.toml").read_text())["graceful_timeout"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


# -- the Dockerfile, read as the builder would ------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends with a continuation line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [args for k, args in stage if k == keyword]
    assert len(values) == 1, f"the final stage has {len(values)} {keyword} instructions"
    return values[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_argv() -> list[str]:
    _, _, command = only(final_stage(), "HEALTHCHECK").partition(" CMD ")
    assert command, "HEALTHCHECK has no CMD"
    return exec_form(command)


def _dockerignore() -> list[str]:
    path = PROJECT / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def dockerignored(relative: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in _dockerignore():
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negated
    return ignored


def image_layout(root: Path) -> Path:
    """The final stage's filesystem as far as the project puts it there: every COPY that is not
    `--from` another stage, applied to the build context (less .dockerignore). Returns WORKDIR."""
    workdir = "/"
    for keyword, args in final_stage():
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if keyword != "COPY":
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        *sources, dest = [w for w in words if not w.startswith("--")]
        target = root / posixpath.join(workdir, dest).lstrip("/")
        for source in sources:
            matches = sorted(PROJECT.glob(source.rstrip("/")))
            assert matches, f"Dockerfile: COPY {source} matches nothing"
            for match in matches:
                relative = match.relative_to(PROJECT).as_posix()
                assert not dockerignored(relative), f"COPY {source}: {relative} is .dockerignored"
                if match.is_dir():  # a directory's contents go into dest
                    shutil.copytree(
                        match,
                        target,
                        dirs_exist_ok=True,
                        ignore=lambda d, names: [
                            n
                            for n in names
                            if dockerignored((Path(d) / n).relative_to(PROJECT).as_posix())
                        ],
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(match, target / match.name)
    return root / workdir.lstrip("/")


# -- the topology -----------------------------------------------------------------------------


def port_of(process: Process) -> int:
    return int(process.url.rsplit(":", 1)[1])


def instance(
    app_dir: Path, logs: Path, name: str, env: dict[str, str]
) -> contextlib.AbstractContextManager[Process]:
    """The image's CMD in the image's WORKDIR, on a loopback port."""
    return service_process(logs, env, name, cwd=app_dir)


def _stop_all(popens: list[subprocess.Popen[bytes]]) -> None:
    for popen in popens:  # signal every one first: each may take graceful_timeout
        if popen.poll() is None:
            popen.terminate()
    for popen in popens:
        stop_process(popen)


def render_nginx_conf(listen_port: int, upstream_ports: list[int], prefix: Path) -> str:
    """deploy/nginx.conf with loopback addresses for its listener and replicas, temp paths in prefix."""
    text = NGINX_CONF.read_text()
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    rewrites = [
        (r"^(\s*)listen 80;$", rf"\g<1>listen 127.0.0.1:{listen_port};"),
        (r"^http \{$", "http {\n" + temp_paths.replace("\\", "\\\\")),
    ] + [
        (rf"^(\s*)server app{n}:8000\b", rf"\g<1>server 127.0.0.1:{port}")
        for n, port in enumerate(upstream_ports, start=1)
    ]
    for pattern, replacement in rewrites:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, f"deploy/nginx.conf: {count} lines match {pattern!r}, expected one"
    assert not re.search(r"server app\d", text), "deploy/nginx.conf has more replicas than the test"
    return text


@dataclass
class Nginx:
    popen: subprocess.Popen[bytes]
    port: int
    access_log: Path
    error_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call_url(self, step_id: object, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/voice/stream/{step_id}?token={token}"


@contextlib.contextmanager
def nginx(prefix: Path, upstream_ports: list[int]) -> Iterator[Nginx]:
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(port, upstream_ports, prefix))
    # As root, workers run as the build's default user (nobody:nogroup): prefix must be reachable.
    command = [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]
    globals_ = f"daemon off; pid {prefix / 'nginx.pid'};"
    checked = subprocess.run(
        [*command, "-t", "-q", "-g", globals_], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, f"nginx -t: {checked.stderr}"
    access_log, error_log = prefix / "access.log", prefix / "error.log"
    with open(access_log, "wb") as out, open(error_log, "wb") as err:
        popen = subprocess.Popen([*command, "-g", globals_], stdout=out, stderr=err)
    try:
        yield Nginx(popen, port, access_log, error_log)
    finally:
        stop_process(popen)


@dataclass
class Deployment:
    replicas: dict[str, Process]  # "a", "b": the order of the upstream's servers
    proxy: Nginx

    async def replica_of(self, step_id: uuid.UUID) -> str:
        """Which replica accepted the socket for this step (its access log line, at the 101)."""
        needle = f"/voice/stream/{step_id} "

        async def seen_by() -> list[str]:
            return [n for n, p in self.replicas.items() if needle in p.output()]

        found = await eventually(seen_by)
        assert len(found) == 1, f"both replicas saw {needle}"
        return found[0]


def _prepare(tmp_root: Path) -> tuple[Path, Path]:
    root = Path(tempfile.mkdtemp(prefix="nginx-", dir=tmp_root))
    root.chmod(0o755)  # nginx's workers (nobody, when run as root) use the temp paths in it
    return root, image_layout(root / "image")


@contextlib.asynccontextmanager
async def deployment(
    dsn: str, simulator: LiveSimulator, tmp_root: Path, *, max_sessions: int
) -> AsyncIterator[Deployment]:
    root, app_dir = _prepare(tmp_root)
    env = base_env(
        DATABASE_URL=dsn,
        JWT_SECRET=os.environ["JWT_SECRET"],
        GEMINI_API_KEY="test-key",
        GEMINI_BASE_URL=simulator.url,
        SSL_CERT_FILE=simulator.ca_file,
        TRUSTED_PROXIES="127.0.0.1/32",
        DRAIN_SECONDS=str(DRAIN_SECONDS),
        MAX_SESSIONS_PER_USER=str(max_sessions),
        LOG_FORMAT="text",
        LOG_LEVEL="INFO",
    )
    with (
        instance(app_dir, root, "a", env) as a,
        instance(app_dir, root, "b", env) as b,
    ):
        await asyncio.gather(wait_ready(a), wait_ready(b))
        with nginx(root, [port_of(a), port_of(b)]) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:

                async def proxying() -> bool:
                    assert proxy.popen.poll() is None, proxy.error_log.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        return (await client.get("/healthz")).status_code == 200
                    return False

                await eventually(proxying, timeout=10)
            try:
                yield Deployment({"a": a, "b": b}, proxy)
            finally:  # both replicas stop at once (each may take graceful_timeout)
                await asyncio.to_thread(_stop_all, [a.popen, b.popen])


@pytest.fixture(scope="session")
def nginx_installed() -> None:
    if not Path(NGINX).is_file():
        # A test dependency like Chromium: .ci/run installs it; missing, the suite fails, not skips.
        pytest.fail("nginx is not installed: apt-get install nginx-light")


@pytest.fixture(scope="module")
async def deployed(
    nginx_installed: None, dsn: str, simulator: LiveSimulator, tmp_root: Path, pool: asyncpg.Pool
) -> AsyncIterator[Deployment]:
    """Two replicas behind nginx, MAX_SESSIONS_PER_USER=2 (the SIGTERM test makes its own)."""
    async with deployment(dsn, simulator, tmp_root, max_sessions=2) as d:
        yield d


# -- calls --------------------------------------------------------------------------------------


def pcm(nbytes: int, seed: int) -> bytes:
    """Deterministic, non-repeating s16le bytes (byte-exactness is what matters here)."""
    return bytes((i * 7 + seed * 13 + (i >> 8)) % 256 for i in range(nbytes))


async def recv_bytes(ws: ClientConnection, nbytes: int) -> bytes:
    received = bytearray()
    async with asyncio.timeout(5):
        while len(received) < nbytes:
            frame = await ws.recv()
            assert isinstance(frame, bytes), f"text frame received: {frame!r}"
            received += frame
    return bytes(received)


async def open_call(
    url: str, simulator: LiveSimulator, origin: Origin | None = None
) -> tuple[ClientConnection, SimSession]:
    ws = await connect(url, open_timeout=5, origin=origin)
    try:
        return ws, await simulator.next_session(timeout=5)
    except BaseException:
        await ws.close()
        raise


async def relays(ws: ClientConnection, upstream: SimSession, seed: int) -> None:
    """8000 bytes of 16 kHz PCM up and 12000 bytes of 24 kHz PCM down, both byte-exact."""
    up, down = pcm(8000, seed), pcm(12000, seed + 1000)
    before = upstream.audio_bytes_in
    for i in range(0, len(up), 3200):
        await ws.send(up[i : i + 3200])
    assert (await upstream.wait_audio(before + len(up)))[before:] == up
    await upstream.send_audio(down)
    assert await recv_bytes(ws, len(down)) == down


async def close_of(url: str) -> tuple[int | None, str]:
    """How the server ends a call that sends nothing: (code, reason), code None without a frame."""
    async with asyncio.timeout(10):
        async with connect(url, open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    received = closed.value.rcvd
    return (received.code, received.reason) if received else (None, "")


async def attempt(url: str, simulator: LiveSimulator) -> tuple[int | None, str]:
    """A new call: (0, "relayed") once audio went both ways, else how it was closed."""
    async with asyncio.timeout(10):
        ws = await connect(url, open_timeout=5)
        try:
            closed = asyncio.ensure_future(ws.recv())
            upstream = asyncio.ensure_future(simulator.next_session(timeout=8))
            await asyncio.wait({closed, upstream}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and upstream.exception() is None:
                closed.cancel()
                await relays(ws, upstream.result(), seed=77)
                return 0, "relayed"
            upstream.cancel()
            with pytest.raises(ConnectionClosed) as ended:
                await closed
            received = ended.value.rcvd
            return (received.code, received.reason) if received else (None, "")
        finally:
            await ws.close()


async def closing(ws: ClientConnection) -> tuple[int | None, str, float]:
    """Read until the server closes: (code, reason, monotonic time the close arrived)."""
    with pytest.raises(ConnectionClosed) as ended:
        while True:
            await ws.recv()
    at = time.monotonic()
    received = ended.value.rcvd
    return (received.code, received.reason, at) if received else (None, "", at)


async def access_lines(proxy: Nginx, needles: list[str]) -> list[str]:
    """nginx's access log lines for these paths, once every one is there (written at call end)."""

    async def all_logged() -> list[str] | None:
        lines = proxy.access_log.read_text().splitlines()
        found = [next((ln for ln in lines if n in ln), None) for n in needles]
        return [ln for ln in found if ln] if all(found) else None

    return await eventually(all_logged)


# -- the image ----------------------------------------------------------------------------------


def test_image_cmd_is_what_the_nginx_tests_run() -> None:
    stage = final_stage()
    assert exec_form(only(stage, "CMD")) == ["python", *SERVE_COMMAND]
    assert exec_form(only(stage, "ENTRYPOINT"))[0].endswith("/tini")
    assert only(stage, "STOPSIGNAL") == "SIGTERM"
    user = only(stage, "USER").split(":")[0]
    assert user not in {"root", "0"}
    env = dict(re.findall(r"(\w+)=(\S+)", only(stage, "ENV")))
    assert env["PORT"] == only(stage, "EXPOSE")
    assert env["HOST"] == "0.0.0.0"  # noqa: S104 (the container listens on its own interface)
    assert healthcheck_argv()[0] == "python" and "/healthz" in healthcheck_argv()[-1]


def test_compose_stop_grace_outlasts_the_drain() -> None:
    """compose's stop_grace_period for the replicas > DRAIN_SECONDS + finalising + graceful_timeout."""
    compose = (PROJECT / "compose.yaml").read_text()
    grace = [int(s) for s in re.findall(r"^\s+stop_grace_period: (\d+)s$", compose, re.M)]
    drain = re.search(r"DRAIN_SECONDS: \$\{DRAIN_SECONDS:-(\d+)\}", compose)
    assert grace and drain, "compose.yaml: stop_grace_period / DRAIN_SECONDS not found"
    needed = int(drain[1]) + FINALISE_TIMEOUT + GRACEFUL_TIMEOUT
    assert int(drain[1]) == Settings.drain_seconds
    assert min(grace) > needed, f"stop_grace_period {min(grace)} s, worst-case stop {needed} s"
    for n in (1, 2):  # the replicas nginx's upstream names
        assert re.search(rf"^  app{n}:$", compose, re.M), f"compose.yaml has no service app{n}"


async def test_image_healthcheck_probes_healthz(deployed: Deployment) -> None:
    argv = [sys.executable, *healthcheck_argv()[1:]]
    live = deployed.replicas["a"]

    def probe(port: int) -> int:
        env = base_env(PORT=str(port))
        probe = subprocess.run(argv, env=env, timeout=10, capture_output=True, check=False)
        return probe.returncode

    assert await asyncio.to_thread(probe, port_of(live)) == 0
    assert await asyncio.to_thread(probe, free_port()) != 0


async def test_instances_run_the_image_layout(deployed: Deployment) -> None:
    """The replicas import serve.py from the copy of the image's files, not from the project."""
    pid = deployed.replicas["a"].popen.pid
    argv, cwd, origin = await asyncio.to_thread(_how_it_runs, pid)
    assert argv == [sys.executable, *SERVE_COMMAND]
    assert cwd != PROJECT and (cwd / "serve.py").is_file()
    assert not (cwd / "tests").exists() and not (cwd / ".env").exists()
    assert origin == cwd / "serve.py"


def _how_it_runs(pid: int) -> tuple[list[str], Path, Path]:
    """A process's argv and cwd, and where `import serve` resolves from that cwd."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    origin = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('serve').origin)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return argv, cwd, Path(origin)


# -- through nginx ------------------------------------------------------------------------------


async def test_calls_relay_through_nginx_and_land_on_both_replicas(
    deployed: Deployment, simulator: LiveSimulator, world: World, pool: asyncpg.Pool
) -> None:
    proxy = deployed.proxy
    users = [await world.user(), await world.user()]
    plans = [await world.plan(u, steps=3) for u in users]
    # A token from POST /auth/login through nginx, as if behind one more proxy (X-Forwarded-For).
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        login = await client.post(
            "/auth/login",
            json={"email": users[0].email, "password": PASSWORD},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
    assert login.status_code == 200, login.text
    tokens = [login.json()["access_token"], users[1].token]
    seen = await pool.fetchval("SELECT count(*) FROM login_attempts WHERE key = 'addr:203.0.113.7'")
    assert seen >= 1  # the client's address went through nginx to the app

    # The browser's own origin passes (nginx forwards Host with its port); a foreign one is 403.
    foreign = Origin("https://evil.example")
    with pytest.raises(InvalidStatus) as refused:
        await connect(proxy.call_url(plans[0].step_ids[2], tokens[0]), origin=foreign)
    assert refused.value.response.status_code == 403

    calls: list[tuple[ClientConnection, SimSession, uuid.UUID, str]] = []
    try:
        for n, (plan, token) in enumerate((plans[u], tokens[u]) for u in (0, 1) for _ in range(2)):
            step = plan.step_ids[n % 2]
            ws, upstream = await open_call(
                proxy.call_url(step, token), simulator, Origin(proxy.url) if n == 0 else None
            )
            calls.append((ws, upstream, step, await deployed.replica_of(step)))
        for n, (ws, upstream, _, _) in enumerate(calls):
            await relays(ws, upstream, seed=n)
        replicas = [replica for *_, replica in calls]
        assert set(replicas) == {"a", "b"}, replicas
    finally:
        for ws, *_ in calls:
            await ws.close()

    lines = await access_lines(proxy, [f"/voice/stream/{step} " for _, _, step, _ in calls])
    ports = {name: port_of(p) for name, p in deployed.replicas.items()}
    for line, (*_, replica) in zip(lines, calls, strict=True):
        assert " 101 " in line and f"upstream=127.0.0.1:{ports[replica]} " in line, line
    log = proxy.access_log.read_text()
    assert "token=" not in log and "?" not in log
    assert all(token not in log for token in tokens)
    print(f"calls per replica: a={replicas.count('a')} b={replicas.count('b')}")
    print("nginx access log:", *lines, sep="\n  ")


async def test_session_limit_holds_across_replicas(
    deployed: Deployment, simulator: LiveSimulator, world: World, pool: asyncpg.Pool
) -> None:
    user = await world.user()
    steps = (await world.plan(user, steps=4)).step_ids
    proxy = deployed.proxy
    first, _ = await open_call(proxy.call_url(steps[0], user.token), simulator)
    second, _ = await open_call(proxy.call_url(steps[1], user.token), simulator)
    try:
        replicas = [await deployed.replica_of(s) for s in steps[:2]]
        assert sorted(replicas) == ["a", "b"], replicas  # round-robin: one call on each
        third = await close_of(proxy.call_url(steps[2], user.token))
        assert third == (1013, "Too many sessions for this user")
        await first.close()
        await eventually(
            lambda: pool.fetchval(
                "SELECT ended_at IS NOT NULL FROM voice_sessions WHERE step_id = $1", steps[0]
            )
        )
        fourth, fourth_up = await open_call(proxy.call_url(steps[3], user.token), simulator)
        try:
            await relays(fourth, fourth_up, seed=4)
        finally:
            await fourth.close()
    finally:
        await first.close()
        await second.close()
    print(f"limit 2: calls on {replicas}, third closed {third}, a freed slot is usable again")


async def test_sigterm_drains_one_replica_while_the_other_serves(
    nginx_installed: None,
    dsn: str,
    simulator: LiveSimulator,
    world: World,
    pool: asyncpg.Pool,
    tmp_root: Path,
) -> None:
    user = await world.user()
    steps = iter((await world.plan(user, steps=12)).step_ids)
    async with deployment(dsn, simulator, tmp_root, max_sessions=20) as d:
        proxy = d.proxy
        replica_a = d.replicas["a"]
        # One live call on each replica (round-robin alternates; bounded tries).
        live: dict[str, tuple[ClientConnection, SimSession, uuid.UUID]] = {}
        for _ in range(4):
            step = next(steps)
            ws, upstream = await open_call(proxy.call_url(step, user.token), simulator)
            replica = await d.replica_of(step)
            if replica in live:
                await ws.close()
                continue
            live[replica] = (ws, upstream, step)
            if len(live) == 2:
                break
        assert set(live) == {"a", "b"}
        (ws_a, up_a, step_a), (ws_b, up_b, _) = live["a"], live["b"]
        try:
            await relays(ws_a, up_a, seed=1)
            await relays(ws_b, up_b, seed=2)
            a_closed = asyncio.create_task(closing(ws_a))

            signalled = time.monotonic()
            replica_a.popen.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=replica_a.url) as direct:

                async def draining() -> httpx.Response | None:
                    response = await direct.get("/readyz")
                    return response if response.status_code == 503 else None

                ready = await eventually(draining, timeout=2, interval=0.005)
            to_503 = time.monotonic() - signalled
            assert ready.json() == {"status": "draining"}

            # New calls while A drains: served by B, or closed 1012 by A; never a hang or a 1006.
            during: list[tuple[str, tuple[int | None, str]]] = []
            while len(during) < 4:
                step = next(steps)
                outcome = await attempt(proxy.call_url(step, user.token), simulator)
                during.append((await d.replica_of(step), outcome))
            in_drain = time.monotonic() - signalled
            expected = {"a": (1012, "Server restarting"), "b": (0, "relayed")}
            assert all(outcome == expected[r] for r, outcome in during), during
            assert {r for r, _ in during} == {"a", "b"}, during
            await relays(ws_b, up_b, seed=3)  # the call on B, during A's drain
            assert not a_closed.done() and in_drain < DRAIN_SECONDS, "the drain ended too soon"

            async with asyncio.timeout(DRAIN_SECONDS + FINALISE_TIMEOUT):
                code, reason, closed_at = await a_closed
            drained = closed_at - signalled
            assert (code, reason) == (1012, "Server restarting")
            assert DRAIN_SECONDS - 0.1 <= drained <= DRAIN_SECONDS + 2, drained
            exit_code = await asyncio.to_thread(replica_a.popen.wait, 20)
            exited = time.monotonic() - signalled
            assert exit_code == 0, replica_a.output()
            assert exited < DRAIN_SECONDS + FINALISE_TIMEOUT + GRACEFUL_TIMEOUT, exited
            row = await pool.fetchrow(
                "SELECT ended_at, close_code, close_reason FROM voice_sessions WHERE step_id = $1",
                step_a,
            )
            assert row["ended_at"] is not None
            assert (row["close_code"], row["close_reason"]) == (1012, "Server restarting")
            async with asyncio.timeout(5):
                await up_a.closed.wait()  # and its Gemini session was closed

            # After: B still serves its call, and new calls (nginx skips the stopped replica).
            await relays(ws_b, up_b, seed=5)
            after = []
            for _ in range(3):
                step = next(steps)
                after.append(await attempt(proxy.call_url(step, user.token), simulator))
                assert await d.replica_of(step) == "b"
            assert after == [(0, "relayed")] * 3, after
        finally:
            await ws_a.close()
            await ws_b.close()
        errors = proxy.error_log.read_text()
        access = proxy.access_log.read_text()
    # A stopped replica shows up in the access log (tried, 502, then the other) and nowhere with
    # the query string: the access log logs $uri, and the error log is at `crit` (see nginx.conf).
    failover = [ln for ln in access.splitlines() if "upstream_status=502, 101" in ln]
    assert failover, access
    for log in (access, errors):
        assert "token=" not in log and user.token not in log
    print(
        f"SIGTERM → /readyz 503 in {to_503 * 1000:.0f} ms; live call closed 1012 after "
        f"{drained:.2f} s (DRAIN_SECONDS={DRAIN_SECONDS}); exit {exit_code} after {exited:.2f} s"
    )
    print(f"new calls during the drain: {during}")
    print(f"after the replica stopped: {after}; failover in nginx's log:", *failover, sep="\n  ")


async def test_nginx_strips_the_deflate_offer_so_pcm_travels_uncompressed(
    deployed: Deployment, simulator: LiveSimulator, world: World
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    url = deployed.proxy.call_url(plan.step_ids[0], user.token)
    ws, upstream = await open_call(
        url, simulator
    )  # websockets offers permessage-deflate, as browsers do
    try:
        assert ws.protocol.extensions == []
        assert ws.response is not None and "sec-websocket-extensions" not in ws.response.headers
        await relays(ws, upstream, seed=7)
    finally:
        await ws.close()
