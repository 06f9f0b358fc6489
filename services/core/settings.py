"""Typed settings from ``TESSERA_*`` variables, validated once at startup.

A bad value stops the process with a message that names the variable, instead of a
stack trace minutes later on the first request that needs it. :class:`EnvSettings` is the
machinery; :class:`Settings` holds what every process shares. A service's own settings
(its port, its tuning) are an ``EnvSettings`` of their own, next to that service.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def flag(raw: str) -> bool:
    """A parser for a true/false switch (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    return _flag(raw)


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


LEADER_BACKENDS = ("auto", "kubernetes", "postgres")


def _leader_backend(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LEADER_BACKENDS:
        raise ValueError(f"must be one of {', '.join(LEADER_BACKENDS)}, got {raw!r}")
    return value


def _prefix(raw: str) -> str:
    value = raw.strip()
    if not value or any(c in value for c in "{}: \t"):
        raise ValueError("must be non-empty without braces, colons or spaces")
    return value


def port_number(raw: str) -> int:
    return _int(0, 65535)(raw)


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """A parser for a whole number in ``[lo, hi]``."""
    return _int(lo, hi)


def number(lo: float, hi: float) -> Callable[[str], float]:
    """A parser for a number in ``[lo, hi]``."""
    return _float(lo, hi)


def setting(default: Any, env: str, parse: Callable[[str], Any], *, secret: bool = False) -> Any:
    """A settings field read from ``TESSERA_<env>`` with ``parse`` (which raises ValueError).
    A ``secret`` one is left out of the settings' repr, so logging the settings never shows it."""
    return field(default=default, metadata={"env": env, "parse": parse}, repr=not secret)


MIN_SERVICE_TOKEN_LENGTH = 32


def _service_token(raw: str) -> str:
    value = raw.strip()
    if len(value) < MIN_SERVICE_TOKEN_LENGTH or not value.isascii() or any(c.isspace() for c in value):
        raise ValueError(f"must be at least {MIN_SERVICE_TOKEN_LENGTH} printable ASCII characters without spaces")
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


S = TypeVar("S", bound="EnvSettings")


@dataclass(frozen=True)
class EnvSettings:
    """Fields declared with :func:`setting`, read from the environment all at once."""

    @classmethod
    def from_env(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
        """Read and validate every ``TESSERA_*`` variable of this class, reporting all problems at once."""
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
        problems += cls.cross_check(values)
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
        return cls(**values)

    @classmethod
    def cross_check(cls, values: Mapping[str, Any]) -> list[str]:
        """Problems between fields (each parsed alone was fine); none by default."""
        return []

    def with_overrides(self: S, **changes: Any) -> S:
        return replace(self, **changes)

    def env_for(self, name: str) -> str:
        """The environment variable behind a field, for messages."""
        for f in fields(self):
            if f.name == name:
                return "TESSERA_" + str(f.metadata["env"])
        raise KeyError(name)


@dataclass(frozen=True)
class Settings(EnvSettings):
    """What every Tessera process can be told through its environment."""

    database_url: str | None = setting(None, "DATABASE_URL", _postgres_url)
    redis_url: str | None = setting(None, "REDIS_URL", _redis_url)
    redis_prefix: str = setting("tessera", "REDIS_PREFIX", _prefix)
    # The Redis URL names one node of a Redis Cluster (the client discovers the rest); every key
    # carries a {tenant} hash tag, so one tenant's keys share a slot.
    redis_cluster: bool = setting(False, "REDIS_CLUSTER", _flag)
    # Stream entries are published only once this many replicas of their Redis node have them
    # (WAIT), so a failover cannot lose what the outbox let go of; 0 trusts the master alone.
    redis_wait_replicas: int = setting(0, "REDIS_WAIT_REPLICAS", _int(0, 5))
    data_dir: Path = setting(Path(".tessera"), "DATA_DIR", _path)
    log_level: str = setting("INFO", "LOG_LEVEL", _log_level)
    bind_host: str = setting("0.0.0.0", "BIND_HOST", str.strip)  # noqa: S104
    # Threads for plain (blocking) handlers; streams wait on the event loop and hold none.
    grpc_workers: int = setting(32, "GRPC_WORKERS", _int(1, 1024))
    # Concurrent calls per HTTP/2 connection (more wait for a free one on that connection).
    grpc_max_streams_per_connection: int = setting(100, "GRPC_MAX_STREAMS_PER_CONNECTION", _int(1, 10_000))
    # Open streaming calls one tenant may hold per process, and all unauthenticated ones
    # (reflection, health Watch) together; beyond, RESOURCE_EXHAUSTED. Health Check is never
    # refused. A stream that sends nothing for this long is ended (UNAVAILABLE: open a new one).
    max_streams_per_tenant: int = setting(200, "MAX_STREAMS_PER_TENANT", _int(1, 100_000))
    max_public_streams: int = setting(500, "MAX_PUBLIC_STREAMS", _int(1, 100_000))
    stream_idle_seconds: float = setting(300.0, "STREAM_IDLE_SECONDS", _float(1, 86_400))
    shutdown_grace_seconds: float = setting(20.0, "SHUTDOWN_GRACE_SECONDS", _float(0, 600))
    health_interval_seconds: float = setting(1.0, "HEALTH_INTERVAL_SECONDS", _float(0.05, 60))
    db_pool_size: int = setting(10, "DB_POOL_SIZE", _int(1, 500))
    tls_cert_file: Path | None = setting(None, "TLS_CERT_FILE", _optional_file)
    tls_key_file: Path | None = setting(None, "TLS_KEY_FILE", _optional_file)
    # How long a checked API key is trusted without a query: a revoked key stops working within
    # this time, for new calls and for open streams alike.
    auth_cache_seconds: float = setting(10.0, "AUTH_CACHE_SECONDS", _float(0, 3600))
    # Shared by the services of one deployment so one can act for a tenant in work no client
    # call carries (an erasure resumed after a restart); unset: no service credentials accepted.
    service_token: str | None = setting(None, "SERVICE_TOKEN", _service_token, secret=True)
    # Streams and the outbox that feeds them.
    stream_maxlen: int = setting(1_000_000, "STREAM_MAXLEN", _int(1000, 10**10))
    outbox_sweep_seconds: float = setting(1.0, "OUTBOX_SWEEP_SECONDS", _float(0.01, 300))
    outbox_grace_seconds: float = setting(5.0, "OUTBOX_GRACE_SECONDS", _float(0, 3600))
    # Stream consumers (identity, profile, metrics).
    consumer_batch_size: int = setting(250, "CONSUMER_BATCH_SIZE", _int(1, 2000))
    consumer_block_ms: int = setting(1000, "CONSUMER_BLOCK_MS", _int(1, 60_000))
    consumer_claim_idle_ms: int = setting(30_000, "CONSUMER_CLAIM_IDLE_MS", _int(100, 3_600_000))
    consumer_max_attempts: int = setting(5, "CONSUMER_MAX_ATTEMPTS", _int(1, 100))
    tenant_refresh_seconds: float = setting(5.0, "TENANT_REFRESH_SECONDS", _float(0.01, 3600))
    # How often the leader runs ANALYZE on its service's tables that changed by a tenth since
    # (services/core/db.py StaleStatistics); 0 leaves it to autovacuum.
    analyze_seconds: float = setting(10.0, "ANALYZE_SECONDS", _float(0, 86_400))
    # Telemetry beyond the OTEL_* variables: a Prometheus scrape endpoint on this port (0: none).
    prometheus_port: int = setting(0, "PROMETHEUS_PORT", _int(0, 65535))
    # Singleton work (partitions, retention, FCR windows, pending erasures) runs on one leader:
    # a Kubernetes Lease when KUBERNETES_SERVICE_HOST is set, else a PostgreSQL advisory lock.
    # A leader that cannot renew within the lease stops its singleton work; another takes over.
    leader_lease_seconds: float = setting(15.0, "LEADER_LEASE_SECONDS", _float(1, 600))
    leader_renew_seconds: float = setting(5.0, "LEADER_RENEW_SECONDS", _float(0.1, 300))
    # ``auto``: the Lease inside Kubernetes, the advisory lock elsewhere. ``postgres`` inside a
    # cluster too (no RBAC for Leases, or a CI runner that is itself a pod); ``kubernetes`` forces it.
    leader_backend: str = setting("auto", "LEADER_BACKEND", _leader_backend)

    @classmethod
    def cross_check(cls, values: Mapping[str, Any]) -> list[str]:
        problems = []
        if (values.get("tls_cert_file") is None) != (values.get("tls_key_file") is None):
            problems.append("TESSERA_TLS_CERT_FILE and TESSERA_TLS_KEY_FILE must be set together")
        if values.get("leader_renew_seconds", 5.0) >= values.get("leader_lease_seconds", 15.0):
            problems.append("TESSERA_LEADER_RENEW_SECONDS must be shorter than TESSERA_LEADER_LEASE_SECONDS")
        return problems

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


def service_address(raw: str) -> str:
    """Where another service answers: host:port (a Kubernetes Service name and port)."""
    value = raw.strip()
    if ":" not in value or any(c.isspace() for c in value):
        raise ValueError("must be host:port")
    return value


def optional_service_address(raw: str) -> str:
    """host:port, or 'none' (empty) for a service that is not deployed."""
    return "" if raw.strip().lower() == "none" else service_address(raw)
