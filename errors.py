"""The service's error vocabulary, in one place: HTTP API errors and WebSocket close codes."""

from __future__ import annotations

from enum import IntEnum


class APIError(Exception):
    """An error answered as `{"error": message}` with `status` (mapped once, in `app.py`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Close(IntEnum):
    """WebSocket close codes (RFC 6455 §7.4.1) the voice socket uses, named after what they mean."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # a text frame on the audio-only protocol
    INVALID_PAYLOAD = 1007  # PCM of odd length
    POLICY_VIOLATION = 1008  # authentication and ownership refusals
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014  # the AI service failed or refused us


class Reason:
    """Close reasons, short enough for a close frame (≤ 123 bytes) and meant to be shown to people."""

    NOT_AUTHENTICATED = "Not authenticated"
    USER_NOT_FOUND = "User not found"
    STEP_NOT_FOUND = "Step not found"
    IMPACT_NOT_FOUND = "Impact not found"
    AI_NOT_CONFIGURED = "Server configuration error for AI client"
    TEXT_FRAME = "Text frames are not accepted; send binary PCM"
    FRAME_TOO_BIG = "Audio frame too large"
    ODD_LENGTH = "Audio frame must hold whole 16-bit samples"
    CLIENT_TOO_SLOW = "Client not reading audio"
    UPSTREAM_FAILED = "AI service error"
    UPSTREAM_UNAVAILABLE = "AI service unavailable"
    UPSTREAM_ENDED = "AI session ended"
    SERVER_RESTARTING = "Server restarting"
    SESSION_TIME_LIMIT = "Session time limit reached"
    IDLE = "No audio received; closing idle session"
    TOO_MANY_SESSIONS = "Too many sessions for this user"
    INTERNAL = "Internal error"
