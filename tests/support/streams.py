"""Reading and writing stream entries in tests, through the one codec the services use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import redis
from google.protobuf.message import Message

from services.core import streams
from services.core.bus import Bus
from services.core.streams import ENTRY_FIELD, Stream

M = TypeVar("M", bound=Message)


def entries(client: redis.Redis, bus: Bus, tenant_id: str, stream: Stream[M]) -> list[tuple[str, M]]:
    """Every entry of a tenant's stream, decoded (and checked to name that tenant)."""
    rows: Any = client.xrange(bus.key(tenant_id, stream.name))
    return [(mid.decode(), streams.decode(stream, fields[ENTRY_FIELD], tenant_id)) for mid, fields in rows]


def publish_events(bus: Bus, tenant_id: str, payloads: Sequence[bytes], traceparent: str = "") -> list[str]:
    """Stored events onto the tenant's events stream, exactly as ingest's outbox writes them."""
    return bus.append(tenant_id, streams.EVENTS.name, streams.event_envelopes(tenant_id, traceparent, payloads))


def wait_entries(
    client: redis.Redis,
    bus: Bus,
    tenant_id: str,
    stream: Stream[M],
    done: Any,
    timeout: float = 10.0,
) -> list[tuple[str, M]]:
    """Poll the stream until ``done(entries)`` holds (outboxes publish just after their commit)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = entries(client, bus, tenant_id, stream)
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
