"""The seam to Gemini Live: what the relay needs (send audio, read events, close) over google-genai.

The relay never sees pydantic types, URLs or SDK exceptions: it gets model audio as `bytes`, a few small
event objects, and `UpstreamError(code, reason)` carrying the close code to give the browser.

Long calls: a Live connection lasts about ten minutes and announces its end with `goAway`. The session
keeps the newest resumable handle and, on goAway, reconnects with it at the next turn boundary (or just
before the announced deadline), after the old socket is closed; it also tries one resumption after an
unexpected drop (1011/1006). Audio sent meanwhile waits for the new connection instead of being lost.

Hot path: the SDK opens each connection (URL, key, TLS, the setup message, its answer). Audio then
travels over that session's own websocket (`AsyncSession._ws`) as the JSON the SDK itself would send
and receive, without a pydantic model per message: the SDK's per-message model building and validation
was the relay's largest cost (bench/README.md). `tests/test_gemini_wire.py` pins the messages against
the SDK's own, so an SDK upgrade that changes them fails a test, not a call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from errors import Close, Reason
from settings import Settings

log = logging.getLogger(__name__)

INPUT_MIME_TYPE = "audio/pcm;rate=16000"
CONNECT_TIMEOUT = 10.0
GO_AWAY_MARGIN = 5.0  # reconnect at least this long before the announced drop
WEBSOCKET_OPTIONS = {
    # Gemini's pongs have been seen 8-30 s late: ping rarely, wait long before declaring it dead.
    "ping_interval": 30.0,
    "ping_timeout": 60.0,
    # Ending a session must not wait long on a peer whose unread audio hides its close frame.
    "close_timeout": 2.0,
    # PCM in base64 barely compresses: permessage-deflate would only cost CPU per message.
    "compression": None,
}
RESUMABLE_CODES = {1006, 1011}
# Exactly what `send_realtime_input(audio=Blob(...))` puts on the wire (google-genai 3.6.1: json.dumps
# of the converted model, URL-safe base64), built without a pydantic model, a dict conversion and a
# json.dumps per 20 ms frame; pinned by tests/test_gemini_wire.py.
_AUDIO_HEAD = '{"realtime_input": {"audio": {"data": "'
_AUDIO_TAIL = f'", "mime_type": "{INPUT_MIME_TYPE}"}}}}}}'


@dataclass(frozen=True, slots=True)
class Transcript:
    role: str  # "user" or "coach"
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class Interrupted:
    pass


@dataclass(frozen=True, slots=True)
class TurnComplete:
    pass


Event = bytes | Transcript | Interrupted | TurnComplete
INTERRUPTED = Interrupted()
TURN_COMPLETE = TurnComplete()


class UpstreamError(Exception):
    """The AI session failed or ended; `code` and `reason` are what the browser should be told."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class LiveConnector:
    """Opens Live sessions for one model with one configured client (shared by every session)."""

    def __init__(
        self,
        client: genai.Client,
        model: str,
        *,
        transcripts: bool = False,
        on_connect: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.transcripts = transcripts
        self.on_connect = on_connect  # told each connection's set-up time, in seconds

    @contextlib.asynccontextmanager
    async def session(self, system_instruction: str) -> AsyncIterator[LiveSession]:
        session = LiveSession(self, system_instruction)
        await session.open()
        try:
            yield session
        finally:
            await session.aclose()

    def config(self, system_instruction: str, handle: str | None) -> types.LiveConnectConfig:
        transcription = types.AudioTranscriptionConfig() if self.transcripts else None
        return types.LiveConnectConfig(
            response_modalities=[types.Modality.AUDIO],
            system_instruction=system_instruction,
            # A handle is only ever sent when the service gave one: never an empty string.
            session_resumption=types.SessionResumptionConfig(handle=handle or None),
            context_window_compression=types.ContextWindowCompressionConfig(
                sliding_window=types.SlidingWindow()
            ),
            input_audio_transcription=transcription,
            output_audio_transcription=transcription,
        )


class LiveSession:
    """One call's upstream: possibly several Live connections in a row, one at a time.

    `send_audio()` is called by the relay's reader, `events()` iterated by its writer; the two may run
    concurrently. `events()` owns reconnection.
    """

    def __init__(self, connector: LiveConnector, system_instruction: str) -> None:
        self._connector = connector
        self._system_instruction = system_instruction
        self._stack: contextlib.AsyncExitStack | None = None
        self._live: Any = None
        self._ready = asyncio.Event()
        self._closed = False
        self.handle: str | None = None
        self.reconnects = 0

    async def open(self) -> None:
        stack = contextlib.AsyncExitStack()
        started = time.monotonic()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                self._live = await stack.enter_async_context(
                    self._connector.client.aio.live.connect(
                        model=self._connector.model,
                        config=self._connector.config(self._system_instruction, self.handle),
                    )
                )
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, Exception):
                raise _upstream_error(exc, connecting=True) from exc
            raise
        if self._connector.on_connect is not None:
            self._connector.on_connect(time.monotonic() - started)
        self._stack = stack
        self._ready.set()

    async def aclose(self) -> None:
        self._closed = True
        self._ready.clear()
        stack, self._stack, self._live = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def send_audio(self, pcm: bytes) -> None:
        """Forward 16 kHz s16le PCM; during a reconnection, waits for the new connection."""
        while True:
            if not self._ready.is_set():  # only during a reconnection: no timeout object per frame
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await self._ready.wait()
                except TimeoutError:
                    raise UpstreamError(Close.INTERNAL_ERROR, Reason.UPSTREAM_FAILED) from None
            live = self._live
            try:
                # The session's websocket (google.genai.live.AsyncSession._ws, a websockets
                # ClientConnection): the SDK has no public way to send pre-built JSON.
                await live._ws.send(realtime_audio_message(pcm))
                return
            except ConnectionClosed as exc:
                if self._closed:
                    raise UpstreamError(Close.INTERNAL_ERROR, Reason.UPSTREAM_ENDED) from exc
                if live is self._live and self._ready.is_set():
                    # Not being replaced yet: let events() see the drop and decide; retry then.
                    self._ready.clear()

    async def events(self) -> AsyncIterator[Event]:
        """Model audio and events, across turns and reconnections, until the upstream ends."""
        go_away_deadline: float | None = None
        in_turn = False
        unexpected_retry_used = False
        while True:
            messages = self._messages(self._live)
            try:
                while True:
                    if go_away_deadline is not None and not in_turn:
                        break  # a turn boundary after goAway: switch connections now
                    if go_away_deadline is None:  # the usual case: no timeout object per message
                        message = await anext(messages)
                    else:
                        async with asyncio.timeout_at(go_away_deadline):
                            message = await anext(messages)
                    unexpected_retry_used = False
                    update = message.get("sessionResumptionUpdate")
                    if update and update.get("resumable") and update.get("newHandle"):
                        self.handle = update["newHandle"]
                    go_away = message.get("goAway")
                    if go_away is not None:
                        go_away_deadline = _go_away_deadline(go_away.get("timeLeft"))
                    content = message.get("serverContent")
                    if content is None:
                        continue
                    for event in _content_events(content):
                        if isinstance(event, bytes):
                            in_turn = True
                        elif event is TURN_COMPLETE or event is INTERRUPTED:
                            in_turn = False
                        yield event
            except TimeoutError:
                pass  # the goAway deadline is near: reconnect even mid-turn
            except UpstreamError as exc:
                resumable = exc.code in RESUMABLE_CODES and self.handle and not self._closed
                if not resumable or unexpected_retry_used:
                    if exc.code in RESUMABLE_CODES:  # 1006 is never sent on a wire
                        raise UpstreamError(Close.INTERNAL_ERROR, exc.reason) from exc
                    raise
                unexpected_retry_used = True
                log.warning("upstream dropped (%s); resuming once", exc)
            finally:
                await messages.aclose()
            go_away_deadline, in_turn = None, False
            await self._reconnect()

    async def _reconnect(self) -> None:
        if not self.handle:
            raise UpstreamError(Close.SERVICE_RESTART, Reason.UPSTREAM_ENDED)
        self._ready.clear()
        stack, self._stack = self._stack, None
        if stack is not None:  # never resume while the old socket is still open
            with contextlib.suppress(Exception):
                await stack.aclose()
        await self.open()
        self.reconnects += 1
        log.info("upstream resumed (reconnect %d)", self.reconnects)

    @staticmethod
    async def _messages(live: Any) -> AsyncGenerator[dict[str, Any], None]:
        """Every server message as parsed JSON, read off the session's websocket.

        Not `receive()`: it builds and validates a pydantic `LiveServerMessage` for every message
        (the largest single cost of the relay), and stops at each turn's end. The session's
        websocket is `google.genai.live.AsyncSession._ws` (a websockets ClientConnection); closes
        map to the same `UpstreamError`s as the SDK's `APIError`s did.
        """
        ws = live._ws
        while True:
            try:
                raw = await ws.recv(decode=False)
            except Exception as exc:
                raise _upstream_error(exc, connecting=False) from exc
            try:
                message = json.loads(raw)
            except ValueError:
                log.debug("skipped an upstream message that is not JSON")
                continue
            if isinstance(message, dict):
                yield message


