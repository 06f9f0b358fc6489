"""Merges and splits forced through IdentityService: two profiles with traits, interactions, cases
and UpdateTraits values merge into one (traits by policy, joined timeline and contacts, computed
traits over both); the merged-away id keeps working in every RPC that takes a profile; an
UnmergeProfile rebuilds both sides exactly from their own events. The timeline pages newest first
(AIP-158) with its filters."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tessera.v1 import event_pb2, profile_pb2
from tests.support.grpc_errors import bad_request
from tests.support.profile import (
    NOW,
    Apis,
    code_of,
    computed_of,
    identify,
    interaction,
    track,
    traits_of,
    wait_until,
)

pytestmark = [pytest.mark.integration]

DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)


def ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def view(p: profile_pb2.Profile) -> dict[str, object]:
    """What a profile says, without the parts that change with every read."""
    return {
        "traits": sorted((t.key, t.value.SerializeToString(), t.source, t.event_id, t.observations) for t in p.traits),
        "computed": computed_of(p),
        "identifiers": sorted((i.type, i.value) for i in p.identifiers),
        "event_count": p.event_count,
        "first_seen": p.first_seen.ToDatetime(),
        "last_seen": p.last_seen.ToDatetime(),
    }


def contacts(ctx: profile_pb2.GetCustomerContextResponse) -> dict[str, object]:
    return {
        "interactions": [(i.interaction_id, i.channel, i.case_id, i.legs) for i in ctx.recent_interactions],
        "cases": sorted((c.case_id, c.status) for c in ctx.open_cases),
        "last_30": ctx.contacts.last_30_days,
        "last_reason": ctx.contacts.last_reason,
    }


COMPUTED = [
    profile_pb2.ComputedTraitDefinition(key="events", aggregation=profile_pb2.AGGREGATION_COUNT),
    profile_pb2.ComputedTraitDefinition(
        key="revenue", aggregation=profile_pb2.AGGREGATION_SUM, field="properties.revenue"
    ),
]


def test_merge_joins_two_profiles_and_unmerge_rebuilds_both_from_their_events(api: Apis) -> None:
    api.settings(profile_pb2.ProfileSettings(computed_traits=COMPUTED), ["computed_traits"])
    email, phone = ("email", "one@merge.example"), ("phone", "+14155550123")
    one = [
        identify(email, traits={"plan": "gold", "city": "Paris"}, at=NOW - 3 * DAY),
        interaction(
            email,
            interaction_id="call-1",
            reason="billing",
            case_id="C-1",
            case_status=event_pb2.CASE_STATUS_OPEN,
            at=NOW - 2 * DAY,
        ),
        track(email, name="Order Completed", properties={"revenue": 30}, at=NOW - 5 * DAY),
    ]
    two = [
        identify(phone, traits={"plan": "silver", "nickname": "Bo"}, at=NOW - DAY, channel=event_pb2.CHANNEL_CHAT),
        identify(phone, traits={"city": "Nice"}, at=NOW - 4 * DAY, channel=event_pb2.CHANNEL_CHAT),
        interaction(
            phone,
            interaction_id="chat-2",
            reason="delivery",
            case_id="C-2",
            case_status=event_pb2.CASE_STATUS_PENDING,
            at=NOW - DAY - HOUR,
            channel=event_pb2.CHANNEL_CHAT,
        ),
        track(phone, name="Order Completed", properties={"revenue": 12.5}, at=NOW - 6 * DAY),
    ]
    one_ids = api.send(*one)
    two_ids = api.send(*two)
    api.wait_applied(len(one) + len(two))
    p1, p2 = api.get(ident=email), api.get(ident=phone)
    assert p1.name != p2.name
    # An UpdateTraits value of the profile that will be merged away goes with it.
    p2 = api.update_traits(p2.name, {"vip": True}, ["traits.vip"], source="crm")
    before1, before2 = view(api.get(p1.name)), view(api.get(p2.name))
    ctx1, ctx2 = contacts(api.context(p1.name)), contacts(api.context(p2.name))
    assert ctx1["cases"] == [("C-1", event_pb2.CASE_STATUS_OPEN)]
    assert ctx2["cases"] == [("C-2", event_pb2.CASE_STATUS_PENDING)]

    merge = api.merge(p1.name, p2.name)
    assert (merge.survivor_profile_id, merge.absorbed_profile_id) == (p1.profile_id, p2.profile_id)
    api.wait_merged(p2.name, p1.name)

    merged = api.get(p1.name)
    assert not merged.redirected
    assert traits_of(merged) == {"plan": "silver", "city": "Paris", "nickname": "Bo", "vip": True}
    assert merged.event_count == len(one) + len(two)
    assert {(i.type, i.value) for i in merged.identifiers} == {email, phone}
    assert computed_of(merged) == {"events": (7, 7), "revenue": (42.5, 2)}
    assert merged.first_seen.ToDatetime() == (NOW - 6 * DAY).replace(tzinfo=None)
    assert merged.last_seen.ToDatetime() == (NOW - DAY).replace(tzinfo=None)
    # The absorbed name answers with the survivor, redirected, in every RPC that takes a profile.
    via_old = api.get(p2.name)
    assert via_old.redirected and via_old.name == p1.name and view(via_old) == view(merged)
    ctx = api.context(p2.name)
    assert ctx.profile.redirected and ctx.profile.name == p1.name
    assert contacts(ctx) == {
        "interactions": [("chat-2", event_pb2.CHANNEL_CHAT, "C-2", 1), ("call-1", event_pb2.CHANNEL_VOICE, "C-1", 1)],
        "cases": [("C-1", event_pb2.CASE_STATUS_OPEN), ("C-2", event_pb2.CASE_STATUS_PENDING)],
        "last_30": 2,
        "last_reason": "delivery",
    }
    assert not api.context(p1.name).profile.redirected
    # By identifier, either identifier: the survivor (an identifier is not a redirect).
    assert api.context(ident=phone).profile.name == p1.name

    # The joined timeline, newest first, every page of two.
    everything = sorted(
        [(e.timestamp.ToDatetime(), i) for e, i in zip(one + two, one_ids + two_ids, strict=True)], reverse=True
    )
    pages = []
    token = ""
    while True:
        page = api.timeline(p2.name, page_size=2, page_token=token)
        pages.append([e.event_id for e in page.events])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[i for _, i in everything][k : k + 2] for k in range(0, 7, 2)]
    full = api.all_timeline(p1.name)
    assert [e.event_id for e in full] == [i for _, i in everything]
    assert all(e.event.profile_id == p1.profile_id for e in full)
    assert {e.event_id: e.kind for e in full}[two_ids[2]] == "interaction"
    # Filters: channel, kind, time range (start inclusive, end exclusive), and together.
    chat = [e.event_id for e in api.all_timeline(p2.name, channels=[event_pb2.CHANNEL_CHAT])]
    assert chat == [two_ids[0], two_ids[2], two_ids[1]]
    kinds = [e.event_id for e in api.all_timeline(p1.name, page_size=1, kinds=["interaction"])]
    assert kinds == [two_ids[2], one_ids[1]]
    ranged = api.all_timeline(p1.name, start_time=ts(NOW - 4 * DAY), end_time=ts(NOW - DAY), page_size=1)
    assert [e.event_id for e in ranged] == [two_ids[2], one_ids[1], one_ids[0], two_ids[1]]
    both = api.all_timeline(
        p1.name, kinds=["identify", "track"], channels=[event_pb2.CHANNEL_WEB], end_time=ts(NOW - 4 * DAY)
    )
    assert [e.event_id for e in both] == [one_ids[2], two_ids[3]]
    # A token belongs to its filters.
    first = api.timeline(p1.name, page_size=1, kinds=["interaction"])
    err = code_of(lambda: api.timeline(p1.name, page_size=1, page_token=first.next_page_token))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in bad_request(err)] == ["page_token"]
    # ... but not to the spelling of the parent: the absorbed name pages the same timeline.
    rest = api.timeline(p2.name, page_size=1, kinds=["interaction"], page_token=first.next_page_token)
    assert [e.event_id for e in rest.events] == [one_ids[1]]

    # UpdateTraits and ExportPerson through the absorbed name act on the survivor.
    updated = api.update_traits(p2.name, {"tier": "A"}, ["traits.tier"], source="agent")
    assert updated.name == p1.name and updated.redirected
    assert traits_of(api.get(p1.name))["tier"] == "A"
    export = api.profile.ExportPerson(profile_pb2.ExportPersonRequest(name=p2.name), metadata=api.metadata, timeout=10)
    assert export.profile == p1.name
    doc = json.loads(export.json)
    assert doc["profile"]["profile_id"] == p1.profile_id
    assert sorted(e["event_id"] for e in doc["timeline"]) == sorted(one_ids + two_ids)

    # Split the phone off again: both sides are what their own events say.
    split = api.unmerge(p1.name, phone)
    new = api.wait_owner(phone, f"profiles/{split.absorbed_profile_id}")
    assert new.name not in (p1.name, p2.name)

    def settled() -> bool:
        return api.get(p1.name).event_count == len(one)

    wait_until(settled, 10, "the survivor rebuilt")
    after1, after_new = view(api.get(p1.name)), view(new)
    # The survivor keeps its UpdateTraits values (vip moved to it with the merge, tier was set on
    # it), everything else is its own events'.
    expect1 = dict(before1)
    expect1_traits = {t[0]: t for t in before1["traits"]}  # type: ignore[attr-defined]
    got1_traits = {t[0]: t for t in after1["traits"]}  # type: ignore[attr-defined]
    assert set(got1_traits) == {"plan", "city", "vip", "tier"}
    assert {k: got1_traits[k] for k in expect1_traits} == expect1_traits
    assert {k: v for k, v in after1.items() if k != "traits"} == {k: v for k, v in expect1.items() if k != "traits"}
    expect2 = dict(before2)
    expect2["traits"] = [t for t in before2["traits"] if t[0] != "vip"]  # type: ignore[attr-defined]
    assert after_new == expect2
    assert [e.event_id for e in api.all_timeline(p1.name)] == [
        i for _, i in sorted(zip([e.timestamp.ToDatetime() for e in one], one_ids, strict=True), reverse=True)
    ]
    assert [e.event_id for e in api.all_timeline(new.name)] == [two_ids[0], two_ids[2], two_ids[1], two_ids[3]]
    assert contacts(api.context(p1.name)) == ctx1
    assert contacts(api.context(new.name)) == ctx2
    assert api.get(ident=email).name == p1.name
    # The id merged away before the split still answers with the profile it went into.
    still = api.get(p2.name)
    assert (still.name, still.redirected) == (p1.name, True)
    # Last, ErasePerson by the merged-away name erases the survivor it resolves to.
    erasure = api.profile.ErasePerson(
        profile_pb2.ErasePersonRequest(name=p2.name, reason="test: right to erasure"), metadata=api.metadata, timeout=10
    ).request
    assert erasure.profile == p1.name and erasure.name.startswith("erasureRequests/")


def test_timeline_validation_names_the_field(api: Apis) -> None:
    email = ("email", "timeline@example.com")
    api.send(identify(email, traits={"a": 1}, at=NOW - DAY))
    api.wait_applied(1)
    name = api.get(ident=email).name
    later, earlier = ts(NOW), ts(NOW - DAY)
    cases: list[tuple[dict[str, object], list[str]]] = [
        ({"parent": ""}, ["parent"]),
        ({"parent": "people/1"}, ["parent"]),
        ({"page_size": -1}, ["page_size"]),
        ({"page_token": "not-a-token"}, ["page_token"]),
        ({"kinds": ["identify", "bogus"]}, ["kinds[1]"]),
        ({"channels": [99]}, ["channels[0]"]),
        ({"start_time": later, "end_time": earlier}, ["end_time"]),
        ({"start_time": later, "end_time": later}, ["end_time"]),
    ]
    for fields, violations in cases:
        req = profile_pb2.ListTimelineEventsRequest(**{"parent": name, **fields})  # type: ignore[arg-type]
        err = code_of(lambda r=req: api.profile.ListTimelineEvents(r, metadata=api.metadata, timeout=10))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, err.details())
        assert [f for f, _ in bad_request(err)] == violations, fields
    missing = code_of(lambda: api.timeline("profiles/00000000-0000-4000-8000-00000000abcd"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert len(api.timeline(name, page_size=5000).events) == 1
