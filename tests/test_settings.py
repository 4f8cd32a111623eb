"""Settings read once from the environment; secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from logs import redact
from settings import _INTEGER_MINIMUMS, Settings, SettingsError

SECRET = "s" * 40


def test_defaults() -> None:
    s = Settings.from_env({"JWT_SECRET": SECRET})
    assert (s.access_token_ttl, s.gemini_api_version, s.max_frame_bytes, s.port) == (
        3600,
        "v1beta",
        65536,
        8000,
    )
    assert s.database_url is None and s.gemini_api_key is None


def test_jwt_secret_is_required_outside_dev_mode() -> None:
    with pytest.raises(SettingsError, match="JWT_SECRET is required"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="at least 32"):
        Settings.from_env({"JWT_SECRET": "short"})


def test_dev_mode_generates_a_secret_once_and_keeps_it(tmp_path: Path) -> None:
    env = {"COACH_DEV": "1", "DATA_DIR": str(tmp_path)}
    first, second = Settings.from_env(env), Settings.from_env(env)
    assert len(first.jwt_secret) >= 32 and first.jwt_secret == second.jwt_secret
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0


def test_malformed_numbers_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="ACCESS_TOKEN_TTL must be an integer"):
        Settings.from_env({"JWT_SECRET": SECRET, "ACCESS_TOKEN_TTL": "soon"})
    with pytest.raises(SettingsError, match="MAX_FRAME_BYTES must be at least 2"):
        Settings.from_env({"JWT_SECRET": SECRET, "MAX_FRAME_BYTES": "0"})


def test_secrets_stay_out_of_repr() -> None:
    s = Settings.from_env(
        {"JWT_SECRET": SECRET, "GEMINI_API_KEY": "key-123", "DATABASE_URL": "postgresql://u:pw@h/d"}
    )
    assert SECRET not in repr(s) and "key-123" not in repr(s) and "pw@" not in repr(s)


def test_allowed_origins_are_a_clean_list() -> None:
    s = Settings.from_env(
        {"JWT_SECRET": SECRET, "ALLOWED_ORIGINS": "https://a.example/, http://b:3000"}
    )
    assert s.allowed_origins == ("https://a.example", "http://b:3000")


def test_redaction_of_tokens_in_log_text() -> None:
    line = "GET /voice/stream/x?token=eyJhbGciOi.eyJzdWIi.sig&ticket=abc Authorization: Bearer eyJx.y.z"
    cleaned = redact(line)
    assert "eyJhbGciOi" not in cleaned and "abc" not in cleaned and "eyJx" not in cleaned


def test_env_example_lists_every_setting() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', (root / "settings.py").read_text()))
    read |= {name.upper() for name in _INTEGER_MINIMUMS}
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (root / ".env.example").read_text(), re.M))
    assert read - {"INFO"} <= listed, read - listed  # "INFO" is a default value
