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
    # Re-estimate every probabilistic tenant's match weights from its records this often (seconds;
    # 0, the default, is off), on the leader only. It only PROPOSES: `tessera identity estimate
    # TENANT --apply` makes a proposal active.
    estimate_interval_seconds: float = setting(0.0, "IDENTITY_ESTIMATE_INTERVAL", number(0, 366 * 86400))
