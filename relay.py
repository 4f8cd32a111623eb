"""The data path of one voice session: browser ⇄ Gemini, until one side ends.

Five coroutines run as tasks owned by `relay()`; the first to finish raises `SessionEnd` and the
others are cancelled and awaited:

- reader: browser binary frames (16 kHz s16le PCM) → the inbox; checks every frame;
- forwarder: the inbox → Gemini, byte-exact; what piled up during a send leaves as one message;
- pump: Gemini events → the outbox, never blocked by the browser, so upstream is always drained;
- writer: the outbox → browser binary frames (24 kHz s16le PCM), byte-exact and in order;
- watchdog: the session time limit, the idle limit (no audio from the browser), and draining.

Backpressure policy: the outbox holds at most `MAX_PENDING_AUDIO_BYTES` (about 10 s of speech) for a
browser that reads slower than the model speaks. Audio that piles up while one send is in flight leaves
as one frame. Past the bound the session is closed 1008 "Client not reading audio": dropping speech
silently would corrupt the conversation, and stalling would stop Gemini's keepalive.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from errors import Close, Reason
from gemini import INTERRUPTED, TURN_COMPLETE, LiveSession, Transcript, UpstreamError

MAX_JOINED_BYTES = 65536
INTERRUPTED_EVENT = json.dumps({"type": "interrupted"})
TURN_COMPLETE_EVENT = json.dumps({"type": "turn_complete"})


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
    heard_at: float = 0.0  # event-loop time of the last frame from the browser


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int
    max_pending_bytes: int
    max_session_seconds: float
    idle_seconds: float


class _FrameQueue:
    """Frames in order, counted in bytes; `_take()` joins the audio that piled up behind the first.

    Joining at most `MAX_JOINED_BYTES` means fewer, larger messages exactly when the other side is
    slower, and no added delay when it keeps up. Text frames (events) are never joined.
    """

    def __init__(self) -> None:
        self._frames: deque[bytes | str] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    def _append(self, frame: bytes | str) -> None:
        self._frames.append(frame)
        self._bytes += len(frame)
        self._ready.set()

    async def _take(self) -> bytes | str:
        frames = self._frames  # a drop_audio() while waiting mutates this same deque
        while not frames:
            self._ready.clear()
            await self._ready.wait()
        first = frames.popleft()
        if isinstance(first, bytes) and frames and isinstance(frames[0], bytes):
            parts, size = [first], len(first)
            while (
                frames
                and isinstance(frames[0], bytes)
                and size + len(frames[0]) <= MAX_JOINED_BYTES
            ):
                frame = frames.popleft()
                assert isinstance(frame, bytes)
                parts.append(frame)
                size += len(frame)
            first = b"".join(parts)
        self._bytes -= len(first)
        return first


class Outbox(_FrameQueue):
    """Frames waiting for the browser, bounded in bytes: past the bound the session ends."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def put(self, frame: bytes | str) -> None:
        if self._bytes + len(frame) > self.max_bytes:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.CLIENT_TOO_SLOW)
        self._append(frame)

    def drop_audio(self) -> None:
        """Barge-in: audio not yet sent is stale; events stay, in order."""
        events = [f for f in self._frames if isinstance(f, str)]
        self._frames.clear()  # in place: a waiting get() holds this deque
        self._frames.extend(events)
        self._bytes = sum(len(f) for f in events)

    async def get(self) -> bytes | str:
        return await self._take()


class Inbox(_FrameQueue):
    """Browser audio on its way to Gemini: what arrives while a send is in flight leaves with the next.

    The forwarder sends whatever is here the moment it is free, so nothing waits when the relay keeps
    up; when the loop is busy, frames that piled up go as one realtime_input, which is what makes the
    per-message cost fall as the load rises. Bounded: past `max_bytes` the reader stops reading the
    browser until the forwarder catches up, as it did when it awaited each send itself.
    """

    def __init__(self, max_bytes: int = 2 * MAX_JOINED_BYTES) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, data: bytes) -> None:
        self._append(data)
        if self._bytes >= self.max_bytes:
            self._room.clear()
            await self._room.wait()

    async def get(self) -> bytes:
        data = await self._take()
        assert isinstance(data, bytes)
        if self._bytes < self.max_bytes:
            self._room.set()
        return data


