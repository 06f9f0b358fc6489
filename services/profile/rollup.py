"""How a profile's stored rows absorb new effects: interactions, cases, trait summaries, computed
states. Pure, no I/O; every function is order-independent (a late or repeated-in-another-order
set of events gives the same row), which is what lets events arrive in any order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.profile import computed
from services.profile.events import CaseUpdate, Leg
from services.profile.traits import Observation, Summary, combine, summary_of, value_hash


@dataclass(frozen=True)
class InteractionRow:
    interaction_id: str
    channel: int = 0
    direction: int = 0
    queue: str = ""
    agent_id: str = ""
    reason: str = ""
    disposition: str = ""
    case_id: str = ""
    case_status: int = 0
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    handle_seconds: float = 0.0
    legs: int = 0
    transferred: bool = False
    abandoned: bool = False
    messages: int = 0
    last_leg_at: dt.datetime | None = None
    last_leg_event: str = ""


_TEXT = ("queue", "agent_id", "reason", "disposition", "case_id")


def add_leg(row: InteractionRow | None, leg: Leg) -> InteractionRow:
    """The contact with one more leg. Descriptive fields follow the latest leg (by event time, then
    event id) that has them; an earlier leg only fills what no later leg said."""
    base = row or InteractionRow(leg.interaction_id)
    newer = base.last_leg_at is None or (leg.at, leg.event_id) > (base.last_leg_at, base.last_leg_event)
    changes: dict[str, Any] = {}
    for name in _TEXT:
        mine, theirs = getattr(base, name), getattr(leg, name)
        if theirs and (newer or not mine):
            changes[name] = theirs
    for name in ("channel", "direction", "case_status"):
        mine, theirs = getattr(base, name), getattr(leg, name)
        if theirs and (newer or not mine):
            changes[name] = theirs
    first_leg = base.legs == 0
    return replace(
        base,
        **changes,
        start_time=leg.start if base.start_time is None else min(base.start_time, leg.start),
        end_time=_latest(base.end_time, leg.end),
        handle_seconds=base.handle_seconds + leg.handle_seconds,
        legs=base.legs + 1,
        transferred=base.transferred or leg.transferred or base.legs >= 1,
        abandoned=leg.abandoned if first_leg else (base.abandoned and leg.abandoned),
        last_leg_at=leg.at if newer else base.last_leg_at,
        last_leg_event=leg.event_id if newer else base.last_leg_event,
    )


def add_messages(
    row: InteractionRow | None, interaction_id: str, count: int, first: tuple[dt.datetime, int]
) -> InteractionRow:
    """Messages of a conversation: counted, and they start the contact if no leg said when."""
    base = row or InteractionRow(interaction_id)
    at, channel = first
    return replace(
        base,
        messages=base.messages + count,
        start_time=at if base.start_time is None else min(base.start_time, at),
        channel=base.channel or channel,
    )


def combine_interactions(a: InteractionRow, b: InteractionRow) -> InteractionRow:
    """One contact whose legs were attributed to two profiles, after they merged."""
    first, second = (a, b) if (a.last_leg_at, a.last_leg_event) <= (b.last_leg_at, b.last_leg_event) else (b, a)
    changes: dict[str, Any] = {}
    for name in (*_TEXT, "channel", "direction", "case_status"):
        later = getattr(second, name)
        changes[name] = later or getattr(first, name)
    starts = [t for t in (a.start_time, b.start_time) if t is not None]
    return replace(
        second,
        **changes,
        start_time=min(starts) if starts else None,
        end_time=_latest(a.end_time, b.end_time),
        handle_seconds=a.handle_seconds + b.handle_seconds,
        legs=a.legs + b.legs,
        transferred=a.transferred or b.transferred or (a.legs + b.legs) > 1,
        abandoned=(a.abandoned or a.legs == 0) and (b.abandoned or b.legs == 0) and (a.legs + b.legs) > 0,
        messages=a.messages + b.messages,
    )


def _latest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass(frozen=True)
class CaseRow:
    case_id: str
    status: int
    reason: str
    interaction_id: str
    open_time: dt.datetime
    update_time: dt.datetime
    update_event: str


def add_case(row: CaseRow | None, u: CaseUpdate) -> CaseRow:
    """A case's latest status by event time (a late event never reopens a closed case)."""
    if row is None:
        return CaseRow(u.case_id, u.status, u.reason, u.interaction_id, u.at, u.at, u.event_id)
    newer = (u.at, u.event_id) > (row.update_time, row.update_event)
    return CaseRow(
        case_id=row.case_id,
        status=u.status if newer else row.status,
        reason=(u.reason or row.reason) if newer else (row.reason or u.reason),
        interaction_id=u.interaction_id if newer else row.interaction_id,
        open_time=min(row.open_time, u.at),
        update_time=u.at if newer else row.update_time,
        update_event=u.event_id if newer else row.update_event,
    )


# ---- traits ----------------------------------------------------------------------------------------


SummaryKey = tuple[str, str, str]  # (trait key, value hash, source)


def add_observations(
    existing: Mapping[SummaryKey, Summary],
    observations: Iterable[Observation],
    removed: Mapping[str, dt.datetime],
) -> dict[SummaryKey, Summary]:
    """The summaries that change when ``observations`` arrive; an observation at or before its
    trait's removal time does not count (a late event does not bring back a removed trait)."""
    out: dict[SummaryKey, Summary] = {}
    for o in observations:
        cut = removed.get(o.key)
        if cut is not None and o.at <= cut:
            continue
        k = (o.key, value_hash(o.value), o.source)
        out[k] = combine(out.get(k) or existing.get(k), summary_of(o))
    return out


def summaries_by_trait(summaries: Iterable[Summary]) -> dict[str, list[Summary]]:
    out: dict[str, list[Summary]] = {}
    for s in summaries:
        out.setdefault(s.key, []).append(s)
    return out


# ---- computed ----------------------------------------------------------------------------------------


def add_points(
    state: computed.State | None, points: Sequence[computed.Point], known_hashes: set[str]
) -> tuple[computed.State, list[str]]:
    """An all-time state with new points; also the value hashes seen for the first time (the
    caller records them), counted into ``distinct``."""
    current = state or computed.State()
    new_hashes: list[str] = []
    for p in points:
        h = p.value_hash
        fresh = h not in known_hashes
        if fresh:
            known_hashes.add(h)
            new_hashes.append(h)
        current = current.add(p, fresh)
    return current, new_hashes
