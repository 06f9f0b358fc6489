"""The rollups against a recomputation from the raw facts: for random facts delivered in random
order, with duplicates, corrections, merges, splits and late arrivals, every ``QueryMetrics``
answer equals what the final facts give when computed from scratch, exactly for counts and
rates. Real PostgreSQL; each example is its own tenant."""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from services.core import db
from services.metrics import codec
from services.metrics import query as q
from services.metrics.definitions import BY_NAME
from services.metrics.derive import Key, attributions, day_of, derive, hour_of
from services.metrics.facts import LEG, MESSAGE, SURVEY, Fact
from services.metrics.reads import MetricsReads
from services.metrics.stats import Stats
from services.metrics.storage import MetricsStore
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
#: Around the US fall-back change, and a few days before now (open FCR windows).
BASES = (dt.datetime(2026, 10, 28, 0, tzinfo=dt.UTC), NOW - dt.timedelta(days=4))
PROFILES = ("p0", "p1", "p2", "p3")
CONFIG = MetricsConfig(time_zone="America/New_York", fcr_window_days=3)
CHANNELS = (event_pb2.CHANNEL_VOICE, event_pb2.CHANNEL_CHAT)


@st.composite
def facts(draw: Any) -> Fact:
    kind = draw(st.sampled_from((LEG, LEG, SURVEY, MESSAGE)))
    at = draw(st.sampled_from(BASES)) + dt.timedelta(minutes=draw(st.integers(0, 9 * 24 * 60)))
    profile = draw(st.sampled_from(PROFILES))
    iid = f"i{draw(st.integers(0, 7))}"
    eid = f"e{secrets.token_hex(5)}"
    channel = draw(st.sampled_from(CHANNELS))
    if kind == LEG:
        abandoned = draw(st.booleans())
        return Fact(
            key=f"leg:{iid}:{draw(st.sampled_from(('a', 'b')))}",
            kind=LEG,
            event_id=eid,
            profile_id=profile,
            at=at,
            channel=channel,
            source="cc",
            interaction_id=iid,
            queue=draw(st.sampled_from(("q1", "q2"))),
            agent="" if abandoned else draw(st.sampled_from(("a1", "a2"))),
            reason=draw(st.sampled_from(("billing", "delivery", ""))),
            case_id=draw(st.sampled_from(("", "c1", "c2"))),
            case_status=draw(st.sampled_from((0, 1, 3, 4))),
            started_at=at,
            talk=float(draw(st.integers(0, 900))),
            hold=float(draw(st.integers(0, 60))),
            acw=float(draw(st.integers(0, 60))) + 0.25,
            wait=float(draw(st.integers(0, 60))),
            transferred=draw(st.booleans()),
            abandoned=abandoned,
            leg_id="x",
        )
    if kind == SURVEY:
        survey_type = draw(st.sampled_from((1, 2, 3)))
        high = {1: 10, 2: 5, 3: 7}[survey_type]
        return Fact(
            key=f"survey:{eid}",
            kind=SURVEY,
            event_id=eid,
            profile_id=profile,
            at=at,
            channel=event_pb2.CHANNEL_EMAIL,
            source=draw(st.sampled_from(("ivr", "email"))),
            interaction_id=draw(st.sampled_from((iid, "", "unknown"))),
            survey_type=survey_type,
            score=draw(st.integers(0 if survey_type == 1 else 1, high)),
        )
    return Fact(
        key=f"message:{eid}",
        kind=MESSAGE,
        event_id=eid,
        profile_id=profile,
        at=at,
        channel=event_pb2.CHANNEL_CHAT,
        source="chat",
        interaction_id=iid,
        author=draw(st.sampled_from((1, 2, 3))),
        compound=draw(st.sampled_from((-0.6, -0.04, 0.0, 0.05, 0.7))),
    )


