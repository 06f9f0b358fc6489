"""Trait values by policy (services/profile/traits.py) against an independent reference.

The reference works on the raw observations, never on summaries: under LATEST the value is the one
of the observation with the greatest (event time, event id); FIRST the least; MOST_FREQUENT the
value observed most often (ties: the value whose latest observation is latest); SOURCE_PRIORITY
the observations of the most trusted source present (unknown sources least trusted, all alike),
then the latest of those. The module must agree for every set of observations, in every arrival
order, split into any batches the way storage applies them (load the stored summaries, add the
batch, store), and for a merge (two profiles' summaries combined = the profile of all events).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.profile import traits
from services.profile.rollup import SummaryKey, add_observations
from services.profile.traits import Chosen, Observation, Summary

T0 = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
POLICIES = (traits.LATEST, traits.FIRST, traits.MOST_FREQUENT, traits.SOURCE_PRIORITY)
SOURCES = ("crm", "web", "app", "agent", "")
# Event ids that are prefixes of one another ("e" < "e1" < "e10") and an empty one (UpdateTraits).
EVENT_IDS = ("", "e", "e1", "e10", "e2", "f", "e1a", "z", "a", "ab")
VALUES: tuple[Any, ...] = ("gold", "silver", "Gold", 30, 30.5, True, 0, "", {"city": "Oslo", "zip": 150}, [1, 2])


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# ---- the reference ------------------------------------------------------------------------------------


def _latest_key(o: Observation) -> tuple[dt.datetime, str]:
    return (o.at, o.event_id)


def reference(obs: Sequence[Observation], policy: int, priority: Sequence[str] = ()) -> tuple[Any, ...] | None:
    """(value as canonical JSON, source, event id, time, policy, observations) of one trait."""
    if not obs:
        return None
    total = len(obs)
    if policy == traits.FIRST:
        o = min(obs, key=_latest_key)
        return (traits.canonical(o.value), o.source, o.event_id, o.at, policy, total)
    if policy == traits.MOST_FREQUENT:
        groups: dict[str, list[Observation]] = {}
        for o in obs:
            groups.setdefault(traits.canonical(o.value), []).append(o)
        best = max(groups.values(), key=lambda g: (len(g), max(_latest_key(o) for o in g)))
        o = max(best, key=_latest_key)
        return (traits.canonical(o.value), o.source, o.event_id, o.at, policy, len(best))
    if policy == traits.SOURCE_PRIORITY:

        def rank(source: str) -> int:
            return priority.index(source) if source in priority else len(priority)

        top = min(rank(o.source) for o in obs)
        o = max((o for o in obs if rank(o.source) == top), key=_latest_key)
        return (traits.canonical(o.value), o.source, o.event_id, o.at, policy, total)
    o = max(obs, key=_latest_key)
    return (traits.canonical(o.value), o.source, o.event_id, o.at, traits.LATEST, total)


def as_tuple(c: Chosen | None) -> tuple[Any, ...] | None:
    if c is None:
        return None
    return (traits.canonical(c.value), c.source, c.event_id, c.at, c.policy, c.observations)


def ranks(priority: Sequence[str]) -> dict[str, int]:
    return {s: i for i, s in enumerate(priority)}


def by_key(store: Mapping[SummaryKey, Summary], key: str) -> list[Summary]:
    return [s for (k, _, _), s in store.items() if k == key]


def apply_in_batches(obs: Sequence[Observation], cuts: Sequence[int]) -> dict[SummaryKey, Summary]:
    """What storage holds after applying ``obs`` batch by batch: load, add the batch, store."""
    store: dict[SummaryKey, Summary] = {}
    bounds = sorted({0, len(obs), *(min(c, len(obs)) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        loaded = dict(store)  # what a transaction reads
        store.update(add_observations(loaded, obs[lo:hi], {}))
    return store


# ---- strategies ---------------------------------------------------------------------------------------


@st.composite
def observation_sets(draw: st.DrawFn, keys: Sequence[str] = ("tier",)) -> list[Observation]:
    """Observations of a few traits, one per (trait, event): an event is recorded once. Times on
    a coarse grid so ties on time are common."""
    ids = draw(st.lists(st.sampled_from(EVENT_IDS), unique=True, min_size=0, max_size=len(EVENT_IDS)))
    out = []
    for eid in ids:
        for key in draw(st.lists(st.sampled_from(keys), unique=True, min_size=1)):
            value = traits.plain(draw(st.sampled_from(VALUES)))
            out.append(Observation(key, value, draw(st.sampled_from(SOURCES)), eid, at(draw(st.integers(0, 4)))))
    return out


priorities = st.lists(st.sampled_from(("crm", "web", "app", "unused")), unique=True, max_size=4)


# ---- properties -----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(obs=observation_sets(), priority=priorities)
def test_choose_equals_the_reference_for_every_policy(obs: list[Observation], priority: list[str]) -> None:
    summaries = traits.summarize(obs)
    for policy in POLICIES:
        assert as_tuple(traits.choose(summaries, policy, ranks(priority))) == reference(obs, policy, priority)


@settings(max_examples=200, deadline=None)
@given(obs=observation_sets(keys=("tier", "city")), data=st.data(), priority=priorities)
def test_any_order_and_any_batches_give_the_same_traits(
    obs: list[Observation], data: st.DataObject, priority: list[str]
) -> None:
    arrival = data.draw(st.permutations(obs))
    cuts = data.draw(st.lists(st.integers(0, len(obs)), max_size=4))
    store = apply_in_batches(arrival, cuts)
    assert sorted(store.values(), key=repr) == sorted(traits.summarize(obs), key=repr)
    for key in ("tier", "city"):
        mine = [o for o in obs if o.key == key]
        for policy in POLICIES:
            got = traits.choose(by_key(store, key), policy, ranks(priority))
            assert as_tuple(got) == reference(mine, policy, priority)


@settings(max_examples=200, deadline=None)
@given(obs=observation_sets(keys=("tier", "city")), data=st.data(), priority=priorities)
def test_a_merge_equals_the_profile_of_all_events(
    obs: list[Observation], data: st.DataObject, priority: list[str]
) -> None:
    """Two profiles built separately (in their own batches), their summaries combined per
    (trait, value, source), choose the same values as one profile built from every event."""
    sides = data.draw(st.lists(st.booleans(), min_size=len(obs), max_size=len(obs)))
    left = [o for o, s in zip(obs, sides, strict=True) if s]
    right = [o for o, s in zip(obs, sides, strict=True) if not s]
    a = apply_in_batches(data.draw(st.permutations(left)), data.draw(st.lists(st.integers(0, len(left)), max_size=2)))
    b = apply_in_batches(data.draw(st.permutations(right)), data.draw(st.lists(st.integers(0, len(right)), max_size=2)))
    merged = {k: traits.combine(a.get(k), s) for k, s in b.items()} | {k: s for k, s in a.items() if k not in b}
    assert sorted(merged.values(), key=repr) == sorted(traits.summarize(obs), key=repr)
    for key in ("tier", "city"):
        for policy in POLICIES:
            got = traits.choose(by_key(merged, key), policy, ranks(priority))
            assert as_tuple(got) == reference([o for o in obs if o.key == key], policy, priority)


@settings(max_examples=200, deadline=None)
@given(obs=observation_sets(), data=st.data())
def test_combine_is_commutative_and_associative(obs: list[Observation], data: st.DataObject) -> None:
    same = [traits.summary_of(o) for o in obs if (o.value, o.source) == (obs[0].value, obs[0].source)] if obs else []
    if len(same) < 3:
        return
    x, y, z = same[:3]
    assert traits.combine(x, y) == traits.combine(y, x)
    assert traits.combine(traits.combine(x, y), z) == traits.combine(x, traits.combine(y, z))


# ---- each policy, by example ---------------------------------------------------------------------------


def obs_(value: Any, seconds: float, event_id: str, source: str = "web", key: str = "tier") -> Observation:
    return Observation(key, value, source, event_id, at(seconds))


def chosen(obs: Sequence[Observation], policy: int, priority: Sequence[str] = ()) -> Chosen:
    c = traits.choose(traits.summarize(obs), policy, ranks(priority))
    assert c is not None
    return c


def test_latest_is_by_event_time_not_arrival() -> None:
    late_arrival_older_event = obs_("silver", 1, "e9")
    newer = obs_("gold", 5, "e1")
    for order in ([newer, late_arrival_older_event], [late_arrival_older_event, newer]):
        c = chosen(order, traits.LATEST)
        assert (c.value, c.event_id, c.at, c.observations) == ("gold", "e1", at(5), 2)


def test_latest_breaks_a_tie_on_time_by_event_id() -> None:
    c = chosen([obs_("a", 3, "e2"), obs_("b", 3, "e10")], traits.LATEST)
    assert c.value == "a"  # "e2" > "e10"


def test_first_is_the_earliest_observation_and_ties_go_to_the_lower_event_id() -> None:
    c = chosen([obs_("late", 9, "a"), obs_("x", 1, "e2"), obs_("y", 1, "e10")], traits.FIRST)
    assert (c.value, c.event_id, c.at, c.observations, c.policy) == ("y", "e10", at(1), 3, traits.FIRST)


def test_most_frequent_counts_a_value_across_sources_and_ties_go_to_the_latest() -> None:
    obs = [obs_("gold", 1, "e1", "crm"), obs_("gold", 2, "e2", "web"), obs_("silver", 3, "e3"), obs_("silver", 4, "e4")]
    c = chosen(obs, traits.MOST_FREQUENT)
    assert (c.value, c.observations, c.event_id) == ("silver", 2, "e4")  # 2 : 2, silver is the latest
    c = chosen([*obs, obs_("gold", 0, "e0", "app")], traits.MOST_FREQUENT)
    assert (c.value, c.observations, c.source, c.event_id) == ("gold", 3, "web", "e2")


def test_most_frequent_treats_30_and_30_0_as_one_value() -> None:
    obs = traits.observations_of({"age": 30.0}, "web", "e1", at(1)) + traits.observations_of(
        {"age": 30}, "crm", "e2", at(2)
    )
    obs.append(obs_(31, 3, "e3", key="age"))
    c = chosen(obs, traits.MOST_FREQUENT)
    assert c.value == 30 and isinstance(c.value, int) and c.observations == 2


def test_source_priority_prefers_the_most_trusted_source_then_the_latest() -> None:
    obs = [obs_("web-new", 9, "e9", "web"), obs_("crm-old", 1, "e1", "crm"), obs_("crm-new", 2, "e2", "crm")]
    c = chosen(obs, traits.SOURCE_PRIORITY, ["crm", "web"])
    assert (c.value, c.source, c.observations) == ("crm-new", "crm", 3)
    assert chosen(obs, traits.SOURCE_PRIORITY, ["web", "crm"]).value == "web-new"


def test_source_priority_ranks_unknown_sources_after_known_ones_and_alike() -> None:
    obs = [obs_("known", 1, "e1", "crm"), obs_("unknown-new", 9, "e9", "partner"), obs_("unknown", 5, "e5", "other")]
    assert chosen(obs, traits.SOURCE_PRIORITY, ["web", "crm"]).value == "known"
    assert chosen(obs[1:], traits.SOURCE_PRIORITY, ["web", "crm"]).value == "unknown-new"
    # No priorities at all: every source is unknown, so it is the latest.
    assert chosen(obs, traits.SOURCE_PRIORITY).value == "unknown-new"


def test_source_priority_breaks_ties_on_time_as_latest_does() -> None:
    """Same source, same time: the greater event id, also when one id is a prefix of the other
    (an UpdateTraits value has event id "")."""
    for pair in ([obs_("a", 3, "e"), obs_("b", 3, "e1")], [obs_("a", 3, ""), obs_("b", 3, "x")]):
        assert chosen(pair, traits.SOURCE_PRIORITY, ["web"]).value == "b"
        assert chosen(pair, traits.LATEST).value == "b"


def test_source_priority_tells_apart_times_one_microsecond_apart_far_from_now() -> None:
    far = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
    older = Observation("tier", "older", "crm", "e2", far)
    newer = Observation("tier", "newer", "crm", "e1", far + dt.timedelta(microseconds=1))
    assert chosen([older, newer], traits.SOURCE_PRIORITY, ["crm"]).value == "newer"


@pytest.mark.parametrize("policy", [0, 99])
def test_an_unknown_policy_is_latest(policy: int) -> None:
    c = chosen([obs_("a", 1, "e1"), obs_("b", 2, "e2")], policy)
    assert (c.value, c.policy) == ("b", traits.LATEST)


def test_no_summaries_no_value() -> None:
    for policy in POLICIES:
        assert traits.choose([], policy) is None


def test_policy_of_falls_back_to_the_default_and_then_latest() -> None:
    assert traits.policy_of("tier", {"tier": traits.FIRST}, traits.MOST_FREQUENT) == traits.FIRST
    assert traits.policy_of("city", {"tier": traits.FIRST}, traits.MOST_FREQUENT) == traits.MOST_FREQUENT
    assert traits.policy_of("city", {}, 0) == traits.LATEST


def test_observations_of_drops_nulls_and_keeps_nested_values_whole() -> None:
    got = traits.observations_of(
        {"a": None, "n": 30.0, "f": 2.5, "big": 2.0**60, "addr": {"zip": 150.0, "l": [1.0, "x"]}, "ok": True},
        "web",
        "e1",
        at(0),
    )
    values = {o.key: o.value for o in got}
    assert values == {"n": 30, "f": 2.5, "big": 2.0**60, "addr": {"zip": 150, "l": [1, "x"]}, "ok": True}
    assert isinstance(values["n"], int) and isinstance(values["big"], float) and values["ok"] is True
    assert all((o.source, o.event_id, o.at) == ("web", "e1", at(0)) for o in got)


def test_value_hash_is_the_same_for_equal_values_and_differs_for_true_and_1() -> None:
    assert traits.value_hash({"a": 1, "b": [1, 2]}) == traits.value_hash({"b": [1, 2], "a": 1})
    assert traits.value_hash(traits.plain(30.0)) == traits.value_hash(30)
    assert traits.value_hash(True) != traits.value_hash(1)
    assert traits.value_hash("1") != traits.value_hash(1)


def test_search_text_lowercases_strings_and_spells_other_values_as_json() -> None:
    assert traits.search_text("Ada LOVELACE") == "ada lovelace"
    assert traits.search_text({"B": 1, "a": "X"}) == '{"b":1,"a":"x"}'  # keys sorted, then lower-cased
    assert len(traits.search_text("x" * 2000)) == 512
