"""Identity's own settings (the shared ones are :class:`services.core.settings.Settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.settings import EnvSettings, number, port_number, setting, whole


@dataclass(frozen=True)
class IdentitySettings(EnvSettings):
    port: int = setting(50052, "IDENTITY_PORT", port_number)
    # Consumers per process: while one waits on PostgreSQL, another runs its Python. The
    # working-set locks make them as safe together as separate replicas.
    consumers: int = setting(2, "IDENTITY_CONSUMERS", whole(1, 64))
    # How soon every replica sees an UpdateIdentityRules.
    rules_cache_seconds: float = setting(5.0, "IDENTITY_RULES_CACHE_SECONDS", number(0, 3600))
