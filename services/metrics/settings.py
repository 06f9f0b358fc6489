"""Metrics' own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import EnvSettings, number, port_number, setting, whole


@dataclass(frozen=True)
class MetricsSettings(EnvSettings):
    port: int = setting(50054, "METRICS_PORT", port_number)
    # Consumers per process on each of the resolved and changes streams.
    consumers: int = setting(1, "METRICS_CONSUMERS", whole(1, 64))
    # How soon replicas see an UpdateMetricsSettings.
    settings_cache_seconds: float = setting(5.0, "METRICS_SETTINGS_CACHE_SECONDS", number(0, 3600))
    upkeep_seconds: float = setting(3600.0, "METRICS_UPKEEP_SECONDS", number(1, 86_400))
    # How often a WatchAlerts stream looks for new alerts.
    watch_poll_ms: int = setting(100, "METRICS_WATCH_POLL_MS", whole(10, 10_000))
