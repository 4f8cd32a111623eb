"""The voice socket over real sockets: handshake refusals, grounding, the relay, endings and bad input.

The upstream is the project's Live simulator over TLS, reached by the real google-genai SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import Plan, Served, User, World, eventually
from jose import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from simulator import LiveSimulator, SimSession

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def open_call(
    service: Served, world: World, simulator: LiveSimulator
) -> AsyncIterator[tuple[ClientConnection, SimSession, User, Plan]]:
    """A new user with a plan, on a call about its first step: (socket, upstream, user, plan)."""
    user = await world.user()
    plan = await world.plan(user)
    async with connect(stream_url(service, plan.step_ids[0], user.token)) as ws:
        yield ws, await simulator.next_session(), user, plan


def stream_url(served: Served, step_id: object, token: str | None = None) -> str:
    url = f"{served.ws_url}/voice/stream/{step_id}"
    return f"{url}?token={token}" if token is not None else url


async def close_of(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """The code and reason the server closes with, without the client sending anything."""
    async with connect(url, additional_headers=headers, open_timeout=5) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                await ws.recv()
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def recv_bytes(ws: ClientConnection, nbytes: int, timeout: float = 5) -> bytes:
    received = bytearray()
    async with asyncio.timeout(timeout):
        while len(received) < nbytes:
            frame = await ws.recv()
            assert isinstance(frame, bytes), f"text frame received: {frame!r}"
            received += frame
    return bytes(received)


def pcm(seconds: float, seed: int = 1, rate: int = 16000) -> bytes:
    """Deterministic, non-repeating s16le bytes (what matters here is byte-exactness, not sound)."""
    return bytes((i * 7 + seed * 13 + (i >> 8)) % 256 for i in range(int(seconds * rate) * 2))


# -- handshake ------------------------------------------------------------------------------


async def test_handshake_refusals_in_order(service: Served, world: World) -> None:
    user, stranger = await world.user(), await world.user()
    plan, strangers_plan = await world.plan(user), await world.plan(stranger)
    secret = service.settings.jwt_secret
    now = int(time.time())
    claims = {"sub": str(user.id), "iat": now, "exp": now + 60}
    alg_none = (
        jwt.encode({"alg": "none", "typ": "JWT"}, "", algorithm="HS256")  # placeholder, replaced
    )
    header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"  # {"alg":"none","typ":"JWT"}
    body = jwt.encode(claims, secret, algorithm="HS256").split(".")[1]
    alg_none = f"{header}.{body}."
    step = plan.step_ids[0]
    cases = {
        "no token": (stream_url(service, step), (1008, "Not authenticated")),
        "garbage": (stream_url(service, step, "garbage"), (1008, "Not authenticated")),
        "expired": (
            stream_url(
                service, step, jwt.encode({**claims, "iat": now - 99, "exp": now - 9}, secret)
            ),
            (1008, "Not authenticated"),
        ),
        "wrong key": (
            stream_url(service, step, jwt.encode(claims, "k" * 40)),
            (1008, "Not authenticated"),
        ),
        "alg none": (stream_url(service, step, alg_none), (1008, "Not authenticated")),
        "no sub": (
            stream_url(service, step, jwt.encode({"iat": now, "exp": now + 60}, secret)),
            (1008, "Not authenticated"),
        ),
        "unknown user": (
            stream_url(service, step, jwt.encode({**claims, "sub": str(uuid.uuid4())}, secret)),
            (1008, "User not found"),
        ),
        "another user's step": (
            stream_url(service, strangers_plan.step_ids[0], user.token),
            (1008, "Step not found"),
        ),
        "non-UUID step": (stream_url(service, "not-a-uuid", user.token), (1008, "Step not found")),
        "missing step": (stream_url(service, uuid.uuid4(), user.token), (1008, "Step not found")),
    }
    for name, (url, expected) in cases.items():
        assert await close_of(url) == expected, name


async def test_step_whose_impact_belongs_to_someone_else(service: Served, world: World) -> None:
    user, stranger = await world.user(), await world.user()
    strangers_plan = await world.plan(stranger)
    # A step row claiming the user, pointing at the stranger's impact: the impact check catches it.
    step_id = await world.pool.fetchval(
        "INSERT INTO steps (user_id, impact_id, step_order, title) VALUES ($1, $2, 99, 'odd')"
        " RETURNING id",
        user.id,
        strangers_plan.impact_id,
    )
    assert await close_of(stream_url(service, step_id, user.token)) == (1008, "Impact not found")


async def test_token_in_header_or_query_opens_a_session(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    for url, headers in [
        (stream_url(service, plan.step_ids[0], user.token), None),
        (stream_url(service, plan.step_ids[0]), {"Authorization": f"Bearer {user.token}"}),
    ]:
        async with connect(url, additional_headers=headers) as ws:
            session = await simulator.next_session()
            await ws.send(b"\x01\x00" * 160)
            assert await session.wait_audio(320) == b"\x01\x00" * 160


async def test_no_ai_key_closes_1011_after_authentication(serve_app, world: World) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with serve_app(gemini_api_key=None) as served:
        assert await close_of(stream_url(served, plan.step_ids[0], user.token)) == (
            1011,
            "Server configuration error for AI client",
        )
        # Authentication is decided first: a bad token still hears 1008.
        assert await close_of(stream_url(served, plan.step_ids[0], "bad")) == (
            1008,
            "Not authenticated",
        )


# -- grounding ------------------------------------------------------------------------------


async def test_system_instruction_is_grounded_in_profile_plan_and_progress(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user(name="Ada Lovelace", data={"favourite_sport": "rowing", "age": 36})
    plan = await world.plan(user, title="Row 10 km", description="Build endurance by June")
    async with connect(stream_url(service, plan.step_ids[1], user.token)):
        session = await simulator.next_session()
    text = session.system_instruction
    for expected in [
        "Ada Lovelace",
        "rowing",
        "36",
        "Row 10 km",
        "Build endurance by June",
        "Step 2",
        "Do thing 2",
        "⭐",
        "Previous step: Step 1",
        "Next step: Step 3",
        "step 2 of 3",
    ]:
        assert expected in text, expected
    assert session.setup["model"].endswith("gemini-3.8-live")
    assert session.api_version == "v1beta"


# -- relay ----------------------------------------------------------------------------------


async def test_audio_is_relayed_byte_exact_both_ways_across_turns(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    async with open_call(service, world, simulator) as (ws, session, _user, _plan):
        spoken = pcm(1.0)
        for offset in range(0, len(spoken), 1280):  # 40 ms frames
            await ws.send(spoken[offset : offset + 1280])
        assert await session.wait_audio(len(spoken)) == spoken
        assert session.mime_types == ["audio/pcm;rate=16000"]
        for turn in range(3):
            reply = pcm(0.7, seed=turn + 2, rate=24000)
            await session.send_audio(reply)
            await session.send_turn_complete()
            assert await recv_bytes(ws, len(reply)) == reply, f"turn {turn}"
        # Nothing but audio: no stray frame (text or otherwise) is waiting.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ws.recv()


# -- endings --------------------------------------------------------------------------------


async def test_client_disconnect_closes_the_upstream_within_a_second(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with connect(stream_url(service, plan.step_ids[0], user.token)):
        session = await simulator.next_session()
    started = time.monotonic()
    await asyncio.wait_for(session.closed.wait(), 1)
    print(f"upstream closed {1000 * (time.monotonic() - started):.1f} ms after the client left")


@pytest.mark.parametrize(
    ("upstream_code", "client_code"), [(1000, 1000), (1011, 1011), (1008, 1011), (1007, 1011)]
)
async def test_upstream_close_closes_the_client_within_a_second(
    service: Served, world: World, simulator: LiveSimulator, upstream_code: int, client_code: int
) -> None:
    async with open_call(service, world, simulator) as (ws, session, _user, _plan):
        started = time.monotonic()
        await session.close(code=upstream_code, reason="simulated")
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(1):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == client_code
    assert closed.value.rcvd.reason
    print(
        f"upstream {upstream_code} → client {client_code} in "
        f"{1000 * (time.monotonic() - started):.1f} ms"
    )


async def test_upstream_unreachable_closes_1014(serve_app, world: World) -> None:
    user = await world.user()
    plan = await world.plan(user)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with serve_app(gemini_base_url=f"https://127.0.0.1:{port}") as served:
        assert await close_of(stream_url(served, plan.step_ids[0], user.token)) == (
            1014,
            "AI service unavailable",
        )


async def test_sessions_are_recorded_and_finalised(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    async with open_call(service, world, simulator) as (ws, session, user, plan):
        await ws.send(b"\x00\x01" * 500)
        await session.wait_audio(1000)
        await session.send_audio(b"\x02\x03" * 600)
        await recv_bytes(ws, 1200)
        await session.close(code=1000)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(2):
                await ws.recv()
    row = await _wait_for_row(world, user.id)
    assert (row["close_code"], row["bytes_in"], row["bytes_out"]) == (1000, 1000, 1200)
    assert row["step_id"] == plan.step_ids[0]


async def _wait_for_row(world: World, user_id: uuid.UUID) -> dict:
    """The user's finalised session row: it is written as the session task unwinds."""
    row = await eventually(
        lambda: world.pool.fetchrow(
            "SELECT * FROM voice_sessions WHERE user_id = $1 AND ended_at IS NOT NULL", user_id
        )
    )
    return dict(row)


