"""The voice socket `/voice/stream/{step_id}`: origin → auth → ownership → context → relay → close.

The handshake accepts first and then closes with a code and a reason, so that browsers can read why
(a foreign Origin is the exception: refused with HTTP 403 before any socket exists). Credentials are a
single-use `?ticket=`, a `?token=` or an `Authorization: Bearer` token. Steps 2–4 of the handshake are
one SQL round trip; the per-user session limit is a second, in a transaction under a per-user lock.
No pooled connection is held while audio flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from starlette.endpoints import WebSocketEndpoint
from starlette.websockets import WebSocket

from auth import InvalidToken, bearer_token, verify_token
from coach_context import context_from_row, system_instruction
from db import queries
from errors import Close, Reason
from gemini import LiveConnector, LiveSession, UpstreamError
from lifecycle import Lifecycle
from metrics import Metrics
from relay import Counters, Limits, SessionEnd, relay
from settings import Settings
from tickets import InvalidTicket, spend_ticket
from transcripts import TranscriptLog

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # a browser that does not read cannot receive a close frame either
EVENTS_SUBPROTOCOL = "coach.events.v1"
INSTANCE = socket.gethostname()


class VoiceStream(WebSocketEndpoint):
    encoding = None

    async def dispatch(self) -> None:
        # The whole session runs here, not in on_connect: the base class's receive loop would
        # otherwise compete with the relay's reader for messages.
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        state = websocket.state
        settings: Settings = state.settings
        metrics: Metrics = state.metrics
        if not _origin_allowed(websocket, settings):
            metrics.rejections.labels("Origin not allowed").inc()
            await websocket.close(Close.POLICY_VIOLATION)  # before accept: HTTP 403
            return
        events = EVENTS_SUBPROTOCOL in websocket.scope.get("subprotocols", ())
        await websocket.accept(subprotocol=EVENTS_SUBPROTOCOL if events else None)
        try:
            row = await self._admit(websocket, settings, state.pool, state.lifecycle)
            connector: LiveConnector | None = state.coach_ai
            if connector is None:
                raise SessionEnd(Close.INTERNAL_ERROR, Reason.AI_NOT_CONFIGURED)
            session_id = await _open_session_row(state.pool, settings, row)
        except SessionEnd as refusal:
            log.info("voice handshake refused: %s (%d)", refusal.reason, refusal.code)
            metrics.rejections.labels(refusal.reason).inc()
            await _close(websocket, refusal.code, refusal.reason)
            return
        except Exception:  # e.g. the database went away mid-handshake
            log.exception("voice handshake failed")
            metrics.rejections.labels(Reason.INTERNAL).inc()
            await _close(websocket, Close.INTERNAL_ERROR, Reason.INTERNAL)
            return
        # The relay talks raw ASGI: Starlette's per-message state checks are not needed there.
        await _run_session(websocket, self.receive, self.send, connector, row, session_id, events)

    async def _admit(
        self, websocket: WebSocket, settings: Settings, pool: asyncpg.Pool, lifecycle: Lifecycle
    ) -> Any:
        """The session context row, or `SessionEnd` with the refusal."""
        if lifecycle.draining:
            raise SessionEnd(Close.SERVICE_RESTART, Reason.SERVER_RESTARTING)
        raw_step_id = websocket.path_params.get("step_id", "")
        user_id = await _caller(websocket, settings, pool, raw_step_id)
        row = await queries.get_session_context(
            pool, user_id=user_id, step_id=_uuid_or_none(raw_step_id)
        )
        if row is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.USER_NOT_FOUND)
        if row["step_id"] is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.STEP_NOT_FOUND)
        if row["impact_id"] is None:
            raise SessionEnd(Close.POLICY_VIOLATION, Reason.IMPACT_NOT_FOUND)
        return row


async def _caller(
    websocket: WebSocket, settings: Settings, pool: asyncpg.Pool, raw_step_id: str
) -> uuid.UUID:
    ticket = websocket.query_params.get("ticket")
    try:
        if ticket:
            return await spend_ticket(pool, settings, ticket, raw_step_id)
        token = websocket.query_params.get("token") or bearer_token(websocket.headers)
        return verify_token(settings, token or "")
    except (InvalidTicket, InvalidToken):
        raise SessionEnd(Close.POLICY_VIOLATION, Reason.NOT_AUTHENTICATED) from None


async def _open_session_row(pool: asyncpg.Pool, settings: Settings, row: Any) -> uuid.UUID:
    async with pool.acquire() as conn, conn.transaction():
        await queries.lock_user_sessions(conn, user_id=row["user_id"])
        session_id = await queries.open_voice_session(
            conn,
            user_id=row["user_id"],
            step_id=row["step_id"],
            instance=INSTANCE,
            max_sessions=settings.max_sessions_per_user,
            max_session_seconds=settings.max_session_seconds,
        )
    if session_id is None:
        raise SessionEnd(Close.TRY_AGAIN_LATER, Reason.TOO_MANY_SESSIONS)
    return session_id


async def _run_session(
    websocket: WebSocket,
    receive: Any,
    send: Any,
    connector: LiveConnector,
    row: Any,
    session_id: uuid.UUID,
    events: bool,
) -> None:
    state = websocket.state
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    lifecycle: Lifecycle = state.lifecycle
    limits = Limits(
        max_frame_bytes=settings.max_frame_bytes,
        max_pending_bytes=settings.max_pending_audio_bytes,
        max_session_seconds=settings.max_session_seconds,
        idle_seconds=settings.idle_seconds,
    )
    started = time.monotonic()
    counters = Counters()
    end = SessionEnd(Close.INTERNAL_ERROR, Reason.INTERNAL)
    upstream: LiveSession | None = None
    lifecycle.session_started()
    try:
        if events:
            await websocket.send_json({"type": "session", "id": str(session_id)})
        instruction = system_instruction(context_from_row(row))
        async with (
            TranscriptLog(state.pool, session_id) as transcript,
            connector.session(instruction) as upstream,
        ):
            end = await relay(
                receive,
                send,
                upstream,
                limits,
                counters,
                lifecycle.stopping,
                events=events,
                on_event=transcript.observe,
            )
    except UpstreamError as exc:
        end = SessionEnd(exc.code, exc.reason)
    except Exception:
        log.exception("voice session %s failed", session_id)
    finally:
        if not end.client_gone:
            if events:
                with contextlib.suppress(Exception):
                    await websocket.send_json(
                        {"type": "error", "code": end.code, "reason": end.reason}
                    )
            await _close(websocket, end.code, end.reason)
        reconnects = upstream.reconnects if upstream is not None else 0
        # Shielded: a session cancelled by shutdown must still be finalised.
        await asyncio.shield(
            queries.finish_voice_session(
                state.pool,
                session_id=session_id,
                close_code=end.code,
                close_reason=end.reason,
                bytes_in=counters.bytes_in,
                bytes_out=counters.bytes_out,
                upstream_reconnects=reconnects,
            )
        )
        metrics.sessions_ended.labels(str(end.code)).inc()
        metrics.audio_bytes.labels("in").inc(counters.bytes_in)
        metrics.audio_bytes.labels("out").inc(counters.bytes_out)
        metrics.upstream_reconnects.inc(reconnects)
        lifecycle.session_ended()
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


def _origin_allowed(websocket: WebSocket, settings: Settings) -> bool:
    """No Origin (curl, scripts), the service's own origin, or one of `ALLOWED_ORIGINS`."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in settings.allowed_origins:
        return True
    return urlsplit(origin).netloc.lower() == websocket.headers.get("host", "").lower()


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await websocket.close(code, reason)


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
