"""Probabilistic matching through the resolver on real PostgreSQL, one event per batch as the
consumer applies a stream: households stay apart (held back for review, with why), a profile is
matched as a whole across batches, a person's records merge with the evidence ExplainLink shows,
and the tenant's value counts follow the records (erasure takes them out)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.outbox import EnvelopeTable, Outbox
from services.core.settings import Settings
from services.identity.matching import MERGE, MatchRecord, decide, record_from_traits
from services.identity.probabilistic import Thresholds
from services.identity.reads import IdentityReads
from services.identity.resolver import Resolver, parse_event
from services.identity.rules_store import RulesCache
from services.identity.servicer import merge_proto
from services.identity.storage import IdentityStore
from tessera.v1 import event_pb2, identity_pb2
from tests.conftest import TenantKey
from tests.support.households import households, traits

pytestmark = pytest.mark.integration


@pytest.fixture
def resolver(settings: Settings, engine: Engine, redis_client: Any) -> Iterator[Resolver]:
    # A prefix of its own, so the session's identity server does not consume anything of ours.
    bus = Bus(redis_client, f"{settings.redis_prefix}-match")
    store = IdentityStore(engine)
    yield Resolver(store, RulesCache(store, ttl=0), Outbox(engine, bus, EnvelopeTable("identity")))


def apply(resolver: Resolver, tenant_id: str, anon: str, person: dict[str, str]) -> str:
    """One Identify event, alone in its batch; returns its profile."""
    ev = event_pb2.Event(
        event_id=str(uuid.uuid4()),
        message_id=f"m-{anon}-{uuid.uuid4().hex[:6]}",
        source="crm",
        identifiers=[event_pb2.Identifier(type="anonymous_id", value=anon)],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(person)
    ev.timestamp.GetCurrentTime()
    rules = resolver.rules.get_full(tenant_id).rules
    incoming = parse_event(rules, ev, streams.event_envelope(tenant_id, "", ev.SerializeToString()), with_traits=True)
    (out,) = resolver.resolve_batch(tenant_id, [incoming]).events
    assert out.profile_id is not None
    return out.profile_id


def enable(resolver: Resolver, tenant_id: str) -> None:
    resolver.store.save_rules(tenant_id, {}, {"enabled": True})  # default thresholds


def rows(engine: Engine, sql: str, tenant_id: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, (tenant_id,)).fetchall()]


def test_households_are_never_auto_merged(resolver: Resolver, tenant: TenantKey, engine: Engine) -> None:
    enable(resolver, tenant.tenant_id)
    pairs = households(seed=2014, n=40)
    profiles = set()
    for i, (a, b, _kind) in enumerate(pairs):
        profiles.add(apply(resolver, tenant.tenant_id, f"h{i}-a", traits(a)))
        profiles.add(apply(resolver, tenant.tenant_id, f"h{i}-b", traits(b)))
    assert len(profiles) == 2 * len(pairs)
    assert rows(engine, "SELECT count(*) FROM identity.merges WHERE tenant_id = %s", tenant.tenant_id) == [(0,)]
    held = rows(
        engine,
        "SELECT evidence->>'held_back' FROM identity.match_suggestions WHERE tenant_id = %s AND evidence ? 'held_back'",
        tenant.tenant_id,
    )
    # Close enough to merge on their score: a person reviews them, told why they were held back.
    assert len(held) >= len(pairs) // 2
    assert all(h[0].startswith("strong conflict: ") for h in held)


def test_a_profile_is_matched_as_a_whole_across_batches(resolver: Resolver, tenant: TenantKey, engine: Engine) -> None:
    enable(resolver, tenant.tenant_id)
    ((father, son, _),) = households(seed=7, n=1)
    father_profile = apply(resolver, tenant.tenant_id, "father-phone", traits(father))
    son_profile = apply(resolver, tenant.tenant_id, "family-tablet", traits(son))
    assert son_profile != father_profile
    # The father's details arrive from the family's shared tablet, whose id the son's profile
    # holds: the record alone matches the father's profile (everything agrees), but merging would
    # join the son's records with the father's. The stored record of the son is what says no.
    again = apply(resolver, tenant.tenant_id, "family-tablet", traits(father))
    assert again == son_profile
    assert resolver.store.survivor(tenant.tenant_id, son_profile) != resolver.store.survivor(
        tenant.tenant_id, father_profile
    )
    assert rows(engine, "SELECT count(*) FROM identity.merges WHERE tenant_id = %s", tenant.tenant_id) == [(0,)]
    # The pair waits for a person (suggested when the son's first record arrived; a pair once).
    assert len(rows(engine, "SELECT 1 FROM identity.match_suggestions WHERE tenant_id = %s", tenant.tenant_id)) == 1
    # The record alone would have merged: it is the son's stored record that held it back.
    alone = decide(father, (), {"father": [father]}, Thresholds.of({}).auto_merge, Thresholds.of({}).review)
    assert alone is not None and alone.action == MERGE


ADA = {
    "first_name": "Adaline",
    "last_name": "Okonkwo",
    "date_of_birth": "1985-12-10",
    "street_number": "12",
    "address_line1": "wattle street",
    "city": "canberra",
    "postcode": "2602",
    "state": "act",
    "national_id": "4417281",
}


def test_a_merge_shows_each_fields_level_and_weight(resolver: Resolver, tenant: TenantKey, engine: Engine) -> None:
    enable(resolver, tenant.tenant_id)
    first = apply(resolver, tenant.tenant_id, "ada-web", ADA)
    again = {**ADA, "first_name": "Adeline", "address_line1": "wattle st", "national_id": "4417231"}
    assert apply(resolver, tenant.tenant_id, "ada-crm", again) == first
    (merge,) = IdentityReads(resolver.store).merges(tenant.tenant_id)
    msg = merge_proto(merge)
    assert msg.kind == identity_pb2.MERGE_KIND_PROBABILISTIC
    levels = {f.field: f.level for f in msg.field_evidence}
    assert levels["first_name"] == "one typo" and levels["last_name"] == "exact"
    assert levels["national_id"] == "one edit" and levels["date_of_birth"] == "exact"
    counted = sum(f.weight_bits for f in msg.field_evidence if f.counted)
    assert msg.prior_bits < 0 < msg.total_bits
    assert msg.prior_bits + counted == pytest.approx(msg.total_bits, abs=1e-2)
    assert msg.evidence["last_name"] == pytest.approx({f.field: f.weight_bits for f in msg.field_evidence}["last_name"])


def test_value_counts_follow_the_records_and_erasure(resolver: Resolver, tenant: TenantKey, engine: Engine) -> None:
    enable(resolver, tenant.tenant_id)
    people = [
        {**ADA, "first_name": name, "last_name": last, "date_of_birth": f"19{50 + i}-0{1 + i % 9}-1{i % 10}",
         "street_number": str(i + 1), "national_id": f"{1000000 + i * 7919}"}
        for i, (name, last) in enumerate([("ann", "smith"), ("bob", "smith"), ("cy", "smith"), ("di", "zyx")])
    ]  # fmt: skip
    pids = [apply(resolver, tenant.tenant_id, f"p{i}", p) for i, p in enumerate(people)]
    assert len(set(pids)) == 4
    counts = dict(
        ((f, v), n)
        for f, v, n in rows(
            engine, "SELECT field, value, n FROM identity.match_value_counts WHERE tenant_id = %s", tenant.tenant_id
        )
    )
    assert counts[("last_name", "smith")] == 3 and counts[("last_name", "zyx")] == 1
    assert counts[("last_name", "")] == 4 and counts[("city", "canberra")] == 4
    rec = record_from_traits(people[3])
    assert isinstance(rec, MatchRecord)
    resolver.erase(tenant.tenant_id, pids[3])
    after = dict(
        ((f, v), n)
        for f, v, n in rows(
            engine, "SELECT field, value, n FROM identity.match_value_counts WHERE tenant_id = %s", tenant.tenant_id
        )
    )
    assert ("last_name", "zyx") not in after and ("first_name", "di") not in after  # no trace of her
    assert after[("last_name", "")] == 3 and after[("city", "canberra")] == 3


def test_explain_link_shows_the_probabilistic_merge(
    resolver: Resolver, tenant: TenantKey, engine: Engine, identity_channel: Any
) -> None:
    from tessera.v1 import identity_pb2_grpc

    enable(resolver, tenant.tenant_id)
    apply(resolver, tenant.tenant_id, "ex-web", ADA)
    apply(resolver, tenant.tenant_id, "ex-crm", {**ADA, "last_name": "Okonkow", "postcode": "2620"})
    stub = identity_pb2_grpc.IdentityServiceStub(identity_channel)
    explain = stub.ExplainLink(
        identity_pb2.ExplainLinkRequest(
            identifier_a=event_pb2.Identifier(type="anonymous_id", value="ex-web"),
            identifier_b=event_pb2.Identifier(type="anonymous_id", value="ex-crm"),
        ),
        metadata=tenant.metadata,
    )
    assert explain.linked
    (step,) = explain.chain
    assert step.kind == identity_pb2.MERGE_KIND_PROBABILISTIC and "probabilistic: score" in explain.summary
    by_field = {f.field: f for f in step.field_evidence}
    assert by_field["last_name"].level == "one typo" and by_field["postcode"].level == "one edit"
    assert by_field["first_name"].level == "exact" and by_field["first_name"].weight_bits > 0
    assert step.total_bits == pytest.approx(
        step.prior_bits + sum(f.weight_bits for f in by_field.values() if f.counted), abs=1e-2
    )
