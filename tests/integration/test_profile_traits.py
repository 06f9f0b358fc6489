"""Trait merge policies and provenance through the public APIs: events sent out of order, across
batches, some re-sent (ingest answers DUPLICATE and nothing counts twice); every trait says which
event, source and time it came from; UpdateTraits sets and removes by update_mask."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from tessera.v1 import ingest_pb2, profile_pb2
from tests.support.grpc_errors import bad_request
from tests.support.profile import NOW, Apis, at, code_of, identify, trait, traits_of, wait_until

pytestmark = [pytest.mark.integration]

DAY = dt.timedelta(days=1)
LATEST = profile_pb2.TRAIT_POLICY_LATEST
FIRST = profile_pb2.TRAIT_POLICY_FIRST
MOST_FREQUENT = profile_pb2.TRAIT_POLICY_MOST_FREQUENT
SOURCE_PRIORITY = profile_pb2.TRAIT_POLICY_SOURCE_PRIORITY


def policies(api: Apis) -> None:
    api.settings(
        profile_pb2.ProfileSettings(
            trait_policies={
                "signup_channel": FIRST,
                "city": MOST_FREQUENT,
                "tier": MOST_FREQUENT,
                "newsletter": SOURCE_PRIORITY,
            },
            default_policy=LATEST,
            source_priority=["crm", "web"],
        )
    )


def test_every_policy_chooses_by_event_time_whatever_the_arrival_order(api: Apis) -> None:
    """Events about one person arrive newest first, in three batches, one re-sent with other
    values under its message_id: each policy picks what its definition says, with the event,
    source and time that set it."""
    policies(api)
    email = ("email", "policy@example.com")
    # (name, event): what each event says; the test sends them in an order unlike their times.
    ev = {
        "d1": identify(email, traits={"plan": "gold", "city": "Lyon", "tier": "b"}, at=NOW - 1 * DAY, source="web"),
        "d2": identify(email, traits={"plan": "bronze", "signup_channel": "app"}, at=NOW - 2 * DAY, source="app"),
        "d3": identify(
            email, traits={"plan": "silver", "tier": "a", "newsletter": "monthly"}, at=NOW - 3 * DAY, source="crm"
        ),
        "d4": identify(email, traits={"signup_channel": "web", "city": "Paris"}, at=NOW - 4 * DAY, source="web"),
        "d5": identify(email, traits={"city": "Paris", "newsletter": "daily"}, at=NOW - 5 * DAY, source="web"),
        "h12": identify(email, traits={"newsletter": "weekly"}, at=NOW - DAY / 2, source="other"),
    }
    ids: dict[str, str] = {}
    ids["d1"], ids["h12"] = api.send(ev["d1"], ev["h12"])
    api.wait_applied(2)
    ids["d2"], ids["d3"] = api.send(ev["d3"], ev["d2"])[::-1]
    api.wait_applied(4)
    # The newest event again, with other values: a duplicate, so none of them counts.
    again = identify(email, traits={"plan": "forged", "city": "Lyon"}, at=NOW, message_id=ev["d1"].message_id)
    statuses = api.send_statuses(ev["d5"], again, ev["d4"])
    accepted, duplicate = ingest_pb2.EVENT_STATUS_ACCEPTED, ingest_pb2.EVENT_STATUS_DUPLICATE
    assert statuses == [accepted, duplicate, accepted]
    api.wait_applied(6)
    assert api.send_statuses(ev["d2"]) == [ingest_pb2.EVENT_STATUS_DUPLICATE]
    got = api.get(ident=email)
    assert got.event_count == 6
    # The event ids of the last batch (ingest does not answer with them for the duplicate).
    timeline = {e.event.message_id: e.event_id for e in api.all_timeline(got.name)}
    assert len(timeline) == 6
    ids = {k: timeline[e.message_id] for k, e in ev.items()}

    assert traits_of(got) == {
        "plan": "gold",  # LATEST: d1, though d2 and d3 arrived after it
        "signup_channel": "web",  # FIRST: d4, sent last
        "city": "Paris",  # MOST_FREQUENT: twice; Lyon once (the re-sent Lyon did not count)
        "tier": "b",  # MOST_FREQUENT tie (a once, b once): the latest
        "newsletter": "monthly",  # SOURCE_PRIORITY: crm first, though web and "other" are newer
    }
    expect = {
        "plan": ("web", "d1", LATEST, 3),
        "signup_channel": ("web", "d4", FIRST, 2),
        "city": ("web", "d4", MOST_FREQUENT, 2),  # the newest observation of the chosen value
        "tier": ("web", "d1", MOST_FREQUENT, 1),
        "newsletter": ("crm", "d3", SOURCE_PRIORITY, 3),
    }
    times = {"d1": NOW - DAY, "d2": NOW - 2 * DAY, "d3": NOW - 3 * DAY, "d4": NOW - 4 * DAY, "d5": NOW - 5 * DAY}
    for key, (source, which, policy, observations) in expect.items():
        t = trait(got, key)
        assert (t.source, t.event_id, t.policy, t.observations) == (source, ids[which], policy, observations), key
        assert at(t.observe_time) == times[which], key
    # "Where did this come from?": the event a trait names is on the timeline, and says so.
    (source_event,) = [e for e in api.all_timeline(got.name) if e.event_id == trait(got, "newsletter").event_id]
    assert source_event.event.source == "crm" and source_event.event.identify.traits["newsletter"] == "monthly"


def test_update_traits_take_part_in_policies_with_their_source_and_time(api: Apis) -> None:
    """UpdateTraits values are observations of their source at the time of the call: LATEST takes
    them over older events and loses to newer ones; SOURCE_PRIORITY ranks their source."""
    policies(api)
    email = ("email", "crm@example.com")
    api.send(
        identify(email, traits={"plan": "silver", "newsletter": "daily"}, at=NOW - DAY, source="web"),
        identify(email, traits={"newsletter": "weekly"}, at=NOW - 2 * DAY, source="crm"),
    )
    api.wait_applied(2)
    name = api.get(ident=email).name
    before = dt.datetime.now(dt.UTC)
    updated = api.update_traits(
        name, {"plan": "platinum", "newsletter": "never"}, ["traits.plan", "traits.newsletter"], source="crm"
    )
    after = dt.datetime.now(dt.UTC)
    assert traits_of(updated) == {"plan": "platinum", "newsletter": "never"}
    # Its events are still counted and dated (an update is not an event).
    assert updated.event_count == 2
    assert (at(updated.first_seen), at(updated.last_seen)) == (NOW - 2 * DAY, NOW - DAY)
    for key in ("plan", "newsletter"):
        t = trait(updated, key)
        assert (t.source, t.event_id) == ("crm", "")
        assert before - dt.timedelta(seconds=1) <= at(t.observe_time) <= after + dt.timedelta(seconds=1)
    assert traits_of(api.get(name)) == traits_of(updated)

    # A web event newer than the update: LATEST takes it; SOURCE_PRIORITY keeps crm's.
    (newer,) = api.send(
        identify(
            email, traits={"plan": "diamond", "newsletter": "hourly"}, at=NOW + dt.timedelta(hours=2), source="web"
        )
    )
    # An old event: changes nothing.
    api.send(identify(email, traits={"plan": "old"}, at=NOW - 10 * DAY, source="web"))
    api.wait_applied(4)
    got = api.get(name)
    assert traits_of(got) == {"plan": "diamond", "newsletter": "never"}
    assert (trait(got, "plan").event_id, trait(got, "plan").source) == (newer, "web")
    assert trait(got, "newsletter").source == "crm"


def test_update_traits_removes_a_named_key_and_late_events_do_not_bring_it_back(api: Apis) -> None:
    email = ("email", "remove@example.com")
    api.send(identify(email, traits={"plan": "gold", "city": "Oslo", "name": "Ada"}, at=NOW - DAY))
    api.wait_applied(1)
    name = api.get(ident=email).name
    # "traits.city" named and absent from traits: removed; "name" is not named: untouched.
    got = api.update_traits(name, {"plan": "silver"}, ["traits.plan", "traits.city"])
    assert traits_of(got) == {"plan": "silver", "name": "Ada"}
    # An event older than the removal does not bring it back, a newer one does.
    api.send(identify(email, traits={"city": "Bergen"}, at=NOW - 2 * DAY))
    api.wait_applied(2)
    assert "city" not in traits_of(api.get(name))
    (newer,) = api.send(identify(email, traits={"city": "Tromso"}, at=NOW + dt.timedelta(hours=1)))
    api.wait_applied(3)
    got = api.get(name)
    assert traits_of(got) == {"plan": "silver", "name": "Ada", "city": "Tromso"}
    assert trait(got, "city").event_id == newer
    # "traits" alone sets every key given; a null value removes.
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update({"name": None, "vip": True})
    req = profile_pb2.UpdateTraitsRequest(profile=name, traits=s, source="agent")
    req.update_mask.paths.append("traits")
    got = api.profile.UpdateTraits(req, metadata=api.metadata, timeout=10).profile
    assert traits_of(got) == {"plan": "silver", "city": "Tromso", "vip": True}
    assert trait(got, "vip").source == "agent"


def test_update_traits_numbers_count_as_the_same_value_as_from_events(api: Apis) -> None:
    """A number set by UpdateTraits equals the same number from an event (whole floats are
    integers either way), so MOST_FREQUENT counts them together."""
    api.settings(profile_pb2.ProfileSettings(trait_policies={"size": MOST_FREQUENT}), ["trait_policies"])
    email = ("email", "numbers@example.com")
    api.send(
        identify(email, traits={"size": 42}, at=NOW - 3 * DAY),
        identify(email, traits={"size": 7}, at=NOW - 2 * DAY),
    )
    api.wait_applied(2)
    name = api.get(ident=email).name
    got = api.update_traits(name, {"size": 42}, ["traits.size"])
    t = trait(got, "size")
    assert (t.value.number_value, t.observations) == (42, 2)


def test_update_traits_validation_names_the_field(api: Apis) -> None:
    email = ("email", "invalid@example.com")
    api.send(identify(email, traits={"plan": "gold"}, at=NOW - DAY))
    api.wait_applied(1)
    name = api.get(ident=email).name
    cases: list[tuple[dict[str, object], list[str], str, set[str]]] = [
        ({"plan": "x"}, ["traits.plan"], "", {"source"}),
        ({"plan": "x"}, [], "crm", {"update_mask", "traits.plan"}),
        ({}, [], "crm", {"update_mask"}),
        ({"plan": "x"}, ["plan"], "crm", {"update_mask.paths[0]", "traits.plan"}),
        ({"plan": "x", "city": "y"}, ["traits.plan"], "crm", {"traits.city"}),
        ({"plan": "x"}, ["traits."], "crm", {"update_mask.paths[0]", "traits.plan"}),
        ({}, ["traits.plan"], "c" * 129, {"source"}),
    ]
    for values, paths, source, fields in cases:
        err = code_of(lambda v=values, p=paths, s=source: api.update_traits(name, v, p, source=s))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (values, paths, source, err.details())
        assert {f for f, _ in bad_request(err)} == fields, (values, paths, source, bad_request(err))
    for bad_name, code in (
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("profiles/nope", grpc.StatusCode.INVALID_ARGUMENT),
        ("profiles/00000000-0000-4000-8000-000000000000", grpc.StatusCode.NOT_FOUND),
    ):
        err = code_of(lambda n=bad_name: api.update_traits(n, {"plan": "x"}, ["traits.plan"]))  # type: ignore[misc]
        assert err.code() == code, (bad_name, err.details())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert [f for f, _ in bad_request(err)] == ["profile"]
    # Nothing changed.
    assert wait_until(lambda: traits_of(api.get(name)) == {"plan": "gold"}, 1)
