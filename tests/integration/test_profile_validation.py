"""Bad input to every ProfileService RPC is INVALID_ARGUMENT with a google.rpc.BadRequest naming
exactly the fields at fault (never INTERNAL, never a silent default), and nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2
from google.protobuf.message import Message

from tessera.v1 import event_pb2, profile_pb2
from tests.support.grpc_errors import bad_request
from tests.support.profile import NOW, Apis, identify

pytestmark = [pytest.mark.integration]

P = profile_pb2
Ident = event_pb2.Identifier


def settings_request(paths: list[str] | None = None, **fields: Any) -> P.UpdateProfileSettingsRequest:
    return P.UpdateProfileSettingsRequest(
        settings=P.ProfileSettings(**fields), update_mask=field_mask_pb2.FieldMask(paths=paths or [])
    )


def computed(**fields: Any) -> P.ComputedTraitDefinition:
    return P.ComputedTraitDefinition(**fields)


def traits_request(name: str, values: dict[str, Any], paths: list[str], source: str) -> P.UpdateTraitsRequest:
    s = struct_pb2.Struct()
    s.update(values)
    return P.UpdateTraitsRequest(
        profile=name, traits=s, update_mask=field_mask_pb2.FieldMask(paths=paths), source=source
    )


def cases(name: str) -> list[tuple[str, Message, set[str]]]:
    """(rpc, request, the fields its violations must name)."""
    count = computed(key="calls", aggregation=P.AGGREGATION_COUNT)
    return [
        # Locating a profile: by name or identifier, the same rules in every RPC that takes one.
        ("GetProfile", P.GetProfileRequest(), {"profile"}),
        ("GetProfile", P.GetProfileRequest(name=""), {"name"}),  # the oneof is set, to an empty name
        ("GetProfile", P.GetProfileRequest(name="profiles/12345"), {"name"}),
        ("GetProfile", P.GetProfileRequest(name="people/" + name.removeprefix("profiles/")), {"name"}),
        ("GetProfile", P.GetProfileRequest(identifier=Ident(type="fax", value="1")), {"identifier.type"}),
        ("GetProfile", P.GetProfileRequest(identifier=Ident(type="", value="a@b.example")), {"identifier.type"}),
        ("GetProfile", P.GetProfileRequest(identifier=Ident(type="email", value="not-an-email")), {"identifier.value"}),
        (
            "GetProfile",
            P.GetProfileRequest(identifier=Ident(type="email", value="test@test.com")),
            {"identifier.value"},
        ),
        ("GetProfile", P.GetProfileRequest(identifier=Ident(type="phone", value="call me")), {"identifier.value"}),
        ("GetCustomerContext", P.GetCustomerContextRequest(), {"profile"}),
        ("GetCustomerContext", P.GetCustomerContextRequest(name="profiles/x"), {"name"}),
        (
            "GetCustomerContext",
            P.GetCustomerContextRequest(identifier=Ident(type="fax", value="1")),
            {"identifier.type"},
        ),
        ("GetCustomerContext", P.GetCustomerContextRequest(name=name, interaction_limit=51), {"interaction_limit"}),
        ("GetCustomerContext", P.GetCustomerContextRequest(name=name, interaction_limit=-1), {"interaction_limit"}),
        ("ExportPerson", P.ExportPersonRequest(), {"profile"}),
        ("ExportPerson", P.ExportPersonRequest(name="profiles/"), {"name"}),
        ("ExportPerson", P.ExportPersonRequest(identifier=Ident(type="fax", value="1")), {"identifier.type"}),
        ("ErasePerson", P.ErasePersonRequest(name=name), {"reason"}),
        ("ErasePerson", P.ErasePersonRequest(name=name, reason="x" * 1001), {"reason"}),
        ("ErasePerson", P.ErasePersonRequest(name="profiles/x", reason="gdpr"), {"name"}),
        ("ErasePerson", P.ErasePersonRequest(reason="gdpr"), {"profile"}),
        ("GetErasureRequest", P.GetErasureRequestRequest(name=""), {"name"}),
        ("GetErasureRequest", P.GetErasureRequestRequest(name="erasureRequests/nope"), {"name"}),
        ("GetErasureRequest", P.GetErasureRequestRequest(name=name), {"name"}),
        # Timeline.
        ("ListTimelineEvents", P.ListTimelineEventsRequest(parent=""), {"parent"}),
        ("ListTimelineEvents", P.ListTimelineEventsRequest(parent=name, page_token="@@@"), {"page_token"}),
        ("ListTimelineEvents", P.ListTimelineEventsRequest(parent=name, page_size=-5), {"page_size"}),
        # Search.
        ("SearchProfiles", P.SearchProfilesRequest(), {"query"}),
        ("SearchProfiles", P.SearchProfilesRequest(trait=P.TraitQuery(key="", value="x")), {"trait.key"}),
        ("SearchProfiles", P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="")), {"trait.value"}),
        ("SearchProfiles", P.SearchProfilesRequest(trait=P.TraitQuery()), {"trait.key", "trait.value"}),
        (
            "SearchProfiles",
            P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="gold"), page_token="nope"),
            {"page_token"},
        ),
        (
            "SearchProfiles",
            P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="gold"), page_size=-1),
            {"page_size"},
        ),
        ("SearchProfiles", P.SearchProfilesRequest(identifier=Ident(type="fax", value="1")), {"identifier.type"}),
        (
            "SearchProfiles",
            P.SearchProfilesRequest(identifier=Ident(type="email", value=""), match=P.SEARCH_MATCH_PREFIX),
            {"identifier"},
        ),
        # UpdateTraits.
        ("UpdateTraits", traits_request("", {"a": 1}, ["traits.a"], "crm"), {"profile"}),
        ("UpdateTraits", traits_request(name, {"a": 1}, ["traits.a"], ""), {"source"}),
        ("UpdateTraits", traits_request(name, {}, [], "crm"), {"update_mask"}),
        ("UpdateTraits", traits_request(name, {"a": 1}, ["a"], "crm"), {"update_mask.paths[0]", "traits.a"}),
        ("UpdateTraits", traits_request(name, {"a": 1, "b": 2}, ["traits.a"], "crm"), {"traits.b"}),
        # Settings.
        ("UpdateProfileSettings", settings_request(["bogus"]), {"update_mask.paths[0]"}),
        (
            "UpdateProfileSettings",
            settings_request(["trait_policies"], trait_policies={"bad key!": P.TRAIT_POLICY_LATEST}),
            {"settings.trait_policies['bad key!']"},
        ),
        (
            "UpdateProfileSettings",
            settings_request(["trait_policies"], trait_policies={"plan": 9}),
            {"settings.trait_policies['plan']"},
        ),
        ("UpdateProfileSettings", settings_request(["default_policy"], default_policy=9), {"settings.default_policy"}),
        (
            "UpdateProfileSettings",
            settings_request(["source_priority"], source_priority=["crm", "web", "crm", ""]),
            {"settings.source_priority[2]", "settings.source_priority[3]"},
        ),
        (
            "UpdateProfileSettings",
            settings_request(
                ["computed_traits"],
                computed_traits=[
                    count,
                    count,
                    computed(key="Bad-Key", aggregation=P.AGGREGATION_COUNT),
                    computed(key="no_agg"),
                    computed(key="sum_nothing", aggregation=P.AGGREGATION_SUM),
                    computed(key="bad_field", aggregation=P.AGGREGATION_SUM, field="nowhere.x"),
                    computed(key="short", aggregation=P.AGGREGATION_COUNT, window=duration_pb2.Duration(seconds=30)),
                    computed(
                        key="filters",
                        aggregation=P.AGGREGATION_COUNT,
                        filter=P.EventFilter(kinds=["call"], channels=[99]),  # type: ignore[list-item]
                    ),
                ],
            ),
            {
                "settings.computed_traits[1].key",
                "settings.computed_traits[2].key",
                "settings.computed_traits[3].aggregation",
                "settings.computed_traits[4].field",
                "settings.computed_traits[5].field",
                "settings.computed_traits[6].window",
                "settings.computed_traits[7].filter.kinds[0]",
                "settings.computed_traits[7].filter.channels[0]",
            },
        ),
    ]


def call(api: Apis, rpc: str, request: Message) -> Any:
    method: Callable[..., Any] = getattr(api.profile, rpc)
    return method(request, metadata=api.metadata, timeout=10)


def test_every_rpc_names_the_fields_at_fault(api: Apis) -> None:
    email = ("email", "valid@example.com")
    api.send(identify(email, traits={"plan": "gold"}, at=NOW))
    api.wait_applied(1)
    name = api.get(ident=email).name
    before = api.get(name)
    settings_before = api.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=api.metadata).settings
    failures: list[tuple[str, str, object, str]] = []
    for rpc, request, fields in cases(name):
        try:
            call(api, rpc, request)
        except grpc.RpcError as err:
            got = (
                err.code(),
                {f for f, _ in bad_request(err)} if err.code() == grpc.StatusCode.INVALID_ARGUMENT else {},
            )
            if got != (grpc.StatusCode.INVALID_ARGUMENT, fields):
                failures.append((rpc, str(request)[:200], got, err.details()))
        else:
            failures.append((rpc, str(request)[:200], "OK", ""))
    assert not failures, "\n".join(map(str, failures))
    after = api.get(name)
    assert (after.traits, after.event_count) == (before.traits, before.event_count)
    assert api.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=api.metadata).settings == (
        settings_before
    )


def test_watch_profiles_refuses_bad_kinds_and_cursors(api: Apis) -> None:
    for request, fields in (
        (P.WatchProfilesRequest(kinds=[P.PROFILE_EVENT_KIND_CREATED, 9]), {"kinds[1]"}),  # type: ignore[list-item]
        (P.WatchProfilesRequest(cursor="garbage!"), {"cursor"}),
        (P.WatchProfilesRequest(cursor="eyJzIjogLTEsICJ0IjogIngifQ"), {"cursor"}),
    ):
        stream = api.profile.WatchProfiles(request, metadata=api.metadata, timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stream))
        err = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.details())  # type: ignore[attr-defined]
        assert {f for f, _ in bad_request(err)} == fields  # type: ignore[arg-type]


def test_settings_round_trip_and_mask(api: Apis) -> None:
    """A masked update changes only the fields it names; an empty mask replaces them all."""
    first = api.settings(
        P.ProfileSettings(
            trait_policies={"plan": P.TRAIT_POLICY_FIRST},
            default_policy=P.TRAIT_POLICY_MOST_FREQUENT,
            source_priority=["crm"],
            computed_traits=[computed(key="n", aggregation=P.AGGREGATION_COUNT)],
        )
    )
    assert first.name == "profileSettings" and first.HasField("update_time")
    second = api.settings(P.ProfileSettings(source_priority=["web", "crm"]), ["source_priority"])
    assert list(second.source_priority) == ["web", "crm"]
    assert dict(second.trait_policies) == {"plan": P.TRAIT_POLICY_FIRST}
    assert second.default_policy == P.TRAIT_POLICY_MOST_FREQUENT
    assert [d.key for d in second.computed_traits] == ["n"]
    read = api.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=api.metadata).settings
    assert read == second
    cleared = api.settings(P.ProfileSettings())
    assert (dict(cleared.trait_policies), cleared.default_policy, list(cleared.source_priority)) == (
        {},
        P.TRAIT_POLICY_LATEST,
        [],
    )
    assert not cleared.computed_traits