async def test_many_sessions_leave_no_task_connection_or_upstream_behind(
    serve_app, world: World, simulator: LiveSimulator
) -> None:
    async with serve_app(
        max_sessions_per_user=100
    ) as service:  # reconnects come faster than teardown
        await _open_and_drop_200_sessions(service, world, simulator)


async def _open_and_drop_200_sessions(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    users = [await world.user() for _ in range(20)]
    urls = [stream_url(service, (await world.plan(u)).step_ids[0], u.token) for u in users]
    baseline_tasks = len(asyncio.all_tasks())

    async def one(url: str, n: int) -> None:
        ws = await connect(url)
        await ws.send(b"\x00\x00" * 320)
        if n % 2:
            await ws.close()
        else:
            ws.transport.abort()  # abrupt: no close frame, just a dropped TCP connection

    for batch in range(10):  # 20 concurrent callers, 10 times: 200 sessions
        await asyncio.gather(*(one(url, batch + n) for n, url in enumerate(urls)))

    async def torn_down() -> bool:
        return not simulator.open_sessions and len(asyncio.all_tasks()) <= baseline_tasks

    await eventually(torn_down, timeout=10)
    ids = [u.id for u in users]
    open_rows, finished = await world.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE ended_at IS NULL), count(*) FROM voice_sessions"
        " WHERE user_id = ANY($1)",
        ids,
    )
    busy = await world.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'coach' AND state <> 'idle'"
        " AND pid <> pg_backend_pid()"
    )
    assert (open_rows, finished, busy) == (0, 200, 0)
    assert len(asyncio.all_tasks()) <= baseline_tasks


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("hello", (1003, "Text frames are not accepted; send binary PCM")),
        (b"\x00" * 65538, (1009, "Audio frame too large")),
        (b"\x00" * 321, (1007, "Audio frame must hold whole 16-bit samples")),
    ],
    ids=["text", "oversized", "odd-length"],
)
async def test_bad_frames_close_the_session_and_are_not_forwarded(
    service: Served, world: World, simulator: LiveSimulator, frame: bytes | str, expected: tuple
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    bystander_url = stream_url(service, plan.step_ids[1], user.token)
    async with connect(bystander_url) as bystander:
        bystander_session = await simulator.next_session()
        async with connect(stream_url(service, plan.step_ids[0], user.token), max_size=None) as ws:
            session = await simulator.next_session()
            await ws.send(b"\x05\x00" * 100)
            await session.wait_audio(200)
            await ws.send(frame)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(2):
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == expected
        await asyncio.wait_for(session.closed.wait(), 1)
        assert bytes(session.audio_in) == b"\x05\x00" * 100
        # The other session is unaffected.
        await bystander.send(b"\x07\x00" * 100)
        assert await bystander_session.wait_audio(200) == b"\x07\x00" * 100
        await bystander_session.send_audio(b"\x08\x00" * 100)
        assert await recv_bytes(bystander, 200) == b"\x08\x00" * 100


# -- backpressure ---------------------------------------------------------------------------


async def test_a_client_that_stops_reading_neither_stalls_upstream_nor_grows_memory(
    serve_app, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    bound = 1_000_000
    async with serve_app(max_pending_audio_bytes=bound) as served:
        sock = await _non_reading_client(
            served, f"/voice/stream/{plan.step_ids[0]}?token={user.token}"
        )
        session = await simulator.next_session()
        # The model speaks 1.2 MB (25 s of audio) to a client that reads nothing.
        for _ in range(60):
            await session.send_audio(b"\x01\x02" * 10000)
        # Upstream is still being read: the relay's SDK connection answers a ping behind it all.
        async with asyncio.timeout(2):
            round_trip = await session.ping()
        assert not session.closed.is_set()
        # Past the bound the session ends rather than buffer more.
        sent = 1_200_000
        while not session.closed.is_set() and sent < 20_000_000:
            try:
                await session.send_audio(b"\x01\x02" * 10000)
            except ConnectionClosed:
                break
            sent += 20000
        await asyncio.wait_for(session.closed.wait(), 5)
        sock.close()
    row = await _wait_for_row(world, user.id)
    assert (row["close_code"], row["close_reason"]) == (1008, "Client not reading audio")
    print(
        f"upstream ping answered in {round_trip * 1000:.1f} ms behind 1.2 MB the client did not "
        f"read; session closed 1008 after the model sent {sent} bytes, {row['bytes_out']} of "
        f"them into the client's socket buffers (outbox bound {bound} bytes)"
    )


async def _non_reading_client(served: Served, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: small window
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", int(served.url.rsplit(":", 1)[1])))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in response:
            response += await loop.sock_recv(sock, 1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock
