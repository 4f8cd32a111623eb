"""Conversations kept per step: transcripts written off the relay's hot path, and read back by owners.

`TranscriptLog` turns the stream of transcription fragments into utterances (a role's fragments up to
a turn boundary or a change of speaker) and writes them in batches from its own flusher task, so the
relay only appends to a list. On exit it writes whatever is left, however the session ended.
`GET /steps/{step_id}/conversations` returns the caller's sessions on a step, newest first, paginated.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse

from auth import require_user
from db import queries
from errors import APIError
from gemini import INTERRUPTED, TURN_COMPLETE, Transcript

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
FLUSH_LINES = 20
DEFAULT_PAGE, MAX_PAGE = 10, 50


class TranscriptLog:
    """`async with TranscriptLog(pool, session_id) as log:` then `log.observe(event)` per event."""

    def __init__(self, pool: asyncpg.Pool, session_id: uuid.UUID) -> None:
        self._pool = pool
        self._session_id = session_id
        self._role: str | None = None
        self._parts: list[str] = []
        self._started: dt.datetime | None = None
        self._pending: list[tuple[Any, ...]] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TranscriptLog:
        self._flusher = asyncio.create_task(self._flush_periodically())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._flusher is not None
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        self._end_utterance()
        # Shielded: a session cancelled at shutdown still keeps what was said.
        await asyncio.shield(self._flush())

    def observe(self, event: Any) -> None:
        """Called by the relay for every non-audio event; never waits."""
        if isinstance(event, Transcript):
            if event.role != self._role:
                self._end_utterance()
                self._role, self._started = event.role, dt.datetime.now(dt.UTC)
            self._parts.append(event.text)
        elif event is TURN_COMPLETE or event is INTERRUPTED:
            self._end_utterance()

    def _end_utterance(self) -> None:
        text = "".join(self._parts).strip()
        if text and self._role is not None:
            self._seq += 1
            self._pending.append((self._session_id, self._seq, self._role, text, self._started))
            if len(self._pending) >= FLUSH_LINES:
                self._wake.set()
        self._role, self._parts, self._started = None, [], None

    async def _flush_periodically(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            await queries.insert_transcript_lines(self._pool, lines)
        except (OSError, asyncpg.PostgresError):
            log.exception(
                "could not store %d transcript lines; keeping them for the next try", len(lines)
            )
            self._pending[:0] = lines


async def list_conversations(request: Request) -> JSONResponse:
    user = await require_user(request)
    pool = request.state.pool
    try:
        step_id = uuid.UUID(request.path_params["step_id"])
    except ValueError:
        raise APIError(404, "Step not found") from None
    if not await queries.step_belongs_to(pool, step_id=step_id, user_id=user["id"]):
        raise APIError(404, "Step not found")
    page_size = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    before = _time_param(request, "before")
    rows = [
        row
        async for row in queries.list_conversations(
            pool, user_id=user["id"], step_id=step_id, before=before, page_size=page_size
        )
    ]
    conversations = [
        {
            "id": str(r["id"]),
            "started_at": r["started_at"].isoformat(),
            "ended_at": r["ended_at"].isoformat() if r["ended_at"] else None,
            "close_code": r["close_code"],
            "close_reason": r["close_reason"],
            "transcript": r["transcript"],
        }
        for r in rows
    ]
    more = len(rows) == page_size
    return JSONResponse(
        {
            "conversations": conversations,
            "next_before": rows[-1]["started_at"].isoformat() if more else None,
        }
    )


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise APIError(422, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _time_param(request: Request, name: str) -> dt.datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise APIError(422, f"{name} must be an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
