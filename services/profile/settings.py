"""Profile's own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import EnvSettings, number, optional_service_address, port_number, setting, whole


@dataclass(frozen=True)
class ProfileSettings(EnvSettings):
    port: int = setting(50053, "PROFILE_PORT", port_number)
    # Consumers per process on each of the resolved and changes streams.
    consumers: int = setting(2, "PROFILE_CONSUMERS", whole(1, 64))
    # Where the other services answer (Kubernetes: their Service names).
    identity_address: str = setting("localhost:50052", "PROFILE_IDENTITY_ADDRESS", optional_service_address)
    ingest_address: str = setting("localhost:50051", "PROFILE_INGEST_ADDRESS", optional_service_address)
    # 'none': no metrics service; contexts say the scores are missing, and why.
    metrics_address: str = setting("localhost:50054", "PROFILE_METRICS_ADDRESS", optional_service_address)
    # How long a context waits for the scores before it returns without them.
    metrics_deadline_ms: int = setting(150, "PROFILE_METRICS_DEADLINE_MS", whole(10, 10_000))
    # A cached context lives at most this long (time-based parts: contact counts, windows, scores).
    context_cache_seconds: float = setting(60.0, "PROFILE_CONTEXT_CACHE_SECONDS", number(1, 86_400))
    # When the scores were missing, the context is cached only this long, so they return soon.
    degraded_cache_seconds: float = setting(5.0, "PROFILE_DEGRADED_CACHE_SECONDS", number(1, 3600))
    owner_cache_seconds: float = setting(600.0, "PROFILE_OWNER_CACHE_SECONDS", number(1, 86_400))
    # How long identity's normalization rules are used before they are asked for again (and
    # kept, when identity does not answer).
    rules_cache_seconds: float = setting(30.0, "PROFILE_RULES_CACHE_SECONDS", number(0, 3600))
    # The change feed keeps this long; a WatchProfiles cursor older than that must resync.
    feed_retention_hours: float = setting(72.0, "PROFILE_FEED_RETENTION_HOURS", number(1, 24 * 90))
    watch_poll_ms: int = setting(200, "PROFILE_WATCH_POLL_MS", whole(10, 10_000))
    # An erasure waits this long after ingest's suppression before it relies on it (at least
    # TESSERA_INGEST_SUPPRESSION_CACHE_SECONDS plus a margin for batches already past the check).
    erasure_settle_seconds: float = setting(5.0, "PROFILE_ERASURE_SETTLE_SECONDS", number(0, 3600))
    # How often the erasure worker looks for work, and partition/feed upkeep runs.
    erasure_poll_seconds: float = setting(1.0, "PROFILE_ERASURE_POLL_SECONDS", number(0.05, 600))
    # How long a worker holds an erasure request while it runs one step. A worker that dies inside
    # a step (kill -9, OOM) holds it that long after its death: then the restarted or another
    # replica takes it up. Keep it above the longest step (its calls time out after 30 s).
    erasure_lease_seconds: float = setting(120.0, "PROFILE_ERASURE_LEASE_SECONDS", number(1, 3600))
    upkeep_seconds: float = setting(300.0, "PROFILE_UPKEEP_SECONDS", number(1, 86_400))
