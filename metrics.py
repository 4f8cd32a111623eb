"""Prometheus metrics of the voice relay, in a registry owned by one app (tests run several apps)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Read from the lifecycle's count when scraped (`set_function`), not kept twice.
        self.active_sessions = Gauge(
            "coach_voice_sessions_active", "Voice sessions relaying now", registry=self.registry
        )
        self.sessions_ended = Counter(
            "coach_voice_sessions_ended",
            "Voice sessions ended, by the close code given to the browser",
            ["code"],
            registry=self.registry,
        )
        self.audio_bytes = Counter(
            "coach_voice_audio_bytes",
            "PCM bytes relayed: in = browser to model, out = model to browser",
            ["direction"],
            registry=self.registry,
        )
        self.upstream_connect_seconds = Histogram(
            "coach_upstream_connect_seconds",
            "Time to open a Gemini Live connection",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.upstream_reconnects = Counter(
            "coach_upstream_reconnects", "Gemini Live resumptions mid-call", registry=self.registry
        )
        self.rejections = Counter(
            "coach_voice_rejections",
            "Voice sockets refused before relaying, by reason",
            ["reason"],
            registry=self.registry,
        )

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
