"""Dedupe within a window whose cost does not grow with history, on real PostgreSQL.

A message id is remembered for the tenant's window (default 7 whole days) in the partition of the
day it was received. A retry within the window answers DUPLICATE with the first event's id, even
across midnight and even while the first write is still in flight; a replay older than the window
is stored again as a new event; partitions every window has left behind are dropped.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import tenancy
from services.core.errors import InvalidArgument
from services.ingest import prepare, validation
from services.ingest.storage import MIDNIGHT_GRACE, EventStore, dedupe_days
from tests.conftest import TenantKey
from tests.support.events import track

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)


def at_midnight(days_ahead: int) -> dt.datetime:
    """Midnight UTC a few days from now (partitions exist a week ahead)."""
    today = dt.datetime.now(dt.UTC).date()
    return dt.datetime.combine(today + days_ahead * DAY, dt.time(), dt.UTC)


def write(store: EventStore, tenant: TenantKey, message_id: str, received_at: dt.datetime, window: int = 7) -> str:
    """Store one event as if received at ``received_at``; returns ACCEPTED:<id> or DUPLICATE:<id>."""
    ev = track(message_id)
    ev.timestamp.FromDatetime(received_at)
    prep = prepare.prepare([ev], received_at, validation.Limits())
    (new,) = prep.to_store
    result = store.write_batch(tenant.tenant_id, prep.to_store, received_at, window_days=window)
    if new.event_id in result.accepted:
        return f"ACCEPTED:{new.event_id}"
    return f"DUPLICATE:{result.duplicates.get(message_id, '')}"


def plant_key(engine: Engine, tenant: TenantKey, message_id: str, day: dt.date, *, cold: bool = True) -> str:
    """A key remembered from an earlier day: in the cold table, where the upkeep leaves a finished
    day, or (``cold=False``) still in that day's hot partition, not moved yet."""
    event_id = str(uuid.uuid4())
    table = "ingest.dedupe_window" if cold else "ingest.dedupe_keys"
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT ingest.ensure_dedupe_partitions(:d, 1)"), {"d": day})
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (tenant_id, key_hash, day, event_id, received_at) "
                "VALUES (:t, ingest.dedupe_key(:m), :d, :e, :at)"
            ),
            {
                "t": tenant.tenant_id,
                "m": message_id,
                "d": day,
                "e": event_id,
                "at": dt.datetime.combine(day, dt.time(12), dt.UTC),
            },
        )
    return event_id


def cold_sighting(engine: Engine, tenant: TenantKey, message_id: str) -> tuple[dt.date, str] | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT day, event_id::text FROM ingest.dedupe_window "
                "WHERE tenant_id = :t AND key_hash = ingest.dedupe_key(:m)"
            ),
            {"t": tenant.tenant_id, "m": message_id},
        ).first()
    return (row[0], row[1]) if row else None


@pytest.mark.parametrize("message_id", ["m-1", "0193aaaa-0000-7000-8000-000000000001", "Ärger-ü-😀", ""])
def test_the_key_ingest_computes_is_the_key_postgresql_computes(engine: Engine, message_id: str) -> None:
    """Migrations and look-ups derive keys in SQL; writes derive them in Python: they must agree."""
    with engine.connect() as conn:
        in_sql = conn.execute(sa.text("SELECT ingest.dedupe_key(:m)::text"), {"m": message_id}).scalar_one()
    assert in_sql.replace("-", "") == prepare.dedupe_key(message_id)


def test_dedupe_days_write_the_day_before_only_just_after_midnight() -> None:
    midnight = at_midnight(1)
    assert dedupe_days(midnight - dt.timedelta(seconds=1), 7) == (
        (midnight - DAY).date(),
        (midnight - DAY).date(),
        (midnight - 8 * DAY).date(),
    )
    today = midnight.date()
    assert dedupe_days(midnight + dt.timedelta(seconds=30), 7) == (today, today - DAY, today - 7 * DAY)
    assert dedupe_days(midnight + MIDNIGHT_GRACE, 7)[1] == today
    assert dedupe_days(midnight + MIDNIGHT_GRACE, 1)[2] == today - DAY


