"""Tenants and API keys. Keys are random, shown once, and stored only as a SHA-256 hash.

A key carries 256 bits of entropy, so a fast hash is the right choice (as for GitHub or
Stripe tokens): there is nothing for a slow password hash to protect against.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated, Violation

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
KEY_PREFIX = "tsk"
#: Service credentials: ``Bearer tss.<tenant_id>.<TESSERA_SERVICE_TOKEN>``, one service acting for a
#: tenant in work no client call carries. The tenant still comes from the credentials.
SERVICE_KEY_PREFIX = "tss."


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    ingest_rate_limit: float | None = None
    ingest_rate_burst: float | None = None
    # How many days a message id is remembered for dedupe; None: the ingest default.
    dedupe_window_days: int | None = None


_current: contextvars.ContextVar[Tenant] = contextvars.ContextVar("tessera_tenant")


def current_tenant() -> Tenant:
    """The tenant of the RPC being served; set by the interceptor from the credentials."""
    try:
        return _current.get()
    except LookupError:
        raise Unauthenticated("no tenant in this context") from None


def current_tenant_id() -> str | None:
    """The tenant of the RPC being served, or None outside one."""
    tenant = _current.get(None)
    return tenant.tenant_id if tenant else None


def set_current_tenant(tenant: Tenant) -> contextvars.Token[Tenant]:
    return _current.set(tenant)


def reset_current_tenant(token: contextvars.Token[Tenant]) -> None:
    _current.reset(token)


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def new_api_key() -> tuple[str, str]:
    """(key_id, full key). The key id is the public part, safe to show in listings and logs."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def validate_tenant_id(tenant_id: str) -> None:
    if not TENANT_ID_RE.match(tenant_id):
        raise InvalidArgument(
            "invalid tenant name",
            [Violation("name", "2-63 characters: lower-case letters, digits and '-', not starting with '-'")],
        )


def create_tenant(engine: Engine, tenant_id: str, display_name: str | None = None) -> str:
    """Create a tenant and its first API key; returns the key, which is never shown again."""
    validate_tenant_id(tenant_id)
    with engine.begin() as conn:
        inserted = conn.execute(
            sa.text(
                "INSERT INTO tenancy.tenants (tenant_id, display_name) VALUES (:t, :d) "
                "ON CONFLICT DO NOTHING RETURNING tenant_id"
            ),
            {"t": tenant_id, "d": display_name or tenant_id},
        ).scalar()
        if inserted is None:
            raise AlreadyExists(f"tenant {tenant_id!r} already exists")
        return _insert_key(conn, tenant_id, "initial key")


def create_api_key(engine: Engine, tenant_id: str, description: str = "") -> str:
    with engine.begin() as conn:
        found = conn.execute(sa.text("SELECT 1 FROM tenancy.tenants WHERE tenant_id = :t"), {"t": tenant_id}).scalar()
        if not found:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return _insert_key(conn, tenant_id, description)


def _insert_key(conn: sa.Connection, tenant_id: str, description: str) -> str:
    key_id, key = new_api_key()
    conn.execute(
        sa.text("INSERT INTO tenancy.api_keys (tenant_id, key_id, key_hash, description) VALUES (:t, :k, :h, :d)"),
        {"t": tenant_id, "k": key_id, "h": hash_key(key), "d": description},
    )
    return key


def revoke_api_key(engine: Engine, tenant_id: str, key_id: str) -> bool:
    with engine.begin() as conn:
        result = conn.execute(
            sa.text(
                "UPDATE tenancy.api_keys SET revoked_at = now() "
                "WHERE tenant_id = :t AND key_id = :k AND revoked_at IS NULL"
            ),
            {"t": tenant_id, "k": key_id},
        )
        return bool(result.rowcount)


def set_rate_limit(engine: Engine, tenant_id: str, rate: float | None, burst: float | None) -> None:
    """A tenant's own ingest rate (events/s) and burst; None goes back to the service default.
    Replicas pick it up when their credential cache expires (TESSERA_AUTH_CACHE_SECONDS)."""
    for field, value in (("rate", rate), ("burst", burst)):
        if value is not None and value <= 0:
            raise InvalidArgument(f"{field} must be positive", [Violation(field, "must be > 0")])
    with engine.begin() as conn:
        updated = conn.execute(
            sa.text("UPDATE tenancy.tenants SET ingest_rate_limit = :r, ingest_rate_burst = :b WHERE tenant_id = :t"),
            {"t": tenant_id, "r": rate, "b": burst},
        ).rowcount
    if not updated:
        raise NotFound(f"tenant {tenant_id!r} not found")


MAX_DEDUPE_WINDOW_DAYS = 90


def set_dedupe_window(engine: Engine, tenant_id: str, days: int | None) -> None:
    """A tenant's own dedupe window in days (1-90); None goes back to the service default.
    Replicas pick it up when their credential cache expires (TESSERA_AUTH_CACHE_SECONDS)."""
    if days is not None and not 1 <= days <= MAX_DEDUPE_WINDOW_DAYS:
        raise InvalidArgument(
            "dedupe window out of range", [Violation("dedupe_days", f"must be 1-{MAX_DEDUPE_WINDOW_DAYS} days")]
        )
    with engine.begin() as conn:
        updated = conn.execute(
            sa.text("UPDATE tenancy.tenants SET dedupe_window_days = :d WHERE tenant_id = :t"),
            {"t": tenant_id, "d": days},
        ).rowcount
    if not updated:
        raise NotFound(f"tenant {tenant_id!r} not found")


