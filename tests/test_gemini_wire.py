"""The relay's hot path speaks exactly the SDK's wire format (it bypasses the SDK's models per message)."""

from __future__ import annotations

import base64
import json
import os

import pytest
from google import genai
from google.genai import types

from gemini import (
    INPUT_MIME_TYPE,
    INTERRUPTED,
    TURN_COMPLETE,
    Transcript,
    _content_events,
    realtime_audio_message,
)
from simulator import LiveSimulator


@pytest.fixture
async def sdk_session(simulator: LiveSimulator):
    assert os.environ["SSL_CERT_FILE"] == simulator.ca_file
    client = genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=simulator.url, api_version="v1beta")
    )
    async with client.aio.live.connect(
        model="gemini-3.8-live",
        config=types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO]),
    ) as session:
        yield session, await simulator.next_session()
    await client.aio.aclose()


@pytest.mark.parametrize("size", [2, 640, 1280, 4097 * 2])
async def test_audio_message_is_what_the_sdk_sends(sdk_session, size: int) -> None:
    session, upstream = sdk_session
    pcm = bytes((i * 37) % 256 for i in range(size))
    sent: list[str] = []
    original = session._ws.send

    async def observe(message, *args, **kwargs):
        sent.append(message)
        return await original(message, *args, **kwargs)

    session._ws.send = observe  # watching the frame leave, the SDK still sends it
    await session.send_realtime_input(audio=types.Blob(data=pcm, mime_type=INPUT_MIME_TYPE))
    await session._ws.send(realtime_audio_message(pcm))
    assert sent[0] == sent[1]
    assert await upstream.wait_audio(2 * size) == pcm + pcm


async def test_server_messages_parse_as_the_sdk_parses_them(sdk_session) -> None:
    session, upstream = sdk_session
    pcm = bytes(range(256)) * 4
    content = {
        "interrupted": True,
        "inputTranscription": {"text": "hi", "finished": True},
        "modelTurn": {
            "parts": [
                {
                    "inlineData": {
                        "mimeType": "audio/pcm;rate=24000",
                        "data": base64.b64encode(pcm).decode(),
                    }
                }
            ]
        },
        "outputTranscription": {"text": "hello"},
        "turnComplete": True,
    }
    await upstream.send_raw({"serverContent": content})
    raw = json.loads(json.dumps({"serverContent": content}))
    async for message in session.receive():  # the SDK's own reading of the same message
        sdk = message.server_content
        break
    assert sdk.interrupted and sdk.turn_complete and message.data == pcm
    assert _content_events(raw["serverContent"]) == [
        INTERRUPTED,
        Transcript("user", sdk.input_transcription.text, bool(sdk.input_transcription.finished)),
        message.data,
        Transcript("coach", sdk.output_transcription.text, False),
        TURN_COMPLETE,
    ]


def test_the_sdk_session_still_keeps_its_websocket_as_ws() -> None:
    from google.genai import live

    assert "_ws" in live.AsyncSession.__init__.__code__.co_names
