"""Probabilistic matching through the running service: off by default; when on, a record above the
auto-merge threshold merges (recorded with score and evidence), one between the thresholds becomes
a suggestion a person accepts or rejects, and one below them stays apart.

Thresholds are set from the matcher's own scores for these records, so this tests what the service
does with a score; the matcher's calibration is measured by ``tessera bench identity-accuracy``.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy.engine import Engine

from services.core.server import RunningServer
from services.identity.matching import record_from_traits, score
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import uid
from tests.support.identity import send, wait_linked

pytestmark = pytest.mark.integration

Ident = event_pb2.Identifier
OPEN = identity_pb2.MATCH_SUGGESTION_STATE_OPEN

ADA = {
    "first_name": "Adaline",
    "last_name": "Lovelace",
    "date_of_birth": "1985-12-10",
    "street_number": "12",
    "address_line1": "wattle street",
    "city": "canberra",
    "postcode": "2602",
    "state": "act",
    "national_id": "4417281",
}
# The same person typed by another system: typos in names, street abbreviated, id digit slip.
ADA_AGAIN = {
    **ADA,
    "first_name": "Adeline",
    "last_name": "Lovelase",
    "address_line1": "wattle st",
    "national_id": "4417231",
}
# Same name and birthday, elsewhere: maybe her, maybe not.
NAMESAKE = {
    **ADA,
    "street_number": "3",
    "address_line1": "collins street",
    "city": "melbourne",
    "postcode": "3000",
    "state": "vic",
    "national_id": "9902113",
}
# Shares only the family name and town.
NEIGHBOUR = {
    "first_name": "Brian",
    "last_name": "Lovelace",
    "date_of_birth": "1951-02-03",
    "street_number": "40",
    "address_line1": "banksia road",
    "city": "canberra",
    "postcode": "2602",
    "state": "act",
    "national_id": "1200458",
}


def scored(a: dict[str, str], b: dict[str, str]) -> float:
    ra, rb = record_from_traits(a), record_from_traits(b)
    assert ra is not None and rb is not None
    return score(ra, rb)[0]


def identify(anon: str, traits: dict[str, str]) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=uid("idf"),
        channel=event_pb2.CHANNEL_WEB,
        source="crm-sync",
        identifiers=[Ident(type="anonymous_id", value=anon)],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(traits)
    ev.timestamp.GetCurrentTime()
    return ev


@pytest.fixture
def stubs(
    ingest_channel: grpc.Channel, identity_channel: grpc.Channel, identity_server: RunningServer
) -> tuple[ingest_pb2_grpc.IngestServiceStub, identity_pb2_grpc.IdentityServiceStub]:
    return ingest_pb2_grpc.IngestServiceStub(ingest_channel), identity_pb2_grpc.IdentityServiceStub(identity_channel)


def resolve(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, anon: str) -> str:
    req = identity_pb2.ResolveIdentifiersRequest(identifiers=[Ident(type="anonymous_id", value=anon)])
    return str(stub.ResolveIdentifiers(req, metadata=tenant.metadata).profile_id)


def enable(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, auto: float, review: float) -> None:
    rules = identity_pb2.IdentityRules(
        probabilistic=identity_pb2.ProbabilisticMatching(
            enabled=True, auto_merge_threshold=auto, review_threshold=review
        )
    )
    stub.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(
            rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["probabilistic"])
        ),
        metadata=tenant.metadata,
    )


def suggestions(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, state: int = OPEN) -> list[Any]:
    req = identity_pb2.ListMatchSuggestionsRequest(state=state)  # type: ignore[arg-type]
    return list(stub.ListMatchSuggestions(req, metadata=tenant.metadata).suggestions)


def test_off_by_default(
    stubs: tuple[ingest_pb2_grpc.IngestServiceStub, identity_pb2_grpc.IdentityServiceStub],
    tenant: TenantKey,
    engine: Engine,
) -> None:
    ingest, identity = stubs
    send(ingest, tenant.metadata, identify("a-1", ADA), identify("a-2", ADA))
    wait_linked(engine, tenant.tenant_id, 2)
    assert resolve(identity, tenant, "a-1") != resolve(identity, tenant, "a-2")
    assert suggestions(identity, tenant) == []


def test_auto_merge_suggest_accept_reject(
    stubs: tuple[ingest_pb2_grpc.IngestServiceStub, identity_pb2_grpc.IdentityServiceStub],
    tenant: TenantKey,
    engine: Engine,
) -> None:
    ingest, identity = stubs
    dup, mid, low = scored(ADA, ADA_AGAIN), scored(ADA, NAMESAKE), scored(ADA, NEIGHBOUR)
    assert dup > mid > low, (dup, mid, low)
    enable(identity, tenant, auto=(dup + mid) / 2, review=(mid + low) / 2)
    md = tenant.metadata

    send(ingest, md, identify("ada-web", ADA))
    wait_linked(engine, tenant.tenant_id, 1)
    send(ingest, md, identify("ada-crm", ADA_AGAIN))
    wait_linked(engine, tenant.tenant_id, 2)
    ada = resolve(identity, tenant, "ada-web")
    assert resolve(identity, tenant, "ada-crm") == ada
    (merge,) = identity.ListMerges(identity_pb2.ListMergesRequest(), metadata=md).merges
    assert merge.kind == identity_pb2.MERGE_KIND_PROBABILISTIC
    assert merge.score == pytest.approx(dup) and merge.evidence and "probabilistic" in merge.rule

    send(ingest, md, identify("namesake", NAMESAKE), identify("neighbour", NEIGHBOUR))
    wait_linked(engine, tenant.tenant_id, 4)
    namesake, neighbour = resolve(identity, tenant, "namesake"), resolve(identity, tenant, "neighbour")
    assert len({ada, namesake, neighbour}) == 3
    (open_one,) = suggestions(identity, tenant)
    assert {open_one.profile_a, open_one.profile_b} == {f"profiles/{ada}", f"profiles/{namesake}"}
    # Scored against Ada's whole profile, with the tenant's value frequencies (three of its four
    # records share the surname), so not exactly the pairwise score; between the thresholds.
    assert (mid + low) / 2 <= open_one.score < (dup + mid) / 2 and open_one.evidence
    assert {f.field for f in open_one.field_evidence} >= {"first_name", "last_name", "date_of_birth"}

    accepted = identity.ReviewMatchSuggestion(
        identity_pb2.ReviewMatchSuggestionRequest(name=open_one.name, accept=True, reason="same passport"),
        metadata=md,
    )
    assert accepted.suggestion.state == identity_pb2.MATCH_SUGGESTION_STATE_ACCEPTED
    assert accepted.merge.kind == identity_pb2.MERGE_KIND_SUGGESTION and accepted.merge.reason == "same passport"
    assert resolve(identity, tenant, "namesake") == ada
    assert suggestions(identity, tenant) == []
    with pytest.raises(grpc.RpcError) as err:
        identity.ReviewMatchSuggestion(
            identity_pb2.ReviewMatchSuggestionRequest(name=open_one.name, accept=False), metadata=md
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_rejected_suggestion_keeps_profiles_apart(
    stubs: tuple[ingest_pb2_grpc.IngestServiceStub, identity_pb2_grpc.IdentityServiceStub],
    engine: Engine,
) -> None:
    ingest, identity = stubs
    tenant = make_tenant(engine, "rej")
    dup, mid, low = scored(ADA, ADA_AGAIN), scored(ADA, NAMESAKE), scored(ADA, NEIGHBOUR)
    enable(identity, tenant, auto=(dup + mid) / 2, review=(mid + low) / 2)
    send(ingest, tenant.metadata, identify("ada", ADA))
    wait_linked(engine, tenant.tenant_id, 1)
    send(ingest, tenant.metadata, identify("namesake", NAMESAKE))
    wait_linked(engine, tenant.tenant_id, 2)
    (s,) = suggestions(identity, tenant)
    rejected = identity.ReviewMatchSuggestion(
        identity_pb2.ReviewMatchSuggestionRequest(name=s.name, accept=False, reason="different people"),
        metadata=tenant.metadata,
    )
    assert rejected.suggestion.state == identity_pb2.MATCH_SUGGESTION_STATE_REJECTED
    assert not rejected.HasField("merge")
    assert resolve(identity, tenant, "ada") != resolve(identity, tenant, "namesake")
    assert suggestions(identity, tenant) == []
    assert [x.name for x in suggestions(identity, tenant, identity_pb2.MATCH_SUGGESTION_STATE_REJECTED)] == [s.name]
    # The same pair is not proposed again by a later look-alike event.
    send(ingest, tenant.metadata, identify("namesake", NAMESAKE))
    wait_linked(engine, tenant.tenant_id, 3)
    assert suggestions(identity, tenant) == []

    with pytest.raises(grpc.RpcError) as err:
        identity.ReviewMatchSuggestion(
            identity_pb2.ReviewMatchSuggestionRequest(name="matchSuggestions/x"), metadata=tenant.metadata
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        identity.ReviewMatchSuggestion(
            identity_pb2.ReviewMatchSuggestionRequest(name="matchSuggestions/999999"), metadata=tenant.metadata
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