@st.composite
def histories(draw: Any) -> list[tuple[str, Any]]:
    """Batches of facts (shuffled, some twice) with merges (chains among them) and splits."""
    pool = draw(st.lists(facts(), min_size=1, max_size=40))
    deliveries = pool + draw(st.lists(st.sampled_from(pool), max_size=10))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    rnd.shuffle(deliveries)
    ops: list[tuple[str, Any]] = []
    i = 0
    while i < len(deliveries):
        n = draw(st.integers(1, 8))
        ops.append(("facts", deliveries[i : i + n]))
        i += n
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(ops)))
        if draw(st.booleans()):
            # p1 may absorb p3 after p0 absorbed p1: a chain whose changes come in either order.
            ops.insert(at, ("merge", draw(st.sampled_from((("p0", "p1"), ("p0", "p2"), ("p1", "p3"))))))
        else:
            moved = [f.event_id for f in pool if draw(st.booleans())]
            ops.insert(at, ("split", ("p0", "p9", moved)))
    return ops


def reference(ops: list[tuple[str, Any]]) -> dict[str, list[Fact]]:
    """The final facts per customer, by the rules alone (no increments): newest fact per key,
    merged-away ids redirected, split events moved, kept in a plain dict."""
    alias: dict[str, str] = {}
    current: dict[str, Fact] = {}
    for kind, arg in ops:
        if kind == "facts":
            for f in arg:
                f = f.with_profile(alias.get(f.profile_id, f.profile_id))  # noqa: PLW2901
                old = current.get(f.key)
                if old is None or f.newer_than(old):
                    current[f.key] = f
        elif kind == "merge":
            survivor, absorbed = arg
            survivor = alias.get(survivor, survivor)  # merged on itself meanwhile: its survivor
            alias[absorbed] = survivor
            for a, s in list(alias.items()):
                if s == absorbed:
                    alias[a] = survivor
            current = {k: (f.with_profile(survivor) if f.profile_id == absorbed else f) for k, f in current.items()}
        else:
            profile, new, moved = arg
            current = {
                k: (f.with_profile(new) if f.profile_id == profile and f.event_id in moved else f)
                for k, f in current.items()
            }
    out: dict[str, list[Fact]] = {}
    for f in current.values():
        out.setdefault(f.profile_id, []).append(f)
    return out


def expected(
    final: dict[str, list[Fact]],
    metric: str,
    group_by: tuple[str, ...],
    granularity: int,
    filters: tuple[tuple[str, tuple[Any, ...]], ...] = (),
) -> dict[tuple[Any, ...], tuple[float | None, int]]:
    """The answer recomputed from scratch: every customer derived from their final facts alone."""
    every_leg = [f for fs in final.values() for f in fs if f.kind == LEG]
    others = attributions(every_leg)
    contrib: dict[Key, Stats] = {}
    pending: dict[tuple[Any, ...], int] = {}
    tz = CONFIG.tz
    names = ("channel", "queue", "agent", "reason", "source")

    def bucket(hour: dt.datetime) -> Any:
        d = day_of(hour, tz)
        return {1: hour, 2: d, 3: d - dt.timedelta(days=d.weekday()), 4: d.replace(day=1), 5: None}[granularity]

    def kept(named: dict[str, Any]) -> bool:
        return all(named[dim] in values for dim, values in filters)

    for fs in final.values():
        d = derive(fs, others, CONFIG)
        for key, s in d.contrib.items():
            contrib.setdefault(key, Stats.zero()).merge(s)
        for c in d.unrepeated:
            if c.start + dt.timedelta(days=CONFIG.fcr_window_days) > NOW:
                open_dims = dict(zip(names, (*c.dims[:4], ""), strict=True))
                if not kept(open_dims):
                    continue
                k = (bucket(hour_of(c.start, tz)), *(open_dims[g] for g in group_by))
                pending[k] = pending.get(k, 0) + 1
    grouped: dict[tuple[Any, ...], Stats] = {}
    for (hour, *dims), s in contrib.items():
        named = dict(zip(names, dims, strict=True))
        if not kept(named):
            continue
        k = (bucket(hour), *(named[g] for g in group_by))
        grouped.setdefault(k, Stats.zero()).merge(s)
    out = {}
    m = BY_NAME[metric]
    for k in set(grouped) | (set(pending) if m.uses_pending else set()):
        score = m.compute(grouped.get(k, Stats.zero()), pending.get(k, 0) if m.uses_pending else 0)
        if score.sample_size or score.pending:
            out[k] = (score.value, score.sample_size)
    return out


@pytest.fixture(scope="module")
def store(engine: Engine) -> Iterator[MetricsStore]:
    yield MetricsStore(engine)


