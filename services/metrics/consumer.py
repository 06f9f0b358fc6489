"""The ``metrics`` consumer groups: resolved events become facts; identity's changes move them
between customers (merge, split) or forget them (erasure).

A batch is grouped by tenant; each tenant's part is one transaction that writes the facts,
derives the touched customers again and adds the difference to the rollups, so a redelivered
event has no second effect and the batch is acknowledged only after that commit.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import metrics

from services.core import streams
from services.core.bus import Delivery
from services.core.tenancy import PerTenantCache
from services.metrics.facts import MAX_TEXT, MESSAGE, Fact, parse
from services.metrics.quality_storage import MessageRow, QualityStore
from services.metrics.storage import MetricsStore
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import stream_pb2

RESOLVED_GROUP = "metrics"
CHANGES_GROUP = "metrics"

_meter = metrics.get_meter("tessera.metrics")
_facts = _meter.create_counter("tessera.metrics.facts", description="CX facts from resolved events, by outcome")
_evaluations = _meter.create_counter("tessera.quality.evaluations", description="evaluations written or changed")
_changes = _meter.create_counter("tessera.metrics.changes", description="identity changes applied, by kind")


class ConfigCache(PerTenantCache[MetricsConfig]):
    """Each tenant's metric settings, re-read after ``ttl`` seconds."""

    def __init__(self, store: MetricsStore, ttl: float = 5.0) -> None:
        super().__init__(store.config, ttl)
        self.store = store


class ResolvedHandler:
    """Facts first (the rollups), then quality: the batch's messages are kept and the ended
    interactions it touched are evaluated again; each step is idempotent, so a batch redelivered
    after a crash between them completes the second."""

    def __init__(
        self, store: MetricsStore, configs: Callable[[str], MetricsConfig], quality: QualityStore | None = None
    ) -> None:
        self.store = store
        self.configs = configs
        self.quality = quality

    def __call__(self, batch: list[Delivery[stream_pb2.ResolvedEventEnvelope]]) -> None:
        by_tenant: dict[str, list[Fact]] = {}
        messages: dict[str, list[MessageRow]] = {}
        for msg in batch:
            fact = parse(msg.envelope)
            if fact is None:
                continue
            by_tenant.setdefault(msg.tenant_id, []).append(fact)
            if fact.kind == MESSAGE and self.quality is not None:
                m = msg.envelope.event.message
                offset = m.offset_seconds if m.HasField("offset_seconds") else None
                messages.setdefault(msg.tenant_id, []).append(
                    MessageRow(
                        fact.event_id,
                        fact.interaction_id,
                        fact.profile_id,
                        fact.at,
                        offset,
                        fact.author,
                        fact.compound,
                        m.text[:MAX_TEXT],
                    )
                )
        for tenant_id, facts in by_tenant.items():
            config = self.configs(tenant_id)
            out = self.store.apply_facts(tenant_id, facts, config)
            for outcome, n in (("applied", out.written), ("unchanged", out.unchanged), ("erased", out.dropped)):
                if n:
                    _facts.add(n, {"outcome": outcome})
            if self.quality is not None:
                changed = self.quality.apply(tenant_id, messages.get(tenant_id, []), facts, config)
                if changed:
                    _evaluations.add(changed)


class ChangesHandler:
    def __init__(
        self, store: MetricsStore, configs: Callable[[str], MetricsConfig], quality: QualityStore | None = None
    ) -> None:
        self.store = store
        self.configs = configs
        self.quality = quality

    def __call__(self, batch: list[Delivery[stream_pb2.ProfileChangeEnvelope]]) -> None:
        for msg in batch:
            c = msg.envelope.change
            tenant = msg.tenant_id
            key = streams.change_key(c)
            if c.kind == streams.MERGED:
                self.store.apply_merge(tenant, c.profile_id, c.absorbed_profile_id, self.configs(tenant), key)
                if self.quality is not None:
                    changed = self.quality.apply_merge(
                        tenant, c.profile_id, c.absorbed_profile_id, self.configs(tenant), key
                    )
                    _evaluations.add(changed)
            elif c.kind == streams.SPLIT:
                self.store.apply_split(
                    tenant, c.profile_id, c.new_profile_id, list(c.moved_event_ids), self.configs(tenant), key
                )
                if self.quality is not None:
                    changed = self.quality.apply_split(
                        tenant,
                        c.new_profile_id,
                        list(c.moved_event_ids),
                        self.configs(tenant),
                        profile_id=c.profile_id,
                        key=key,
                    )
                    _evaluations.add(changed)
            elif c.kind == streams.ERASED:
                erased = sorted({c.profile_id, *c.erased_profile_ids})
                self.store.erase(tenant, erased)
                if self.quality is not None:
                    self.quality.erase(tenant, erased)
            else:
                continue
            _changes.add(1, {"kind": streams.kind_name(c.kind)})