def longest_dedupe_window(engine: Engine) -> int | None:
    """The longest window any tenant asked for (their keys must be kept that long)."""
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT max(dedupe_window_days) FROM tenancy.tenants")).scalar()
    return int(found) if found is not None else None


def tenant_ids(engine: Engine) -> list[str]:
    """Every enabled tenant, for consumers that read each tenant's streams."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT tenant_id FROM tenancy.tenants WHERE NOT disabled")).scalars())


def list_tenants(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT t.tenant_id, t.display_name, t.created_at, t.disabled, t.ingest_rate_limit, "
                "t.ingest_rate_burst, t.dedupe_window_days, "
                "count(k.key_id) FILTER (WHERE k.revoked_at IS NULL) AS active_keys "
                "FROM tenancy.tenants t LEFT JOIN tenancy.api_keys k USING (tenant_id) "
                "GROUP BY t.tenant_id ORDER BY t.tenant_id"
            )
        ).mappings()
        return [dict(r) for r in rows]


def service_authorization(tenant_id: str, service_token: str) -> str:
    """The ``authorization`` metadata with which a service acts for ``tenant_id``."""
    return f"Bearer {SERVICE_KEY_PREFIX}{tenant_id}.{service_token}"


class Authenticator:
    """Resolves ``authorization: Bearer <key>`` to a tenant, caching lookups briefly.

    The cache bounds revocation latency to ``ttl`` seconds and spares PostgreSQL a
    query per RPC; unknown keys are cached for a shorter time so a typo is not sticky.
    Service credentials (:func:`service_authorization`) are accepted only when this deployment
    has a service token, and only for a tenant that exists and is enabled.
    """

    def __init__(
        self, engine: Engine, ttl: float = 30.0, negative_ttl: float = 2.0, service_token: str | None = None
    ) -> None:
        self.engine = engine
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.service_token = service_token
        self._cache: dict[bytes, tuple[float, Tenant | None]] = {}
        self._lock = threading.Lock()

    def cached(self, authorization: str | None) -> Tenant | None:
        """The tenant of a key the cache still vouches for, without any query; None otherwise
        (unknown, expired, malformed or refused: :meth:`authenticate` then decides)."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        with self._lock:
            hit = self._cache.get(hash_key(key.strip()))
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def authenticate(self, authorization: str | None) -> Tenant:
        if not authorization:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <api key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed credentials: expected 'authorization: Bearer <api key>'")
        digest = hash_key(key.strip())
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            tenant = hit[1]
        else:
            key = key.strip()
            tenant = self._service_lookup(key) if key.startswith(SERVICE_KEY_PREFIX) else self._lookup(digest)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + (self.ttl if tenant else self.negative_ttl), tenant)
        if tenant is None:
            raise Unauthenticated("invalid or revoked API key")
        return tenant

    def _service_lookup(self, key: str) -> Tenant | None:
        tenant_id, _, token = key.removeprefix(SERVICE_KEY_PREFIX).partition(".")
        if not self.service_token or not hmac.compare_digest(token.encode(), self.service_token.encode()):
            return None
        if not TENANT_ID_RE.match(tenant_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT tenant_id, ingest_rate_limit, ingest_rate_burst, dedupe_window_days "
                    "FROM tenancy.tenants WHERE tenant_id = :t AND NOT disabled"
                ),
                {"t": tenant_id},
            ).first()
        if row is None:
            return None
        return Tenant(row.tenant_id, row.ingest_rate_limit, row.ingest_rate_burst, row.dedupe_window_days)

    def _lookup(self, digest: bytes) -> Tenant | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT t.tenant_id, t.ingest_rate_limit, t.ingest_rate_burst, t.dedupe_window_days, k.key_hash "
                    "FROM tenancy.api_keys k JOIN tenancy.tenants t USING (tenant_id) "
                    "WHERE k.key_hash = :h AND k.revoked_at IS NULL AND NOT t.disabled"
                ),
                {"h": digest},
            ).first()
        if row is None or not hmac.compare_digest(bytes(row.key_hash), digest):
            return None
        return Tenant(row.tenant_id, row.ingest_rate_limit, row.ingest_rate_burst, row.dedupe_window_days)


V = TypeVar("V")


class PerTenantCache(Generic[V]):
    """One value per tenant (its settings), loaded by ``load`` and kept ``ttl`` seconds: how soon
    every replica follows a change another one made."""

    def __init__(self, load: Callable[[str], V], ttl: float = 5.0) -> None:
        self.load = load
        self.ttl = ttl
        self._cache: dict[str, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, tenant_id: str) -> V:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = self.load(tenant_id)
        with self._lock:
            self._cache[tenant_id] = (now + self.ttl, value)
        return value

    def forget(self, tenant_id: str) -> None:
        with self._lock:
            self._cache.pop(tenant_id, None)