NO_FILTER: tuple[tuple[str, tuple[Any, ...]], ...] = ()
QUERIES: tuple[tuple[str, tuple[str, ...], int, tuple[tuple[str, tuple[Any, ...]], ...]], ...] = (
    ("contact_volume", ("queue",), 4, (("channel", ("voice",)),)),
    ("aht_seconds", ("channel", "agent"), 2, (("queue", ("q1",)), ("reason", ("billing", "delivery")))),
    ("fcr", (), 1, (("agent", ("a1",)),)),
    ("contact_volume", ("channel",), 2, NO_FILTER),
    ("nps", ("source",), 2, NO_FILTER),
    ("aht_seconds", ("agent",), 1, NO_FILTER),
    ("abandonment_rate", (), 3, NO_FILTER),
    ("fcr", ("channel", "reason"), 2, NO_FILTER),
    ("repeat_contact_rate", ("queue",), 5, NO_FILTER),
    ("csat", ("channel", "queue", "agent"), 2, NO_FILTER),
    ("sentiment", (), 2, NO_FILTER),
    ("handoff_rate", ("channel",), 5, NO_FILTER),
    ("fcr_case", ("reason",), 5, NO_FILTER),
    ("service_level", ("channel",), 2, NO_FILTER),
)


def _leg(iid: str, profile: str, at: dt.datetime, reason: str = "billing") -> Fact:
    return Fact(
        key=f"leg:{iid}:{iid}", kind=LEG, event_id=f"e-{iid}", profile_id=profile, at=at, channel=6, source="cc",
        interaction_id=iid, agent="a1", reason=reason, talk=60.0, started_at=at, leg_id=iid,
    )  # fmt: skip


