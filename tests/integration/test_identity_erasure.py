"""EraseProfile on real PostgreSQL and Redis, checked by scanning every row of every table of the
identity schema (the tables are read from information_schema, not listed here): after erasure the
person's identifier values, trait values (names, birth date, address, national id), blocking keys
and client message ids are nowhere, and nobody else loses anything: not a namesake of the same
tenant, not another tenant holding exactly the same person."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.server import RunningServer
from services.core.settings import Settings
from services.core.streams import ERASED
from services.identity.matching import blocking_keys, record_from_traits, score
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.identity import (
    enable_matching,
    event_profile,
    identify_event,
    linked_count,
    person_event,
    rows_mentioning,
    send,
    tenant_rows,
    wait_linked,
    wait_outbox_drained,
)
from tests.support.streams import wait_entries

pytestmark = pytest.mark.integration

Ident = event_pb2.Identifier
OPEN = identity_pb2.MATCH_SUGGESTION_STATE_OPEN


@pytest.fixture
def ingest(ingest_channel: grpc.Channel) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(ingest_channel)


@pytest.fixture
def identity(identity_channel: grpc.Channel, identity_server: RunningServer) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(identity_channel)


# One person typed by two systems (surname typo, street abbreviated, id digit slip), and a namesake:
# same name and birth date, nothing else. Values long and odd enough to find in a scan of every row.
OQ_WEB = {
    "first_name": "Ottoline",
    "last_name": "Quarendon",
    "date_of_birth": "1979-04-23",
    "address_line1": "marrowfen street",
    "city": "thistlebury",
    "national_id": "73916482",
}
OQ_CRM = {**OQ_WEB, "last_name": "Quarenden", "address_line1": "marrowfen st", "national_id": "73916432"}
OQ_NAMESAKE = {**OQ_WEB, "address_line1": "brackenholt road", "city": "wexmoor", "national_id": "20558317"}

PHONE, DEVICE, EMAIL = ("phone", "+14155550188"), ("device_id", "dev-oq-7731"), ("email", "o.q.private@example.com")
WEB_ANON, CRM_ANON, NAMESAKE_ANON = (
    ("anonymous_id", "anon-oq-web"),
    ("anonymous_id", "anon-oq-crm"),
    ("anonymous_id", "anon-namesake"),
)
IDENTS = (PHONE, DEVICE, EMAIL, WEB_ANON, CRM_ANON)


def trait_values(*traits: dict[str, str]) -> set[str]:
    """The values as sent and as stored: normalized in trait records, and the blocking keys."""
    out = {v for t in traits for v in t.values()}
    for t in traits:
        rec = record_from_traits(t)
        assert rec is not None
        out |= set(rec.to_json().values()) | set(blocking_keys(rec))
    return out


def resolve(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, ident: tuple[str, str]) -> str:
    req = identity_pb2.ResolveIdentifiersRequest(identifiers=[Ident(type=ident[0], value=ident[1])])
    return str(stub.ResolveIdentifiers(req, metadata=tenant.metadata, timeout=5).profile_id)


@dataclass(frozen=True)
class Person:
    """What one tenant holds of Ottoline Q. and her namesake, as the scenario built it."""

    survivor: str  # the profile everything merged into
    web_profile: str  # one merged into it
    ids: frozenset[str]  # the survivor and the two profiles merged into it
    namesake: str  # the namesake's profile
    namesake_event: str
    event_ids: tuple[str, ...]  # Ottoline's events
    message_ids: frozenset[str]  # their client message ids


def build_person(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    engine: Engine,
    tenant: TenantKey,
) -> Person:
    """Through the public APIs: identifiers, a deterministic merge, Identify traits from two systems
    that auto-merge probabilistically, and a namesake left as an open match suggestion."""
    md, t = tenant.metadata, tenant.tenant_id
    ra, rb, rn = (record_from_traits(x) for x in (OQ_WEB, OQ_CRM, OQ_NAMESAKE))
    assert ra and rb and rn
    dup, namesake = score(ra, rb)[0], score(ra, rn)[0]
    assert dup > namesake
    enable_matching(identity, md, auto=(dup + namesake) / 2, review=namesake / 2)

    def step(ev: event_pb2.Event) -> str:
        """Send one event and wait until identity has applied it."""
        before = linked_count(engine, t)
        (event_id,) = send(ingest, md, ev)
        wait_linked(engine, t, before + 1)
        return event_id

    sent = [
        person_event(PHONE, DEVICE),
        identify_event(OQ_WEB, WEB_ANON, EMAIL),
        person_event(EMAIL, PHONE),  # deterministic: the web profile merges into the phone one
        identify_event(OQ_CRM, CRM_ANON),  # probabilistic: auto-merges into it too
    ]
    phone_event, web_event = step(sent[0]), step(sent[1])
    # The namesake scores between the thresholds: an open suggestion with the web profile.
    namesake_event = step(identify_event(OQ_NAMESAKE, NAMESAKE_ANON))
    join_event, crm_event = step(sent[2]), step(sent[3])
    event_ids = (phone_event, web_event, join_event, crm_event)
    survivor, web_profile, _, crm_profile = (event_profile(engine, t, e) for e in event_ids)
    assert survivor and web_profile and crm_profile
    ids = {survivor, web_profile, crm_profile}
    other = resolve(identity, tenant, NAMESAKE_ANON)
    assert len(ids) == 3 and other not in ids
    assert {resolve(identity, tenant, i) for i in IDENTS} == {survivor}
    merges = identity.ListMerges(identity_pb2.ListMergesRequest(), metadata=md).merges
    assert sorted((m.kind, m.absorbed_profile_id) for m in merges) == [
        (identity_pb2.MERGE_KIND_DETERMINISTIC, web_profile),
        (identity_pb2.MERGE_KIND_PROBABILISTIC, crm_profile),
    ]
    req = identity_pb2.ListMatchSuggestionsRequest(state=OPEN)
    (suggestion,) = identity.ListMatchSuggestions(req, metadata=md).suggestions
    assert {suggestion.profile_a, suggestion.profile_b} == {f"profiles/{web_profile}", f"profiles/{other}"}
    return Person(
        survivor, web_profile, frozenset(ids), other, namesake_event, event_ids, frozenset(e.message_id for e in sent)
    )


SHARED = trait_values(OQ_WEB) & trait_values(OQ_NAMESAKE)  # the namesake's own data too
TRAITS = trait_values(OQ_WEB, OQ_CRM) - SHARED
IDENT_VALUES = {v for _, v in IDENTS}


def test_erase_leaves_nothing_of_the_person_in_any_identity_table_and_takes_nothing_else(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
    redis_client: Any,
    settings: Settings,
) -> None:
    """A GDPR erasure (README: "the profile's identifiers, trait records and suggestions are deleted,
    identifier values are removed from its merge facts") of a person with identifiers, a
    deterministic and a probabilistic merge, Identify traits and an open match suggestion. Every row
    of every identity table is scanned afterwards: what stays is what erase documents (the erased
    profile rows, merge facts with profile and event ids only, event links with no identifiers).
    A namesake of the same tenant keeps their own record, and another tenant holding the very same
    person, identifiers and traits keeps every row it had, unchanged."""
    md, t = tenant.metadata, tenant.tenant_id
    other_tenant = make_tenant(engine, "erase-other")
    theirs = build_person(ingest, identity, engine, other_tenant)
    me = build_person(ingest, identity, engine, tenant)
    wait_outbox_drained(engine, other_tenant.tenant_id)
    other_before = tenant_rows(engine, other_tenant.tenant_id)
    assert other_before["match_suggestions"] and other_before["match_records"] and other_before["match_blocks"]

    # The scan finds the person where the graph, matching and the merge facts keep them.
    needles = IDENT_VALUES | TRAITS | me.message_ids
    found = rows_mentioning(engine, t, needles)
    assert {"identifiers", "event_links", "merges", "match_records", "match_blocks"} <= found.keys()
    assert "match_suggestions" in rows_mentioning(engine, t, me.ids)

    erased = identity.EraseProfile(
        # By an id merged away: the whole person goes, the survivor and all merged into it.
        identity_pb2.EraseProfileRequest(name=f"profiles/{me.web_profile}", reason="GDPR art. 17 request #1207"),
        metadata=md,
    )
    assert erased.profile == f"profiles/{me.survivor}" and sorted(erased.erased_profile_ids) == sorted(me.ids)
    assert erased.identifiers_erased == len(IDENTS)
    bus = Bus(redis_client, settings.redis_prefix)
    wait_entries(redis_client, bus, t, streams.CHANGES, lambda es: any(e.change.kind == ERASED for _, e in es))
    wait_outbox_drained(engine, t)  # the "erased" change names the ids until it is published

    assert rows_mentioning(engine, t, needles) == {}
    remaining = rows_mentioning(engine, t, me.ids)
    assert {table: len(rows) for table, rows in remaining.items()} == {
        "profiles": 3,
        "merges": 2,
        "event_links": len(me.event_ids),
    }
    # The event ids stay only where they keep redeliveries idempotent and merges explainable.
    assert rows_mentioning(engine, t, me.event_ids).keys() <= {"event_links", "merges"}
    with engine.connect() as conn:
        facts = conn.execute(
            sa.text(
                "SELECT survivor_id::text, identifiers, evidence, message_id FROM identity.merges WHERE tenant_id = :t"
            ),
            {"t": t},
        ).all()
        links = conn.execute(
            sa.text(
                "SELECT event_id, identifiers FROM identity.event_links WHERE tenant_id = :t AND event_id = ANY(:e)"
            ),
            {"t": t, "e": list(me.event_ids)},
        ).all()
        live = conn.execute(
            sa.text(
                "SELECT count(*) FROM identity.profiles WHERE tenant_id = :t "
                "AND profile_id = ANY(CAST(:p AS uuid[])) AND erased_at IS NULL"
            ),
            {"t": t, "p": sorted(me.ids)},
        ).scalar_one()
    assert [tuple(f) for f in facts] == [(me.survivor, [], {}, None)] * 2
    assert sorted(tuple(link) for link in links) == sorted((e, []) for e in me.event_ids)
    assert live == 0
    for ident in IDENTS:
        with pytest.raises(grpc.RpcError) as err:
            resolve(identity, tenant, ident)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Their suggestion went with the person; no other suggestion is left behind.
    assert not identity.ListMatchSuggestions(
        identity_pb2.ListMatchSuggestionsRequest(state=OPEN), metadata=md
    ).suggestions

    # The namesake keeps their own record, which shares the name and birth date: only theirs has them.
    kept = rows_mentioning(engine, t, SHARED)
    # The value counts (term frequencies) still count the namesake's record, and only it.
    kept.pop("match_value_counts", None)
    with engine.connect() as conn:
        counted = conn.execute(
            sa.text(
                "SELECT field, value, n FROM identity.match_value_counts WHERE tenant_id = :t AND value <> '' "
                "AND lower(value) = ANY(:v)"
            ),
            {"t": t, "v": [v.casefold() for v in SHARED]},
        ).all()
    assert counted and all(n == 1 for _f, _v, n in counted), counted
    assert kept.keys() <= {"match_records", "match_blocks"} and len(kept["match_records"]) == 1
    assert all(me.namesake_event in row for rows in kept.values() for row in rows)
    assert resolve(identity, tenant, NAMESAKE_ANON) == me.namesake

    # The other tenant: every row as it was, and its person still whole through the API.
    assert tenant_rows(engine, other_tenant.tenant_id) == other_before
    assert {resolve(identity, other_tenant, i) for i in IDENTS} == {theirs.survivor}
    req = identity_pb2.ListMatchSuggestionsRequest(state=OPEN)
    assert len(identity.ListMatchSuggestions(req, metadata=other_tenant.metadata).suggestions) == 1
