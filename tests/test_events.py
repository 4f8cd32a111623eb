"""The opt-in event channel (`coach.events.v1`) and the conversations kept per step."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import Served, World, eventually
from test_voice import _wait_for_row, recv_bytes, stream_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay import Outbox
from simulator import LiveSimulator

EVENTS = "coach.events.v1"
pytestmark = pytest.mark.timeout(60)


async def next_frame(ws: ClientConnection) -> bytes | dict:
    async with asyncio.timeout(5):
        frame = await ws.recv()
    return json.loads(frame) if isinstance(frame, str) else frame


async def test_without_the_subprotocol_only_audio_arrives(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    async with connect(stream_url(service, plan.step_ids[0], user.token)) as ws:
        assert ws.subprotocol is None
        upstream = await simulator.next_session()
        await upstream.send_transcript("user", "hello")
        await upstream.send_audio(b"\x01\x00" * 100)
        assert await recv_bytes(ws, 200) == b"\x01\x00" * 100  # fails on any text frame
        await upstream.send_interrupted()
        await upstream.send_transcript("coach", "hi")
        await upstream.send_turn_complete()
        await upstream.send_audio(b"\x02\x00" * 100)
        assert await recv_bytes(ws, 200) == b"\x02\x00" * 100


async def test_events_arrive_in_order_with_the_audio(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user = await world.user()
    plan = await world.plan(user)
    url = stream_url(service, plan.step_ids[0], user.token)
    async with connect(url, subprotocols=[EVENTS]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == EVENTS
        first = await next_frame(ws)
        assert isinstance(first, dict) and first["type"] == "session"
        upstream = await simulator.next_session()
        await upstream.send_transcript("user", "How do I start?")
        await upstream.send_audio(b"\x01\x00" * 100)
        assert await next_frame(ws) == {
            "type": "transcript",
            "role": "user",
            "text": "How do I start?",
            "final": False,
        }
        assert await next_frame(ws) == b"\x01\x00" * 100
        await upstream.send_interrupted()
        await upstream.send_audio(b"\x02\x00" * 100)
        await upstream.send_transcript("coach", "Let's begin.")
        await upstream.send_turn_complete()
        rest = [await next_frame(ws) for _ in range(4)]
        assert rest == [
            {"type": "interrupted"},
            b"\x02\x00" * 100,
            {"type": "transcript", "role": "coach", "text": "Let's begin.", "final": False},
            {"type": "turn_complete"},
        ]
        await upstream.close(1011)
        assert await next_frame(ws) == {"type": "error", "code": 1011, "reason": "AI service error"}
        with pytest.raises(ConnectionClosed):
            await next_frame(ws)
    assert first["id"] == str((await _wait_for_row(world, user.id))["id"])


async def test_interruption_drops_unsent_audio_and_keeps_events_in_order() -> None:
    outbox = Outbox(10_000)
    outbox.put(b"a" * 10)
    outbox.put('{"type":"transcript"}')
    outbox.put(b"b" * 10)
    outbox.drop_audio()
    outbox.put('{"type":"interrupted"}')
    outbox.put(b"c" * 4)
    frames = [await outbox.get() for _ in range(3)]
    assert frames == ['{"type":"transcript"}', '{"type":"interrupted"}', b"cccc"]


async def test_a_writer_waiting_across_an_interruption_still_gets_new_audio() -> None:
    outbox = Outbox(10_000)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)  # paced: one turn of the loop, so the get() is waiting before the drop
    outbox.drop_audio()
    outbox.put(b"d" * 6)
    assert await asyncio.wait_for(waiting, 1) == b"dddddd"


async def transcript_session(
    service: Served, user, step_id, simulator: LiveSimulator, *, abrupt: bool
) -> None:
    ws = await connect(stream_url(service, step_id, user.token))
    upstream = await simulator.next_session()
    for role, pieces in [
        ("user", ["How ", "do I ", "start?"]),
        ("coach", ["Put on ", "your shoes."]),
        ("user", ["Then?"]),
    ]:
        for piece in pieces:
            await upstream.send_transcript(role, piece)
        if role == "coach":
            await upstream.send_turn_complete()
    await upstream.send_audio(b"\x00\x00" * 10)
    await recv_bytes(ws, 20)  # everything before it has been through the relay
    if abrupt:
        ws.transport.abort()
    else:
        await ws.close()


async def test_transcripts_are_stored_in_order_and_read_back_by_their_owner_only(
    service: Served, world: World, simulator: LiveSimulator
) -> None:
    user, stranger = await world.user(), await world.user()
    plan = await world.plan(user)
    step = plan.step_ids[0]
    await transcript_session(service, user, step, simulator, abrupt=False)
    await transcript_session(service, user, step, simulator, abrupt=True)
    expected = [
        ("user", "How do I start?"),
        ("coach", "Put on your shoes."),
        ("user", "Then?"),
    ]
    async with httpx.AsyncClient(base_url=service.url) as http:

        async def conversations(token: str, **params: str) -> httpx.Response:
            return await http.get(
                f"/steps/{step}/conversations",
                params=params,
                headers={"Authorization": f"Bearer {token}"},
            )

        async def both_complete() -> dict | None:  # the abrupt session's lines land as it unwinds
            body = (await conversations(user.token)).json()
            complete = len(body["conversations"]) == 2 and all(
                len(c["transcript"]) == 3 for c in body["conversations"]
            )
            return body if complete else None

        body = await eventually(both_complete)
        newest, oldest = body["conversations"]
        assert newest["started_at"] > oldest["started_at"]
        for conversation in body["conversations"]:
            assert [(t["role"], t["text"]) for t in conversation["transcript"]] == expected
        page = (await conversations(user.token, limit="1")).json()
        assert [c["id"] for c in page["conversations"]] == [newest["id"]]
        rest = (await conversations(user.token, limit="1", before=page["next_before"])).json()
        assert [c["id"] for c in rest["conversations"]] == [oldest["id"]]
        assert (await conversations(stranger.token)).status_code == 404
        assert (await http.get(f"/steps/{step}/conversations")).status_code == 401
        assert (await conversations(user.token, limit="0")).status_code == 422
        assert (await conversations(user.token, before="yesterday")).status_code == 422
