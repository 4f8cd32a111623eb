"""Logging set-up for the entry points: one format, and secrets redacted from every record.

The voice socket's query string carries a token (or a ticket), and access logs print request lines, so
redaction is a filter on every handler rather than a promise each call site has to keep.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

_SECRET_PARAM = re.compile(r"(?i)\b(token|ticket|access_token|password)=([^&\s\"']+)")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    text = _SECRET_PARAM.sub(r"\1=[redacted]", text)
    text = _BEARER.sub(r"\1 [redacted]", text)
    return _JWT.sub("[redacted-jwt]", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class RedactingFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Idempotent: configures the root logger once, with redaction. Hypercorn's records reach it
    through `hypercorn.toml`'s `logconfig_dict`, which removes Hypercorn's own handlers."""
    root = logging.getLogger()
    if any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
