"""Computed traits (services/profile/computed.py, through events.effects) against an independent
reference that reads a plain description of each event, never the protobuf.

Every value must equal a recomputation from the raw events: all-time values folded incrementally
in any order and any batches (load the stored state, add the batch, store), two profiles' states
combined on a merge, and windowed values over the points storage keeps, read at any later time
(windows expire as ``now`` advances; a point exactly at the window's start is outside it).
Numbers are small multiples of 1/4, so every sum is exact in any order (see the note on float sums
in test_float_sums_are_order_dependent_in_the_last_bit).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.profile import computed, events
from services.profile.computed import Definition, Point, State
from services.profile.rollup import add_points
from services.profile.tenant_settings import ProfileConfig
from tessera.v1 import event_pb2, profile_pb2

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
STEP = 600  # event times are on a 10-minute grid, so points fall exactly on window boundaries
WINDOW = 3600
CH = event_pb2
AGGS = (
    computed.COUNT,
    computed.SUM,
    computed.MIN,
    computed.MAX,
    computed.AVERAGE,
    computed.FIRST,
    computed.LAST,
    computed.DISTINCT_COUNT,
)
MISSING = object()


def at(steps: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=steps * STEP)


# ---- a plain description of an event, and its protobuf ------------------------------------------------


@dataclass(frozen=True)
class Ev:
    event_id: str
    step: int
    kind: str
    channel: int = CH.CHANNEL_WEB
    source: str = ""
    properties: dict[str, Any] | None = None  # None: no properties Struct at all
    track: str = ""
    score: int | None = None  # survey_response.score (optional in the proto)
    talk: float = 0.0
    traits: dict[str, Any] = field(default_factory=dict)

    def proto(self) -> event_pb2.Event:
        e = event_pb2.Event(event_id=self.event_id, channel=self.channel, source=self.source)  # type: ignore[arg-type]
        e.timestamp.FromDatetime(at(self.step))
        e.received_at.FromDatetime(at(self.step) + dt.timedelta(days=3))  # arrival never counts
        if self.properties is not None:
            e.properties.update(self.properties)
        getattr(e, self.kind).SetInParent()  # the payload is set even when all its fields are empty
        if self.kind == "track":
            e.track.event = self.track
        elif self.kind == "survey_response":
            e.survey_response.type = event_pb2.SURVEY_TYPE_CSAT
            if self.score is not None:
                e.survey_response.score = self.score
        elif self.kind == "interaction":
            e.interaction.interaction_id = "i-" + self.event_id
            e.interaction.talk_seconds = self.talk
        elif self.kind == "identify":
            e.identify.traits.update(self.traits)
        elif self.kind == "message":
            e.message.interaction_id = "i-" + self.event_id
            e.message.text = "hi"
        return e


def norm(v: Any) -> Any:
    """Whole floats as ints, recursively (Struct numbers are all doubles)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v


def text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(norm(v), sort_keys=True, separators=(",", ":"))


# ---- the reference ----------------------------------------------------------------------------------------


def ref_value(e: Ev, path: str) -> Any:
    """The value at ``path`` in the description, or MISSING."""
    props = e.properties or {}
    if path.startswith("properties."):
        v: Any = props
        for part in path.split(".")[1:]:
            if not isinstance(v, dict) or v.get(part) is None:
                return MISSING
            v = v[part]
        return norm(v)
    if path == "survey_response.score":
        return e.score if e.kind == "survey_response" and e.score is not None else MISSING
    if path == "interaction.talk_seconds":
        return e.talk if e.kind == "interaction" else MISSING
    if path.startswith("identify.traits."):
        v = e.traits.get(path.split(".", 2)[2]) if e.kind == "identify" else None
        return MISSING if v is None else norm(v)
    if path == "channel":
        return event_pb2.Channel.Name(e.channel)  # type: ignore[arg-type]
    if path == "source":
        return e.source or MISSING
    if path == "track.event":
        return e.track if e.kind == "track" and e.track else MISSING
    raise AssertionError(path)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def ref_points(d: Definition, evs: Sequence[Ev]) -> list[tuple[dt.datetime, str, Any]]:
    out = []
    for e in evs:
        if d.kinds and e.kind not in d.kinds:
            continue
        if d.channels and e.channel not in d.channels:
            continue
        if d.track_event and not (e.kind == "track" and e.track == d.track_event):
            continue
        props = e.properties or {}
        if any(props.get(k) is None or text(props[k]) != v for k, v in d.property_equals):
            continue
        v = ref_value(e, d.field) if d.field else None
        if v is MISSING:
            continue
        if d.aggregation in computed.NUMERIC and not is_number(v):
            continue
        out.append((at(e.step), e.event_id, v))
    return out


