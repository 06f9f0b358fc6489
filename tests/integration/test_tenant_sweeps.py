"""The cross-tenant sweeps go tenant by tenant over indexes leading with tenant_id (see
test_schema_tenant_keys.py) and still do what they did: the outbox relay claims every tenant's
old rows, oldest first, and replicas share them (SKIP LOCKED); dedupe expiry, the profile upkeep
and the erasure worker reach every tenant, in bounded batches."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import db
from services.core.outbox import EnvelopeTable
from services.ingest.storage import EventStore
from services.profile import computed, erasure_store
from services.profile.storage import ProfileStore
from services.profile.tenant_settings import ProfileConfig

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


def tenant_ids(label: str, n: int = 2) -> list[str]:
    return [f"{label}-{i}-{secrets.token_hex(4)}" for i in range(n)]


@pytest.fixture
def outbox_schema(engine: Engine) -> Iterator[str]:
    """A copy of identity's outbox (its indexes too) that no running relay sweeps."""
    schema = f"sweep_{secrets.token_hex(4)}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        conn.exec_driver_sql(f'CREATE TABLE "{schema}".outbox (LIKE identity.outbox INCLUDING ALL)')
    yield schema
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


def test_the_outbox_sweep_claims_each_tenants_old_rows_oldest_first_and_replicas_share_them(
    engine: Engine, outbox_schema: str
) -> None:
    a, b = tenant_ids("outbox")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f'INSERT INTO "{outbox_schema}".outbox (tenant_id, stream, envelope, created_at) '
                "SELECT t, 'changes', convert_to(t || ':' || i, 'UTF8'), now() - make_interval(secs => 60 - i) "
                "FROM unnest(CAST(:ts AS text[])) AS t, generate_series(1, 5) AS i"
            ),
            {"ts": [a, b]},
        )
        # A young row: left for the fast path.
        conn.execute(
            sa.text(f"INSERT INTO \"{outbox_schema}\".outbox (tenant_id, stream, envelope) VALUES (:t, 'changes', '')"),
            {"t": a},
        )
    table = EnvelopeTable(outbox_schema)
    with db.raw_transaction(engine, "first") as (first, _), db.raw_transaction(engine, "second") as (second, _):
        taken = table.claim(first, 30.0, 3)
        rest = table.claim(second, 30.0, 100)
        first.connection.rollback()
        second.connection.rollback()
    # The first tenant's three oldest to one replica; everything else old to the other.
    first_tenant = min(a, b)
    assert [p.envelopes[0] for p in taken] == [f"{first_tenant}:{i}".encode() for i in (1, 2, 3)]
    others = {f"{t}:{i}".encode() for t in (a, b) for i in range(1, 6)} - {p.envelopes[0] for p in taken}
    assert sorted(p.envelopes[0] for p in rest) == sorted(others)
    for tenant in (a, b):
        seqs = [p.seqs[0] for p in rest if p.tenant_id == tenant]
        assert seqs == sorted(seqs), "each tenant's rows come oldest first"
    with db.raw_transaction(engine, "degraded") as (cur, _):
        assert len(table.claim(cur, 0.0, 100)) == 11, "with no grace every row is claimed, young ones too"
        cur.connection.rollback()


def test_dedupe_expiry_reaches_every_tenant_in_bounded_batches(engine: Engine) -> None:
    tenants = tenant_ids("expire")
    today = NOW.date()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ingest.dedupe_window (tenant_id, key_hash, day, event_id, received_at) "
                "SELECT t, gen_random_uuid(), CAST(:today AS date) - d, gen_random_uuid(), now() "
                "FROM unnest(CAST(:ts AS text[])) AS t, generate_series(1, 10) AS d, generate_series(1, 3) AS n"
            ),
            {"ts": tenants, "today": today},
        )
    expired = EventStore(engine).expire(today - dt.timedelta(days=7), chunk=4)
    assert expired >= 2 * 3 * 3  # days 8, 9 and 10 of both tenants (other tests' keys may expire too)
    with engine.connect() as conn:
        left = conn.execute(
            sa.text(
                "SELECT tenant_id, min(CAST(:today AS date) - day), max(CAST(:today AS date) - day), count(*) "
                "FROM ingest.dedupe_window WHERE tenant_id = ANY(:ts) GROUP BY tenant_id ORDER BY 1"
            ),
            {"ts": tenants, "today": today},
        ).all()
        conn.execute(sa.text("DELETE FROM ingest.dedupe_window WHERE tenant_id = ANY(:ts)"), {"ts": tenants})
        conn.commit()
    assert [tuple(r) for r in left] == [(t, 1, 7, 21) for t in sorted(tenants)]


