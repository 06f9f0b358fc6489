"""Identity under concurrency, with real worker processes in one consumer group.

- With no limits in play, the final partition of identifiers equals the connected components of
  the identifier graph, whatever the order and number of workers (a hypothesis property).
- With limits in play, no identifier has two owners, no profile breaks a limit, and every event
  stays attributed to a live profile that holds one of its identifiers.
- kill -9 of a worker in the middle of a batch: the survivor reclaims its messages with
  XAUTOCLAIM and finishes, with nothing lost or applied twice (events applied before the kill are
  also delivered again): one merge fact per profile merged away, and one change published per
  profile created and per merge fact, however often the outbox repeats it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.harness import ServiceProcess, free_port, spawn_service, wait_health
from services.core.settings import Settings
from services.core.streams import CREATED, ENTRY_FIELD, MERGED
from services.identity.stitching import Key, components, partition
from services.identity.storage import IdentityStore
from tessera.v1 import event_pb2, identity_pb2, stream_pb2
from tests.conftest import make_tenant
from tests.support.identity import linked_count, wait_linked, wait_outbox_drained
from tests.support.streams import entries, publish_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TYPES = ("user_id", "device_id", "anonymous_id")
POOL: list[Key] = [(t, f"v{i}") for t in TYPES for i in range(5)]
UNLIMITED = {"types": {t: {"normalizer": "trim", "priority": 50, "max_per_profile": 1000} for t in TYPES}}
LIMITED = {
    "types": {
        "user_id": {"normalizer": "trim", "priority": 100, "max_per_profile": 1},
        "device_id": {"normalizer": "trim", "priority": 60, "max_per_profile": 2},
        "anonymous_id": {"normalizer": "trim", "priority": 50, "max_per_profile": 3},
    }
}


def worker_env(s: Settings, **extra: str) -> dict[str, str]:
    return {
        "TESSERA_DATABASE_URL": s.require_database_url(),
        "TESSERA_REDIS_URL": s.require_redis_url(),
        "TESSERA_REDIS_PREFIX": s.redis_prefix,
        "TESSERA_BIND_HOST": "127.0.0.1",
        "TESSERA_HEALTH_INTERVAL_SECONDS": "0.1",
        "TESSERA_CONSUMER_BLOCK_MS": "50",
        "TESSERA_TENANT_REFRESH_SECONDS": "0.1",
        "TESSERA_IDENTITY_RULES_CACHE_SECONDS": "0",
        "TESSERA_SHUTDOWN_GRACE_SECONDS": "2",
        "TESSERA_LOG_LEVEL": "WARNING",
        **extra,
    }


def start_workers(s: Settings, count: int, log_dir: Path, **extra: str) -> list[ServiceProcess]:
    procs = []
    ports = []
    for n in range(count):
        port = free_port()
        ports.append(port)
        env = worker_env(s, TESSERA_IDENTITY_PORT=str(port), **extra)
        procs.append(spawn_service("identity", env, log_dir / f"identity-{n}.log"))
    for port in ports:
        assert wait_health(f"127.0.0.1:{port}", timeout=30), "identity worker never became SERVING"
    return procs


def stop_workers(procs: Sequence[ServiceProcess]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def workers(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServiceProcess]]:
    """Three identity processes reading small batches, so their batches interleave."""
    procs = start_workers(settings, 3, tmp_path_factory.mktemp("identity-workers"), TESSERA_CONSUMER_BATCH_SIZE="4")
    yield procs
    stop_workers(procs)


def event_payloads(events: Sequence[Sequence[Key]]) -> tuple[list[str], list[bytes]]:
    """Stored events (event ids and encoded events) carrying these identifiers."""
    ids = [str(uuid.uuid4()) for _ in events]
    payloads = []
    for event_id, keys in zip(ids, events, strict=True):
        ev = event_pb2.Event(
            message_id=event_id,
            event_id=event_id,
            channel=event_pb2.CHANNEL_WEB,
            source="concurrency",
            identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in keys],
            track=event_pb2.Track(event="Seen"),
        )
        ev.timestamp.GetCurrentTime()
        payloads.append(ev.SerializeToString())
    return ids, payloads


def publish(bus: Bus, tenant_id: str, events: Sequence[Sequence[Key]]) -> list[str]:
    ids, payloads = event_payloads(events)
    publish_events(bus, tenant_id, payloads)
    return ids


def linked_ids(engine: Engine, tenant_id: str) -> set[str]:
    """The events identity has applied for the tenant."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT event_id FROM identity.event_links WHERE tenant_id = :t"), {"t": tenant_id})
        return {str(e) for (e,) in rows}