def reference(d: Definition, evs: Sequence[Ev], now: dt.datetime | None = None) -> tuple[Any, int]:
    """The value a recomputation from the raw events gives at ``now`` (all time when None)."""
    pts = ref_points(d, evs)
    if d.window_seconds and now is not None:
        pts = [p for p in pts if now - dt.timedelta(seconds=d.window_seconds) < p[0]]
    nums = [Fraction(v) for _, _, v in pts if is_number(v)]
    agg = d.aggregation
    if agg == computed.COUNT:
        return len(pts), len(pts)
    if agg == computed.SUM:
        return sum(nums, Fraction(0)), len(nums)
    if agg == computed.MIN:
        return (min(nums) if nums else None), len(nums)
    if agg == computed.MAX:
        return (max(nums) if nums else None), len(nums)
    if agg == computed.AVERAGE:
        return (sum(nums, Fraction(0)) / len(nums) if nums else None), len(nums)
    if agg == computed.FIRST:
        return (min(pts, key=lambda p: (p[0], p[1]))[2] if pts else None), len(pts)
    if agg == computed.LAST:
        return (max(pts, key=lambda p: (p[0], p[1]))[2] if pts else None), len(pts)
    return len({text(v) for _, _, v in pts}), len(pts)


def same(got: tuple[Any, int], want: tuple[Any, int]) -> bool:
    (g, gn), (w, wn) = got, want
    if gn != wn:
        return False
    if isinstance(w, Fraction):
        # Exact up to float rounding: an average of 0.25 over 3 events is 0.0833…, never 1/12.
        number = not isinstance(g, bool) and isinstance(g, int | float)
        return number and math.isclose(g, w, rel_tol=1e-12, abs_tol=1e-12)
    return text(g) == text(w) if w is not None else g is None


# ---- the module, the way the consumer and storage run it ------------------------------------------------


def points_of(d: Definition, evs: Sequence[Ev]) -> list[Point]:
    return points_by_key((d,), evs).get(d.key, [])


def points_by_key(defs: Sequence[Definition], evs: Sequence[Ev]) -> dict[str, list[Point]]:
    """What the consumer derives from a batch: every definition's points, in one effects() call."""
    return events.effects(
        [events.from_event(e.proto()) for e in evs], ProfileConfig(computed_traits=tuple(defs))
    ).points


class AllTime:
    """All-time computed traits as storage keeps them: a state per definition and, for
    DISTINCT_COUNT, the value hashes seen. Each batch loads them, adds its points, stores."""

    def __init__(self, defs: Sequence[Definition]) -> None:
        self.defs = defs
        self.states: dict[str, State] = {}
        self.known: dict[str, set[str]] = {d.key: set() for d in defs}

    def apply(self, batch: Sequence[Ev]) -> None:
        points = points_by_key(self.defs, batch)
        for d in self.defs:
            pts = points.get(d.key, [])
            if not pts:
                continue
            track = d.aggregation == computed.DISTINCT_COUNT
            known = set(self.known[d.key]) if track else set()  # what the transaction loaded
            state, fresh = add_points(self.states.get(d.key), pts, known)
            self.states[d.key] = state
            if track:
                assert set(fresh) <= known and not set(fresh) & self.known[d.key]
                self.known[d.key] |= set(fresh)

    def value(self, d: Definition) -> tuple[Any, int]:
        return computed.value_of(d, self.states.get(d.key, State()))


