"""``tessera.bus.consumer_pending``: what a consumer group has not acknowledged yet, over all its
tenants' streams, split into entries not yet delivered and entries delivered but not acknowledged,
labelled by stream and group only (never by tenant)."""

from __future__ import annotations

import secrets
import time

import pytest
import redis

from services.core import backlog, streams
from services.core.bus import Bus, Consumer, Delivery, Publication
from tessera.v1 import event_pb2, stream_pb2

pytestmark = pytest.mark.integration

Envelope = stream_pb2.EventEnvelope


class Flaky:
    """Fails every batch while ``failing``."""

    def __init__(self) -> None:
        self.failing = True
        self.handled = 0

    def __call__(self, batch: list[Delivery[Envelope]]) -> None:
        if self.failing:
            raise RuntimeError("down")
        self.handled += len(batch)


def publish(bus: Bus, tenant_id: str, n: int) -> None:
    event = event_pb2.Event(message_id="m").SerializeToString()
    bus.publish([Publication(tenant_id, streams.EVENTS.name, streams.event_envelope(tenant_id, "", event))] * n)


def figures(group: str) -> dict[str, int]:
    """This group's observations, by state; checks no observation names a tenant."""
    out: dict[str, int] = {}
    for obs in backlog.measure():
        attrs = dict(obs.attributes or {})
        if attrs.get("group") != group:
            continue
        assert set(attrs) == {"stream", "group", "state"}
        assert attrs["stream"] == streams.EVENTS.name
        out[str(attrs["state"])] = int(obs.value)
    return out


def test_backlog_counts_undelivered_and_unacknowledged_entries_over_every_tenant(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    token = secrets.token_hex(4)
    bus = Bus(redis_client, f"{redis_prefix}-backlog-{token}")
    group = f"backlog-{token}"
    tenants = [f"b1-{token}", f"b2-{token}"]
    handler = Flaky()
    consumer = Consumer(
        bus=bus,
        stream=streams.EVENTS,
        group=group,
        name="c1",
        handler=handler,
        tenants=lambda: tenants,
        block_ms=20,
        claim_idle_ms=100,
    )
    publish(bus, tenants[0], 3)
    publish(bus, tenants[1], 2)
    assert consumer.poll() == 5  # delivered, and the handler failed: none acknowledged
    assert figures(group) == {backlog.UNDELIVERED: 0, backlog.UNACKNOWLEDGED: 5}

    publish(bus, tenants[0], 4)
    assert figures(group) == {backlog.UNDELIVERED: 4, backlog.UNACKNOWLEDGED: 5}

    handler.failing = False
    time.sleep(0.15)  # past claim_idle_ms: the failed ones are reclaimed
    deadline = time.monotonic() + 5
    while handler.handled < 9:
        assert time.monotonic() < deadline, "the consumer never caught up"
        consumer.poll()
    assert figures(group) == {backlog.UNDELIVERED: 0, backlog.UNACKNOWLEDGED: 0}


def test_a_consumer_that_is_gone_is_no_longer_measured(redis_client: redis.Redis, redis_prefix: str) -> None:
    token = secrets.token_hex(4)
    group = f"gone-{token}"
    consumer = Consumer(
        bus=Bus(redis_client, f"{redis_prefix}-gone-{token}"),
        stream=streams.EVENTS,
        group=group,
        name="c1",
        handler=Flaky(),
        tenants=lambda: [f"g-{token}"],
        block_ms=20,
    )
    consumer.poll()
    assert figures(group) == {backlog.UNDELIVERED: 0, backlog.UNACKNOWLEDGED: 0}
    del consumer
    assert figures(group) == {}
