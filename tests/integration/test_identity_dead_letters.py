"""A poison event does not hold back its neighbours in the identity consumer; after its attempts
it goes to the dead-letter stream, and `tessera dead-letters` lists it and replays it."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from services.cli.main import main
from services.core import streams
from services.core.bus import Bus
from services.core.harness import delete_prefix, free_port
from services.core.outbox import EnvelopeTable, Outbox
from services.core.settings import Settings
from services.core.streams import CREATED, MERGED
from services.identity.consumer import build_consumer
from services.identity.resolver import IncomingEvent, Resolver
from services.identity.rules_store import RulesCache
from services.identity.storage import IdentityStore
from tessera.v1 import event_pb2
from tests.conftest import TenantKey
from tests.support.identity import linked_count, person_event
from tests.support.streams import entries, publish_events

EVENTS = streams.EVENTS.name

pytestmark = pytest.mark.integration


def test_poison_event_is_dead_lettered_listed_and_replayed(
    settings: Settings,
    engine: Engine,
    redis_client: Any,
    tenant: TenantKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A prefix of its own, so the session's identity server does not consume these messages.
    prefix = f"{settings.redis_prefix}-dlq"
    bus = Bus(redis_client, prefix)
    store = IdentityStore(engine)
    consumer = build_consumer(
        Resolver(store, RulesCache(store, ttl=0), Outbox(engine, bus, EnvelopeTable("identity"))),
        bus,
        lambda: [tenant.tenant_id],
        name="dlq-test",
        block_ms=10,
        claim_idle_ms=100,
        max_attempts=2,
    )
    good = person_event(("email", "good@example.com"))
    good.event_id = str(uuid.uuid4())
    # Well-formed on the wire, but no timestamp can have 2e9 nanoseconds: applying it fails.
    poison = person_event(("email", "poison@example.com"))
    poison.event_id = poison_id = str(uuid.uuid4())
    poison.timestamp.nanos = 2_000_000_000
    try:
        bus.ensure_group(tenant.tenant_id, EVENTS, "identity")
        publish_events(bus, tenant.tenant_id, [poison.SerializeToString(), good.SerializeToString()])
        deadline = time.monotonic() + 20
        while not bus.dead_letters(tenant.tenant_id, EVENTS) and time.monotonic() < deadline:
            consumer.poll()
            time.sleep(0.05)
        assert linked_count(engine, tenant.tenant_id) == 1, "the good neighbour was applied"
        ((_id, dead),) = bus.dead_letters(tenant.tenant_id, EVENTS)
        assert dead.original_id and dead.group == "identity"

        monkeypatch.setenv("TESSERA_REDIS_URL", settings.require_redis_url())
        monkeypatch.setenv("TESSERA_DATABASE_URL", settings.require_database_url())
        monkeypatch.setenv("TESSERA_REDIS_PREFIX", prefix)
        capsys.readouterr()
        assert main(["dead-letters", "list", tenant.tenant_id, "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["event_id"] == poison_id and row["group"] == "identity" and row["attempts"] == 2
        assert row["carries"] == f"event {poison_id}"
        assert "Error" in row["reason"]

        assert main(["dead-letters", "replay", tenant.tenant_id, "--id", row["id"]]) == 0
        assert "replayed 1" in capsys.readouterr().out
        assert bus.dead_letters(tenant.tenant_id, EVENTS) == []
        # Back on the stream for the group: still poison, so it fails again rather than vanishing.
        consumer.poll()
        pending = redis_client.xpending(bus.key(tenant.tenant_id, EVENTS), "identity")
        assert pending["pending"] == 1
        assert redis_client.xlen(bus.key(tenant.tenant_id, streams.RESOLVED.name)) == 1
    finally:
        delete_prefix(redis_client, prefix)


def test_changes_survive_a_failed_publish_through_the_outbox(
    settings: Settings, engine: Engine, redis_client: Any, tenant: TenantKey
) -> None:
    """Redis gone between commit and publish: the change stays in the outbox and the sweeper sends it."""
    from services.core.bus import connect
    from services.identity.resolver import parse_event

    def incoming(ev: event_pb2.Event) -> IncomingEvent:
        envelope = streams.event_envelope(tenant.tenant_id, "", ev.SerializeToString())
        return parse_event(rules.get(tenant.tenant_id), ev, envelope)

    prefix = f"{settings.redis_prefix}-outbox"
    live = Bus(redis_client, prefix)
    dead = Bus(connect(f"redis://127.0.0.1:{free_port()}/0"), prefix)
    store = IdentityStore(engine)
    rules = RulesCache(store, ttl=0)
    resolver = Resolver(store, rules, Outbox(engine, dead, EnvelopeTable("identity")))
    try:
        events = []
        for anon in ("o-1", "o-2"):
            ev = person_event(("anonymous_id", anon))
            ev.event_id = str(uuid.uuid4())
            events.append(incoming(ev))
        joined = person_event(("anonymous_id", "o-1"), ("anonymous_id", "o-2"))
        joined.event_id = str(uuid.uuid4())
        events.append(incoming(joined))
        # Commits; its outbox thread is not running (as if the process died right after the commit).
        result = resolver.resolve_batch(tenant.tenant_id, events)
        assert [c.kind for c in result.changes] == [CREATED, CREATED, MERGED]
        assert redis_client.xlen(live.key(tenant.tenant_id, streams.CHANGES.name)) == 0

        assert Outbox(engine, live, EnvelopeTable("identity"), grace_seconds=0).sweep() >= 3
        sent = [env.change.kind for _, env in entries(redis_client, live, tenant.tenant_id, streams.CHANGES)]
        assert sent == [CREATED, CREATED, MERGED]
        with engine.connect() as conn:
            left = conn.exec_driver_sql(
                "SELECT count(*) FROM identity.outbox WHERE tenant_id = %(t)s", {"t": tenant.tenant_id}
            ).scalar_one()
        assert left == 0
    finally:
        delete_prefix(redis_client, prefix)
