"""The Live simulator, driven by the real google-genai SDK over TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import ssl
import struct
import sys
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import pytest
from google import genai
from google.genai import errors, types
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from simulator import LiveSimulator

MODEL = "gemini-3.8-live"
MIC_MIME = "audio/pcm;rate=16000"
SIMULATOR = Path(__file__).resolve().parents[1] / "simulator.py"

StartSim = Callable[..., Awaitable[LiveSimulator]]


class Endpoint(Protocol):
    url: str
    ca_file: str


Live = Callable[..., contextlib.AbstractAsyncContextManager["genai.live.AsyncSession"]]


def tone(seconds: float, hz: float = 440.0, amplitude: int = 8000, rate: int = 16_000) -> bytes:
    """A sine tone as s16le mono."""
    n = int(seconds * rate)
    return array(
        "h", (int(amplitude * math.sin(2 * math.pi * hz * i / rate)) for i in range(n))
    ).tobytes()


def silence(seconds: float, rate: int = 16_000) -> bytes:
    return bytes(2 * int(seconds * rate))


def chunks(pcm: bytes, size: int = 3200) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


async def send_mic(session: genai.live.AsyncSession, pcm: bytes) -> None:
    for chunk in chunks(pcm):
        await session.send_realtime_input(audio=types.Blob(data=chunk, mime_type=MIC_MIME))


async def receive_turn(
    session: genai.live.AsyncSession,
) -> tuple[bytes, list[types.LiveServerMessage]]:
    """One model turn: receive() stops after turn_complete."""
    audio = bytearray()
    messages = []
    async for msg in session.receive():
        messages.append(msg)
        audio += msg.data or b""
    return bytes(audio), messages


@pytest.fixture
async def start_sim(caplog: pytest.LogCaptureFixture) -> AsyncIterator[StartSim]:
    """Starts simulators; stops them after the test and checks no connection handler crashed."""
    sims: list[LiveSimulator] = []

    async def start(mode: str = "script", **kwargs: Any) -> LiveSimulator:
        sim = LiveSimulator(mode=mode, **kwargs)
        await sim.start()
        sims.append(sim)
        return sim

    yield start
    async with asyncio.timeout(5):
        for sim in sims:
            await sim.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> Live:
    """Opens an SDK Live session on a simulator, as the app would."""

    @contextlib.asynccontextmanager
    async def open_live(
        sim: Endpoint, api_key: str = "test-key", **config: Any
    ) -> AsyncIterator[genai.live.AsyncSession]:
        # The SDK builds its SSL context from SSL_CERT_FILE once, in genai.Client(): set it first.
        monkeypatch.setenv("SSL_CERT_FILE", sim.ca_file)
        client = genai.Client(
            api_key=api_key, http_options=types.HttpOptions(base_url=sim.url, api_version="v1beta")
        )
        config.setdefault("system_instruction", "You are a voice coach.")
        live_config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO], **config)
        try:
            async with client.aio.live.connect(model=MODEL, config=live_config) as session:
                yield session
        finally:
            await client.aio.aclose()
            client.close()

    return open_live


async def test_setup_is_recorded(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    async with asyncio.timeout(5):
        async with live(sim, system_instruction="Be a kind coach."):
            session = await sim.next_session()
            assert sim.open_sessions == 1
        await session.closed.wait()
    assert session.system_instruction == "Be a kind coach."
    assert session.api_key == "test-key"
    assert session.api_version == "v1beta"
    assert session.path.endswith("v1beta.GenerativeService.BidiGenerateContent")
    assert session.setup["model"] == f"models/{MODEL}"
    assert session.resumption_handle is None
    assert session.close_code == 1000
    assert sim.open_sessions == 0


async def test_resumption_handle_is_recorded(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    async with (
        asyncio.timeout(5),
        live(sim, session_resumption=types.SessionResumptionConfig(handle="h-7")),
    ):
        session = await sim.next_session()
    assert session.resumption_handle == "h-7"


async def test_client_audio_arrives_byte_exact(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    sent = os.urandom(16_000)  # random bytes exercise every base64 character
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        await send_mic(client, sent[:8000])
        await client.send_realtime_input(audio_stream_end=True)
        await send_mic(client, sent[8000:])
        assert await session.wait_audio(len(sent)) == sent
    assert session.mime_types == [MIC_MIME]
    assert session.audio_stream_ends == 1
    assert session.audio_chunks_in == 6  # 3 chunks of each half


async def test_scripted_audio_arrives_in_order_per_turn(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    replies = [os.urandom(9_600 + 1_000 * turn) for turn in range(3)]
    turns: list[bytes] = []
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        for reply in replies:
            await session.send_audio(reply)
            await session.send_turn_complete()
        while True:
            audio = bytearray()
            async for msg in client.receive():
                audio += msg.data or b""
                if msg.server_content and msg.server_content.turn_complete:
                    turns.append(bytes(audio))
            if len(turns) == len(replies):
                break
    assert turns == replies


async def test_transcripts_and_interrupted_reach_the_sdk(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        await session.send_transcript("user", "hello")
        await session.send_transcript("coach", "hi there")
        await session.send_interrupted()
        await session.send_turn_complete()
        _, messages = await receive_turn(client)
    contents = [m.server_content for m in messages if m.server_content]
    assert contents[0].input_transcription
    assert contents[0].input_transcription.text == "hello"
    assert contents[1].output_transcription
    assert contents[1].output_transcription.text == "hi there"
    assert contents[2].interrupted is True


async def test_echo_answers_an_utterance_resampled_to_24k(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim("echo")
    async with asyncio.timeout(5), live(sim) as client:
        await send_mic(client, tone(1.0) + silence(0.6))
        audio, messages = await receive_turn(client)
    assert abs(len(audio) - 48_000) <= 48_000 * 0.05  # 1 s at 24 kHz s16le
    contents = [m.server_content for m in messages if m.server_content]
    assert contents[0].input_transcription
    assert contents[0].input_transcription.text == "(you spoke 1.0 s)"
    assert any(c.output_transcription for c in contents)
    assert contents[-1].turn_complete


async def test_echo_answers_at_audio_stream_end(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim("echo")
    async with asyncio.timeout(5), live(sim) as client:
        await send_mic(client, tone(0.5))
        await client.send_realtime_input(audio_stream_end=True)
        audio, _ = await receive_turn(client)
    assert abs(len(audio) - 24_000) <= 24_000 * 0.05


async def test_echo_is_interrupted_by_barge_in(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim("echo")
    async with asyncio.timeout(5), live(sim) as client:
        await send_mic(client, tone(1.0) + silence(0.5))
        audio = bytearray()
        interrupted = 0
        async for msg in client.receive():
            if msg.data and not audio:
                await send_mic(client, tone(0.2))  # the caller talks over the first chunk
            audio += msg.data or b""
            interrupted += bool(msg.server_content and msg.server_content.interrupted)
        await send_mic(client, silence(0.5))
        answer, messages = await receive_turn(client)  # the barge-in was an utterance too
    assert interrupted == 1
    assert 0 < len(audio) < 48_000
    assert not any(m.server_content and m.server_content.interrupted for m in messages)
    assert len(answer) == 9_600  # 0.2 s at 24 kHz


async def test_echo_survives_the_caller_leaving_mid_reply(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim("echo")
    async with asyncio.timeout(5):
        async with live(sim) as client:
            session = await sim.next_session()
            await send_mic(client, tone(1.0) + silence(0.5))
            async for msg in client.receive():
                if msg.data:
                    break  # hang up while the echo is still streaming
        await session.closed.wait()
    assert session.close_code == 1000  # and start_sim checks nothing was logged as an error


async def test_camel_case_and_legacy_media_chunks_are_accepted(start_sim: StartSim) -> None:
    sim = await start_sim()
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    path = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent"
    pcm = os.urandom(3000)
    chunk = {"mimeType": "audio/pcm", "data": base64.b64encode(pcm).decode()}  # standard alphabet
    setup = {
        "setup": {
            "model": "models/x",
            "systemInstruction": {"parts": [{"text": "A"}, {"text": "B"}]},
        }
    }
    async with asyncio.timeout(5):
        async with ws_connect(sim.url.replace("https", "wss") + path, ssl=ctx) as ws:
            await ws.send(json.dumps(setup))
            reply = await ws.recv()
            await ws.send(json.dumps({"realtimeInput": {"mediaChunks": [chunk]}}))
            await ws.send(json.dumps({"realtimeInput": {"audioStreamEnd": True}}))
            session = await sim.next_session()
            assert await session.wait_audio(len(pcm)) == pcm
        await session.closed.wait()
    assert isinstance(reply, bytes)  # Google sends JSON in binary frames
    assert json.loads(reply) == {"setupComplete": {}}
    assert session.api_version == "v1alpha"
    assert session.system_instruction == "AB"
    assert session.mime_types == ["audio/pcm"]
    assert session.audio_stream_ends == 1


async def test_bench_reply_starts_with_the_chunk(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim("bench")
    sent = [struct.pack("<I", seq) + os.urandom(636) for seq in range(5)]
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        replies: list[bytes] = []
        async with contextlib.aclosing(client.receive()) as stream:  # type: ignore[type-var]
            for chunk in sent:
                await client.send_realtime_input(audio=types.Blob(data=chunk, mime_type=MIC_MIME))
                replies.append((await anext(stream)).data or b"")
    assert [r[:640] for r in replies] == sent
    assert all(len(r) == 960 for r in replies)
    assert session.audio_bytes_in == 5 * 640
    assert session.audio_in == b""  # bench keeps counts only


async def test_close_code_surfaces_as_api_error(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        await session.close(code=1011, reason="x")
        with pytest.raises(errors.APIError) as raised:
            async for _ in client.receive():
                pass
    assert raised.value.code == 1011
    assert raised.value.details == "x"
    assert session.close_code == 1011


async def test_go_away_and_resumption_update_reach_the_sdk(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim()
    async with asyncio.timeout(5), live(sim) as client:
        session = await sim.next_session()
        await session.send_go_away("50s")
        await session.send_resumption_update("handle-1")
        async with contextlib.aclosing(client.receive()) as stream:  # type: ignore[type-var]
            go_away = (await anext(stream)).go_away
            update = (await anext(stream)).session_resumption_update
    assert go_away is not None
    assert go_away.time_left == "50s"
    assert update is not None
    assert update.new_handle == "handle-1"
    assert update.resumable is True


async def test_wrong_api_key_is_closed_with_1007(start_sim: StartSim, live: Live) -> None:
    sim = await start_sim(api_key="right-key")
    async with asyncio.timeout(5):
        with pytest.raises(errors.APIError) as raised:
            async with live(sim, api_key="wrong-key"):
                pass
        session = await sim.next_session()
    assert raised.value.code == 1007
    assert "API key not valid" in str(raised.value.details)
    assert session.close_code == 1007


async def test_other_paths_get_404(start_sim: StartSim) -> None:
    sim = await start_sim()
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    async with asyncio.timeout(5):
        with pytest.raises(InvalidStatus) as raised:
            async with ws_connect(sim.url.replace("https", "wss") + "/ws/elsewhere", ssl=ctx):
                pass
    assert raised.value.response.status_code == 404


async def test_runs_standalone_until_sigterm(tmp_path: Path, live: Live) -> None:
    ca_out = tmp_path / "ca.pem"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SIMULATOR),
        "--mode",
        "echo",
        "--port",
        "0",
        "--ca-out",
        str(ca_out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
            fields = dict(part.split("=", 1) for part in line.split())
            assert fields["SSL_CERT_FILE"] == str(ca_out)
            assert ca_out.read_text().startswith("-----BEGIN CERTIFICATE-----")
            endpoint = SimpleNamespace(url=fields["GEMINI_BASE_URL"], ca_file=str(ca_out))
            async with live(endpoint) as client:
                await send_mic(client, tone(0.3))
                await client.send_realtime_input(audio_stream_end=True)
                audio, _ = await receive_turn(client)
            assert len(audio) > 0
            proc.terminate()
            _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert b"session open" in stderr
    assert b"session closed" in stderr
