"""The ``identity`` consumer group on the events stream: resolve, then publish downstream.

A batch is grouped by tenant; each tenant's part is one transaction (see
:meth:`~services.identity.resolver.Resolver.resolve_batch`). Resolved events and profile changes
are published after the commit and before the acknowledgement, so a crash anywhere means a
redelivery, and a redelivered event republishes its stored result instead of resolving again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from services.core import streams
from services.core.bus import Bus, Consumer, Delivery, consumer_name
from services.identity.resolver import IncomingEvent, Resolver, parse_event
from tessera.v1 import stream_pb2

GROUP = "identity"


class ResolveHandler:
    def __init__(self, resolver: Resolver, bus: Bus) -> None:
        self.resolver = resolver
        self.bus = bus

    def __call__(self, batch: list[Delivery[stream_pb2.EventEnvelope]]) -> None:
        by_tenant: dict[str, list[IncomingEvent]] = {}
        for msg in batch:
            tenant_rules = self.resolver.rules.get_full(msg.tenant_id)
            with_traits = bool(tenant_rules.probabilistic.get("enabled"))
            by_tenant.setdefault(msg.tenant_id, []).append(
                parse_event(tenant_rules.rules, msg.envelope.event, msg.raw, msg.relay, with_traits=with_traits)
            )
        for tenant_id, events in by_tenant.items():
            result = self.resolver.resolve_batch(tenant_id, events)
            self.bus.append(tenant_id, streams.RESOLVED.name, [e.envelope for e in result.events])


def build_consumer(
    resolver: Resolver,
    bus: Bus,
    tenants: Callable[[], Iterable[str]],
    *,
    name: str | None = None,
    batch_size: int = 250,
    block_ms: int = 1000,
    claim_idle_ms: int = 30_000,
    max_attempts: int = 5,
    tenant_refresh_seconds: float = 5.0,
) -> Consumer[stream_pb2.EventEnvelope]:
    return Consumer(
        bus=bus,
        stream=streams.EVENTS,
        group=GROUP,
        name=name or consumer_name(),
        handler=ResolveHandler(resolver, bus),
        tenants=tenants,
        batch_size=batch_size,
        block_ms=block_ms,
        claim_idle_ms=claim_idle_ms,
        max_attempts=max_attempts,
        tenant_refresh_seconds=tenant_refresh_seconds,
    )


__all__ = ["GROUP", "ResolveHandler", "build_consumer"]
