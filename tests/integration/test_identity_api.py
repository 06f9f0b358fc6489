"""Identity end to end on real PostgreSQL and Redis: events go in through the public ingest API,
the identity consumer stitches them, and IdentityService answers for the result."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.engine import Engine

from services.core import pagination, streams
from services.core.bus import Bus
from services.core.server import RunningServer
from services.core.settings import Settings
from services.core.streams import CREATED, ERASED, MERGED, SPLIT
from services.core.tenancy import Tenant, reset_current_tenant, set_current_tenant
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2_grpc
from tests.conftest import TenantKey
from tests.support.events import uid
from tests.support.grpc_errors import bad_request, precondition_failures
from tests.support.identity import (
    event_profile,
    linked_count,
    person_event,
    send,
    wait_linked,
)
from tests.support.streams import entries, publish_events, wait_entries

pytestmark = pytest.mark.integration

Ident = event_pb2.Identifier


@pytest.fixture
def ingest(ingest_channel: grpc.Channel) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(ingest_channel)


@pytest.fixture
def identity(identity_channel: grpc.Channel, identity_server: RunningServer) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(identity_channel)


def resolve(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, t: str, v: str) -> str:
    req = identity_pb2.ResolveIdentifiersRequest(identifiers=[Ident(type=t, value=v)])
    return str(stub.ResolveIdentifiers(req, metadata=tenant.metadata, timeout=5).profile_id)


def add_custom_types(stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, *names: str) -> None:
    rules = stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=tenant.metadata).rules
    for name in names:
        rules.types.add(type=name, normalizer="trim", priority=70, max_per_profile=5)
    stub.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["types"])),
        metadata=tenant.metadata,
    )


def test_one_person_across_channels_becomes_one_profile(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
    redis_client: Any,
    settings: Settings,
) -> None:
    add_custom_types(identity, tenant, "chat_id", "loyalty_id")
    md = tenant.metadata
    web = send(ingest, md, person_event(("email", " Maya.Okafor@Example.com ")))[0]
    voice = send(ingest, md, person_event(("phone", "(415) 555-0199"), channel=event_pb2.CHANNEL_VOICE))[0]
    wait_linked(engine, tenant.tenant_id, 2)
    assert resolve(identity, tenant, "email", "maya.okafor@example.com") != resolve(
        identity, tenant, "phone", "+14155550199"
    )
    # The chat transcript carries both: the two profiles merge into the older one (the web one).
    chat = send(
        ingest,
        md,
        person_event(("chat_id", "c-77"), ("phone", "+1 415 555 0199"), ("email", "maya.okafor@example.com")),
    )[0]
    store = send(ingest, md, person_event(("loyalty_id", "L-1234"), ("chat_id", "c-77")))[0]
    wait_linked(engine, tenant.tenant_id, 4)

    survivor = event_profile(engine, tenant.tenant_id, web)
    assert survivor is not None
    for t, v in [
        ("email", "MAYA.OKAFOR@example.com"),
        ("phone", "415-555-0199"),
        ("chat_id", "c-77"),
        ("loyalty_id", "L-1234"),
    ]:
        assert resolve(identity, tenant, t, v) == survivor

    graph = identity.GetIdentityGraph(
        identity_pb2.GetIdentityGraphRequest(name=f"profiles/{survivor}"), metadata=md
    ).graph
    assert not graph.redirected
    assert {(i.type, i.value) for i in graph.identifiers} == {
        ("email", "maya.okafor@example.com"),
        ("phone", "+14155550199"),
        ("chat_id", "c-77"),
        ("loyalty_id", "L-1234"),
    }
    first = {i.type: i for i in graph.identifiers}
    assert first["email"].first_event_id == web and first["email"].source == "tests"
    assert first["phone"].first_event_id == voice
    assert first["loyalty_id"].first_event_id == store
    (merge,) = graph.merges
    assert merge.kind == identity_pb2.MERGE_KIND_DETERMINISTIC and merge.event_id == chat
    assert merge.survivor_profile_id == survivor
    absorbed = merge.absorbed_profile_id
    assert absorbed == event_profile(engine, tenant.tenant_id, voice)

    # Attached without a merge: the explanation names the event that brought each one in.
    attached = identity.ExplainLink(
        identity_pb2.ExplainLinkRequest(
            identifier_a=Ident(type="chat_id", value="c-77"), identifier_b=Ident(type="loyalty_id", value="L-1234")
        ),
        metadata=md,
    )
    assert attached.linked and not attached.chain
    assert "no merge was needed" in attached.summary and chat in attached.summary and store in attached.summary

    # The merged-away id keeps resolving, with a flag.
    old = identity.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=f"profiles/{absorbed}"), metadata=md)
    assert old.graph.redirected and old.graph.profile_id == survivor

    # Downstream sees each event stamped with its profile, and the lifecycle changes.
    bus = Bus(redis_client, settings.redis_prefix)
    resolved = entries(redis_client, bus, tenant.tenant_id, streams.RESOLVED)
    by_event = {env.event.event_id: env for _, env in resolved}
    assert set(by_event) == {web, voice, chat, store}
    stamped = by_event[store].event
    assert stamped.profile_id == survivor and stamped.event_id == store
    # The envelope says whose it is, and carries the producer's trace.
    assert by_event[store].tenant_id == tenant.tenant_id
    found = wait_entries(
        redis_client, bus, tenant.tenant_id, streams.CHANGES, lambda es: any(e.change.kind == MERGED for _, e in es)
    )
    changes = [env.change for _, env in found]
    kinds = [(c.kind, c.profile_id) for c in changes]
    assert (CREATED, survivor) in kinds and (CREATED, absorbed) in kinds
    assert (MERGED, survivor) in kinds
    merged = next(c for c in changes if c.kind == MERGED)
    assert merged.absorbed_profile_id == absorbed and merged.event_id == chat and merged.merge_id > 0


def test_merge_chain_explain_and_unmerge(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
) -> None:
    md = tenant.metadata
    c_ev = send(ingest, md, person_event(("anonymous_id", "anon-c")))[0]
    wait_linked(engine, tenant.tenant_id, 1)
    b_ev = send(ingest, md, person_event(("phone", "+442071838750")))[0]
    wait_linked(engine, tenant.tenant_id, 2)
    a_ev = send(ingest, md, person_event(("email", "a@chain.example")))[0]
    wait_linked(engine, tenant.tenant_id, 3)
    a, b, c = (event_profile(engine, tenant.tenant_id, e) for e in (a_ev, b_ev, c_ev))
    assert len({a, b, c}) == 3
    ab = send(ingest, md, person_event(("email", "a@chain.example"), ("phone", "+44 20 7183 8750")))[0]
    wait_linked(engine, tenant.tenant_id, 4)
    bc = send(ingest, md, person_event(("phone", "+442071838750"), ("anonymous_id", "anon-c")))[0]
    wait_linked(engine, tenant.tenant_id, 5)

    # A went into B, B into C (the oldest survives): A resolves to C.
    graph = identity.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=f"profiles/{a}"), metadata=md).graph
    assert graph.redirected and graph.profile_id == c
    assert resolve(identity, tenant, "email", "a@chain.example") == c

    explain = identity.ExplainLink(
        identity_pb2.ExplainLinkRequest(
            identifier_a=Ident(type="email", value="A@chain.example"),
            identifier_b=Ident(type="anonymous_id", value="anon-c"),
        ),
        metadata=md,
    )
    assert explain.linked
    assert [(m.absorbed_profile_id, m.survivor_profile_id, m.event_id) for m in explain.chain] == [
        (a, b, ab),
        (b, c, bc),
    ]
    assert ab in explain.summary and bc in explain.summary
    by_profile = identity.ExplainLink(
        identity_pb2.ExplainLinkRequest(profile_a=f"profiles/{a}", profile_b=f"profiles/{b}"), metadata=md
    )
    assert by_profile.linked and [m.event_id for m in by_profile.chain] == [ab]

    # Undo: split the email off C. Its own event follows it; the others stay.
    split = identity.UnmergeProfile(
        identity_pb2.UnmergeProfileRequest(
            profile=f"profiles/{c}",
            identifiers=[Ident(type="email", value="a@chain.example")],
            reason="shared family device",
        ),
        metadata=md,
    ).merge
    new = split.absorbed_profile_id
    assert split.kind == identity_pb2.MERGE_KIND_UNMERGE and split.survivor_profile_id == c
    assert split.reason == "shared family device"
    assert resolve(identity, tenant, "email", "a@chain.example") == new
    assert resolve(identity, tenant, "phone", "+442071838750") == c
    assert event_profile(engine, tenant.tenant_id, a_ev) == new
    assert event_profile(engine, tenant.tenant_id, b_ev) != new
    not_linked = identity.ExplainLink(
        identity_pb2.ExplainLinkRequest(
            identifier_a=Ident(type="email", value="a@chain.example"),
            identifier_b=Ident(type="anonymous_id", value="anon-c"),
        ),
        metadata=md,
    )
    assert not not_linked.linked and not_linked.summary.startswith("not linked")
    # The split is itself a recorded, listed fact.
    merges = identity.ListMerges(identity_pb2.ListMergesRequest(profile=f"profiles/{c}"), metadata=md).merges
    assert merges[0].name == split.name and merges[0].kind == identity_pb2.MERGE_KIND_UNMERGE


def test_unmerge_moves_only_events_linked_by_nothing_that_stays(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
    redis_client: Any,
    settings: Settings,
) -> None:
    """UnmergeProfile re-attributes "the events that only they link" (README): an event follows the
    split only when every identifier that linked it moves. One also linked by an identifier that
    stays keeps its profile, whether the event was applied to the profile itself or to one merged
    into it. Checked where clients see attribution: the SPLIT change's moved events, and the
    profile a redelivered event is stamped with on the resolved stream."""
    md, t = tenant.metadata, tenant.tenant_id
    email, anon, old_anon = ("email", "split@example.com"), ("anonymous_id", "anon-new"), ("anonymous_id", "anon-old")
    phone, user = ("phone", "+14155550155"), ("user_id", "u-stays")
    (email_only,) = send(ingest, md, person_event(email))
    wait_linked(engine, t, 1)
    phone_and_old_anon, old_anon_only = send(ingest, md, person_event(phone, old_anon), person_event(old_anon))
    wait_linked(engine, t, 3)
    (email_and_phone,) = send(ingest, md, person_event(email, phone))  # the phone's profile merges in
    wait_linked(engine, t, 4)
    (anon_and_email,) = send(ingest, md, person_event(anon, email))
    wait_linked(engine, t, 5)
    user_and_phone, anon_and_user, anon_only = send(
        ingest, md, person_event(user, phone), person_event(anon, user), person_event(anon)
    )
    wait_linked(engine, t, 8)
    events = [
        email_only,
        phone_and_old_anon,
        old_anon_only,
        email_and_phone,
        anon_and_email,
        user_and_phone,
        anon_and_user,
        anon_only,
    ]
    before = {e: event_profile(engine, t, e) for e in events}
    survivor, absorbed = before[email_only], before[phone_and_old_anon]
    assert survivor and absorbed and survivor != absorbed
    assert before[old_anon_only] == absorbed and resolve(identity, tenant, "anonymous_id", "anon-old") == survivor
    assert {before[e] for e in (email_and_phone, anon_and_email, user_and_phone, anon_and_user, anon_only)} == {
        survivor
    }

    split = identity.UnmergeProfile(
        identity_pb2.UnmergeProfileRequest(
            profile=f"profiles/{survivor}",
            identifiers=[Ident(type=ty, value=v) for ty, v in (email, anon, old_anon)],
            reason="two people on one account",
        ),
        metadata=md,
    ).merge
    new = split.absorbed_profile_id
    # Linked only by split-off identifiers: on the profile, or on the one merged into it.
    moved = {email_only, old_anon_only, anon_and_email, anon_only}
    after = {e: event_profile(engine, t, e) for e in events}
    assert after == {e: new if e in moved else before[e] for e in events}
    assert resolve(identity, tenant, "phone", "+14155550155") == survivor
    assert resolve(identity, tenant, "anonymous_id", "anon-old") == new

    bus = Bus(redis_client, settings.redis_prefix)
    found = wait_entries(redis_client, bus, t, streams.CHANGES, lambda es: any(e.change.kind == SPLIT for _, e in es))
    (change,) = [env.change for _, env in found if env.change.kind == SPLIT]
    assert (change.profile_id, change.new_profile_id, f"merges/{change.merge_id}") == (survivor, new, split.name)
    assert sorted(change.moved_event_ids) == sorted(moved)

    # Each event delivered again (as after a crash) goes out stamped with the profile it has now.
    sent = [env.event for _, env in entries(redis_client, bus, t, streams.EVENTS)]
    assert sorted(ev.event_id for ev in sent) == sorted(events)
    seen = len(entries(redis_client, bus, t, streams.RESOLVED))
    publish_events(bus, t, [ev.SerializeToString() for ev in sent])
    resolved = wait_entries(redis_client, bus, t, streams.RESOLVED, lambda es: len(es) >= seen + len(events))
    again = {env.event.event_id: env.event.profile_id for _, env in resolved[seen:]}
    assert again == {e: new if e in moved else survivor for e in events}


def test_explain_link_names_the_clients_message_ids(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
) -> None:
    """The caller knows its message_id, not our event ids: the summary names both."""
    md = tenant.metadata

    def event(message_id: str, *idents: tuple[str, str]) -> event_pb2.Event:
        ev = person_event(*idents)
        ev.message_id = message_id
        return ev

    web, app, anon, joined = (uid(label) for label in ("web", "app", "anon", "join"))
    web_ev = send(ingest, md, event(web, ("email", "mid@example.com")))[0]
    wait_linked(engine, tenant.tenant_id, 1)
    app_ev = send(ingest, md, event(app, ("email", "mid@example.com"), ("phone", "+14155550144")))[0]
    wait_linked(engine, tenant.tenant_id, 2)

    # No merge: each identifier joined the profile with the event that first carried it.
    attached = identity.ExplainLink(
        identity_pb2.ExplainLinkRequest(
            identifier_a=Ident(type="email", value="mid@example.com"),
            identifier_b=Ident(type="phone", value="+14155550144"),
        ),
        metadata=md,
    )
    assert attached.linked and not attached.chain
    assert "no merge was needed" in attached.summary
    assert f'email:mid@example.com joined it with event {web_ev} (message_id "{web}")' in attached.summary
    assert f'phone:+14155550144 joined it with event {app_ev} (message_id "{app}")' in attached.summary

    # A merge: the chain names the event that caused it, and its message_id.
    send(ingest, md, event(anon, ("anonymous_id", "anon-mid")))
    wait_linked(engine, tenant.tenant_id, 3)
    join_ev = send(ingest, md, event(joined, ("phone", "+14155550144"), ("anonymous_id", "anon-mid")))[0]
    wait_linked(engine, tenant.tenant_id, 4)
    request = identity_pb2.ExplainLinkRequest(
        identifier_a=Ident(type="email", value="mid@example.com"),
        identifier_b=Ident(type="anonymous_id", value="anon-mid"),
    )
    merged = identity.ExplainLink(request, metadata=md)
    assert merged.linked and [m.event_id for m in merged.chain] == [join_ev]
    assert f'by event {join_ev} (message_id "{joined}")' in merged.summary

    # Facts recorded before identity kept message ids name only the event id.
    with engine.begin() as conn:
        forget = sa.text("UPDATE identity.merges SET message_id = NULL WHERE tenant_id = :t")
        conn.execute(forget, {"t": tenant.tenant_id})
    old = identity.ExplainLink(request, metadata=md)
    assert old.summary == merged.summary.replace(f' (message_id "{joined}")', "")
    assert "message_id" not in old.summary


def test_blocked_placeholders_never_link(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
) -> None:
    md = tenant.metadata
    send(
        ingest,
        md,
        person_event(("email", "test@test.com"), ("phone", "+14155550111")),
        person_event(("email", "TEST@test.com"), ("phone", "+14155550122")),
        person_event(("email", "unknown"), ("phone", "000-000-0000"), ("device_id", "d-1")),
    )
    wait_linked(engine, tenant.tenant_id, 3)
    p1 = resolve(identity, tenant, "phone", "+14155550111")
    p2 = resolve(identity, tenant, "phone", "+14155550122")
    assert p1 != p2
    with pytest.raises(grpc.RpcError) as err:
        resolve(identity, tenant, "email", "test@test.com")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value)[0][0] == "identifiers[0].value"


def merge_refused(
    stub: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey, survivor: str, absorbed: str, reason: str
) -> grpc.RpcError:
    """The error a MergeProfiles call that must fail fails with."""
    req = identity_pb2.MergeProfilesRequest(survivor_profile=survivor, absorbed_profile=absorbed, reason=reason)
    with pytest.raises(grpc.RpcError) as err:
        stub.MergeProfiles(req, metadata=tenant.metadata)
    return err.value


def test_manual_merge_respects_limits_and_needs_a_reason(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
) -> None:
    md = tenant.metadata
    e1, e2, e3 = send(
        ingest,
        md,
        person_event(("user_id", "u-1")),
        person_event(("user_id", "u-2")),
        person_event(("email", "third@example.com")),
    )
    wait_linked(engine, tenant.tenant_id, 3)
    p1, p2, p3 = (event_profile(engine, tenant.tenant_id, e) for e in (e1, e2, e3))
    err = merge_refused(identity, tenant, f"profiles/{p1}", f"profiles/{p2}", "same person")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_failures(err) == [("IDENTIFIER_LIMIT", "identityRules/types/user_id")]

    err = merge_refused(identity, tenant, f"profiles/{p1}", f"profiles/{p3}", "")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err) == [("reason", "say why, for the audit trail")]

    merge = identity.MergeProfiles(
        identity_pb2.MergeProfilesRequest(
            survivor_profile=f"profiles/{p1}", absorbed_profile=f"profiles/{p3}", reason="agent verified by phone"
        ),
        metadata=md,
    ).merge
    assert merge.kind == identity_pb2.MERGE_KIND_MANUAL and merge.reason == "agent verified by phone"
    assert resolve(identity, tenant, "email", "third@example.com") == p1

    err = merge_refused(identity, tenant, f"profiles/{p1}", f"profiles/{p3}", "again")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_failures(err) == [("ALREADY_MERGED", f"profiles/{p1}")]
    err = merge_refused(identity, tenant, "profiles/nope", f"profiles/{p3}", "typo")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err)[0][0] == "survivor_profile"


def test_rules_are_validated_and_updated_by_mask(
    identity: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey
) -> None:
    md = tenant.metadata
    rules = identity.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=md).rules
    limits = {t.type: t.max_per_profile for t in rules.types}
    assert limits == {"user_id": 1, "email": 5, "phone": 5, "device_id": 5, "anonymous_id": 5}
    assert rules.default_region == "US"

    bad = identity_pb2.IdentityRules()
    bad.CopyFrom(rules)
    bad.types.add(type="crm_id", normalizer="soundex", priority=10, max_per_profile=-1)
    with pytest.raises(grpc.RpcError) as err:
        identity.UpdateIdentityRules(
            identity_pb2.UpdateIdentityRulesRequest(rules=bad, update_mask=field_mask_pb2.FieldMask(paths=["types"])),
            metadata=md,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in bad_request(err.value)}
    assert fields == {"rules.types[crm_id].normalizer", "rules.types[crm_id].max_per_profile"}

    with pytest.raises(grpc.RpcError) as err:
        identity.UpdateIdentityRules(
            identity_pb2.UpdateIdentityRulesRequest(
                rules=identity_pb2.IdentityRules(default_region="GB"),
                update_mask=field_mask_pb2.FieldMask(paths=["default_region", "colour"]),
            ),
            metadata=md,
        )
    assert bad_request(err.value)[0][0] == "update_mask.paths[1]"

    updated = identity.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(
            rules=identity_pb2.IdentityRules(default_region="GB"),
            update_mask=field_mask_pb2.FieldMask(paths=["default_region"]),
        ),
        metadata=md,
    ).rules
    assert updated.default_region == "GB" and len(updated.types) == 5 and updated.HasField("update_time")
    # A national number now reads as British.
    req = identity_pb2.ResolveIdentifiersRequest(identifiers=[Ident(type="phone", value="020 7183 8750")])
    with pytest.raises(grpc.RpcError) as err:
        identity.ResolveIdentifiers(req, metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_redelivered_event_has_no_second_effect(
    identity_server: RunningServer,
    tenant: TenantKey,
    engine: Engine,
    redis_client: Any,
    settings: Settings,
) -> None:
    bus = Bus(redis_client, settings.redis_prefix)
    ev = person_event(("email", "twice@example.com"), ("phone", "+14155550133"))
    ev.event_id = "0193aaaa-0000-7000-8000-000000000001"
    payload = ev.SerializeToString()
    key = bus.key(tenant.tenant_id, streams.RESOLVED.name)
    for n in (1, 2, 3):
        # Delivered again after it was applied, as after a crash between commit and acknowledgement.
        publish_events(bus, tenant.tenant_id, [payload])
        deadline = time.monotonic() + 10
        while redis_client.xlen(key) < n and time.monotonic() < deadline:
            time.sleep(0.02)
    resolved = entries(redis_client, bus, tenant.tenant_id, streams.RESOLVED)
    assert len(resolved) == 3
    assert len({env.event.profile_id for _, env in resolved}) == 1
    assert linked_count(engine, tenant.tenant_id) == 1
    wait_entries(redis_client, bus, tenant.tenant_id, streams.CHANGES, bool)
    time.sleep(0.3)  # a second "created" would have been published by now
    changes = entries(redis_client, bus, tenant.tenant_id, streams.CHANGES)
    assert [env.change.kind for _, env in changes] == [CREATED]


def test_list_merges_pages_newest_first(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
) -> None:
    md = tenant.metadata
    n = 0
    for i in range(5):
        send(ingest, md, person_event(("email", f"m{i}@example.com")), person_event(("phone", f"+1415555{i:04d}")))
        n += 2
        wait_linked(engine, tenant.tenant_id, n)
        send(ingest, md, person_event(("email", f"m{i}@example.com"), ("phone", f"+1415555{i:04d}")))
        n += 1
        wait_linked(engine, tenant.tenant_id, n)
    names: list[str] = []
    token = ""
    while True:
        page = identity.ListMerges(identity_pb2.ListMergesRequest(page_size=2, page_token=token), metadata=md)
        names += [m.name for m in page.merges]
        token = page.next_page_token
        if not token:
            break
    ids = [int(n.split("/")[1]) for n in names]
    assert len(ids) == 5 and ids == sorted(ids, reverse=True)
    with pytest.raises(grpc.RpcError) as err:
        identity.ListMerges(identity_pb2.ListMergesRequest(page_token="forged"), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_odd_input_gets_a_clear_error_not_internal(
    identity: identity_pb2_grpc.IdentityServiceStub, tenant: TenantKey
) -> None:
    md = tenant.metadata
    # A spelling Python's uuid accepts and PostgreSQL does not.
    name = "profiles/urn:uuid:12345678-1234-5678-1234-567812345678"
    with pytest.raises(grpc.RpcError) as err:
        identity.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=name), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # NUL cannot be stored in PostgreSQL text: the identifier is invalid, not a server error.
    req = identity_pb2.ResolveIdentifiersRequest(identifiers=[Ident(type="device_id", value="a\x00b")])
    with pytest.raises(grpc.RpcError) as err:
        identity.ResolveIdentifiers(req, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value)[0][0] == "identifiers[0].value"
    # A token with the right fingerprint but a position this API never issues.
    token = set_current_tenant(Tenant(tenant.tenant_id))  # as the server fingerprints it
    try:
        forged = pagination.encode_token("x", {"profile": ""})
    finally:
        reset_current_tenant(token)
    with pytest.raises(grpc.RpcError) as err:
        identity.ListMerges(identity_pb2.ListMergesRequest(page_token=forged), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_erase_forgets_the_person_and_every_id_merged_into_them(
    ingest: ingest_pb2_grpc.IngestServiceStub,
    identity: identity_pb2_grpc.IdentityServiceStub,
    tenant: TenantKey,
    engine: Engine,
    redis_client: Any,
    settings: Settings,
) -> None:
    md = tenant.metadata
    first, second = send(
        ingest, md, person_event(("email", "gone@example.com")), person_event(("phone", "+14155550177"))
    )
    wait_linked(engine, tenant.tenant_id, 2)
    send(ingest, md, person_event(("email", "gone@example.com"), ("phone", "+14155550177")))
    wait_linked(engine, tenant.tenant_id, 3)
    survivor, absorbed = (event_profile(engine, tenant.tenant_id, e) for e in (first, second))
    assert survivor and absorbed and survivor != absorbed

    with pytest.raises(grpc.RpcError) as err:
        identity.EraseProfile(identity_pb2.EraseProfileRequest(name=f"profiles/{absorbed}"), metadata=md)
    assert bad_request(err.value) == [("reason", "say why, for the audit trail")]

    erased = identity.EraseProfile(
        identity_pb2.EraseProfileRequest(name=f"profiles/{absorbed}", reason="GDPR art. 17 request #991"),
        metadata=md,
    )
    assert erased.profile == f"profiles/{survivor}" and erased.identifiers_erased == 2
    assert sorted(erased.erased_profile_ids) == sorted([survivor, absorbed])
    for pid in (survivor, absorbed):
        with pytest.raises(grpc.RpcError) as err:
            identity.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=f"profiles/{pid}"), metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        resolve(identity, tenant, "email", "gone@example.com")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    merges = identity.ListMerges(identity_pb2.ListMergesRequest(), metadata=md).merges
    assert merges and all(not m.identifiers for m in merges), "identifier values stay in merge facts"

    bus = Bus(redis_client, settings.redis_prefix)
    found = wait_entries(
        redis_client, bus, tenant.tenant_id, streams.CHANGES, lambda es: any(e.change.kind == ERASED for _, e in es)
    )
    (change,) = [env.change for _, env in found if env.change.kind == ERASED]
    assert change.profile_id == survivor
    assert sorted(change.erased_profile_ids) == sorted([survivor, absorbed])

    # Seen again later, the person starts a new profile: nothing links it to the forgotten one.
    again = send(ingest, md, person_event(("email", "gone@example.com")))[0]
    wait_linked(engine, tenant.tenant_id, 4)
    assert event_profile(engine, tenant.tenant_id, again) not in (survivor, absorbed)
