"""Each CX formula on hand-made cases, with their edges (pure: no database)."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from services.core.errors import InvalidArgument
from services.metrics import query as q
from services.metrics import stats
from services.metrics.definitions import BY_NAME, METRICS
from services.metrics.derive import day_of, derive, hour_of, hour_of_exact, sentiment_trend
from services.metrics.facts import LEG, MESSAGE, SURVEY, Fact, sentiment
from services.metrics.stats import Stats, total
from services.metrics.tenant_settings import MetricsConfig, updated
from tessera.v1 import event_pb2

T0 = dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)
CONFIG = MetricsConfig()


def leg(iid: str, at: dt.datetime = T0, leg_id: str = "", **kw: object) -> Fact:
    values: dict[str, object] = {
        "channel": event_pb2.CHANNEL_VOICE,
        "queue": "support",
        "agent": "a1",
        "reason": "billing",
        "talk": 100.0,
        "hold": 20.0,
        "acw": 30.0,
        **kw,
    }
    return Fact(
        key=f"leg:{iid}:{leg_id or iid}",
        kind=LEG,
        event_id=f"e-{iid}-{leg_id}",
        profile_id="p",
        at=at,
        source="cc",
        interaction_id=iid,
        started_at=at,
        leg_id=leg_id or iid,
        **values,  # type: ignore[arg-type]
    )


def survey(kind: int, score: int, iid: str = "", at: dt.datetime = T0, n: int = 0) -> Fact:
    return Fact(
        key=f"survey:{kind}-{score}-{n}",
        kind=SURVEY,
        event_id=f"s{kind}-{score}-{n}",
        profile_id="p",
        at=at,
        channel=event_pb2.CHANNEL_EMAIL,
        source="qualtrics",
        interaction_id=iid,
        survey_type=kind,
        score=score,
    )


def message(iid: str, author: int, compound: float = 0.0, n: int = 0) -> Fact:
    return Fact(
        key=f"message:{iid}-{n}",
        kind=MESSAGE,
        event_id=f"m{iid}-{n}",
        profile_id="p",
        at=T0 + dt.timedelta(seconds=n),
        channel=event_pb2.CHANNEL_CHAT,
        source="chat",
        interaction_id=iid,
        author=author,
        compound=compound,
    )


def totals(facts: list[Fact], config: MetricsConfig = CONFIG) -> Stats:
    return total(derive(facts, {}, config).contrib.values())


def value(name: str, facts: list[Fact], pending: int = 0) -> float | None:
    return BY_NAME[name].compute(totals(facts), pending).value


# ---- surveys -----------------------------------------------------------------------------------


def test_nps_of_no_responses_is_absent_not_zero() -> None:
    s = BY_NAME["nps"].compute(Stats.zero(), 0)
    assert s.value is None and s.sample_size == 0 and s.ci_low is None


def test_nps_all_detractors_is_minus_100_with_an_adjusted_wald_interval() -> None:
    facts = [survey(event_pb2.SURVEY_TYPE_NPS, score, n=i) for i, score in enumerate([0, 3, 6, 6, 2])]
    s = BY_NAME["nps"].compute(totals(facts), 0)
    assert s.value == -100 and s.sample_size == 5
    # adjusted Wald by hand: n' = 8, p' = 0.75/8, d' = 5.75/8
    p, d = 0.75 / 8, 5.75 / 8
    half = 1.959963984540054 * math.sqrt((p + d - (p - d) ** 2) / 8)
    assert s.ci_low == pytest.approx(max(-100, (p - d - half) * 100))
    assert s.ci_high == pytest.approx((p - d + half) * 100)


def test_nps_of_5_answers_has_a_far_wider_interval_than_of_5000() -> None:
    small = stats.nps(3, 1, 5)
    large = stats.nps(3000, 1000, 5000)
    assert small.value == large.value == 40
    assert (small.ci_high - small.ci_low) > 8 * (large.ci_high - large.ci_low)  # type: ignore[operator]


def test_csat_is_top_two_box_and_its_mean_is_named_apart() -> None:
    facts = [survey(event_pb2.SURVEY_TYPE_CSAT, score, n=i) for i, score in enumerate([5, 4, 3, 1])]
    assert value("csat", facts) == 50
    assert value("csat_mean", facts) == pytest.approx(13 / 4)


def test_ces_mean_and_percent_agree() -> None:
    facts = [survey(event_pb2.SURVEY_TYPE_CES, score, n=i) for i, score in enumerate([7, 5, 4, 1])]
    assert value("ces_mean", facts) == pytest.approx(17 / 4)
    assert value("ces_agree", facts) == 50


def test_a_survey_on_an_unknown_interaction_keeps_its_own_channel() -> None:
    d = derive([survey(event_pb2.SURVEY_TYPE_NPS, 10, iid="nobody-knows")], {}, CONFIG)
    [(key, s)] = d.contrib.items()
    assert key[1:] == (event_pb2.CHANNEL_EMAIL, "", "", "", "qualtrics") and s["nps_promoters"] == 1


def test_a_survey_on_a_known_interaction_takes_its_channel_queue_agent_and_reason() -> None:
    d = derive([leg("i1"), survey(event_pb2.SURVEY_TYPE_NPS, 10, iid="i1", at=T0 + dt.timedelta(hours=3))], {}, CONFIG)
    surveyed = [k for k, s in d.contrib.items() if s["nps_n"]]
    assert [k[1:] for k in surveyed] == [(event_pb2.CHANNEL_VOICE, "support", "a1", "billing", "qualtrics")]


# ---- contacts ------------------------------------------------------------------------------------


def test_aht_counts_each_agent_leg_of_a_transfer_and_not_abandoned_contacts() -> None:
    facts = [
        leg("i1", leg_id="l1", transferred=True),
        leg("i1", leg_id="l2", agent="a2", at=T0 + dt.timedelta(minutes=3), talk=200.0),
        leg("i2", at=T0 + dt.timedelta(hours=1), agent="", abandoned=True, talk=0.0, hold=0.0, acw=0.0, wait=90.0),
    ]
    s = totals(facts)
    assert s["legs_handled"] == 2 and s["offered"] == 2 and s["handled"] == 1
    assert value("aht_seconds", facts) == pytest.approx((150 + 250) / 2)
    assert value("transfer_rate", facts) == 100
    assert value("abandonment_rate", facts) == 50
    assert value("contact_volume", facts) == 2


def test_service_level_uses_the_tenant_threshold() -> None:
    facts = [leg("i1", wait=10.0), leg("i2", wait=25.0, at=T0 + dt.timedelta(hours=1))]
    assert BY_NAME["service_level"].compute(totals(facts), 0).value == 50
    assert BY_NAME["service_level"].compute(totals(facts, MetricsConfig(service_level_seconds=30)), 0).value == 100


def test_fcr_a_repeat_on_another_channel_within_the_window_is_not_resolved() -> None:
    first = leg("i1")
    again = leg("i2", at=T0 + dt.timedelta(days=3), channel=event_pb2.CHANNEL_CHAT)
    late = leg("i3", at=T0 + dt.timedelta(days=20))
    d = derive([first, again, late], {}, CONFIG)
    s = total(d.contrib.values())
    assert s["fcr_handled"] == 3 and s["fcr_repeated"] == 1 and s["repeats"] == 1
    # i2 and i3 are unrepeated: resolved once their windows close, pending until then
    assert {c.interaction_id for c in d.unrepeated} == {"i2", "i3"}
    assert d.pending(T0 + dt.timedelta(days=21), dt.timedelta(days=7)) == 1
    score = BY_NAME["fcr"].compute(s, 1)
    assert score.value == 50 and score.sample_size == 2 and score.pending == 1


def test_fcr_a_transfer_is_not_a_repeat_and_another_reason_is_not_either() -> None:
    facts = [
        leg("i1", leg_id="l1", transferred=True),
        leg("i1", leg_id="l2", at=T0 + dt.timedelta(minutes=5)),
        leg("i2", at=T0 + dt.timedelta(days=1), reason="delivery"),
    ]
    s = totals(facts)
    assert s["fcr_handled"] == 2 and s["fcr_repeated"] == 0


def test_case_based_fcr_counts_resolved_cases_with_a_single_contact() -> None:
    facts = [
        leg("i1", case_id="c1", case_status=event_pb2.CASE_STATUS_RESOLVED),
        leg("i2", case_id="c2", case_status=event_pb2.CASE_STATUS_OPEN, at=T0 + dt.timedelta(hours=1)),
        leg("i3", case_id="c2", case_status=event_pb2.CASE_STATUS_CLOSED, at=T0 + dt.timedelta(hours=5)),
        leg("i4", case_id="c3", case_status=event_pb2.CASE_STATUS_OPEN, at=T0 + dt.timedelta(hours=6)),
    ]
    s = totals(facts)
    assert s["cases_resolved"] == 2 and s["cases_single"] == 1
    assert value("fcr_case", facts) == 50


def test_containment_and_handoff_from_message_authors_and_legs_abandoned_is_neither() -> None:
    facts = [
        message("bot-only", event_pb2.AUTHOR_CUSTOMER, 0.2, 0),
        message("bot-only", event_pb2.AUTHOR_BOT, 0.0, 1),
        message("handed", event_pb2.AUTHOR_BOT, 0.0, 2),
        message("handed", event_pb2.AUTHOR_AGENT, 0.0, 3),
        message("no-bot", event_pb2.AUTHOR_AGENT, 0.0, 4),
        # the customer gave up on the bot: neither contained nor handed off
        message("gave-up", event_pb2.AUTHOR_BOT, 0.0, 5),
        leg("gave-up", agent="", abandoned=True, channel=event_pb2.CHANNEL_CHAT),
    ]
    assert value("containment_rate", facts) == pytest.approx(100 / 3)
    assert value("handoff_rate", facts) == pytest.approx(100 / 3)


def test_sentiment_averages_customer_messages_only() -> None:
    facts = [
        message("c1", event_pb2.AUTHOR_CUSTOMER, 0.5, 0),
        message("c1", event_pb2.AUTHOR_CUSTOMER, -0.3, 1),
        message("c1", event_pb2.AUTHOR_AGENT, 0.0, 2),
    ]
    assert value("sentiment", facts) == pytest.approx(0.1)
    assert value("sentiment_negative_rate", facts) == 50


def test_an_interactions_sentiment_is_its_customer_messages_mean_and_their_trend() -> None:
    facts = [
        message("c1", event_pb2.AUTHOR_CUSTOMER, -0.6, 0),
        message("c1", event_pb2.AUTHOR_AGENT, 0.9, 1),
        message("c1", event_pb2.AUTHOR_CUSTOMER, 0.4, 2),
        message("c2", event_pb2.AUTHOR_CUSTOMER, 0.2, 3),
    ]
    [first, second] = sentiment_trend(facts)
    assert (first.interaction_id, first.messages) == ("c1", 2)
    assert first.mean == pytest.approx(-0.1) and first.trend == pytest.approx(1.0)
    assert (second.interaction_id, second.trend) == ("c2", 0.0)


@pytest.mark.parametrize(
    "text",
    [
        "I love this, thank you so much!",
        "Worst service ever. I am furious.",
        "My order number is 1234.",
        "",
    ],
)
def test_vader_compound_scores_are_the_librarys_own(text: str) -> None:
    assert sentiment(text) == SentimentIntensityAnalyzer().polarity_scores(text)["compound"]


# ---- buckets and time zones --------------------------------------------------------------------


def test_a_dst_fall_back_day_has_25_local_hours_and_they_are_all_distinct_buckets() -> None:
    tz = MetricsConfig(time_zone="America/New_York").tz
    start = dt.datetime(2026, 11, 1, 4, tzinfo=dt.UTC)  # 00:00 EDT
    hours = {hour_of(start + dt.timedelta(hours=h), tz) for h in range(25)}
    assert len(hours) == 25
    assert {day_of(h, tz) for h in hours} == {dt.date(2026, 11, 1)}


@pytest.mark.parametrize(
    "zone",
    ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu", "Asia/Kolkata", "Pacific/Chatham"],
)
def test_the_fast_local_hour_agrees_with_the_exact_one_through_every_transition(zone: str) -> None:
    """``hour_of`` answers per quarter hour from a cache; around each DST change of 2026 (half-hour
    shifts, quarter-hour offsets included) it must give what converting each instant gives."""
    tz = MetricsConfig(time_zone=zone).tz
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    step = dt.timedelta(minutes=7, seconds=13, microseconds=500)
    checked = 0
    while t < dt.datetime(2027, 1, 1, tzinfo=dt.UTC):
        near_change = (t + dt.timedelta(hours=3)).astimezone(tz).utcoffset() != (t - dt.timedelta(hours=3)).astimezone(
            tz
        ).utcoffset()
        if near_change or t.day == 15:
            assert hour_of(t, tz) == hour_of_exact(t, tz), t
            checked += 1
            t += step
        else:
            t += dt.timedelta(hours=1)
    assert checked > 200


def test_a_day_query_over_a_dst_change_widens_to_local_midnights() -> None:
    config = MetricsConfig(time_zone="Europe/Berlin")
    plan = q.plan(
        config,
        ["nps"],
        dt.datetime(2026, 10, 24, 12, tzinfo=dt.UTC),
        dt.datetime(2026, 10, 26, 12, tzinfo=dt.UTC),
        2,  # GRANULARITY_DAY
        [],
        [],
    )
    starts = q.bucket_starts(plan)
    assert [s.astimezone(config.tz).hour for s in starts] == [0, 0, 0]
    assert [(b - a).total_seconds() / 3600 for a, b in zip(starts, [*starts[1:], plan.end], strict=True)] == [
        24,
        25,
        24,
    ]


def test_weeks_start_on_monday_and_months_on_the_first_local_day() -> None:
    config = MetricsConfig(time_zone="Asia/Kolkata")
    week = q.plan(config, ["nps"], T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=3), 3, [], [])
    assert week.start.astimezone(config.tz).weekday() == 0 and week.start.astimezone(config.tz).hour == 0
    month = q.plan(config, ["nps"], T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=3), 4, [], [])
    local = month.start.astimezone(config.tz)
    assert (local.day, local.hour, local.minute) == (1, 0, 0)


# ---- histogram ------------------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=1.0, max_value=20_000.0), min_size=1, max_size=300), st.sampled_from([0.5, 0.9]))
def test_handle_time_percentiles_are_within_the_stated_error(values: list[float], quantile: float) -> None:
    hist = [0] * stats.HIST_BUCKETS
    for v in values:
        hist[stats.hist_index(v)] += 1
    exact = sorted(values)[max(1, math.ceil(quantile * len(values))) - 1]
    found = stats.percentile(hist, quantile)
    assert found.value is not None
    assert abs(found.value - exact) / exact <= stats.PERCENTILE_ERROR + 1e-9


# ---- validation ------------------------------------------------------------------------------------


def _fields(call: object) -> set[str]:
    with pytest.raises(InvalidArgument) as err:
        call()  # type: ignore[operator]
    return {v.field for v in err.value.violations}


def test_a_bad_query_names_every_bad_field() -> None:
    start = T0
    assert _fields(lambda: q.plan(CONFIG, ["nope"], start, start + dt.timedelta(days=1), 2, ["colour"], [])) == {
        "metrics[0]",
        "group_by[0]",
    }
    assert _fields(lambda: q.plan(CONFIG, ["nps"], start, start + dt.timedelta(days=500), 2, [], [])) == {"end_time"}
    assert _fields(lambda: q.plan(CONFIG, ["nps"], start, start + dt.timedelta(days=300), 1, [], [])) == {"granularity"}
    assert _fields(lambda: q.plan(CONFIG, ["nps"], None, None, 0, [], [("channel", ["fax"])])) == {
        "granularity",
        "filters[0].values[0]",
        "start_time",
        "end_time",
    }


def test_settings_updates_are_validated_field_by_field() -> None:
    assert _fields(
        lambda: updated(CONFIG, {"time_zone": "Mars/Olympus", "fcr_window_days": 0}, ["time_zone", "fcr_window_days"])
    ) == {"settings.time_zone", "settings.fcr_window_days"}
    assert updated(CONFIG, {"fcr_window_days": 3}, ["fcr_window_days"]).fcr_window_days == 3


def test_every_metric_has_a_definition_formula_and_unit() -> None:
    assert len({m.name for m in METRICS}) == len(METRICS)
    for m in METRICS:
        assert m.definition.endswith(".") and m.formula and m.unit


def test_the_rollup_tables_hold_every_statistic_in_the_codes_order() -> None:
    import importlib.util
    from pathlib import Path

    import services.metrics

    path = Path(services.metrics.__file__).parent / "migrations" / "0001_metrics.py"
    spec = importlib.util.spec_from_file_location("metrics_0001", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert (migration.COUNTERS, migration.SQUARES) == (stats.COUNTERS, stats.SQUARES)


@given(
    st.lists(st.floats(min_value=0.0, max_value=5_000.0), min_size=2, max_size=40),
    st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=2, max_size=40),
    st.randoms(use_true_random=False),
)
def test_intervals_are_the_same_whatever_order_the_events_are_added_in(
    talks: list[float], compounds: list[float], rnd: random.Random
) -> None:
    """Replicas, redeliveries and merges add customers' contributions in different orders; the
    sums of squares behind the intervals are integers, so every order gives the same bits."""
    facts = [leg(f"i{n}", talk=t, hold=0.0, acw=0.0) for n, t in enumerate(talks)]
    facts += [message(f"c{n}", event_pb2.AUTHOR_CUSTOMER, round(c, 4), n) for n, c in enumerate(compounds)]
    parts = [derive([f], {}, CONFIG).contrib for f in facts]
    shuffled = parts.copy()
    rnd.shuffle(shuffled)
    forward = total(s for p in parts for s in p.values())
    other = total(s for p in shuffled for s in p.values())
    assert forward.values == other.values
    for name, values in (("aht_seconds", talks), ("sentiment", [round(c, 4) for c in compounds])):
        got = BY_NAME[name].compute(forward, 0)
        mean = sum(values) / len(values)
        half = stats.Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        assert got.value == pytest.approx(mean, abs=1e-3)
        assert got.ci_low == pytest.approx(mean - half, abs=1e-3)
