"""The voice socket `/voice/stream/{step_id}`: authenticate, check ownership, build context, relay, close.

The handshake accepts first and then closes with a code and a reason, so that browsers can read why.
The relay runs three coroutines in one task group, and the first to finish ends the session:

- reader: browser binary frames (16 kHz s16le PCM) → Gemini, byte-exact;
- pump: Gemini events → the outbox, never blocked by the browser, so upstream is always drained;
- writer: the outbox → browser binary frames (24 kHz s16le PCM), byte-exact and in order.

Backpressure policy: the outbox holds at most `MAX_PENDING_AUDIO_BYTES` (about 10 s of speech) for a
browser that reads slower than the model speaks. Whatever piles up while one send is in flight goes
out as one frame. Past the bound the session is closed 1008 "Client not reading audio": dropping
speech silently would corrupt the conversation, and stalling would stop Gemini's keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg
from starlette.endpoints import WebSocketEndpoint
from starlette.websockets import WebSocket, WebSocketDisconnect

from auth import InvalidToken, bearer_token, verify_token
from coach_context import context_from_row, system_instruction
from db import queries
from errors import Close, Reason
from gemini import LiveConnector, LiveSession, UpstreamError
from settings import Settings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
MAX_JOINED_BYTES = 65536  # a browser that does not read cannot receive a close frame either
INSTANCE = socket.gethostname()


class SessionEnd(Exception):
    """Raised by whichever relay coroutine finishes first; carries how the session ends."""

    def __init__(self, code: int, reason: str, *, client_gone: bool = False) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.client_gone = client_gone


@dataclass
class Counters:
    bytes_in: int = 0
    bytes_out: int = 0


class Outbox:
    """Frames waiting for the browser, bounded in bytes.

    Audio that piles up while a send is in flight leaves as one frame (at most `MAX_JOINED_BYTES`):
    fewer, larger frames when the browser is slow, and no added delay when it keeps up.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: deque[bytes | str] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    def put(self, frame: bytes | str) -> None:
        if self._bytes + len(frame) > self.max_bytes:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.CLIENT_TOO_SLOW)
        self._frames.append(frame)
        self._bytes += len(frame)
        self._ready.set()

    async def get(self) -> bytes | str:
        frames = self._frames
        while not frames:
            self._ready.clear()
            await self._ready.wait()
        first = frames.popleft()
        self._bytes -= len(first)
        if isinstance(first, str) or not frames or isinstance(frames[0], str):
            return first
        parts, size = [first], len(first)
        while frames and isinstance(frames[0], bytes) and size + len(frames[0]) <= MAX_JOINED_BYTES:
            frame = frames.popleft()
            parts.append(frame)  # type: ignore[arg-type]
            size += len(frame)
        self._bytes -= size - len(first)
        return b"".join(parts)


