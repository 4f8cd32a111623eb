"""What operators rely on: long calls across goAway, limits, origins, tickets, metrics, client address."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import PASSWORD, Served, World, eventually
from itsdangerous import URLSafeTimedSerializer
from prometheus_client.parser import text_string_to_metric_families
from test_voice import _wait_for_row, close_of, open_call, recv_bytes, stream_url
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulator import LiveSimulator

pytestmark = pytest.mark.timeout(60)


def chunk(n: int, size: int = 4800) -> bytes:
    return bytes((n * 31 + i) % 251 for i in range(size))


# -- long calls -----------------------------------------------------------------------------


async def test_a_call_survives_two_go_aways_with_no_audio_lost_or_duplicated(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    expected = bytearray()
    async with connect(stream_url(service, plan.step_ids[0], user.token)) as ws:
        upstream = await simulator.next_session()
        assert upstream.resumption_handle is None
        for n, handle in enumerate(["handle-1", "handle-2"]):
            await upstream.send_resumption_update(handle)
            reply = chunk(n) * 3
            await upstream.send_audio(reply)
            await upstream.send_turn_complete()
            expected += reply
            await upstream.send_go_away("50s")
            # The relay moves to a new connection, resuming with the newest handle.
            replacement = await simulator.next_session()
            assert replacement.resumption_handle == handle
            assert upstream.closed.is_set(), "old upstream must be closed before resuming"
            # The browser's audio keeps flowing, now to the new connection.
            await ws.send(b"\x01\x00" * 400)
            assert await replacement.wait_audio(800) == b"\x01\x00" * 400
            upstream = replacement
        final = chunk(9) * 2
        await upstream.send_audio(final)
        expected += final
        assert await recv_bytes(ws, len(expected)) == bytes(expected)
        assert ws.close_code is None  # the browser saw no close
    row = await _wait_for_row(world, user.id)
    assert row["upstream_reconnects"] == 2


async def test_an_unexpected_upstream_drop_is_resumed_once(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    async with open_call(service, world, simulator) as (ws, first, _user, _plan):
        await first.send_resumption_update("handle-a")
        await first.send_audio(chunk(1))
        assert await recv_bytes(ws, 4800) == chunk(1)
        await first.close(code=1011, reason="Internal error")
        second = await simulator.next_session()
        assert second.resumption_handle == "handle-a"
        await second.send_audio(chunk(2))
        assert await recv_bytes(ws, 4800) == chunk(2)
        await second.close(code=1011, reason="Internal error")  # 1011 again, later on
        third = await simulator.next_session()
        assert third.resumption_handle == "handle-a"
        # A drop straight after resuming, with nothing received in between: no endless retrying.
        await third.close(code=1011, reason="Internal error")
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_go_away_without_a_resumable_handle_ends_the_call_cleanly(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    async with open_call(service, world, simulator) as (ws, upstream, _user, _plan):
        await upstream.send_resumption_update("", resumable=False)  # never sent back as a handle
        await upstream.send_go_away("1s")
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "AI session ended")
    assert len(simulator.sessions) == simulator.sessions.index(upstream) + 1  # no resumption


# -- limits ---------------------------------------------------------------------------------


async def test_the_session_over_the_per_user_limit_is_refused(
    serve_app, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    url = stream_url  # keep the lines short
    async with serve_app(max_sessions_per_user=2) as served:
        async with connect(url(served, plan.step_ids[0], user.token)):
            await simulator.next_session()
            async with connect(url(served, plan.step_ids[1], user.token)):
                await simulator.next_session()
                assert await close_of(url(served, plan.step_ids[2], user.token)) == (
                    1013,
                    "Too many sessions for this user",
                )
                other = await world.user()  # limits are per user
                other_plan = await world.plan(other)
                async with connect(url(served, other_plan.step_ids[0], other.token)):
                    await simulator.next_session()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"max_session_seconds": 1}, "Session time limit reached"),
        ({"idle_seconds": 1}, "No audio received; closing idle session"),
    ],
    ids=["session-time", "idle"],
)
async def test_time_limits_close_the_session(
    serve_app, world: World, simulator: LiveSimulator, overrides: dict, reason: str
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with serve_app(**overrides) as served:
        started = time.monotonic()
        async with connect(stream_url(served, plan.step_ids[0], user.token)) as ws:
            upstream = await simulator.next_session()
            if "idle_seconds" not in overrides:
                # Talking does not extend the session time limit.
                async def talk() -> None:
                    while True:
                        await ws.send(b"\x00\x00" * 320)
                        await asyncio.sleep(0.02)  # paced: real-time 20 ms frames

                talker = asyncio.create_task(talk())
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            if "idle_seconds" not in overrides:
                talker.cancel()
        took = time.monotonic() - started
        await asyncio.wait_for(upstream.closed.wait(), 2)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, reason)
    assert 0.9 < took < 3
    print(f"{reason}: closed after {took:.2f} s with a 1 s limit")


async def test_login_attempts_are_rate_limited_per_email_and_address(
    serve_app, world: World
) -> None:
    user = await world.user()
    await world.pool.execute("DELETE FROM login_attempts")  # attempts of earlier tests
    async with (
        serve_app(login_attempts_per_email=3, login_attempts_per_address=5) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):

        async def attempt(email: str, password: str = "wrong") -> httpx.Response:
            return await http.post("/auth/login", json={"email": email, "password": password})

        statuses = [(await attempt(user.email)).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        limited = await attempt(user.email, PASSWORD)  # even the right password waits
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 300
        # The address is limited too, whatever the email.
        other = [(await attempt(f"x{n}@example.com")).status_code for n in range(2)]
        assert other == [429, 429]


# -- origins and tickets --------------------------------------------------------------------


async def test_foreign_origins_are_refused_and_no_origin_is_allowed(
    serve_app, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with serve_app(allowed_origins=("https://coach.example",)) as served:
        url = stream_url(served, plan.step_ids[0], user.token)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        for origin in [None, "https://coach.example", served.url]:
            async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                upstream = await simulator.next_session()
                await ws.send(b"\x02\x00" * 10)
                assert await upstream.wait_audio(20) == b"\x02\x00" * 10


async def test_a_ticket_works_once(service: Served, world: World, simulator: LiveSimulator) -> None:
    user = await world.user()
    plan = await world.plan(user)
    step = plan.step_ids[0]
    async with httpx.AsyncClient(base_url=service.url) as http:
        issued = await http.post(
            f"/voice/ticket/{step}", headers={"Authorization": f"Bearer {user.token}"}
        )
        assert (await http.post(f"/voice/ticket/{step}")).status_code == 401
        stranger = await world.user()
        not_theirs = await http.post(
            f"/voice/ticket/{step}", headers={"Authorization": f"Bearer {stranger.token}"}
        )
        assert (
            await http.post(
                "/voice/ticket/not-a-uuid", headers={"Authorization": f"Bearer {user.token}"}
            )
        ).status_code == 404
    assert issued.status_code == 200 and issued.json()["expires_in"] == 60
    ticket = issued.json()["ticket"]
    url = f"{service.ws_url}/voice/stream/{step}?ticket={ticket}"
    async with connect(url) as ws:
        upstream = await simulator.next_session()
        await ws.send(b"\x03\x00" * 10)
        assert await upstream.wait_audio(20) == b"\x03\x00" * 10
    assert await close_of(url) == (1008, "Not authenticated")  # spent
    other_step = f"{service.ws_url}/voice/stream/{plan.step_ids[1]}?ticket={ticket}"
    assert await close_of(other_step) == (1008, "Not authenticated")  # bound to its step
    # A ticket for someone else's step is issued, and refused where ownership is decided.
    strangers = f"{service.ws_url}/voice/stream/{step}?ticket={not_theirs.json()['ticket']}"
    assert await close_of(strangers) == (1008, "Step not found")


async def test_an_expired_ticket_fails(service: Served, world: World) -> None:
    user = await world.user()
    plan = await world.plan(user)

    class Past(URLSafeTimedSerializer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            signer = self.signer

            class OldSigner(signer):  # type: ignore[misc, valid-type]
                def get_timestamp(self) -> int:
                    return int(time.time()) - 61

            self.signer = OldSigner

    payload = {"u": str(user.id), "s": str(plan.step_ids[0]), "n": "expired-nonce"}
    old = Past(service.settings.jwt_secret, salt="coach.voice-ticket.v1").dumps(payload)
    url = f"{service.ws_url}/voice/stream/{plan.step_ids[0]}?ticket={old}"
    assert await close_of(url) == (1008, "Not authenticated")


# -- metrics and client address -------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("coach_"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_reflect_a_scripted_sequence_exactly(
    serve_app, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with serve_app() as served, httpx.AsyncClient(base_url=served.url) as http:
        url = stream_url(served, plan.step_ids[0], user.token)
        # 1: audio both ways, then the model ends the session normally.
        async with connect(url) as ws:
            upstream = await simulator.next_session()
            await ws.send(b"\x01\x00" * 500)
            await upstream.wait_audio(1000)
            await upstream.send_audio(b"\x02\x00" * 700)
            await recv_bytes(ws, 1400)
            await upstream.close(1000)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(2):
                    await ws.recv()
        # 2: the model fails.
        async with connect(url) as ws:
            upstream = await simulator.next_session()
            await upstream.close(1011)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(2):
                    await ws.recv()
        # 3 and 4: refused.
        await close_of(stream_url(served, plan.step_ids[0], "bad-token"))
        await close_of(stream_url(served, "not-a-step", user.token))

        async def settled() -> dict | None:  # the last session's figures land as its task unwinds
            found = samples((await http.get("/metrics")).text)
            return found if found.get(("coach_voice_sessions_active", ())) == 0 else None

        found = await eventually(settled)
    assert found[("coach_voice_sessions_ended_total", (("code", "1000"),))] == 1
    assert found[("coach_voice_sessions_ended_total", (("code", "1011"),))] == 1
    assert found[("coach_voice_audio_bytes_total", (("direction", "in"),))] == 1000
    assert found[("coach_voice_audio_bytes_total", (("direction", "out"),))] == 1400
    assert found[("coach_voice_rejections_total", (("reason", "Not authenticated"),))] == 1
    assert found[("coach_voice_rejections_total", (("reason", "Step not found"),))] == 1
    assert found[("coach_upstream_connect_seconds_count", ())] == 2
    assert found[("coach_upstream_reconnects_total", ())] == 0


async def test_forwarded_address_is_used_only_from_trusted_proxies(serve_app, world: World) -> None:
    async def limited_after(served: Served, forwarded: list[str]) -> list[int]:
        async with httpx.AsyncClient(base_url=served.url) as http:
            return [
                (
                    await http.post(
                        "/auth/login",
                        json={"email": f"u{n}@example.com", "password": "x"},
                        headers={"X-Forwarded-For": forwarded[n]},
                    )
                ).status_code
                for n in range(len(forwarded))
            ]

    await world.pool.execute("DELETE FROM login_attempts")  # attempts of earlier tests
    # Trusted proxy: each forwarded client has its own allowance.
    async with serve_app(
        login_attempts_per_address=1,
        trusted_proxies=(__import__("ipaddress").ip_network("127.0.0.0/8"),),
    ) as served:
        assert await limited_after(served, ["198.51.100.1", "198.51.100.2"]) == [401, 401]
        assert await limited_after(served, ["198.51.100.1"]) == [429]
    # Untrusted peer: the header is ignored, the peer address is the key.
    await world.pool.execute("DELETE FROM login_attempts")
    async with serve_app(login_attempts_per_address=1) as served:
        assert await limited_after(served, ["203.0.113.1", "203.0.113.2"]) == [401, 429]
