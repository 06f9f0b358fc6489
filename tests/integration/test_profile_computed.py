"""Computed traits defined through UpdateProfileSettings, checked against a recomputation from the
events the test sent: windowed and all-time, every aggregation the brief names, events out of
order and re-sent (ingest says DUPLICATE; nothing counts twice)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf import duration_pb2

from tessera.v1 import event_pb2, ingest_pb2, profile_pb2
from tests.support.profile import NOW, Apis, computed_of, interaction, survey, track

pytestmark = [pytest.mark.integration]

DAY = dt.timedelta(days=1)
A = profile_pb2


def definition(
    key: str,
    aggregation: int,
    field: str = "",
    days: int = 0,
    kinds: Sequence[str] = (),
    channels: Sequence[int] = (),
    track_event: str = "",
) -> profile_pb2.ComputedTraitDefinition:
    d = profile_pb2.ComputedTraitDefinition(key=key, aggregation=aggregation, field=field)  # type: ignore[arg-type]
    if days:
        d.window.CopyFrom(duration_pb2.Duration(seconds=days * 86400))
    d.filter.kinds.extend(kinds)
    d.filter.channels.extend(channels)  # type: ignore[arg-type]
    d.filter.track_event = track_event
    return d


DEFINITIONS = [
    definition("calls_30d", A.AGGREGATION_COUNT, days=30, kinds=["interaction"], channels=[event_pb2.CHANNEL_VOICE]),
    definition("csat_avg_90d", A.AGGREGATION_AVERAGE, "survey_response.score", days=90, kinds=["survey_response"]),
    definition("revenue_total", A.AGGREGATION_SUM, "properties.revenue"),
    definition("revenue_max", A.AGGREGATION_MAX, "properties.revenue"),
    definition("revenue_min_30d", A.AGGREGATION_MIN, "properties.revenue", days=30),
    definition("skus", A.AGGREGATION_DISTINCT_COUNT, "properties.sku"),
    definition("skus_30d", A.AGGREGATION_DISTINCT_COUNT, "properties.sku", days=30),
    definition("first_sku", A.AGGREGATION_FIRST, "properties.sku", track_event="Order Completed"),
    definition("last_sku", A.AGGREGATION_LAST, "properties.sku", track_event="Order Completed"),
    definition("last_sku_30d", A.AGGREGATION_LAST, "properties.sku", days=30, track_event="Order Completed"),
    definition("orders", A.AGGREGATION_COUNT, track_event="Order Completed"),
    # Every matching event is older than these windows.
    definition("calls_7d", A.AGGREGATION_COUNT, days=7, kinds=["interaction"], channels=[event_pb2.CHANNEL_VOICE]),
    definition("csat_avg_7d", A.AGGREGATION_AVERAGE, "survey_response.score", days=7, kinds=["survey_response"]),
    definition("last_sku_7d", A.AGGREGATION_LAST, "properties.sku", days=7, track_event="Order Completed"),
]


def expected(events: Sequence[event_pb2.Event], now: dt.datetime) -> dict[str, tuple[Any, int]]:
    """Every definition recomputed from the events, plainly."""

    def when(e: event_pb2.Event) -> dt.datetime:
        return e.timestamp.ToDatetime(tzinfo=dt.UTC)

    def within(days: int) -> list[event_pb2.Event]:
        return [e for e in events if when(e) > now - dt.timedelta(days=days)] if days else list(events)

    def calls(days: int) -> list[event_pb2.Event]:
        return [e for e in within(days) if e.HasField("interaction") and e.channel == event_pb2.CHANNEL_VOICE]

    def csat(days: int) -> list[float]:
        return [e.survey_response.score for e in within(days) if e.HasField("survey_response")]

    def revenue(days: int) -> list[float]:
        values = [e.properties["revenue"] for e in within(days) if "revenue" in e.properties.fields]
        return [v for v in values if isinstance(v, float)]

    def skus(days: int, orders_only: bool = False) -> list[tuple[dt.datetime, str, Any]]:
        return sorted(
            (when(e), e.event_id, e.properties["sku"])
            for e in within(days)
            if "sku" in e.properties.fields and (not orders_only or e.track.event == "Order Completed")
        )

    def avg(xs: list[float]) -> tuple[Any, int]:
        return (sum(xs) / len(xs) if xs else None, len(xs))

    def last(xs: list[tuple[dt.datetime, str, Any]]) -> tuple[Any, int]:
        return (xs[-1][2] if xs else None, len(xs))

    orders = [e for e in events if e.track.event == "Order Completed"]
    return {
        "calls_30d": (len(calls(30)), len(calls(30))),
        "csat_avg_90d": avg(csat(90)),
        "revenue_total": (sum(revenue(0)), len(revenue(0))),
        "revenue_max": (max(revenue(0)), len(revenue(0))),
        "revenue_min_30d": (min(revenue(30)), len(revenue(30))),
        "skus": (len({s for _, _, s in skus(0)}), len(skus(0))),
        "skus_30d": (len({s for _, _, s in skus(30)}), len(skus(30))),
        "first_sku": (skus(0, True)[0][2], len(skus(0, True))),
        "last_sku": last(skus(0, True)),
        "last_sku_30d": last(skus(30, True)),
        "orders": (len(orders), len(orders)),
        "calls_7d": (len(calls(7)), len(calls(7))),
        "csat_avg_7d": avg(csat(7)),
        "last_sku_7d": last(skus(7, True)),
    }


def test_computed_traits_equal_a_recomputation_from_the_events(api: Apis) -> None:
    saved = api.settings(profile_pb2.ProfileSettings(computed_traits=DEFINITIONS), ["computed_traits"])
    assert [d.key for d in saved.computed_traits] == [d.key for d in DEFINITIONS]
    assert (
        api.profile.GetProfileSettings(
            profile_pb2.GetProfileSettingsRequest(), metadata=api.metadata, timeout=10
        ).settings.computed_traits
        == saved.computed_traits
    )
    phone = ("phone", "+14155550177")
    email = ("email", "computed@example.com")
    ev: list[event_pb2.Event] = [
        # Calls: two inside 30 days (but older than 7), one older; an email contact is not a call.
        interaction(phone, email, interaction_id="c1", at=NOW - 10 * DAY),
        interaction(phone, interaction_id="c2", at=NOW - 20 * DAY),
        interaction(phone, interaction_id="c3", at=NOW - 45 * DAY),
        interaction(phone, interaction_id="e1", at=NOW - 9 * DAY, channel=event_pb2.CHANNEL_EMAIL),
        # CSAT: 5 and 2 inside 90 days (average 3.5), 1 outside.
        survey(email, kind=event_pb2.SURVEY_TYPE_CSAT, score=5, at=NOW - 8 * DAY),
        survey(email, kind=event_pb2.SURVEY_TYPE_CSAT, score=2, at=NOW - 60 * DAY),
        survey(email, kind=event_pb2.SURVEY_TYPE_CSAT, score=1, at=NOW - 120 * DAY),
        # Orders: revenue and skus, all older than 7 days.
        track(email, name="Order Completed", properties={"revenue": 10.5, "sku": "B"}, at=NOW - 12 * DAY),
        track(email, name="Order Completed", properties={"revenue": 20, "sku": "A"}, at=NOW - 200 * DAY),
        track(email, name="Order Completed", properties={"revenue": 4.25, "sku": "C"}, at=NOW - 40 * DAY),
        track(email, name="Order Completed", properties={"revenue": 7, "sku": "A"}, at=NOW - 25 * DAY),
        # Not an order: its sku counts for the distinct counts only; no revenue.
        track(email, name="Viewed", properties={"sku": "D"}, at=NOW - 11 * DAY),
        # A revenue that is not a number counts for nothing numeric.
        track(email, name="Refund", properties={"revenue": "n/a"}, at=NOW - 13 * DAY),
    ]
    order = [12, 3, 7, 0, 9, 5, 1, 10, 2, 8, 4, 11, 6]  # arrival order, unlike event time
    assert sorted(order) == list(range(len(ev)))
    sent: list[event_pb2.Event] = []
    for batch in (order[:4], order[4:9], order[9:]):
        ids = api.send(*(ev[i] for i in batch))
        for i, event_id in zip(batch, ids, strict=True):
            ev[i].event_id = event_id
            sent.append(ev[i])
    # Every event again: duplicates, counted by nobody.
    again = api.send_statuses(*ev)
    assert again == [ingest_pb2.EVENT_STATUS_DUPLICATE] * len(ev)
    api.wait_applied(len(ev))
    got = api.get(ident=email)
    assert got.event_count == len(ev)
    want = expected(ev, dt.datetime.now(dt.UTC))
    assert want["calls_30d"] == (2, 2) and want["csat_avg_90d"] == (3.5, 2)
    assert want["revenue_total"] == (41.75, 4) and want["skus"] == (4, 5)
    assert want["first_sku"] == ("A", 4) and want["last_sku"] == ("B", 4)
    assert want["calls_7d"] == (0, 0) and want["csat_avg_7d"] == (None, 0) and want["last_sku_7d"] == (None, 0)
    assert computed_of(got) == want
    # compute_time says when the values were computed (now).
    for c in got.computed_traits:
        assert abs(c.compute_time.ToDatetime(tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=30)
    # The customer context carries the same computed traits.
    assert computed_of(api.context(ident=phone).profile) == want

    # One more call today: the windowed count moves, the 7-day one too.
    (today,) = api.send(interaction(phone, interaction_id="c4", at=NOW))
    api.wait_applied(len(ev) + 1)
    got = api.get(ident=email)
    now = computed_of(got)
    assert now["calls_30d"] == (3, 3) and now["calls_7d"] == (1, 1)
    assert {k: v for k, v in now.items() if k not in ("calls_30d", "calls_7d")} == {
        k: v for k, v in want.items() if k not in ("calls_30d", "calls_7d")
    }
    assert today