#: The later merge of a chain applied first (two replicas can): p3's contacts still join p0's,
#: and its repeat of p0's billing contact counts.
CHAIN_OUT_OF_ORDER = [
    ("facts", [_leg("c1", "p0", BASES[0]), _leg("c2", "p3", BASES[0] + dt.timedelta(days=1))]),
    ("merge", ("p0", "p1")),
    ("merge", ("p1", "p3")),
    ("facts", [_leg("c3", "p3", BASES[0] + dt.timedelta(days=2), "delivery")]),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(histories())
@example(CHAIN_OUT_OF_ORDER)
def test_every_query_equals_a_recomputation_from_the_final_facts(
    store: MetricsStore, ops: list[tuple[str, Any]]
) -> None:
    tenant = f"prop-{secrets.token_hex(4)}"
    for kind, arg in ops:
        if kind == "facts":
            store.apply_facts(tenant, arg, CONFIG)
        elif kind == "merge":
            store.apply_merge(tenant, arg[0], arg[1], CONFIG)
        else:
            store.apply_split(tenant, arg[0], arg[1], arg[2], CONFIG)
    assert_matches_recomputation(store, tenant, reference(ops))


def assert_matches_recomputation(store: MetricsStore, tenant: str, final: dict[str, list[Fact]]) -> None:
    """Every query of :data:`QUERIES` answers what ``final`` gives from scratch, each fact is its
    final owner's, and the stored contributions sum to the final facts' derivation."""
    reads = MetricsReads(store, lambda _t: CONFIG)
    start, end = BASES[0] - dt.timedelta(days=2), NOW + dt.timedelta(days=10)
    for metric, group_by, granularity, filters in QUERIES:
        asked = [(dim, list(values)) for dim, values in filters]
        resp = reads.query(tenant, [metric], start, end, granularity, list(group_by), asked, now=NOW)
        got = {}
        for series in resp.series:
            for p in series.points:
                t = p.start_time.ToDatetime(tzinfo=dt.UTC)
                local = t.astimezone(CONFIG.tz).date()
                b = {1: t, 2: local, 3: local, 4: local, 5: None}[granularity]
                dims = tuple(q.CHANNELS[series.group[g]] if g == "channel" else series.group[g] for g in group_by)
                got[(b, *dims)] = (p.score.value if p.score.HasField("value") else None, p.score.sample_size)
        named_filters = tuple((d, tuple(q.CHANNELS[v] if d == "channel" else v for v in vs)) for d, vs in filters)
        want = expected(final, metric, group_by, granularity, named_filters)
        assert got.keys() == want.keys(), (metric, group_by)
        for k, (value, n) in want.items():
            assert got[k][1] == n, (metric, k)
            assert (got[k][0] is None) == (value is None), (metric, k)
            if value is not None:
                assert got[k][0] == pytest.approx(value, rel=1e-12, abs=1e-9), (metric, k)
    # Each fact belongs to whom the rules say, and the rollups hold exactly the sum of the
    # stored contributions, which are the final facts'.
    owners = {f.key: p for p, fs in store.all_facts(tenant).items() for f in fs}
    assert owners == {f.key: p for p, fs in final.items() for f in fs}
    assert _close(store.derived_total(tenant), _scratch(final))


def _scratch(final: dict[str, list[Fact]]) -> dict[Key, Stats]:
    others = attributions(f for fs in final.values() for f in fs if f.kind == LEG)
    out: dict[Key, Stats] = {}
    for fs in final.values():
        for key, s in derive(fs, others, CONFIG).contrib.items():
            out.setdefault(key, Stats.zero()).merge(s)
    return out


def _close(a: dict[Key, Stats], b: dict[Key, Stats]) -> bool:
    keys = {k for k, v in a.items() if not v.is_zero()} | {k for k, v in b.items() if not v.is_zero()}
    for k in keys:
        x, y = a.get(k, Stats.zero()), b.get(k, Stats.zero())
        if x.counts != y.counts or x.hist != y.hist:
            return False
        if any(abs(p - r) > 1e-6 for p, r in zip(x.squares, y.squares, strict=True)):
            return False
    return True


def _survey(eid: str, profile: str, at: dt.datetime, iid: str, score: int) -> Fact:
    return Fact(
        key=f"survey:{eid}", kind=SURVEY, event_id=eid, profile_id=profile, at=at, channel=event_pb2.CHANNEL_EMAIL,
        source="email", interaction_id=iid, survey_type=event_pb2.SURVEY_TYPE_NPS, score=score,
    )  # fmt: skip


def _message(eid: str, profile: str, at: dt.datetime, iid: str, author: int, compound: float = 0.0) -> Fact:
    return Fact(
        key=f"message:{eid}", kind=MESSAGE, event_id=eid, profile_id=profile, at=at, channel=event_pb2.CHANNEL_CHAT,
        source="chat", interaction_id=iid, author=author, compound=compound,
    )  # fmt: skip


def test_a_customer_stored_whole_before_parts_is_derived_in_full_on_their_next_change(
    store: MetricsStore,
) -> None:
    """Contributions stored before metrics_0009 are one row per customer (part ''). The next
    change to that customer replaces the row by parts, so nothing is counted twice: here a new
    leg re-attributes a survey and a conversation, and a survey arrives from another customer."""
    tenant = f"legacy-{secrets.token_hex(4)}"
    t0 = BASES[1]
    first = [
        _leg("i1", "p0", t0),
        _survey("s1", "p0", t0 + dt.timedelta(hours=1), "i1", 9),
        _message("m1", "p0", t0, "i1", event_pb2.AUTHOR_BOT),
        _message("m2", "p0", t0 + dt.timedelta(minutes=1), "i1", event_pb2.AUTHOR_CUSTOMER, 0.7),
        _leg("i2", "p1", t0 + dt.timedelta(days=1)),
        # parts the next change does not touch
        _survey("s0", "p0", t0 + dt.timedelta(hours=5), "", 10),
        _message("m9", "p0", t0 + dt.timedelta(days=2), "i3", event_pb2.AUTHOR_CUSTOMER, 0.05),
    ]
    store.apply_facts(tenant, first, CONFIG)
    with db.raw_transaction(store.engine, "test") as (cur, _):
        cur.execute("SELECT body FROM metrics.contributions WHERE tenant_id = %s AND profile_id = 'p0'", (tenant,))
        whole: dict[Key, Stats] = {}
        for (body,) in cur.fetchall():
            for key, st_ in codec.contribution(json.loads(body)).items():
                whole.setdefault(key, Stats.zero()).merge(st_)
        cur.execute("DELETE FROM metrics.contributions WHERE tenant_id = %s AND profile_id = 'p0'", (tenant,))
        cur.execute(
            "INSERT INTO metrics.contributions (tenant_id, profile_id, part, body) VALUES (%s, 'p0', '', %s)",
            (tenant, json.dumps(codec.contribution_body(whole))),
        )
    later = [
        replace(_leg("i1", "p0", t0, reason="delivery"), event_id="e-i1-late", at=t0 + dt.timedelta(hours=2)),
        _message("m3", "p0", t0 + dt.timedelta(minutes=2), "i1", event_pb2.AUTHOR_CUSTOMER, -0.6),
        _survey("s2", "p1", t0 + dt.timedelta(hours=3), "i1", 3),
    ]
    store.apply_facts(tenant, later, CONFIG)
    with db.raw_transaction(store.engine, "test") as (cur, _):
        cur.execute(
            "SELECT part FROM metrics.contributions WHERE tenant_id = %s AND profile_id = 'p0' ORDER BY part",
            (tenant,),
        )
        assert [r[0] for r in cur.fetchall()] == ["contacts", "conv:i1", "conv:i3", "survey:s0", "survey:s1"]
    final = reference([("facts", first), ("facts", later)])
    assert_matches_recomputation(store, tenant, final)


def test_redelivering_every_batch_changes_nothing(store: MetricsStore) -> None:
    tenant = f"redo-{secrets.token_hex(4)}"
    t = BASES[0]
    batch = [
        Fact(
            key="leg:r1:r1",
            kind=LEG,
            event_id="e1",
            profile_id="p0",
            at=t,
            channel=6,
            source="cc",
            interaction_id="r1",
            agent="a1",
            reason="billing",
            talk=60.0,
            started_at=t,
            leg_id="r1",
        )
    ]
    first = store.apply_facts(tenant, batch, CONFIG)
    again = store.apply_facts(tenant, batch, CONFIG)
    assert (first.written, again.written, again.unchanged) == (1, 0, 1)
    reads = MetricsReads(store, lambda _t: CONFIG)
    resp = reads.query(tenant, ["contact_volume"], t - dt.timedelta(days=1), t + dt.timedelta(days=1), 5, [], [])
    assert [p.score.value for p in resp.series[0].points] == [1]


def test_a_split_that_comes_again_after_the_profiles_merged_back_moves_nothing(store: MetricsStore) -> None:
    """A change can arrive twice (a publish retried across a Redis failover): the second copy of
    an old split, after a later merge joined the two profiles again, must not take the events
    off the survivor a second time."""
    from services.core import streams
    from services.core.bus import Delivery
    from services.metrics.consumer import ChangesHandler
    from tessera.v1 import stream_pb2

    tenant = f"replay-{secrets.token_hex(4)}"
    t = BASES[0]
    legs = [
        Fact(key=f"leg:{i}:{i}", kind=LEG, event_id=f"e-{i}", profile_id="p0", at=t + dt.timedelta(hours=n),
             channel=6, source="cc", interaction_id=i, agent="a1", reason="billing", talk=60.0, leg_id=i)
        for n, i in enumerate(("x1", "x2"))
    ]  # fmt: skip
    store.apply_facts(tenant, legs, CONFIG)
    split = stream_pb2.ProfileChange(
        kind=streams.SPLIT, profile_id="p0", new_profile_id="p1", merge_id=7, moved_event_ids=["e-x2"]
    )
    merge = stream_pb2.ProfileChange(kind=streams.MERGED, profile_id="p0", absorbed_profile_id="p1", merge_id=8)
    handler = ChangesHandler(store, lambda _t: CONFIG)

    def deliver(*changes: stream_pb2.ProfileChange) -> None:
        handler(
            [
                Delivery(tenant, "changes", f"{n}-0", b"", stream_pb2.ProfileChangeEnvelope(tenant_id=tenant, change=c))
                for n, c in enumerate(changes)
            ]
        )

    deliver(split)
    assert {f.event_id: p for p, fs in store.all_facts(tenant).items() for f in fs} == {"e-x1": "p0", "e-x2": "p1"}
    deliver(merge, split)  # the split again, after the merge
    assert {f.event_id: p for p, fs in store.all_facts(tenant).items() for f in fs} == {"e-x1": "p0", "e-x2": "p0"}
    assert _close(store.derived_total(tenant), _scratch(store.all_facts(tenant)))
