"""Settings: one frozen object read once from the environment (and `.env` when present).

Every variable is listed in `.env.example`. Secrets are kept out of `repr()` so that logging the
settings, or a traceback that shows them, never prints a key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from dotenv import dotenv_values

PROJECT_DIR = Path(__file__).resolve().parent


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None = field(default=None, repr=False)
    jwt_secret: str = field(default="", repr=False)
    access_token_ttl: int = 3600
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_model: str = "gemini-3.8-live"
    gemini_base_url: str | None = None
    gemini_api_version: str = "v1beta"
    allowed_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = PROJECT_DIR / ".data"
    dev_mode: bool = False
    max_frame_bytes: int = 65536
    # Model audio waiting for a slow browser, in bytes (about 10 s of 24 kHz speech by default).
    max_pending_audio_bytes: int = 480_000
    max_sessions_per_user: int = 3
    max_session_seconds: int = 1800
    idle_seconds: int = 60
    drain_seconds: int = 20
    login_window_seconds: int = 300
    login_attempts_per_email: int = 10
    login_attempts_per_address: int = 50
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    transcripts: bool = True
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dev_default: bool = False
    ) -> Settings:
        """`dev_default`: dev mode unless COACH_DEV says otherwise (the admin CLI on a dev box)."""
        env = _merged_env(environ)
        dev_mode = _flag(env, "COACH_DEV") if "COACH_DEV" in env else dev_default
        data_dir = Path(env.get("DATA_DIR") or PROJECT_DIR / ".data").resolve()
        jwt_secret = env.get("JWT_SECRET", "")
        if not jwt_secret:
            if not dev_mode:
                raise SettingsError("JWT_SECRET is required (set COACH_DEV=1 for a generated one)")
            jwt_secret = _dev_secret(data_dir)
        elif len(jwt_secret) < 32:
            raise SettingsError("JWT_SECRET must be at least 32 characters")
        integers = {
            name: _int(env, name.upper(), getattr(cls, name), minimum=minimum)
            for name, minimum in _INTEGER_MINIMUMS.items()
        }
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            jwt_secret=jwt_secret,
            gemini_api_key=env.get("GEMINI_API_KEY") or None,
            gemini_model=env.get("GEMINI_MODEL") or cls.gemini_model,
            gemini_base_url=env.get("GEMINI_BASE_URL") or None,
            gemini_api_version=env.get("GEMINI_API_VERSION") or cls.gemini_api_version,
            allowed_origins=tuple(
                o.strip().rstrip("/")
                for o in env.get("ALLOWED_ORIGINS", "").split(",")
                if o.strip()
            ),
            host=env.get("HOST") or cls.host,
            data_dir=data_dir,
            dev_mode=dev_mode,
            trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
            transcripts=_flag(env, "TRANSCRIPTS") if "TRANSCRIPTS" in env else True,
            log_level=(env.get("LOG_LEVEL") or cls.log_level).upper(),
            log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
            **integers,
        )


# Integer settings, read from the upper-cased field name, with the smallest value that makes sense.
_INTEGER_MINIMUMS = {
    "access_token_ttl": 1,
    "port": 0,
    "max_frame_bytes": 2,
    "max_pending_audio_bytes": 4800,
    "max_sessions_per_user": 1,
    "max_session_seconds": 1,
    "idle_seconds": 1,
    "drain_seconds": 0,
    "login_window_seconds": 1,
    "login_attempts_per_email": 1,
    "login_attempts_per_address": 1,
}


def _merged_env(environ: Mapping[str, str] | None) -> dict[str, str]:
    """The process environment wins over `.env`, as with every twelve-factor tool."""
    if environ is not None:
        return dict(environ)
    dotenv_path = PROJECT_DIR / ".env"
    from_file = dotenv_values(dotenv_path) if dotenv_path.is_file() else {}
    return {**{k: v for k, v in from_file.items() if v is not None}, **os.environ}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    try:
        return tuple(
            ip_network(part.strip(), strict=False)
            for part in env.get(name, "").split(",")
            if part.strip()
        )
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}")
    return value


def _dev_secret(data_dir: Path) -> str:
    """A signing key generated once and kept in `.data/`, so dev tokens survive restarts."""
    path = data_dir / "jwt_secret"
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its key
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret
