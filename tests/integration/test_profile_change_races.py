"""What profile replicas do to each other: two applying one chain of identity changes at the same
time leave nothing on a merged-away profile, whichever order the transactions commit in (the other
replica's transaction is held open by hand, so the race happens on every run); a batch delivered
again adds nothing to the change feed. Real PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import uuid

import pytest
from sqlalchemy.engine import Engine

from services.core import db
from services.profile.events import ProfileEvent
from services.profile.storage import ACTIVE, CREATED, MERGED, UPDATED, ProfileStore
from services.profile.tenant_settings import ProfileConfig
from tessera.v1 import event_pb2
from tests.conftest import TenantKey

pytestmark = pytest.mark.integration

CONFIG = ProfileConfig()


def _seen(store: ProfileStore, tenant_id: str, profile_id: str, identifier: tuple[str, str]) -> ProfileEvent:
    now = dt.datetime.now(dt.UTC)
    event = ProfileEvent(
        event_id=f"e-{uuid.uuid4()}",
        profile_id=profile_id,
        received_at=now,
        at=now,
        channel=event_pb2.CHANNEL_WEB,
        kind="track",
        source="test",
        event=event_pb2.Event(),
        identifiers=(identifier,),
    )
    store.apply_events(tenant_id, [event], CONFIG)
    return event


def _owner(engine: Engine, tenant_id: str, id_type: str, value: str) -> str:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT profile_id::text FROM profile.identifiers WHERE tenant_id = %s AND id_type = %s AND id_value = %s",
            (tenant_id, id_type, value),
        ).one()
    return str(row[0])


def test_a_merge_into_a_profile_merged_on_meanwhile_lands_on_its_survivor(engine: Engine, tenant: TenantKey) -> None:
    """Identity merged B into A, then A into C. One replica applies A into C and has not committed
    when the other starts B into A: it finds A active, waits for A's lock, and must then see that
    A is gone and put B's data on C (the system test caught B's identifiers left on A)."""
    t = tenant.tenant_id
    store = ProfileStore(engine)
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    _seen(store, t, a, ("email", "a@example.com"))
    _seen(store, t, b, ("phone", "+15105556377"))
    _seen(store, t, c, ("crm_id", "0035glVKV4GXY9HIfl"))

    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        # The other replica's "A into C", in flight: A's row locked and marked, not yet committed.
        cur.execute(
            "UPDATE profile.profiles SET state = %s, merged_into = %s WHERE tenant_id = %s AND profile_id = %s",
            (MERGED, c, t, a),
        )
        cur.execute(
            "UPDATE profile.identifiers SET profile_id = %s WHERE tenant_id = %s AND profile_id = %s", (c, t, a)
        )
        done = threading.Event()
        failure: list[BaseException] = []

        def merge_b_into_a() -> None:
            try:
                store.apply_merge(t, a, b, f"merge:{uuid.uuid4()}", CONFIG)
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=merge_b_into_a)
        worker.start()
        time.sleep(0.5)
        assert not done.is_set(), "the merge must wait for the lock the other replica holds"
        raw.commit()
    finally:
        raw.close()
    worker.join(30)
    assert done.is_set() and not failure, failure

    assert _owner(engine, t, "phone", "+15105556377") == c
    assert _owner(engine, t, "email", "a@example.com") == c
    assert store.resolve(t, b) == (MERGED, c)
    assert store.resolve(t, c) == (ACTIVE, c)
    with db.raw_transaction(engine, "test") as (cur2, _):
        cur2.execute(
            "SELECT count(*) FROM profile.identifiers WHERE tenant_id = %s AND profile_id = ANY(%s::uuid[])",
            (t, [a, b]),
        )
        assert cur2.fetchone()[0] == 0


def test_a_batch_delivered_again_adds_nothing_to_the_change_feed(engine: Engine, tenant: TenantKey) -> None:
    """A consumer that dies after its commit and before its acknowledgement gets the batch again:
    the profile does not change, so a watcher must not see a second "updated"."""
    t = tenant.tenant_id
    store = ProfileStore(engine)
    p = str(uuid.uuid4())
    first = _seen(store, t, p, ("email", "again@example.com"))
    later = dataclasses.replace(first, event_id=f"e-{uuid.uuid4()}")
    store.apply_events(t, [later], CONFIG)
    rows, head, _ = store.feed_after(t, 0, 100)
    assert [(r[1], r[2]) for r in rows] == [(CREATED, p), (UPDATED, p)]
    store.apply_events(t, [first, later], CONFIG)  # both again
    again, head_after, _ = store.feed_after(t, 0, 100)
    assert again == rows and head_after == head