def graph_state(engine: Engine, tenant_id: str) -> tuple[dict[Key, str], dict[str, str | None], dict[str, str]]:
    """(identifier owners, profile -> merged_into, event -> its profile's final survivor)."""
    with engine.connect() as conn:
        owners = {
            (t, v): str(p)
            for t, v, p in conn.execute(
                sa.text("SELECT id_type, id_value, profile_id FROM identity.identifiers WHERE tenant_id = :t"),
                {"t": tenant_id},
            )
        }
        merged = {
            str(p): (str(m) if m else None)
            for p, m in conn.execute(
                sa.text("SELECT profile_id, merged_into FROM identity.profiles WHERE tenant_id = :t"),
                {"t": tenant_id},
            )
        }
        events = {
            e: str(p)
            for e, p in conn.execute(
                sa.text(
                    "SELECT l.event_id, coalesce(p.merged_into, p.profile_id) FROM identity.event_links l "
                    "JOIN identity.profiles p USING (tenant_id, profile_id) WHERE l.tenant_id = :t"
                ),
                {"t": tenant_id},
            )
        }
    return owners, merged, events


def wait_resolved_twice(redis_client: Any, bus: Bus, tenant_id: str, event_ids: set[str], timeout: float) -> None:
    """Until each of these events, delivered again, has gone out on the resolved stream again."""
    deadline = time.monotonic() + timeout
    while True:
        seen = Counter(env.event.event_id for _, env in entries(redis_client, bus, tenant_id, streams.RESOLVED))
        short = [e for e in event_ids if seen[e] < 2]
        if not short:
            return
        assert time.monotonic() < deadline, f"{len(short)} redelivered events not resolved again in {timeout}s"
        time.sleep(0.1)


def check_invariants(
    engine: Engine, tenant_id: str, ids: Sequence[str], events: Sequence[Sequence[Key]], limits: dict[str, int]
) -> dict[Key, str]:
    owners, merged, attributed = graph_state(engine, tenant_id)
    # Every identifier belongs to exactly one live profile (the primary key makes it one).
    assert all(merged[p] is None for p in owners.values()), "an identifier is owned by a merged-away profile"
    # Merged-away ids point straight at a live survivor.
    assert all(merged[m] is None for m in merged.values() if m is not None)
    # No event lost its attribution: it is on a live profile that holds one of its identifiers.
    for event_id, keys in zip(ids, events, strict=True):
        profile = attributed[event_id]
        assert merged[profile] is None
        assert any(owners.get(k) == profile for k in keys), f"event {event_id} attributed away from its identifiers"
    per_profile: dict[tuple[str, str], int] = {}
    for (t, _v), p in owners.items():
        per_profile[(p, t)] = per_profile.get((p, t), 0) + 1
    for (p, t), n in per_profile.items():
        assert n <= limits[t], f"profile {p} holds {n} {t} values, limit {limits[t]}"
    return owners


def apply_with_workers(
    settings: Settings, engine: Engine, redis_client: Any, rules: dict[str, Any], events: Sequence[Sequence[Key]]
) -> tuple[str, list[str]]:
    """A fresh tenant with these rules; publish the events at once and wait until all are applied."""
    tenant = make_tenant(engine, "cc")
    IdentityStore(engine).save_rules(tenant.tenant_id, rules, {})
    ids = publish(Bus(redis_client, settings.redis_prefix), tenant.tenant_id, events)
    wait_linked(engine, tenant.tenant_id, len(ids), timeout=60)
    return tenant.tenant_id, ids


EVENTS_STRATEGY = st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3), min_size=10, max_size=60)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=EVENTS_STRATEGY)
def test_partition_equals_connected_components_with_several_workers(
    workers: list[ServiceProcess],
    settings: Settings,
    engine: Engine,
    redis_client: Any,
    events: list[list[Key]],
) -> None:
    tenant_id, ids = apply_with_workers(settings, engine, redis_client, UNLIMITED, events)
    owners = check_invariants(engine, tenant_id, ids, events, dict.fromkeys(TYPES, 1000))
    assert partition(owners) == components(events)
    assert all(p.poll() is None for p in workers), "a worker died"


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=EVENTS_STRATEGY)
def test_limits_hold_and_attribution_survives_with_several_workers(
    workers: list[ServiceProcess],
    settings: Settings,
    engine: Engine,
    redis_client: Any,
    events: list[list[Key]],
) -> None:
    tenant_id, ids = apply_with_workers(settings, engine, redis_client, LIMITED, events)
    check_invariants(engine, tenant_id, ids, events, {"user_id": 1, "device_id": 2, "anonymous_id": 3})