async def relay(
    receive: Callable[[], Any],
    send: Callable[[dict[str, Any]], Any],
    upstream: LiveSession,
    limits: Limits,
    counters: Counters,
    stopping: asyncio.Event,
    *,
    on_event: Callable[[Any], None] | None = None,
    events: bool = False,
) -> SessionEnd:
    """Relay until one side ends; returns how the session ended. `receive`/`send` are ASGI's.

    `events`: also send JSON text frames (barge-in, turns, transcripts) — the opt-in subprotocol.
    `on_event`: called with every non-audio upstream event (transcripts are stored from it).
    """
    outbox = Outbox(limits.max_pending_bytes)
    inbox = Inbox()
    tasks = [
        asyncio.create_task(_read_client(receive, inbox, limits.max_frame_bytes, counters)),
        asyncio.create_task(_forward_upstream(inbox, upstream, counters)),
        asyncio.create_task(_pump_upstream(upstream, outbox, events, on_event)),
        asyncio.create_task(_write_client(send, outbox, counters)),
        asyncio.create_task(_watchdog(limits, counters, stopping)),
    ]
    # Not a TaskGroup: in early 3.11 releases (seen with 3.11.2, not 3.11.7) a TaskGroup whose child
    # fails while the parent waits in __aexit__ can leave a cancellation pending on the parent, which
    # then breaks the session's clean-up. Here the five tasks are owned the same way: the first to
    # finish ends them all, and none outlives this function.
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    endings = [task.exception() for task in done]
    for ending in endings:
        if isinstance(ending, SessionEnd):
            return ending
    raise next((e for e in endings if e is not None), AssertionError("relay tasks end by raising"))


async def _read_client(
    receive: Callable[[], Any], inbox: Inbox, max_frame: int, counters: Counters
) -> None:
    clock = asyncio.get_running_loop().time
    while True:
        message = await receive()
        data = message.get("bytes")
        if data is None:
            if message["type"] == "websocket.disconnect":
                code = message.get("code") or Close.GOING_AWAY
                raise SessionEnd(code, "Client closed", client_gone=True)
            raise SessionEnd(Close.UNSUPPORTED_DATA, Reason.TEXT_FRAME)
        size = len(data)
        if size > max_frame:
            raise SessionEnd(Close.MESSAGE_TOO_BIG, Reason.FRAME_TOO_BIG)
        if size % 2:
            raise SessionEnd(Close.INVALID_PAYLOAD, Reason.ODD_LENGTH)
        counters.heard_at = clock()
        if size:
            await inbox.put(data)


async def _forward_upstream(inbox: Inbox, upstream: LiveSession, counters: Counters) -> None:
    while True:
        data = await inbox.get()
        await upstream.send_audio(data)
        counters.bytes_in += len(data)


async def _pump_upstream(
    upstream: LiveSession,
    outbox: Outbox,
    events: bool,
    on_event: Callable[[Any], None] | None,
) -> None:
    try:
        async for event in upstream.events():
            if isinstance(event, bytes):
                outbox.put(event)
                continue
            if on_event is not None:
                on_event(event)
            if event is INTERRUPTED:
                outbox.drop_audio()  # the browser must not hear the rest of an interrupted turn
            if events:
                outbox.put(_event_frame(event))
    except UpstreamError as exc:
        raise SessionEnd(exc.code, exc.reason) from None
    raise SessionEnd(Close.NORMAL, Reason.UPSTREAM_ENDED)


def _event_frame(event: Any) -> str:
    if event is INTERRUPTED:
        return INTERRUPTED_EVENT
    if event is TURN_COMPLETE:
        return TURN_COMPLETE_EVENT
    assert isinstance(event, Transcript)
    return json.dumps(
        {"type": "transcript", "role": event.role, "text": event.text, "final": event.final}
    )


async def _write_client(
    send: Callable[[dict[str, Any]], Any], outbox: Outbox, counters: Counters
) -> None:
    while True:
        frame = await outbox.get()
        if isinstance(frame, bytes):
            message = {"type": "websocket.send", "bytes": frame}
        else:
            message = {"type": "websocket.send", "text": frame}
        try:
            await send(message)
        except (RuntimeError, OSError):
            raise SessionEnd(Close.GOING_AWAY, "Client closed", client_gone=True) from None
        if isinstance(frame, bytes):
            counters.bytes_out += len(frame)


async def _watchdog(limits: Limits, counters: Counters, stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.max_session_seconds
    counters.heard_at = max(counters.heard_at, loop.time())
    while True:
        try:
            async with asyncio.timeout_at(min(deadline, counters.heard_at + limits.idle_seconds)):
                await stopping.wait()
            raise SessionEnd(Close.SERVICE_RESTART, Reason.SERVER_RESTARTING)
        except TimeoutError:
            pass
        now = loop.time()
        if now >= deadline:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.SESSION_TIME_LIMIT)
        if now >= counters.heard_at + limits.idle_seconds:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.IDLE)