class Windowed:
    """Windowed computed traits as storage keeps them: their points (those already outside the
    window when written are not kept), and upkeep deletes the ones that left it."""

    def __init__(self, defs: Sequence[Definition]) -> None:
        self.defs = defs
        self.points: dict[str, list[Point]] = {d.key: [] for d in defs}

    def apply(self, batch: Sequence[Ev], now: dt.datetime) -> None:
        points = points_by_key(self.defs, batch)
        for d in self.defs:
            since = computed.window_start(d, now)
            self.points[d.key] += [p for p in points.get(d.key, []) if p.at > since]

    def upkeep(self, now: dt.datetime) -> None:
        for d in self.defs:
            since = computed.window_start(d, now)
            self.points[d.key] = [p for p in self.points[d.key] if not p.at <= since]

    def value(self, d: Definition, now: dt.datetime) -> tuple[Any, int]:
        return computed.aggregate(d, computed.in_window(d, self.points[d.key], now))


# ---- strategies -----------------------------------------------------------------------------------------

numbers = st.integers(-8, 8).map(lambda n: n / 4)  # multiples of 1/4: exact sums in any order
x_values = st.one_of(
    numbers,
    st.integers(-3, 3),
    st.sampled_from(["a", "b", "B", "", True, False, None, {"y": 1}, [1, "a"]]),
)
props = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "x": x_values,
            "plan": st.sampled_from(["gold", "silver", 30, 30.0, True, None]),
            "n": st.one_of(st.fixed_dictionaries({"y": numbers}), st.just("flat")),
        },
    ),
)
KIND = st.sampled_from(["identify", "track", "interaction", "survey_response", "message"])
FIELDS = (
    "properties.x",
    "properties.n.y",
    "survey_response.score",
    "interaction.talk_seconds",
    "identify.traits.x",
    "channel",
    "source",
    "track.event",
)


@st.composite
def event_sets(draw: st.DrawFn, max_size: int = 14) -> list[Ev]:
    ids = draw(st.lists(st.text("abe1", min_size=1, max_size=3), unique=True, max_size=max_size))
    out = []
    for eid in ids:
        out.append(
            Ev(
                event_id=eid,
                step=draw(st.integers(0, 12)),
                kind=draw(KIND),
                channel=draw(st.sampled_from([CH.CHANNEL_WEB, CH.CHANNEL_VOICE, CH.CHANNEL_CHAT])),
                source=draw(st.sampled_from(["", "web", "crm"])),
                properties=draw(props),
                track=draw(st.sampled_from(["", "Order Completed", "Viewed"])),
                score=draw(st.one_of(st.none(), st.integers(0, 10))),
                talk=draw(numbers.map(abs)),
                traits=draw(st.fixed_dictionaries({}, optional={"x": x_values})),
            )
        )
    return out


@st.composite
def definitions(draw: st.DrawFn, window: bool | None = None) -> Definition:
    return draw(definition_sets(window))[0]


@st.composite
def definition_sets(draw: st.DrawFn, window: bool | None = None) -> list[Definition]:
    """Every (aggregation, field) pair under one drawn filter (and window), shuffled."""
    windowed = draw(st.booleans()) if window is None else window
    kinds = tuple(draw(st.lists(KIND, unique=True, max_size=2))) if draw(st.booleans()) else ()
    channels = tuple(draw(st.lists(st.sampled_from([CH.CHANNEL_WEB, CH.CHANNEL_VOICE]), unique=True, max_size=1)))
    property_equals = draw(st.sampled_from([(), (("plan", "gold"),), (("plan", "30"),), (("plan", "true"),)]))
    track_event = draw(st.sampled_from(["", "", "Order Completed"]))
    pairs = [(agg, fld) for agg in AGGS for fld in FIELDS] + [(computed.COUNT, "")]
    return [
        Definition(
            key=f"t{i}",
            aggregation=agg,
            field=fld,
            window_seconds=WINDOW if windowed else 0,
            kinds=kinds,
            channels=channels,
            property_equals=property_equals,
            track_event=track_event,
        )
        for i, (agg, fld) in enumerate(draw(st.permutations(pairs)))
    ]


