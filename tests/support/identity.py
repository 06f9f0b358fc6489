"""Helpers for identity tests: send events through the public ingest API, wait for identity."""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.support.events import uid


def person_event(*idents: tuple[str, str], channel: int = event_pb2.CHANNEL_WEB, name: str = "Seen") -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=uid("id"),
        channel=channel,  # type: ignore[arg-type]
        source="tests",
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in idents],
        track=event_pb2.Track(event=name),
    )
    ev.timestamp.GetCurrentTime()
    return ev


def send(
    stub: ingest_pb2_grpc.IngestServiceStub, metadata: Sequence[tuple[str, str]], *events: event_pb2.Event
) -> list[str]:
    """Ingest events in one batch; returns their event ids (all must be accepted)."""
    resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=list(events)), metadata=metadata, timeout=10)
    assert resp.accepted_count == len(events), resp
    return [r.event_id for r in resp.results]


def linked_count(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM identity.event_links WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def wait_linked(engine: Engine, tenant_id: str, count: int, timeout: float = 20.0) -> None:
    """Until identity has applied ``count`` events of the tenant."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = linked_count(engine, tenant_id)
        if seen >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"identity applied {seen} of {count} events in {timeout}s")


def event_profile(engine: Engine, tenant_id: str, event_id: str) -> str | None:
    with engine.connect() as conn:
        value = conn.execute(
            sa.text("SELECT profile_id::text FROM identity.event_links WHERE tenant_id = :t AND event_id = :e"),
            {"t": tenant_id, "e": event_id},
        ).scalar()
        return None if value is None else str(value)
