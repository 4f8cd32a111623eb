"""The process's life: the live voice sessions, and draining them when the process is asked to stop.

Draining (SIGTERM): readiness turns 503 at once so the load balancer stops sending new callers; new
voice sockets are refused 1012; live sessions get `DRAIN_SECONDS` to end on their own and are then
told to close 1012 "Server restarting"; the caller waits until every session has finalised its row.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

FINALISE_TIMEOUT = 10.0  # for sessions told to stop to close their sockets and rows


class Lifecycle:
    def __init__(self, drain_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.draining = False
        self.stopping = asyncio.Event()  # set when live sessions must close now
        self._sessions = 0
        self._none_left = asyncio.Event()
        self._none_left.set()

    @property
    def active_sessions(self) -> int:
        return self._sessions

    def session_started(self) -> None:
        self._sessions += 1
        self._none_left.clear()

    def session_ended(self) -> None:
        self._sessions -= 1
        if self._sessions == 0:
            self._none_left.set()

    async def drain(self) -> None:
        """Refuse new sessions, let live ones finish within `drain_seconds`, then stop the rest."""
        self.draining = True
        started = time.monotonic()
        log.info(
            "draining: %d live voice sessions, up to %.0f s", self._sessions, self.drain_seconds
        )
        try:
            async with asyncio.timeout(self.drain_seconds):
                await self._none_left.wait()
        except TimeoutError:
            log.info("drain time is up: closing %d voice sessions", self._sessions)
        self.stopping.set()
        try:
            async with asyncio.timeout(FINALISE_TIMEOUT):
                await self._none_left.wait()
        except TimeoutError:
            log.warning("%d voice sessions did not finish closing", self._sessions)
        log.info("drained in %.1f s", time.monotonic() - started)
