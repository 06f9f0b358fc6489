"""Deterministic stitching on the pure graph: create, attach, merge, merge protection, chains,
splits, and the connected-components property for any order of events."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.identity_rules import DEFAULT_RULES, IdentifierType, IdentityRules
from services.identity.stitching import Graph, Key, LimitBroken, Profile, components, partition


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"p{self.n}"


E1: Key = ("email", "ada@example.com")
E2: Key = ("email", "ada@work.example")
PH: Key = ("phone", "+14155550123")
U1: Key = ("user_id", "u-1")
U2: Key = ("user_id", "u-2")
AN: Key = ("anonymous_id", "anon-1")


def test_first_event_creates_a_profile_with_all_its_identifiers() -> None:
    g = Graph(DEFAULT_RULES)
    out = g.resolve("e1", [E1, PH], Ids(), 1.0)
    assert out.created and out.profile_id == "p1"
    assert set(out.attached) == {E1, PH}
    assert g.owner == {E1: "p1", PH: "p1"}


def test_known_identifier_attaches_new_ones_to_its_profile() -> None:
    g = Graph(DEFAULT_RULES)
    g.resolve("e1", [E1], Ids(), 1.0)
    out = g.resolve("e2", [E1, PH], Ids(), 2.0)
    assert not out.created and out.profile_id == "p1" and out.attached == (PH,)
    assert not out.merges


def test_identifiers_of_two_profiles_merge_them_into_the_oldest() -> None:
    g = Graph(DEFAULT_RULES, [Profile("old", 1, {E1}), Profile("new", 5, {PH})])
    out = g.resolve("e3", [PH, E1, AN], Ids(), 9.0)
    assert out.profile_id == "old"
    assert [(m.survivor, m.absorbed, m.event_id) for m in out.merges] == [("old", "new", "e3")]
    assert set(out.merges[0].keys) == {E1, PH}
    assert g.owner == {E1: "old", PH: "old", AN: "old"}
    assert g.final("new") == "old"


def test_merge_chain_resolves_to_the_last_survivor() -> None:
    g = Graph(DEFAULT_RULES, [Profile("a", 3, {E1}), Profile("b", 2, {PH}), Profile("c", 1, {AN})])
    g.resolve("x", [E1, PH], Ids(), 9.0)  # a into b
    g.resolve("y", [PH, AN], Ids(), 9.0)  # b into c
    assert g.final("a") == "c" and g.final("b") == "c"
    assert set(g.profiles) == {"c"}


def test_merge_protection_keeps_two_user_ids_apart_and_drops_the_weaker_link() -> None:
    g = Graph(DEFAULT_RULES, [Profile("p", 1, {U1, E1})])
    # A second user_id with the first one's email: user_id allows one value per profile.
    out = g.resolve("e", [U2, E1], Ids(), 2.0)
    assert out.created and out.profile_id != "p"
    assert [d.key for d in out.dropped] == [E1]
    assert "MERGE_PROTECTION" in out.dropped[0].reason and "'user_id'" in out.dropped[0].reason
    assert g.owner[E1] == "p" and g.owner[U2] == out.profile_id


def test_merge_protection_drops_lowest_priority_first() -> None:
    g = Graph(DEFAULT_RULES, [Profile("p", 1, {U1}), Profile("q", 2, {U2, AN})])
    out = g.resolve("e", [U1, E1, AN], Ids(), 3.0)
    # anonymous_id (priority 50) goes first; then the union no longer holds two user_ids.
    assert [d.key for d in out.dropped] == [AN]
    assert out.profile_id == "p" and not out.merges
    assert g.owner[E1] == "p" and g.owner[AN] == "q"


def test_a_full_type_keeps_its_known_value_and_drops_the_new_one() -> None:
    rules = IdentityRules.of(IdentifierType("email", "email", 90, 2))
    known = [("email", f"k{i}@example.com") for i in range(2)]
    g = Graph(rules, [Profile("p", 1, set(known))])
    new: Key = ("email", "a-new@example.com")  # sorts before the known ones
    out = g.resolve("e", [new, known[1]], Ids(), 2.0)
    assert out.profile_id == "p" and [d.key for d in out.dropped] == [new]


def test_lowered_limit_does_not_block_events_that_add_nothing() -> None:
    rules = IdentityRules.of(IdentifierType("email", "email", 90, 1))
    g = Graph(rules, [Profile("p", 1, {E1, E2})])  # over the limit since it was lowered
    out = g.resolve("e", [E1, E2], Ids(), 2.0)
    assert out.profile_id == "p" and not out.dropped


def test_manual_merge_refuses_to_break_a_limit() -> None:
    g = Graph(DEFAULT_RULES, [Profile("p", 1, {U1}), Profile("q", 2, {U2})])
    with pytest.raises(LimitBroken) as err:
        g.merge("p", "q")
    assert err.value.type_name == "user_id" and err.value.limit == 1
    fact = Graph(DEFAULT_RULES, [Profile("p", 1, {U1}), Profile("q", 2, {E1})]).merge("p", "q")
    assert (fact.survivor, fact.absorbed) == ("p", "q")


def test_split_moves_identifiers_to_a_new_profile() -> None:
    g = Graph(DEFAULT_RULES, [Profile("p", 1, {E1, PH, AN})])
    target = g.split("p", [PH, AN], "q", 5.0)
    assert target.profile_id == "q" and g.owner[PH] == "q" and g.owner[E1] == "p"
    with pytest.raises(ValueError, match="at least one"):
        g.split("p", [E1], "r", 6.0)
    with pytest.raises(ValueError, match="belong"):
        g.split("p", [PH], "r", 6.0)


def test_resolve_needs_an_identifier() -> None:
    with pytest.raises(ValueError, match="at least one identifier"):
        Graph(DEFAULT_RULES).resolve("e", [], Ids(), 1.0)


UNLIMITED = IdentityRules.of(
    *(IdentifierType(t, "trim", 50, 1000) for t in ("email", "phone", "user_id", "anonymous_id"))
)
POOL = [(t, str(v)) for t in ("email", "phone", "user_id", "anonymous_id") for v in range(4)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=4), min_size=1, max_size=25), st.randoms())
def test_without_limits_profiles_are_the_connected_components_in_any_order(
    events: list[list[Key]], rnd: random.Random
) -> None:
    expected = components(events)
    for _ in range(3):
        order = events[:]
        rnd.shuffle(order)
        g = Graph(UNLIMITED)
        new_id = Ids()
        for n, keys in enumerate(order):
            g.resolve(f"e{n}", keys, new_id, float(n))
        assert partition(g.owner) == expected
        # Every identifier belongs to exactly one active profile, and the profiles agree.
        assert {k for p in g.profiles.values() for k in p.keys} == set(g.owner)
        assert sum(len(p.keys) for p in g.profiles.values()) == len(g.owner)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=4), min_size=1, max_size=25))
def test_limits_always_hold_with_default_rules(events: list[list[Key]]) -> None:
    rules = IdentityRules.of(
        IdentifierType("user_id", "trim", 100, 1),
        IdentifierType("email", "trim", 90, 2),
        IdentifierType("phone", "trim", 80, 2),
        IdentifierType("anonymous_id", "trim", 50, 3),
    )
    g = Graph(rules)
    new_id = Ids()
    for n, keys in enumerate(events):
        out = g.resolve(f"e{n}", keys, new_id, float(n))
        assert out.linked, "at least one identifier always links"
        assert g.owner[out.linked[0]] == out.profile_id or g.final(out.profile_id) == g.owner[out.linked[0]]
    for p in g.profiles.values():
        for t, rule in rules.types.items():
            assert sum(1 for k in p.keys if k[0] == t) <= rule.max_per_profile


def test_profiles_created_and_absorbed_in_one_working_set_are_still_reported_new() -> None:
    g = Graph(DEFAULT_RULES)
    ids = Ids()
    first = g.resolve("e1", [E1], ids, 1.0).profile_id
    second = g.resolve("e2", [PH], ids, 1.0).profile_id
    out = g.resolve("e3", [E1, PH], ids, 1.0)
    assert out.profile_id == first, "the profile created first survives"
    assert [p.profile_id for p in g.new_profiles()] == [first, second]
    assert g.final(second) == first
