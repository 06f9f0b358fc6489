"""Helpers for identity tests: send events through the public ingest API, wait for identity."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.engine import Engine

from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2, ingest_pb2_grpc
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


def identify_event(traits: Mapping[str, Any], *idents: tuple[str, str]) -> event_pb2.Event:
    """An Identify event carrying ``traits`` (what probabilistic matching reads, when it is on)."""
    ev = event_pb2.Event(
        message_id=uid("idf"),
        channel=event_pb2.CHANNEL_WEB,
        source="crm-sync",
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in idents],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(traits)
    ev.timestamp.GetCurrentTime()
    return ev


def identity_tables(conn: sa.Connection) -> list[tuple[str, bool]]:
    """Every table of the ``identity`` schema, from information_schema (none is left out by a list
    kept here), and whether it has a ``tenant_id`` column."""
    tables = conn.execute(
        sa.text(
            "SELECT t.table_name, EXISTS (SELECT 1 FROM information_schema.columns c WHERE c.table_schema = "
            "t.table_schema AND c.table_name = t.table_name AND c.column_name = 'tenant_id') "
            "FROM information_schema.tables t WHERE t.table_schema = 'identity' AND t.table_type = 'BASE TABLE' "
            "ORDER BY t.table_name"
        )
    ).all()
    assert tables, "no identity tables found"
    return [(str(name), bool(per_tenant)) for name, per_tenant in tables]


def _rows(conn: sa.Connection, table: str, per_tenant: bool, tenant_id: str) -> list[str]:
    """A table's rows (the tenant's, where it has a ``tenant_id``) in their text form: every column,
    whatever its type (text, jsonb, arrays, and bytea as hex). ``ONLY``: a partition's rows are
    read once, as its own table's."""
    sql = f'SELECT r::text FROM ONLY identity."{table}" r' + (" WHERE r.tenant_id = :t" if per_tenant else "")
    return sorted(text for (text,) in conn.execute(sa.text(sql), {"t": tenant_id}))


def tenant_rows(engine: Engine, tenant_id: str) -> dict[str, list[str]]:
    """Every row the tenant has in every table of the ``identity`` schema, by table (sorted)."""
    with engine.connect() as conn:
        return {
            table: rows
            for table, per_tenant in identity_tables(conn)
            if per_tenant and (rows := _rows(conn, table, per_tenant, tenant_id))
        }


def rows_mentioning(engine: Engine, tenant_id: str, needles: Iterable[str]) -> dict[str, list[str]]:
    """Every row of every table of the ``identity`` schema (the tenant's rows where a table has a
    ``tenant_id``) whose text form contains one of ``needles``, case-insensitively, by table.

    A needle is also looked for hex-encoded, as ``bytea`` columns (the outbox's envelopes) print."""
    wanted = {form for n in needles for form in (n.casefold(), n.encode().hex(), n.casefold().encode().hex())}
    assert all(wanted), "an empty needle matches everything"
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for table, per_tenant in identity_tables(conn):
            hits = [
                text for text in _rows(conn, table, per_tenant, tenant_id) if any(n in text.casefold() for n in wanted)
            ]
            if hits:
                found[table] = hits
    return found


def enable_matching(
    stub: identity_pb2_grpc.IdentityServiceStub, metadata: Sequence[tuple[str, str]], auto: float, review: float
) -> None:
    """Switch probabilistic matching on for the tenant, with these thresholds."""
    rules = identity_pb2.IdentityRules(
        probabilistic=identity_pb2.ProbabilisticMatching(
            enabled=True, auto_merge_threshold=auto, review_threshold=review
        )
    )
    mask = field_mask_pb2.FieldMask(paths=["probabilistic"])
    stub.UpdateIdentityRules(identity_pb2.UpdateIdentityRulesRequest(rules=rules, update_mask=mask), metadata=metadata)


def wait_outbox_drained(engine: Engine, tenant_id: str, timeout: float = 10.0) -> None:
    """Until every change identity committed for the tenant has left its outbox (been published)."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            left = conn.execute(
                sa.text("SELECT count(*) FROM identity.outbox WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} changes still in identity's outbox after {timeout}s")
        time.sleep(0.05)