def test_a_retry_within_the_window_is_a_duplicate_of_the_first_event(engine: Engine, tenant: TenantKey) -> None:
    store = EventStore(engine)
    now = dt.datetime.now(dt.UTC)
    first = write(store, tenant, "w-1", now)
    assert first.startswith("ACCEPTED:")
    assert write(store, tenant, "w-1", now + dt.timedelta(seconds=5)) == first.replace("ACCEPTED", "DUPLICATE")

    # Remembered from five days ago: still a duplicate, naming that first event.
    old = plant_key(engine, tenant, "w-2", now.date() - 5 * DAY)
    assert write(store, tenant, "w-2", now) == f"DUPLICATE:{old}"
    # Yesterday's keys before the upkeep moved them: probed in their hot partition.
    hot = plant_key(engine, tenant, "w-5", now.date() - DAY, cold=False)
    assert write(store, tenant, "w-5", now) == f"DUPLICATE:{hot}"


def test_a_replay_older_than_the_window_is_stored_again(engine: Engine, tenant: TenantKey) -> None:
    store = EventStore(engine)
    now = dt.datetime.now(dt.UTC)
    plant_key(engine, tenant, "w-3", now.date() - 9 * DAY)
    assert write(store, tenant, "w-3", now).startswith("ACCEPTED:")
    # A tenant with a shorter window forgets sooner.
    plant_key(engine, tenant, "w-4", now.date() - 3 * DAY)
    assert write(store, tenant, "w-4", now, window=2).startswith("ACCEPTED:")
    assert write(store, tenant, "w-4", now, window=2).startswith("DUPLICATE:")


def test_a_retry_across_midnight_is_a_duplicate(engine: Engine, tenant: TenantKey) -> None:
    store = EventStore(engine)
    midnight = at_midnight(2)
    first = write(store, tenant, "mid-1", midnight - dt.timedelta(seconds=1))
    dup = first.replace("ACCEPTED", "DUPLICATE")
    assert write(store, tenant, "mid-1", midnight + dt.timedelta(seconds=2)) == dup  # within the grace
    assert write(store, tenant, "mid-1", midnight + dt.timedelta(hours=3)) == dup  # a probe of yesterday


def test_a_retry_just_after_midnight_waits_for_the_first_write_still_in_flight(
    engine: Engine, tenant: TenantKey
) -> None:
    """The first write (before midnight, its own day) has not committed when the retry (after
    midnight, the next day's partition) runs: the retry must wait for it, then answer DUPLICATE."""
    store = EventStore(engine)
    midnight = at_midnight(3)
    yesterday = (midnight - DAY).date()
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT ingest.ensure_dedupe_partitions(:d, 2)"), {"d": yesterday})
    tx.commit()
    tx = holder.begin()
    first_id = str(uuid.uuid4())
    holder.execute(
        sa.text(
            "INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at) "
            "VALUES (:t, ingest.dedupe_key(:m), :d, :e, :at)"
        ),
        {"t": tenant.tenant_id, "m": "race-1", "d": yesterday, "e": first_id, "at": midnight - dt.timedelta(seconds=1)},
    )
    outcome: dict[str, str] = {}
    retry = threading.Thread(
        target=lambda: outcome.setdefault("r", write(store, tenant, "race-1", midnight + dt.timedelta(seconds=1)))
    )
    retry.start()
    retry.join(1.0)
    assert retry.is_alive(), "the retry must wait for the write in flight, not pass it"
    tx.commit()
    holder.close()
    retry.join(10)
    assert outcome["r"] == f"DUPLICATE:{first_id}"