def realtime_audio_message(pcm: bytes) -> str:
    """The message `send_realtime_input(audio=Blob(pcm, INPUT_MIME_TYPE))` sends, built directly."""
    return _AUDIO_HEAD + base64.urlsafe_b64encode(pcm).decode("ascii") + _AUDIO_TAIL


def connector_from_settings(
    settings: Settings, on_connect: Callable[[float], None] | None = None
) -> LiveConnector | None:
    """None when no API key is configured: the voice socket then refuses with 1011."""
    if not settings.gemini_api_key:
        return None
    http_options = types.HttpOptions(
        api_version=settings.gemini_api_version,
        base_url=settings.gemini_base_url,
        async_client_args=dict(WEBSOCKET_OPTIONS),
    )
    client = genai.Client(api_key=settings.gemini_api_key, http_options=http_options)
    return LiveConnector(
        client, settings.gemini_model, transcripts=settings.transcripts, on_connect=on_connect
    )


def _content_events(content: dict[str, Any]) -> list[Event]:
    """The events of one `serverContent` (camelCase, as Gemini sends it), in the SDK's order."""
    events: list[Event] = []
    if content.get("interrupted"):
        events.append(INTERRUPTED)
    t = content.get("inputTranscription")
    if t and t.get("text"):
        events.append(Transcript("user", t["text"], bool(t.get("finished"))))
    turn = content.get("modelTurn")
    if turn:
        for part in turn.get("parts") or ():
            blob = part.get("inlineData")
            if blob and blob.get("data"):
                events.append(_b64decode(blob["data"]))
    t = content.get("outputTranscription")
    if t and t.get("text"):
        events.append(Transcript("coach", t["text"], bool(t.get("finished"))))
    if content.get("turnComplete"):
        events.append(TURN_COMPLETE)
    return events