def batches(data: st.DataObject, evs: Sequence[Ev]) -> list[list[Ev]]:
    order = data.draw(st.permutations(evs))
    cuts = sorted({0, len(order), *data.draw(st.lists(st.integers(0, len(order)), max_size=4))})
    return [list(order[lo:hi]) for lo, hi in itertools.pairwise(cuts)]


# ---- properties -------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(defs=definition_sets(window=False), evs=event_sets())
def test_aggregate_over_the_points_equals_the_reference(defs: list[Definition], evs: list[Ev]) -> None:
    points = points_by_key(defs, evs)
    for d in defs:
        assert same(computed.aggregate(d, points.get(d.key, [])), reference(d, evs)), d


@settings(max_examples=120, deadline=None)
@given(defs=definition_sets(window=False), evs=event_sets(), data=st.data())
def test_all_time_state_in_any_order_and_batches_equals_the_recomputation(
    defs: list[Definition], evs: list[Ev], data: st.DataObject
) -> None:
    traits = AllTime(defs)
    for batch in batches(data, evs):
        traits.apply(batch)
    for d in defs:
        assert same(traits.value(d), reference(d, evs)), d


@settings(max_examples=120, deadline=None)
@given(defs=definition_sets(window=False), evs=event_sets(), data=st.data())
def test_merged_states_equal_the_profile_of_all_events(
    defs: list[Definition], evs: list[Ev], data: st.DataObject
) -> None:
    sides = data.draw(st.lists(st.booleans(), min_size=len(evs), max_size=len(evs)))
    a, b = AllTime(defs), AllTime(defs)
    for batch in batches(data, [e for e, s in zip(evs, sides, strict=True) if s]):
        a.apply(batch)
    for batch in batches(data, [e for e, s in zip(evs, sides, strict=True) if not s]):
        b.apply(batch)
    for d in defs:
        sa, sb = a.states.get(d.key, State()), b.states.get(d.key, State())
        merged = computed.combine(sa, sb, distinct=len(a.known[d.key] | b.known[d.key]))
        assert same(computed.value_of(d, merged), reference(d, evs)), d