def test_one_message_id_in_two_tenants_stays_two_events_on_retry(engine: Engine, tenant: TenantKey) -> None:
    """The existing-key look-up is scoped by tenant: B's retry must never get A's event id."""
    from tests.conftest import make_tenant

    other = make_tenant(engine)
    store = EventStore(engine)
    now = dt.datetime.now(dt.UTC)
    a = write(store, tenant, "shared-1", now)
    b = write(store, other, "shared-1", now)
    assert a.startswith("ACCEPTED:") and b.startswith("ACCEPTED:") and a != b
    assert write(store, other, "shared-1", now) == b.replace("ACCEPTED", "DUPLICATE")
    assert write(store, tenant, "shared-1", now) == a.replace("ACCEPTED", "DUPLICATE")


def test_upkeep_moves_finished_days_cold_and_forgets_what_every_window_left_behind(
    engine: Engine, tenant: TenantKey
) -> None:
    store = EventStore(engine)
    now = dt.datetime.now(dt.UTC)
    today = now.date()
    # Two sightings of one message id, three and two days ago (the second stored again after the
    # first fell out of some tenant's window): the cold table must keep the later one.
    first = plant_key(engine, tenant, "up-1", today - 3 * DAY, cold=False)
    later = plant_key(engine, tenant, "up-1", today - 2 * DAY, cold=False)
    plant_key(engine, tenant, "up-2", today - 20 * DAY)  # expired for a 7-day window
    accepted = write(store, tenant, "up-3", now)  # today's: stays hot
    report = store.upkeep(keep_dedupe_days=7)
    assert report["dedupe_days_moved_cold"] >= 2
    assert first != later
    assert cold_sighting(engine, tenant, "up-1") == (today - 2 * DAY, later)
    assert cold_sighting(engine, tenant, "up-2") is None
    assert cold_sighting(engine, tenant, "up-3") is None
    with engine.connect() as conn:
        names = set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'ingest'")).scalars())
    assert f"dedupe_keys_{today - 2 * DAY:%Y_%m_%d}" not in names
    assert {f"dedupe_keys_{today + n * DAY:%Y_%m_%d}" for n in range(8)} <= names
    assert "dedupe_keys_default" in names
    # Dedupe is the same after the move: cold keys are probed, today's still conflict.
    assert write(store, tenant, "up-1", now) == f"DUPLICATE:{later}"
    assert write(store, tenant, "up-3", now) == accepted.replace("ACCEPTED", "DUPLICATE")
    assert write(store, tenant, "up-2", now).startswith("ACCEPTED:")


def test_a_tenant_window_is_validated(engine: Engine, tenant: TenantKey) -> None:
    tenancy.set_dedupe_window(engine, tenant.tenant_id, 30)
    assert tenancy.longest_dedupe_window(engine) is not None
    assert (tenancy.longest_dedupe_window(engine) or 0) >= 30
    with pytest.raises(InvalidArgument):
        tenancy.set_dedupe_window(engine, tenant.tenant_id, 91)
    tenancy.set_dedupe_window(engine, tenant.tenant_id, None)


def test_a_replay_after_retention_dropped_the_event_is_stored_again(engine: Engine, tenant: TenantKey) -> None:
    """Retention drops old event partitions; the dedupe window is far shorter, so an event that old
    was forgotten long before and its replay is a new event (as README documents)."""
    store = EventStore(engine)
    long_ago = dt.datetime(2001, 1, 15, 12, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT ingest.ensure_event_partitions('2001-01-01', 1)"))
    first = write(store, tenant, "old-1", long_ago)
    assert first.startswith("ACCEPTED:")
    assert "events_2001_01" in store.drop_partitions_before(dt.date(2001, 2, 1))
    again = write(store, tenant, "old-1", dt.datetime.now(dt.UTC))
    assert again.startswith("ACCEPTED:") and again != first
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM ingest.events WHERE tenant_id = :t AND message_id = 'old-1'"),
            {"t": tenant.tenant_id},
        ).scalar_one()
    assert rows == 1  # the replay, the original being gone with its partition