def change_key(change: stream_pb2.ProfileChange) -> tuple[int, str]:
    """What one change announces, which happens once in a profile's life: its creation, or its being
    merged away (an absorbed profile never comes back; an unmerge makes a new one)."""
    if change.kind == CREATED:
        return (CREATED, change.profile_id)
    assert change.kind == MERGED, f"no {change.kind} change expected here"
    return (MERGED, change.absorbed_profile_id)


def check_nothing_doubled(engine: Engine, redis_client: Any, bus: Bus, tenant_id: str, event_ids: set[str]) -> None:
    """What a crash and a redelivery could double: merge facts and the changes announcing them.

    Each fact absorbs a profile that is merged away ever after, so a run records exactly one fact per
    profile merged away (profiles created minus the live ones, one per connected component), and
    an event of the mix carries at most two identifiers, so it causes at most one merge.

    The outbox may put one change on the stream twice (it publishes, then commits its delete;
    consumers dedupe on the bytes), so the stream is read as its distinct envelopes: one per profile
    created and one per merge fact, each naming exactly that fact. A change made a second time, as
    when a redelivered event is applied again, differs at least in its time, and is caught."""
    with engine.connect() as conn:
        facts = conn.execute(
            sa.text(
                "SELECT merge_id, kind, survivor_id::text, absorbed_id::text, event_id FROM identity.merges "
                "WHERE tenant_id = :t"
            ),
            {"t": tenant_id},
        ).all()
        profiles: dict[str, str | None] = {
            p: into
            for p, into in conn.execute(
                sa.text("SELECT profile_id::text, merged_into::text FROM identity.profiles WHERE tenant_id = :t"),
                {"t": tenant_id},
            )
        }
    merged_away = {p for p, into in profiles.items() if into is not None}
    live = set(profiles) - merged_away
    assert facts, "the mix merged nothing: nothing to double"
    assert len(facts) == len(profiles) - len(live), "merge facts are not one per profile merged away"
    assert {kind for _, kind, _, _, _ in facts} == {identity_pb2.MERGE_KIND_DETERMINISTIC}
    absorbed = [a for _, _, _, a, _ in facts]
    assert len(absorbed) == len(set(absorbed)), "two merge facts absorb the same profile"
    assert set(absorbed) == merged_away
    causes = [e for _, _, _, _, e in facts]
    assert len(causes) == len(set(causes)) and set(causes) <= event_ids, "an event caused two merge facts"
    assert all(s in profiles for _, _, s, _, _ in facts)

    raw = [fields[ENTRY_FIELD] for _, fields in redis_client.xrange(bus.key(tenant_id, streams.CHANGES.name))]
    distinct = [streams.decode(streams.CHANGES, b, tenant_id).change for b in set(raw)]
    doubled = {k: n for k, n in Counter(change_key(c) for c in distinct).items() if n > 1}
    assert not doubled, f"changes announced twice, differently: {sorted(doubled)[:5]}"
    announced = {change_key(c): c for c in distinct}
    assert announced.keys() == {(CREATED, p) for p in profiles} | {(MERGED, a) for a in absorbed}
    for merge_id, _, survivor, absorbed_id, event_id in facts:
        c = announced[(MERGED, absorbed_id)]
        assert (c.profile_id, c.merge_id, c.event_id) == (survivor, merge_id, event_id)