@settings(max_examples=120, deadline=None)
@given(defs=definition_sets(window=True), evs=event_sets(), data=st.data())
def test_windowed_values_equal_the_recomputation_as_time_passes(
    defs: list[Definition], evs: list[Ev], data: st.DataObject
) -> None:
    """Batches arrive while the clock moves forward (any batch may hold old events); upkeep runs
    now and then; at any later time the value is the recomputation over the window ending then."""
    traits = Windowed(defs)
    now = data.draw(st.integers(0, 14))
    for batch in batches(data, evs):
        now += data.draw(st.integers(0, 3))
        traits.apply(batch, at(now))
        if data.draw(st.booleans()):
            traits.upkeep(at(now))
    for later in range(now, now + WINDOW // STEP + 2):
        for d in defs:
            assert same(traits.value(d, at(later)), reference(d, evs, at(later))), (d, later)


@settings(max_examples=100, deadline=None)
@given(d=definitions())
def test_definition_round_trips_through_proto_and_json(d: Definition) -> None:
    assert computed.from_proto(computed.to_proto(d)) == d
    assert computed.from_json(json.loads(json.dumps(computed.to_json(d)))) == d


# ---- windows, by example ------------------------------------------------------------------------------------


def test_a_point_exactly_at_the_window_start_is_outside_and_one_just_after_is_inside() -> None:
    d = Definition("n", computed.COUNT, window_seconds=WINDOW)
    now = at(10)
    edge = Point(now - dt.timedelta(seconds=WINDOW), "e1")
    inside = Point(now - dt.timedelta(seconds=WINDOW) + dt.timedelta(microseconds=1), "e2")
    at_now = Point(now, "e3")
    assert computed.in_window(d, [edge, inside, at_now], now) == [inside, at_now]
    assert computed.window_start(d, now) == edge.at


def test_windowed_count_expires_as_now_advances() -> None:
    d = Definition("n", computed.COUNT, window_seconds=WINDOW)
    pts = [Point(at(s), f"e{s}") for s in (0, 2, 4)]
    seen = [computed.aggregate(d, computed.in_window(d, pts, at(now)))[0] for now in range(4, 12)]
    # A window of 6 steps: the point at step 0 leaves at step 6 (exactly 3600 s later), and so on.
    assert seen == [3, 3, 2, 2, 1, 1, 0, 0]


def test_an_all_time_definition_keeps_every_point() -> None:
    d = Definition("n", computed.COUNT)
    pts = [Point(at(0), "e1")]
    assert computed.in_window(d, pts, at(10_000)) == pts and not d.windowed


# ---- field paths and filters, by example -------------------------------------------------------------------


def pt(d: Definition, e: Ev) -> Point | None:
    pts = points_of(d, [e])
    assert len(pts) <= 1
    return pts[0] if pts else None


def value(d: Definition, e: Ev) -> Any:
    p = pt(d, e)
    return MISSING if p is None else p.value


def test_properties_paths_reach_nested_values_and_skip_missing_and_null() -> None:
    e = Ev("e1", 0, "track", properties={"x": 30.0, "s": "a", "n": {"y": 2.5, "z": None}, "nil": None})
    assert value(Definition("t", computed.LAST, "properties.x"), e) == 30
    assert isinstance(value(Definition("t", computed.LAST, "properties.x"), e), int)
    assert value(Definition("t", computed.LAST, "properties.n.y"), e) == 2.5
    assert value(Definition("t", computed.LAST, "properties.n"), e) == {"y": 2.5, "z": None}
    for missing in ("properties.nil", "properties.n.z", "properties.absent", "properties.s.deeper", "context.x"):
        assert value(Definition("t", computed.LAST, missing), e) is MISSING, missing
    assert value(Definition("t", computed.COUNT, "properties.x"), Ev("e2", 0, "track")) is MISSING


def test_survey_score_zero_counts_and_an_unset_score_does_not() -> None:
    d = Definition("nps", computed.AVERAGE, "survey_response.score")
    zero, unset = Ev("e1", 0, "survey_response", score=0), Ev("e2", 1, "survey_response", score=None)
    assert value(d, zero) == 0
    assert pt(d, unset) is None
    assert pt(Definition("n", computed.COUNT, "survey_response.score"), unset) is None
    assert computed.aggregate(d, points_of(d, [zero, unset, Ev("e3", 2, "survey_response", score=9)])) == (4.5, 2)


def test_payload_paths_only_reach_their_own_kind() -> None:
    d = Definition("talk", computed.SUM, "interaction.talk_seconds")
    assert value(d, Ev("e1", 0, "interaction", talk=12.5)) == 12.5
    # An unset proto3 double reads as 0: a leg without talk time adds 0 to the sum.
    assert value(d, Ev("e2", 0, "interaction")) == 0.0
    assert pt(d, Ev("e3", 0, "track", talk=99)) is None
    assert value(Definition("t", computed.LAST, "identify.traits.x"), Ev("e4", 0, "identify", traits={"x": "v"})) == "v"
    assert pt(Definition("t", computed.LAST, "identify.traits.x"), Ev("e5", 0, "identify", traits={"y": 1})) is None
    assert pt(Definition("t", computed.LAST, "identify.traits.x"), Ev("e6", 0, "track")) is None
    assert value(Definition("t", computed.LAST, "survey_response.type"), Ev("e7", 0, "survey_response")) == (
        "SURVEY_TYPE_CSAT"
    )
    assert pt(Definition("t", computed.LAST, "interaction.queue"), Ev("e8", 0, "interaction")) is None  # "" is unset


def test_channel_and_source_are_values_and_an_empty_source_is_missing() -> None:
    e = Ev("e1", 0, "track", channel=CH.CHANNEL_VOICE, source="genesys")
    assert value(Definition("c", computed.LAST, "channel"), e) == "CHANNEL_VOICE"
    assert value(Definition("s", computed.DISTINCT_COUNT, "source"), e) == "genesys"
    assert pt(Definition("s", computed.LAST, "source"), Ev("e2", 0, "track")) is None


def test_bools_are_values_but_not_numbers() -> None:
    e = Ev("e1", 0, "track", properties={"flag": True})
    for agg in computed.NUMERIC:
        assert pt(Definition("t", agg, "properties.flag"), e) is None
    p = pt(Definition("t", computed.COUNT, "properties.flag"), e)
    assert p is not None and p.value is True and p.num is None
    evs = [e, Ev("e2", 1, "track", properties={"flag": 1}), Ev("e3", 2, "track", properties={"flag": False})]
    d = Definition("t", computed.DISTINCT_COUNT, "properties.flag")
    assert computed.aggregate(d, points_of(d, evs)) == (3, 3)  # True, 1 and False are three values
    assert computed.aggregate(
        Definition("s", computed.SUM, "properties.flag"),
        points_of(Definition("s", computed.SUM, "properties.flag"), evs),
    ) == (1, 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("agg", AGGS)
def test_non_finite_numbers_do_not_poison_any_aggregation(bad: float, agg: int) -> None:
    """Ingest refuses NaN and Infinity, but a double field can still hold one: it is no value."""
    d = Definition("talk", agg, "interaction.talk_seconds")
    evs = [
        Ev("e1", 0, "interaction", talk=2.0),
        Ev("e2", 1, "interaction", talk=bad),
        Ev("e3", 2, "interaction", talk=4.0),
    ]
    pts = points_of(d, evs)
    assert [p.event_id for p in pts] == ["e1", "e3"]
    trait = AllTime([d])
    trait.apply(evs)
    want = reference(d, [evs[0], evs[2]])
    assert same(computed.aggregate(d, pts), want) and same(trait.value(d), want)


def test_filters_kinds_channels_track_event_and_property_equals() -> None:
    order = Ev(
        "e1", 0, "track", channel=CH.CHANNEL_WEB, track="Order Completed", properties={"plan": "gold", "n": 30.0}
    )
    view = Ev("e2", 0, "track", channel=CH.CHANNEL_WEB, track="Viewed", properties={"plan": "gold"})
    call = Ev("e3", 0, "interaction", channel=CH.CHANNEL_VOICE, properties={"plan": True, "n": 30.5})

    def hits(**kw: Any) -> list[str]:
        d = Definition("n", computed.COUNT, **kw)
        return [p.event_id for e in (order, view, call) for p in points_of(d, [e])]

    assert hits() == ["e1", "e2", "e3"]
    assert hits(kinds=("interaction", "identify")) == ["e3"]
    assert hits(channels=(CH.CHANNEL_WEB,)) == ["e1", "e2"]
    assert hits(track_event="Order Completed") == ["e1"]
    assert hits(track_event="Order Completed", kinds=("interaction",)) == []
    assert hits(property_equals=(("plan", "gold"),)) == ["e1", "e2"]
    assert hits(property_equals=(("plan", "true"),)) == ["e3"]  # a bool compares as JSON text
    assert hits(property_equals=(("n", "30"),)) == ["e1"]  # 30.0 arrives as a double, shows as 30
    assert hits(property_equals=(("n", "30.5"),)) == ["e3"]
    assert hits(property_equals=(("plan", "gold"), ("n", "30"))) == ["e1"]
    assert hits(property_equals=(("absent", ""),)) == []


# ---- values of a state --------------------------------------------------------------------------------------


def test_values_of_nothing() -> None:
    empty = State()
    want = {
        computed.COUNT: (0, 0),
        computed.SUM: (0, 0),
        computed.MIN: (None, 0),
        computed.MAX: (None, 0),
        computed.AVERAGE: (None, 0),
        computed.FIRST: (None, 0),
        computed.LAST: (None, 0),
        computed.DISTINCT_COUNT: (0, 0),
    }
    for agg, expected in want.items():
        assert computed.value_of(Definition("t", agg, "properties.x"), empty) == expected


def test_whole_sums_show_as_integers() -> None:
    pts = [Point(at(0), "a", 1, 1.0), Point(at(1), "b", 2, 2.0)]
    got, n = computed.aggregate(Definition("t", computed.SUM, "properties.x"), pts)
    assert (got, n) == (3, 2) and isinstance(got, int)
    assert computed.aggregate(Definition("t", computed.AVERAGE, "properties.x"), pts) == (1.5, 2)


def test_first_and_last_break_ties_on_time_by_event_id() -> None:
    pts = [Point(at(0), "e2", "x"), Point(at(0), "e10", "y"), Point(at(0), "e", "z")]
    assert computed.aggregate(Definition("t", computed.FIRST, "properties.v"), pts)[0] == "z"
    assert computed.aggregate(Definition("t", computed.LAST, "properties.v"), pts)[0] == "x"


def test_float_sums_are_order_dependent_in_the_last_bit() -> None:
    """Documents a limit, not a wish: the stored all-time total is a float8 that each batch adds
    to, so decimals such as 0.1 may differ in the last bit between arrival orders (fold uses an
    exact fsum, State.add a plain +). Exact totals need an exact stored sum (numeric column)."""
    d = Definition("t", computed.SUM, "properties.x")
    pts = [Point(at(i), f"e{i}", v, v) for i, v in enumerate([0.1, 0.2, 0.3])]
    forward = State()
    for p in pts:
        forward = forward.add(p, False)
    backward = State()
    for p in reversed(pts):
        backward = backward.add(p, False)
    assert math.isclose(computed.value_of(d, forward)[0], computed.value_of(d, backward)[0], rel_tol=1e-15)


def test_state_add_and_fold_agree_and_combine_is_associative() -> None:
    pts = [Point(at(i % 3), f"e{i}", i % 4, float(i % 4)) for i in range(9)]
    folded = computed.fold(pts)
    added = State()
    seen: set[str] = set()
    for p in pts:
        added = added.add(p, p.value_hash not in seen)
        seen.add(p.value_hash)
    assert added == folded
    a, b, c = computed.fold(pts[:3]), computed.fold(pts[3:5]), computed.fold(pts[5:])
    assert computed.combine(computed.combine(a, b), c) == computed.combine(a, computed.combine(b, c))


# ---- validation ---------------------------------------------------------------------------------------------


def proto_def(
    key: str = "calls_30d", agg: int = computed.COUNT, fld: str = "", **kw: Any
) -> profile_pb2.ComputedTraitDefinition:
    msg = profile_pb2.ComputedTraitDefinition(key=key, aggregation=agg, field=fld)  # type: ignore[arg-type]
    if "window" in kw:
        secs, nanos = kw.pop("window")
        msg.window.CopyFrom(duration_pb2.Duration(seconds=secs, nanos=nanos))
    msg.filter.kinds.extend(kw.pop("kinds", []))
    msg.filter.channels.extend(kw.pop("channels", []))
    msg.filter.property_equals.update(kw.pop("property_equals", {}))
    msg.filter.track_event = kw.pop("track_event", "")
    assert not kw
    return msg


def paths(defs: Sequence[profile_pb2.ComputedTraitDefinition]) -> list[str]:
    return [p for p, _ in computed.problems(defs, "settings.computed_traits")]


def test_a_valid_definition_has_no_problems() -> None:
    good = [
        proto_def(),
        proto_def(
            "csat_avg_90d", computed.AVERAGE, "survey_response.score", window=(90 * 86400, 0), kinds=["survey_response"]
        ),
        proto_def("revenue", computed.SUM, "properties.revenue", channels=[CH.CHANNEL_WEB], property_equals={"a": "b"}),
        proto_def("skus", computed.DISTINCT_COUNT, "properties.sku", track_event="Order Completed", window=(0, 0)),
        proto_def("talk", computed.MAX, "interaction.talk_seconds", window=(60, 0)),
        proto_def("last_city", computed.LAST, "identify.traits.address.city", window=(3650 * 86400, 0)),
        proto_def("ch", computed.DISTINCT_COUNT, "channel"),
        proto_def("src", computed.FIRST, "source"),
        proto_def("page", computed.LAST, "context.page.url"),
        proto_def("props", computed.FIRST, "properties"),
        proto_def("traits", computed.FIRST, "identify.traits"),
        proto_def("survey_types", computed.DISTINCT_COUNT, "survey_response.type"),
    ]
    assert computed.problems(good, "settings.computed_traits") == []


@pytest.mark.parametrize(
    ("defs", "want"),
    [
        ([proto_def("Calls")], ["settings.computed_traits[0].key"]),
        ([proto_def("")], ["settings.computed_traits[0].key"]),
        ([proto_def("a" * 65)], ["settings.computed_traits[0].key"]),
        ([proto_def("1calls")], ["settings.computed_traits[0].key"]),
        ([proto_def("calls"), proto_def("calls")], ["settings.computed_traits[1].key"]),
        ([proto_def(agg=0)], ["settings.computed_traits[0].aggregation"]),
        ([proto_def(agg=99, fld="properties.x")], ["settings.computed_traits[0].aggregation"]),
        ([proto_def(agg=computed.SUM)], ["settings.computed_traits[0].field"]),
        ([proto_def(agg=computed.DISTINCT_COUNT)], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="revenue")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="Properties.x")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="properties.")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="properties.a b")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="properties." + ".".join("abcdefgh"))], ["settings.computed_traits[0].field"]),
        ([proto_def(window=(59, 0))], ["settings.computed_traits[0].window"]),
        ([proto_def(window=(3650 * 86400 + 1, 0))], ["settings.computed_traits[0].window"]),
        ([proto_def(window=(-60, 0))], ["settings.computed_traits[0].window"]),
        ([proto_def(window=(3600, 5))], ["settings.computed_traits[0].window"]),
        ([proto_def(kinds=["track", "page"])], ["settings.computed_traits[0].filter.kinds[1]"]),
        ([proto_def(channels=[0])], ["settings.computed_traits[0].filter.channels[0]"]),
        ([proto_def(channels=[CH.CHANNEL_WEB, 42])], ["settings.computed_traits[0].filter.channels[1]"]),
        ([proto_def(property_equals={"": "x"})], ["settings.computed_traits[0].filter.property_equals"]),
        ([proto_def(property_equals={"k" * 129: "x"})], ["settings.computed_traits[0].filter.property_equals"]),
        ([proto_def(property_equals={"k": "v" * 257})], ["settings.computed_traits[0].filter.property_equals"]),
        ([proto_def(track_event="e" * 257)], ["settings.computed_traits[0].filter.track_event"]),
        # Paths no event can have a value at are refused, not silently never matched.
        ([proto_def(fld="interaction.talk_secs")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="interaction")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="interaction.started_at")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="interaction.queue.name")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="channel.name")], ["settings.computed_traits[0].field"]),
        ([proto_def(fld="source.x")], ["settings.computed_traits[0].field"]),
        ([proto_def(agg=computed.SUM, fld="interaction.queue")], ["settings.computed_traits[0].field"]),
        ([proto_def(agg=computed.AVERAGE, fld="channel")], ["settings.computed_traits[0].field"]),
        ([proto_def(agg=computed.MAX, fld="interaction.abandoned")], ["settings.computed_traits[0].field"]),
    ],
)
def test_every_problem_is_named_by_its_field_path(
    defs: list[profile_pb2.ComputedTraitDefinition], want: list[str]
) -> None:
    assert paths(defs) == want


def test_every_problem_is_reported_at_once() -> None:
    bad = proto_def("X", 0, "nowhere.x", window=(1, 1), kinds=["nope"], channels=[0], track_event="e" * 300)
    bad.filter.property_equals[""] = "x"
    assert paths([bad, proto_def("ok", computed.SUM)]) == [
        "settings.computed_traits[0].key",
        "settings.computed_traits[0].aggregation",
        "settings.computed_traits[0].field",
        "settings.computed_traits[0].window",
        "settings.computed_traits[0].filter.kinds[0]",
        "settings.computed_traits[0].filter.channels[0]",
        "settings.computed_traits[0].filter.property_equals",
        "settings.computed_traits[0].filter.track_event",
        "settings.computed_traits[1].field",
    ]


def test_at_most_fifty_definitions() -> None:
    defs = [proto_def(f"t{i}") for i in range(computed.MAX_DEFINITIONS)]
    assert paths(defs) == []
    assert paths([*defs, proto_def("one_more")]) == ["settings.computed_traits"]
