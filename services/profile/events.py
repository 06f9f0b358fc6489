"""A resolved event as the profile service sees it: what it says about its profile. Pure, no I/O.

:func:`parse` reads one entry of the resolved stream; :func:`effects` turns a profile's events into
what they add (trait observations, computed-trait points, interaction legs, case updates,
identifiers), the one derivation both the consumer and a rebuild after a split use, so a profile
rebuilt from its timeline equals the profile built event by event.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from services.profile import computed
from services.profile.tenant_settings import ProfileConfig
from services.profile.traits import Observation, observations_of, plain
from tessera.v1 import event_pb2, stream_pb2

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class ProfileEvent:
    event_id: str
    profile_id: str  # as identity stamped it (the consumer redirects merged-away ids)
    received_at: dt.datetime
    at: dt.datetime  # event time
    channel: int
    kind: str
    source: str
    event: event_pb2.Event
    identifiers: tuple[tuple[str, str], ...] = ()

    @property
    def payload(self) -> bytes:
        return self.event.SerializeToString()


def _time(ts: timestamp_pb2.Timestamp, fallback: dt.datetime) -> dt.datetime:
    if ts.seconds == 0 and ts.nanos == 0:
        return fallback
    return ts.ToDatetime(tzinfo=dt.UTC)


def parse(envelope: stream_pb2.ResolvedEventEnvelope) -> ProfileEvent | None:
    """The event, or None when identity could link it to no profile (nothing to build)."""
    ev = envelope.event
    if not ev.profile_id or not ev.event_id:
        return None
    return from_event(ev, tuple((i.type, i.value) for i in envelope.identifiers))


def from_event(ev: event_pb2.Event, identifiers: tuple[tuple[str, str], ...] = ()) -> ProfileEvent:
    received = _time(ev.received_at, EPOCH)
    return ProfileEvent(
        event_id=ev.event_id,
        profile_id=ev.profile_id,
        received_at=received,
        at=_time(ev.timestamp, received),
        channel=int(ev.channel),
        kind=ev.WhichOneof("payload") or "",
        source=ev.source,
        event=ev,
        identifiers=identifiers,
    )


# ---- effects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leg:
    """One Interaction event: a leg of a contact."""

    interaction_id: str
    at: dt.datetime
    event_id: str
    channel: int
    direction: int
    queue: str
    agent_id: str
    reason: str
    disposition: str
    case_id: str
    case_status: int
    start: dt.datetime
    end: dt.datetime | None
    handle_seconds: float
    transferred: bool
    abandoned: bool


@dataclass(frozen=True)
class CaseUpdate:
    case_id: str
    status: int
    reason: str
    interaction_id: str
    at: dt.datetime
    event_id: str


@dataclass
class Effects:
    """What a set of one profile's events adds to it."""

    observations: list[Observation] = field(default_factory=list)
    points: dict[str, list[computed.Point]] = field(default_factory=dict)
    legs: list[Leg] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)  # interaction id -> messages
    message_first: dict[str, tuple[dt.datetime, int]] = field(default_factory=dict)
    cases: list[CaseUpdate] = field(default_factory=list)
    identifiers: dict[tuple[str, str], tuple[dt.datetime, dt.datetime, str, str]] = field(default_factory=dict)
    count: int = 0
    first_seen: dt.datetime | None = None
    last_seen: dt.datetime | None = None


def effects(events: Iterable[ProfileEvent], config: ProfileConfig) -> Effects:
    out = Effects()
    for e in events:
        out.count += 1
        out.first_seen = e.at if out.first_seen is None else min(out.first_seen, e.at)
        out.last_seen = e.at if out.last_seen is None else max(out.last_seen, e.at)
        for k in e.identifiers:
            seen = out.identifiers.get(k)
            if seen is None:
                out.identifiers[k] = (e.at, e.at, e.source, e.event_id)
            else:
                first, last, source, first_event = seen
                if (e.at, e.event_id) < (first, first_event):
                    first, source, first_event = e.at, e.source, e.event_id
                out.identifiers[k] = (first, max(last, e.at), source, first_event)
        ev = e.event
        cache: dict[str, Any] = {}
        if e.kind == "identify" and ev.identify.HasField("traits"):
            traits = plain(json_format.MessageToDict(ev.identify.traits))
            out.observations.extend(observations_of(traits, e.source, e.event_id, e.at))
        elif e.kind == "interaction":
            leg = _leg(e)
            out.legs.append(leg)
            if leg.case_id and leg.case_status:
                out.cases.append(
                    CaseUpdate(leg.case_id, leg.case_status, leg.reason, leg.interaction_id, e.at, e.event_id)
                )
        elif e.kind == "message" and ev.message.interaction_id:
            iid = ev.message.interaction_id
            out.messages[iid] = out.messages.get(iid, 0) + 1
            earliest = out.message_first.get(iid)
            if earliest is None or e.at < earliest[0]:
                out.message_first[iid] = (e.at, e.channel)
        for d in config.computed_traits:
            p = computed.point(d, ev, e.kind, e.at, cache)
            if p is not None:
                out.points.setdefault(d.key, []).append(p)
    return out


def _leg(e: ProfileEvent) -> Leg:
    i = e.event.interaction
    start = _time(i.started_at, e.at)
    end = _time(i.ended_at, start) if i.HasField("ended_at") else None
    handle = 0.0 if i.abandoned else i.talk_seconds + i.hold_seconds + i.after_contact_work_seconds
    return Leg(
        interaction_id=i.interaction_id or e.event_id,
        at=e.at,
        event_id=e.event_id,
        channel=e.channel,
        direction=int(i.direction),
        queue=i.queue,
        agent_id=i.agent_id,
        reason=i.reason,
        disposition=i.disposition,
        case_id=i.case_id,
        case_status=int(i.case_status),
        start=start,
        end=end,
        handle_seconds=handle,
        transferred=i.transferred,
        abandoned=i.abandoned,
    )


def sort_key(e: ProfileEvent) -> tuple[dt.datetime, str]:
    return (e.at, e.event_id)


def newest_first(events: Sequence[ProfileEvent]) -> list[ProfileEvent]:
    return sorted(events, key=sort_key, reverse=True)