def test_kill_9_mid_batch_the_survivor_finishes_with_nothing_lost_or_doubled(
    settings: Settings, engine: Engine, redis_client: Any, tmp_path: Path
) -> None:
    procs = start_workers(
        settings,
        2,
        tmp_path,
        TESSERA_CONSUMER_BATCH_SIZE="50",
        TESSERA_CONSUMER_CLAIM_IDLE_MS="1000",
        # The survivor sweeps what the dead worker committed and never published, soon.
        TESSERA_OUTBOX_GRACE_SECONDS="0.5",
        TESSERA_OUTBOX_SWEEP_SECONDS="0.2",
    )
    try:
        tenant = make_tenant(engine, "kill")
        IdentityStore(engine).save_rules(tenant.tenant_id, UNLIMITED, {})
        # Chains of people: event n joins person n//3 with a shared device every 10th event.
        events: list[list[Key]] = []
        for n in range(3000):
            keys: list[Key] = [("user_id", f"u{n // 3}")]
            if n % 10 == 0:
                keys.append(("device_id", f"d{n // 40}"))
            events.append(keys)
        bus = Bus(redis_client, settings.redis_prefix)
        ids, payloads = event_payloads(events)
        publish_events(bus, tenant.tenant_id, payloads)
        deadline = time.monotonic() + 60
        while linked_count(engine, tenant.tenant_id) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(5)
        applied = linked_count(engine, tenant.tenant_id)
        assert applied < len(ids), "the kill came too late to test anything"
        # Some events applied before the kill come again, as after a crash between commit and
        # acknowledgement (the kill itself may or may not have left such a window).
        done = linked_ids(engine, tenant.tenant_id)
        again = [(i, p) for p, i in zip(payloads, ids, strict=True) if i in done][:200]
        assert again
        publish_events(bus, tenant.tenant_id, [p for _, p in again])
        wait_linked(engine, tenant.tenant_id, len(ids), timeout=90)
        wait_resolved_twice(redis_client, bus, tenant.tenant_id, {i for i, _ in again}, timeout=30)
        wait_outbox_drained(engine, tenant.tenant_id, timeout=30)
        owners = check_invariants(engine, tenant.tenant_id, ids, events, dict.fromkeys(TYPES, 1000))
        assert partition(owners) == components(events)
        # Downstream got every event at least once (a redelivery may repeat one; consumers dedupe).
        resolved = {env.event.event_id for _, env in entries(redis_client, bus, tenant.tenant_id, streams.RESOLVED)}
        assert resolved == set(ids)
        check_nothing_doubled(engine, redis_client, bus, tenant.tenant_id, set(ids))
        assert procs[1].poll() is None
    finally:
        stop_workers(procs)


def test_probabilistic_matching_is_not_lost_between_concurrent_batches(
    workers: list[ServiceProcess], settings: Settings, engine: Engine, redis_client: Any
) -> None:
    """Duplicates spread over batches that three workers apply at once still merge: a tenant's
    matching batches take one lock, so each sees every record committed before it."""
    from bench.identity_accuracy_offline import load_traits
    from services.identity.matching import compare, record_from_traits, score

    by_person: dict[str, list[dict[str, Any]]] = {}
    for rec_id, traits in load_traits():
        by_person.setdefault(rec_id.split("-")[1], []).append(traits)
    pairs = []
    for person in sorted(by_person):
        a, b = (record_from_traits(t) for t in by_person[person])
        # Pairs the matcher merges on their own (FEBRL replaced some duplicates' birth dates or ids:
        # strong conflicts, which only a person may merge).
        if a is not None and b is not None and score(a, b)[0] >= 0.9999 and not compare(a, b).conflicts:
            pairs.append(by_person[person])
        if len(pairs) == 60:
            break
    tenant = make_tenant(engine, "pm")
    IdentityStore(engine).save_rules(tenant.tenant_id, {}, {"enabled": True})
    # Four originals, then their four duplicates, and so on: with batches of four, each duplicate
    # lands in the batch right after its original's, which another worker applies at the same time.
    records = [
        (f"p{n}-{side}", pairs[n][side])
        for start in range(0, len(pairs), 4)
        for side in (0, 1)
        for n in range(start, min(start + 4, len(pairs)))
    ]
    ids, payloads = [], []
    for anon, traits in records:
        ev = event_pb2.Event(
            event_id=str(uuid.uuid4()),
            channel=event_pb2.CHANNEL_OTHER,
            identifiers=[event_pb2.Identifier(type="anonymous_id", value=anon)],
            identify=event_pb2.Identify(),
        )
        ev.identify.traits.update(traits)
        ids.append(ev.event_id)
        payloads.append(ev.SerializeToString())
    bus = Bus(redis_client, settings.redis_prefix)
    publish_events(bus, tenant.tenant_id, payloads)
    wait_linked(engine, tenant.tenant_id, len(ids), timeout=60)
    owners, _, _ = graph_state(engine, tenant.tenant_id)
    for n in range(len(pairs)):
        assert owners[("anonymous_id", f"p{n}-0")] == owners[("anonymous_id", f"p{n}-1")], f"pair {n} not merged"
    assert len(set(owners.values())) == len(pairs), "records of different people were merged"
