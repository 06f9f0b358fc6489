"""The gateway's own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from services.core.settings import EnvSettings, number, port_number, service_address, setting


def origins(raw: str) -> tuple[str, ...]:
    """Comma-separated exact origins (``scheme://host[:port]``, nothing after it): the only pages
    whose scripts may read the JSON API cross-origin. Empty: none may."""
    out: list[str] = []
    for item in raw.split(","):
        origin = item.strip()
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or origin != f"{parts.scheme}://{parts.netloc}":
            raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port] with no path or trailing slash")
        if "*" in origin or "@" in parts.netloc:
            raise ValueError(f"{origin!r}: wildcards and credentials are not allowed in an origin")
        out.append(origin.lower())
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class GatewaySettings(EnvSettings):
    port: int = setting(8080, "GATEWAY_PORT", port_number)
    # Where ingest answers (Kubernetes: its Service name).
    ingest_address: str = setting("localhost:50051", "GATEWAY_INGEST_ADDRESS", service_address)
    # How long one call to ingest may take before the SDK is told to retry (503).
    ingest_deadline_seconds: float = setting(10.0, "GATEWAY_INGEST_DEADLINE_SECONDS", number(0.1, 120))
    # ProfileService (the JSON API's context, profile, timeline and profile stream).
    profile_address: str = setting("localhost:50053", "GATEWAY_PROFILE_ADDRESS", service_address)
    # MetricsService and QualityService (scores, series, evaluations, alerts, the alert stream).
    metrics_address: str = setting("localhost:50054", "GATEWAY_METRICS_ADDRESS", service_address)
    # Exact origins allowed to call the JSON API from a browser (CORS); empty: same origin only.
    cors_origins: tuple[str, ...] = setting((), "GATEWAY_CORS_ORIGINS", origins)
    # The deadline of each gRPC read call of the JSON API (past it: 503).
    read_deadline_seconds: float = setting(5.0, "GATEWAY_READ_DEADLINE_SECONDS", number(0.1, 60))
