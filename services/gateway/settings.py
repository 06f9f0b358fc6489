"""The gateway's own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import EnvSettings, number, port_number, service_address, setting


@dataclass(frozen=True)
class GatewaySettings(EnvSettings):
    port: int = setting(8080, "GATEWAY_PORT", port_number)
    # Where ingest answers (Kubernetes: its Service name).
    ingest_address: str = setting("localhost:50051", "GATEWAY_INGEST_ADDRESS", service_address)
    # How long one call to ingest may take before the SDK is told to retry (503).
    ingest_deadline_seconds: float = setting(10.0, "GATEWAY_INGEST_DEADLINE_SECONDS", number(0.1, 120))
