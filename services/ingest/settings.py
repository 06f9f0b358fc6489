"""Ingest's own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import EnvSettings, number, port_number, setting, whole


@dataclass(frozen=True)
class IngestSettings(EnvSettings):
    port: int = setting(50051, "INGEST_PORT", port_number)
    # A tenant's default token bucket; `tessera tenant set-limits` overrides it per tenant.
    rate_limit: float = setting(50_000.0, "INGEST_RATE_LIMIT", number(1, 1e9))
    rate_burst: float = setting(100_000.0, "INGEST_RATE_BURST", number(1, 1e9))
    # How many whole days a message id is remembered, so a retry or replay answers DUPLICATE;
    # `tessera tenant set-limits --dedupe-days` overrides it per tenant (1-90).
    dedupe_window_days: int = setting(7, "INGEST_DEDUPE_WINDOW_DAYS", whole(1, 90))
    # How long a replica trusts its in-memory copy of the suppression list (erased people's
    # identifiers) before asking PostgreSQL again: a suppression applies on every replica within
    # this time. 0 = ask on every batch. See services/ingest/suppression.py.
    suppression_cache_seconds: float = setting(2.0, "INGEST_SUPPRESSION_CACHE_SECONDS", number(0, 300))