def _b64decode(data: str) -> bytes:
    """Standard or URL-safe base64, padded or not (pydantic accepted both)."""
    if "-" in data or "_" in data:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    return base64.b64decode(data + "=" * (-len(data) % 4))


def _go_away_deadline(time_left: str | None) -> float:
    """When to switch connections, in event-loop time: `GO_AWAY_MARGIN` before the announced end."""
    seconds = 0.0
    if time_left:
        with contextlib.suppress(ValueError):
            seconds = float(time_left.rstrip("s"))
    return asyncio.get_running_loop().time() + max(0.0, seconds - GO_AWAY_MARGIN)


def _closed_error(code: int, *, connecting: bool = False) -> UpstreamError:
    """The upstream closed with `code` (1006: no close frame), in the browser's terms."""
    if code == 1000:
        return UpstreamError(Close.NORMAL, Reason.UPSTREAM_ENDED)
    if code in RESUMABLE_CODES and not connecting:
        return UpstreamError(code, Reason.UPSTREAM_FAILED)  # the caller may resume
    return UpstreamError(Close.INTERNAL_ERROR, Reason.UPSTREAM_FAILED)


def _upstream_error(exc: Exception, *, connecting: bool) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, genai_errors.APIError):  # the SDK's report of a close during connect()
        return _closed_error(exc.code if isinstance(exc.code, int) else 1011, connecting=connecting)
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        return _closed_error(code, connecting=connecting)
    if isinstance(exc, (InvalidStatus, InvalidHandshake, OSError, TimeoutError)):
        return UpstreamError(Close.BAD_GATEWAY, Reason.UPSTREAM_UNAVAILABLE)
    return UpstreamError(Close.INTERNAL_ERROR, Reason.UPSTREAM_FAILED)
