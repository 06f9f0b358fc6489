"""The ``profile`` consumer groups: resolved events build profiles; identity's changes merge,
split and erase them.

A batch is grouped by tenant; each tenant's part is one transaction that records every event in
the timeline with its effects, so a redelivered event has no second effect. After the commit the
touched profiles' cache versions move on (also for redeliveries, so a crash between commit and
invalidation is repaired by the redelivery), then the batch is acknowledged.
"""

from __future__ import annotations

from opentelemetry import metrics

from services.core import streams
from services.core.bus import Delivery
from services.core.tenancy import PerTenantCache
from services.profile.cache import ContextCache
from services.profile.events import ProfileEvent, parse
from services.profile.storage import ProfileStore
from services.profile.tenant_settings import ProfileConfig
from tessera.v1 import stream_pb2

RESOLVED_GROUP = "profile"
CHANGES_GROUP = "profile"

_meter = metrics.get_meter("tessera.profile")
_applied = _meter.create_counter("tessera.profile.events", description="resolved events by outcome")
_changes = _meter.create_counter("tessera.profile.changes", description="identity changes applied, by kind")


class ConfigCache(PerTenantCache[ProfileConfig]):
    """Each tenant's profile settings, re-read after ``ttl`` seconds (how soon replicas see an
    UpdateProfileSettings)."""

    def __init__(self, store: ProfileStore, ttl: float = 5.0) -> None:
        super().__init__(store.config, ttl)
        self.store = store


class ResolvedHandler:
    def __init__(self, store: ProfileStore, configs: ConfigCache, cache: ContextCache) -> None:
        self.store = store
        self.configs = configs
        self.cache = cache

    def __call__(self, batch: list[Delivery[stream_pb2.ResolvedEventEnvelope]]) -> None:
        by_tenant: dict[str, list[ProfileEvent]] = {}
        for msg in batch:
            event = parse(msg.envelope)
            if event is not None:
                by_tenant.setdefault(msg.tenant_id, []).append(event)
        for tenant_id, events in by_tenant.items():
            out = self.store.apply_events(tenant_id, events, self.configs.get(tenant_id))
            self.cache.invalidate(tenant_id, out.touched)
            for outcome, n in (
                ("applied", out.applied),
                ("redelivered", out.redelivered),
                ("suppressed", out.suppressed),
                ("erased", out.dropped),
            ):
                if n:
                    _applied.add(n, {"outcome": outcome})


class ChangesHandler:
    def __init__(self, store: ProfileStore, configs: ConfigCache, cache: ContextCache) -> None:
        self.store = store
        self.configs = configs
        self.cache = cache

    def __call__(self, batch: list[Delivery[stream_pb2.ProfileChangeEnvelope]]) -> None:
        for msg in batch:
            c = msg.envelope.change
            tenant = msg.tenant_id
            forget = False
            if c.kind == streams.CREATED:
                out = self.store.apply_created(tenant, c.profile_id)
            elif c.kind == streams.MERGED:
                out = self.store.apply_merge(
                    tenant, c.profile_id, c.absorbed_profile_id, streams.change_key(c), self.configs.get(tenant)
                )
            elif c.kind == streams.SPLIT:
                out = self.store.apply_split(
                    tenant,
                    c.profile_id,
                    c.new_profile_id,
                    list(c.moved_event_ids),
                    [(i.type, i.value) for i in c.moved_identifiers],
                    streams.change_key(c),
                    self.configs.get(tenant),
                )
            elif c.kind == streams.ERASED:
                out = self.store.apply_erased(tenant, sorted({c.profile_id, *c.erased_profile_ids}))
                forget = True
            else:
                continue
            self.cache.invalidate(tenant, out.touched, out.moved_identifiers, forget=forget)
            _changes.add(
                1, {"kind": stream_pb2.ProfileChangeKind.Name(c.kind).removeprefix("PROFILE_CHANGE_KIND_").lower()}
            )


__all__ = [
    "CHANGES_GROUP",
    "RESOLVED_GROUP",
    "ChangesHandler",
    "ConfigCache",
    "ResolvedHandler",
]
