"""Typed settings from ``TESSERA_*`` variables, validated once at startup.

A bad value stops the process with a message that names the variable, instead of a
stack trace minutes later on the first request that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SERVICES: tuple[str, ...] = ("ingest", "identity", "profile", "metrics")
DEFAULT_PORTS: dict[str, int] = {"ingest": 50051, "identity": 50052, "profile": 50053, "metrics": 50054}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

T = TypeVar("T")


class SettingsError(ValueError):
    """One or more variables are missing or malformed; the message names each of them."""


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _postgres_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("postgresql", "postgresql+psycopg2", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    if parts.scheme == "postgres":
        parts = parts._replace(scheme="postgresql")
    return urlunsplit(parts)


def _redis_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw.strip()


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


def _prefix(raw: str) -> str:
    value = raw.strip()
    if not value or any(c in value for c in "{}: \t"):
        raise ValueError("must be non-empty without braces, colons or spaces")
    return value


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _optional_file(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    return path


SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "secret", "token", "sslpassword"})


def redact_url(url: str | None) -> str:
    """The URL without its passwords (userinfo or query), for logs and messages."""
    if not url:
        return "<unset>"
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        redacted = [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(redacted, safe="*/"))
    return urlunsplit(parts)


@dataclass(frozen=True)
class Settings:
    """Everything a Tessera process can be told through its environment."""

    database_url: str | None = field(default=None, metadata={"env": "DATABASE_URL", "parse": _postgres_url})
    redis_url: str | None = field(default=None, metadata={"env": "REDIS_URL", "parse": _redis_url})
    redis_prefix: str = field(default="tessera", metadata={"env": "REDIS_PREFIX", "parse": _prefix})
    data_dir: Path = field(default=Path(".tessera"), metadata={"env": "DATA_DIR", "parse": _path})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "parse": _log_level})
    bind_host: str = field(default="0.0.0.0", metadata={"env": "BIND_HOST", "parse": str.strip})  # noqa: S104
    ingest_port: int = field(default=50051, metadata={"env": "INGEST_PORT", "parse": _int(0, 65535)})
    identity_port: int = field(default=50052, metadata={"env": "IDENTITY_PORT", "parse": _int(0, 65535)})
    profile_port: int = field(default=50053, metadata={"env": "PROFILE_PORT", "parse": _int(0, 65535)})
    metrics_port: int = field(default=50054, metadata={"env": "METRICS_PORT", "parse": _int(0, 65535)})
    grpc_workers: int = field(default=32, metadata={"env": "GRPC_WORKERS", "parse": _int(1, 1024)})
    shutdown_grace_seconds: float = field(
        default=20.0, metadata={"env": "SHUTDOWN_GRACE_SECONDS", "parse": _float(0, 600)}
    )
    health_interval_seconds: float = field(
        default=1.0, metadata={"env": "HEALTH_INTERVAL_SECONDS", "parse": _float(0.05, 60)}
    )
    db_pool_size: int = field(default=10, metadata={"env": "DB_POOL_SIZE", "parse": _int(1, 500)})
    tls_cert_file: Path | None = field(default=None, metadata={"env": "TLS_CERT_FILE", "parse": _optional_file})
    tls_key_file: Path | None = field(default=None, metadata={"env": "TLS_KEY_FILE", "parse": _optional_file})
    # Ingest.
    ingest_rate_limit: float = field(default=50_000.0, metadata={"env": "INGEST_RATE_LIMIT", "parse": _float(1, 1e9)})
    ingest_rate_burst: float = field(default=100_000.0, metadata={"env": "INGEST_RATE_BURST", "parse": _float(1, 1e9)})
    stream_maxlen: int = field(default=1_000_000, metadata={"env": "STREAM_MAXLEN", "parse": _int(1000, 10**10)})
    relay_sweep_seconds: float = field(default=1.0, metadata={"env": "RELAY_SWEEP_SECONDS", "parse": _float(0.01, 300)})
    relay_grace_seconds: float = field(default=5.0, metadata={"env": "RELAY_GRACE_SECONDS", "parse": _float(0, 3600)})
    auth_cache_seconds: float = field(default=30.0, metadata={"env": "AUTH_CACHE_SECONDS", "parse": _float(0, 3600)})
    # Stream consumers (identity, profile, metrics).
    consumer_batch_size: int = field(default=250, metadata={"env": "CONSUMER_BATCH_SIZE", "parse": _int(1, 2000)})
    consumer_block_ms: int = field(default=1000, metadata={"env": "CONSUMER_BLOCK_MS", "parse": _int(1, 60_000)})
    consumer_claim_idle_ms: int = field(
        default=30_000, metadata={"env": "CONSUMER_CLAIM_IDLE_MS", "parse": _int(100, 3_600_000)}
    )
    consumer_max_attempts: int = field(default=5, metadata={"env": "CONSUMER_MAX_ATTEMPTS", "parse": _int(1, 100)})
    tenant_refresh_seconds: float = field(
        default=5.0, metadata={"env": "TENANT_REFRESH_SECONDS", "parse": _float(0.01, 3600)}
    )
    # Identity.
    identity_consumers: int = field(default=2, metadata={"env": "IDENTITY_CONSUMERS", "parse": _int(1, 64)})
    identity_rules_cache_seconds: float = field(
        default=5.0, metadata={"env": "IDENTITY_RULES_CACHE_SECONDS", "parse": _float(0, 3600)}
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``TESSERA_*`` variable, reporting all problems at once."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            name = "TESSERA_" + f.metadata["env"]
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                problems.append(f"{name} {exc}")
        if (values.get("tls_cert_file") is None) != (values.get("tls_key_file") is None):
            problems.append("TESSERA_TLS_CERT_FILE and TESSERA_TLS_KEY_FILE must be set together")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
        return cls(**values)

    def port_for(self, service: str) -> int:
        port: int = getattr(self, f"{service}_port")
        return port

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError(
                "TESSERA_DATABASE_URL is not set; `tessera up` starts an embedded PostgreSQL when it is unset"
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SettingsError("TESSERA_REDIS_URL is not set; `tessera up` starts an embedded Redis when it is unset")
        return self.redis_url

    def env_for(self, name: str) -> str:
        """The environment variable behind a field, for messages."""
        for f in fields(self):
            if f.name == name:
                return "TESSERA_" + str(f.metadata["env"])
        raise KeyError(name)
