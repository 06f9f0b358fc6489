"""Settings.from_env: defaults, one clear message per bad variable, and URLs that never print passwords."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.core.settings import Settings, SettingsError, redact_url
from services.identity.settings import IdentitySettings
from services.ingest.settings import IngestSettings


def test_defaults_when_nothing_is_set() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.database_url is None and s.redis_url is None
    assert s.redis_prefix == "tessera"
    assert s.log_level == "INFO"
    assert (IngestSettings.from_env({}).port, IdentitySettings.from_env({}).port) == (50051, 50052)
    assert s.tls_cert_file is None and s.tls_key_file is None


def test_values_are_parsed_and_typed() -> None:
    s = Settings.from_env(
        {
            "TESSERA_LOG_LEVEL": "debug",
            "TESSERA_SHUTDOWN_GRACE_SECONDS": "2.5",
            "TESSERA_REDIS_URL": "rediss://cache.example:6380/2",
            "TESSERA_REDIS_PREFIX": "acme",
            "UNRELATED": "ignored",
        }
    )
    assert IngestSettings.from_env({"TESSERA_INGEST_PORT": " 6000 "}).port == 6000
    assert s.log_level == "DEBUG"
    assert s.shutdown_grace_seconds == 2.5
    assert s.redis_url == "rediss://cache.example:6380/2"
    assert s.redis_prefix == "acme"


def test_blank_values_count_as_unset() -> None:
    assert Settings.from_env({"TESSERA_DB_POOL_SIZE": "  ", "TESSERA_LOG_LEVEL": ""}) == Settings()
    assert IngestSettings.from_env({"TESSERA_INGEST_PORT": "  "}) == IngestSettings()


def test_shared_settings_ignore_a_service_s_variables() -> None:
    """A service's own variables are checked by that service's settings, not by every process."""
    assert Settings.from_env({"TESSERA_INGEST_PORT": "70000"}) == Settings()
    with pytest.raises(SettingsError, match="TESSERA_INGEST_PORT"):
        IngestSettings.from_env({"TESSERA_INGEST_PORT": "70000"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TESSERA_GRPC_WORKERS", "0"),
        ("TESSERA_SHUTDOWN_GRACE_SECONDS", "soon"),
        ("TESSERA_HEALTH_INTERVAL_SECONDS", "nan"),
        ("TESSERA_LOG_LEVEL", "LOUD"),
        ("TESSERA_DATABASE_URL", "mysql://db.example/tessera"),
        ("TESSERA_DATABASE_URL", "db.example:5432"),
        ("TESSERA_REDIS_URL", "http://cache.example:6379"),
        ("TESSERA_REDIS_URL", "localhost:6379"),
        ("TESSERA_REDIS_PREFIX", "{tessera}"),
        ("TESSERA_REDIS_PREFIX", "a:b"),
        ("TESSERA_REDIS_PREFIX", "a b"),
        ("TESSERA_TLS_KEY_FILE", "/nonexistent/tessera/key.pem"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    # The message names exactly that variable, and no other is blamed.
    assert set(re.findall(r"TESSERA_[A-Z_]+", str(info.value))) == {variable}


@pytest.mark.parametrize(
    ("settings", "variable", "value"),
    [
        (IngestSettings, "TESSERA_INGEST_PORT", "http"),
        (IngestSettings, "TESSERA_INGEST_PORT", "70000"),
        (IngestSettings, "TESSERA_INGEST_RATE_LIMIT", "0"),
        (IdentitySettings, "TESSERA_IDENTITY_PORT", "-1"),
        (IdentitySettings, "TESSERA_IDENTITY_CONSUMERS", "0"),
        (IdentitySettings, "TESSERA_IDENTITY_RULES_CACHE_SECONDS", "forever"),
    ],
)
def test_a_bad_service_value_names_its_variable(settings: type[IngestSettings], variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings.from_env({variable: value})
    assert set(re.findall(r"TESSERA_[A-Z_]+", str(info.value))) == {variable}


def test_port_out_of_range_says_the_range() -> None:
    with pytest.raises(SettingsError, match=r"TESSERA_INGEST_PORT must be between 0 and 65535, got 70000"):
        IngestSettings.from_env({"TESSERA_INGEST_PORT": "70000"})


def test_non_numeric_port_quotes_the_value() -> None:
    with pytest.raises(SettingsError, match=r"TESSERA_INGEST_PORT must be a whole number, got 'http'"):
        IngestSettings.from_env({"TESSERA_INGEST_PORT": "http"})


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not really a cert")
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TESSERA_TLS_CERT_FILE": str(cert)})
    assert "TESSERA_TLS_CERT_FILE" in str(info.value)
    assert "TESSERA_TLS_KEY_FILE" in str(info.value)


def test_tls_cert_and_key_together_are_accepted(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    s = Settings.from_env({"TESSERA_TLS_CERT_FILE": str(cert), "TESSERA_TLS_KEY_FILE": str(key)})
    assert (s.tls_cert_file, s.tls_key_file) == (cert, key)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "TESSERA_GRPC_WORKERS": "0",
                "TESSERA_LOG_LEVEL": "chatty",
                "TESSERA_DATABASE_URL": "sqlite:///x.db",
                "TESSERA_REDIS_PREFIX": "{x}",
                "TESSERA_DB_POOL_SIZE": "3",  # fine, must not be blamed
            }
        )
    message = str(info.value)
    for variable in ("TESSERA_GRPC_WORKERS", "TESSERA_LOG_LEVEL", "TESSERA_DATABASE_URL", "TESSERA_REDIS_PREFIX"):
        assert variable in message
    assert "TESSERA_DB_POOL_SIZE" not in message


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u@db.example:5432/tessera", "postgresql://u@db.example:5432/tessera"),
        ("postgresql://u@db.example/tessera", "postgresql://u@db.example/tessera"),
        ("postgresql+psycopg2://u@db/t", "postgresql+psycopg2://u@db/t"),
        ("  postgres://db/t  ", "postgresql://db/t"),
    ],
)
def test_database_url_scheme_is_normalised(raw: str, expected: str) -> None:
    assert Settings.from_env({"TESSERA_DATABASE_URL": raw}).database_url == expected


def test_invalid_database_url_message_does_not_echo_the_password() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TESSERA_DATABASE_URL": "mysql://admin:hunter2@db.example/tessera"})
    assert "TESSERA_DATABASE_URL" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_require_urls_name_the_variable() -> None:
    s = Settings()
    with pytest.raises(SettingsError, match="TESSERA_DATABASE_URL"):
        s.require_database_url()
    with pytest.raises(SettingsError, match="TESSERA_REDIS_URL"):
        s.require_redis_url()
    assert s.env_for("redis_prefix") == "TESSERA_REDIS_PREFIX"
    assert IngestSettings().env_for("port") == "TESSERA_INGEST_PORT"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://tessera:hunter2@db.example:5432/tessera", "postgresql://tessera:***@db.example:5432/tessera"),
        ("redis://:hunter2@cache.example:6379/0", "redis://:***@cache.example:6379/0"),
        ("postgresql://tessera:hun%40ter2@db.example/t", "postgresql://tessera:***@db.example/t"),
        ("postgresql://tessera:hun@ter2@db.example/t", "postgresql://tessera:***@db.example/t"),
        ("postgresql://tessera@db.example/t", "postgresql://tessera@db.example/t"),
        ("redis://cache.example:6379/0", "redis://cache.example:6379/0"),
    ],
)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    out = redact_url(url)
    assert out == expected
    assert "hunter2" not in out and "hun%40ter2" not in out and "ter2" not in out


def test_redact_url_of_nothing() -> None:
    assert redact_url(None) == "<unset>"
    assert redact_url("") == "<unset>"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://db.example/tessera?user=tessera&password=hunter2",
        "postgresql://db.example/tessera?sslmode=require&PASSWORD=hunter2",
        "redis://cache.example:6379/0?password=hunter2",
        "postgresql://tessera:hunter2@db.example/tessera?password=hunter2&sslmode=require",
    ],
)
def test_redact_url_hides_a_password_in_the_query_string(url: str) -> None:
    out = redact_url(url)
    assert "hunter2" not in out
    assert "db.example" in out or "cache.example" in out
    if "sslmode" in url:
        assert "sslmode=require" in out  # other parameters are kept