class VoiceStream(WebSocketEndpoint):
    encoding = None

    async def dispatch(self) -> None:
        # The whole session runs here, not in on_connect: the base class's receive loop would
        # otherwise compete with the relay's reader for messages.
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        await websocket.accept()
        settings: Settings = websocket.state.settings
        pool: asyncpg.Pool = websocket.state.pool
        try:
            row = await self._admit(websocket, settings, pool)
        except SessionEnd as refusal:
            log.info("voice handshake refused: %s (%d)", refusal.reason, refusal.code)
            await _close(websocket, refusal.code, refusal.reason)
            return
        connector: LiveConnector | None = websocket.state.coach_ai
        if connector is None:
            await _close(websocket, Close.INTERNAL_ERROR, Reason.AI_NOT_CONFIGURED)
            return
        await self._run_session(websocket, settings, pool, connector, row)

    async def _admit(self, websocket: WebSocket, settings: Settings, pool: asyncpg.Pool) -> Any:
        """The session context row, or `SessionEnd` with the refusal; one SQL round trip."""
        token = websocket.query_params.get("token") or bearer_token(websocket.headers)
        try:
            user_id = verify_token(settings, token or "")
        except InvalidToken:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.NOT_AUTHENTICATED) from None
        step_id = _uuid_or_none(websocket.path_params.get("step_id", ""))
        row = await queries.get_session_context(pool, user_id=user_id, step_id=step_id)
        if row is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.USER_NOT_FOUND)
        if row["step_id"] is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.STEP_NOT_FOUND)
        if row["impact_id"] is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.IMPACT_NOT_FOUND)
        return row

    async def _run_session(
        self,
        websocket: WebSocket,
        settings: Settings,
        pool: asyncpg.Pool,
        connector: LiveConnector,
        row: Any,
    ) -> None:
        started = time.monotonic()
        counters = Counters()
        end = SessionEnd(Close.INTERNAL_ERROR, Reason.UPSTREAM_FAILED)
        upstream: LiveSession | None = None
        session_id = await queries.open_voice_session(
            pool, user_id=row["user_id"], step_id=row["step_id"], instance=INSTANCE
        )
        try:
            instruction = system_instruction(context_from_row(row))
            async with connector.session(instruction) as upstream:
                end = await _relay(websocket, upstream, settings, counters)
        except UpstreamError as exc:
            end = SessionEnd(exc.code, exc.reason)
        except Exception:
            log.exception("voice session %s failed", session_id)
            end = SessionEnd(Close.INTERNAL_ERROR, "Internal error")
        finally:
            if not end.client_gone:
                await _close(websocket, end.code, end.reason)
            reconnects = upstream.reconnects if upstream is not None else 0
            # Shielded: a session cancelled by shutdown must still be finalised.
            await asyncio.shield(
                queries.finish_voice_session(
                    pool,
                    session_id=session_id,
                    close_code=end.code,
                    close_reason=end.reason,
                    bytes_in=counters.bytes_in,
                    bytes_out=counters.bytes_out,
                    upstream_reconnects=reconnects,
                )
            )
            log.info(
                "voice session %s ended: %d %s; %.1f s, %d bytes in, %d bytes out, %d reconnects",
                session_id,
                end.code,
                end.reason,
                time.monotonic() - started,
                counters.bytes_in,
                counters.bytes_out,
                reconnects,
            )


async def _relay(
    websocket: WebSocket, upstream: LiveSession, settings: Settings, counters: Counters
) -> SessionEnd:
    outbox = Outbox(settings.max_pending_audio_bytes)
    end: SessionEnd | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_read_client(websocket, upstream, settings, counters))
            tasks.create_task(_pump_upstream(upstream, outbox))
            tasks.create_task(_write_client(websocket, outbox, counters))
    except* SessionEnd as ended:
        first = ended.exceptions[0]
        assert isinstance(first, SessionEnd)
        end = first
    assert end is not None, "relay coroutines only end by raising SessionEnd"
    return end


async def _read_client(
    websocket: WebSocket, upstream: LiveSession, settings: Settings, counters: Counters
) -> None:
    receive = websocket.receive
    max_frame = settings.max_frame_bytes
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            raise SessionEnd(
                message.get("code") or Close.GOING_AWAY, "Client closed", client_gone=True
            )
        data = message.get("bytes")
        if data is None:
            raise SessionEnd(Close.UNSUPPORTED_DATA, Reason.TEXT_FRAME)
        if len(data) > max_frame:
            raise SessionEnd(Close.MESSAGE_TOO_BIG, Reason.FRAME_TOO_BIG)
        if len(data) % 2:
            raise SessionEnd(Close.INVALID_PAYLOAD, Reason.ODD_LENGTH)
        if data:
            await upstream.send_audio(data)
            counters.bytes_in += len(data)


async def _pump_upstream(upstream: LiveSession, outbox: Outbox) -> None:
    try:
        async for event in upstream.events():
            if isinstance(event, bytes):
                outbox.put(event)
    except UpstreamError as exc:
        raise SessionEnd(exc.code, exc.reason) from None
    raise SessionEnd(Close.NORMAL, Reason.UPSTREAM_ENDED)


async def _write_client(websocket: WebSocket, outbox: Outbox, counters: Counters) -> None:
    send = websocket.send
    while True:
        frame = await outbox.get()
        message = (
            {"type": "websocket.send", "bytes": frame}
            if isinstance(frame, bytes)
            else {"type": "websocket.send", "text": frame}
        )
        try:
            await send(message)
        except (WebSocketDisconnect, RuntimeError, OSError):
            raise SessionEnd(Close.GOING_AWAY, "Client closed", client_gone=True) from None
        counters.bytes_out += len(frame)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await websocket.close(code, reason)


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