def test_profile_upkeep_expires_points_and_prunes_the_feed_of_every_tenant_in_batches(engine: Engine) -> None:
    tenants = tenant_ids("upkeep")
    store = ProfileStore(engine, clock=NOW.timestamp)
    week = computed.Definition("visits_7d", computed.COUNT, window_seconds=7 * 86400)
    for tenant_id in tenants:
        store.save_config(tenant_id, ProfileConfig(computed_traits=(week,)))
    with engine.begin() as conn:
        # Ten points a tenant, a day apart from a minute ago; and a feed of ten rows, an hour apart.
        conn.execute(
            sa.text(
                "INSERT INTO profile.computed_points (tenant_id, profile_id, trait_key, at, event_id, num) "
                "SELECT t, gen_random_uuid(), 'visits_7d', CAST(:now AS timestamptz) - make_interval(days => d) "
                "- interval '1 minute', 'e' || d, 1 FROM unnest(CAST(:ts AS text[])) AS t, generate_series(0, 9) AS d"
            ),
            {"ts": tenants, "now": NOW},
        )
        conn.execute(
            sa.text(
                "INSERT INTO profile.feed_heads (tenant_id, seq) SELECT t, 10 FROM unnest(CAST(:ts AS text[])) AS t"
            ),
            {"ts": tenants},
        )
        conn.execute(
            sa.text(
                "INSERT INTO profile.feed (tenant_id, seq, kind, profile_id, at) "
                "SELECT t, 10 - h, 1, gen_random_uuid(), CAST(:now AS timestamptz) - make_interval(hours => h) "
                "FROM unnest(CAST(:ts AS text[])) AS t, generate_series(0, 9) AS h"
            ),
            {"ts": tenants, "now": NOW},
        )
    report = store.upkeep(feed_retention_seconds=4.5 * 3600, batch=2)
    assert report["points_expired"] >= 2 * 3  # 7, 8 and 9 days and a minute old: out of the window
    assert report["feed_tenants_pruned"] >= 2
    with engine.connect() as conn:
        points = conn.execute(
            sa.text("SELECT tenant_id, count(*) FROM profile.computed_points WHERE tenant_id = ANY(:ts) GROUP BY 1"),
            {"ts": tenants},
        ).all()
        feed = conn.execute(
            sa.text(
                "SELECT f.tenant_id, min(f.seq), count(*), h.pruned_through FROM profile.feed f "
                "JOIN profile.feed_heads h USING (tenant_id) WHERE f.tenant_id = ANY(:ts) GROUP BY 1, 4"
            ),
            {"ts": tenants},
        ).all()
        for table in ("computed_points", "feed", "feed_heads", "settings"):
            conn.execute(sa.text(f"DELETE FROM profile.{table} WHERE tenant_id = ANY(:ts)"), {"ts": tenants})
        conn.commit()
    assert sorted(tuple(r) for r in points) == [(t, 7) for t in sorted(tenants)]
    # Hours 5-9 back are older than 4.5 hours: seqs 1-5 go, the head says so.
    assert sorted(tuple(r) for r in feed) == [(t, 6, 5, 5) for t in sorted(tenants)]


def test_the_erasure_claim_takes_the_most_overdue_running_request_of_any_tenant(engine: Engine) -> None:
    """Inside one transaction, rolled back: a running erasure worker must not take these rows."""
    a, b = tenant_ids("erasure")
    rows = [  # (tenant, state, overdue by days): b's overdue running request is the oldest
        (a, erasure_store.RUNNING, 3000),
        (b, erasure_store.RUNNING, 4000),
        (b, erasure_store.DONE, 5000),
        (a, erasure_store.RUNNING, -1),
    ]
    with engine.connect() as conn:
        ids = []
        for tenant_id, state, days in rows:
            ids.append(str(uuid.uuid4()))
            conn.execute(
                sa.text(
                    "INSERT INTO profile.erasure_requests (tenant_id, request_id, profile_id, member_ids, identifiers, "
                    "normalizers, state, steps, reason, next_try_at) VALUES (:t, :r, gen_random_uuid(), '{}', '[]', "
                    "'{}', :s, '[]', 'test', now() - make_interval(days => :d))"
                ),
                {"t": tenant_id, "r": ids[-1], "s": state, "d": days},
            )
        first = conn.execute(erasure_store._CLAIM, {"k": 16}).one()
        conn.rollback()
    assert (first.tenant_id, str(first.request_id)) == (b, ids[1])
