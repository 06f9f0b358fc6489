"""From one customer's facts to what they contribute to the rollups. Pure, no I/O.

Everything a customer adds to any bucket is a function of that customer's facts alone (plus the
legs of the interactions their surveys and messages name, for attribution). So the consumer can
apply any change (a late event, a redelivery, a merge, a split) the same way: derive the
customer again (only the parts the change touched) and add the difference to the rollups. The
rollups then always equal the sum of every customer's derivation, which is what a
recomputation from the raw events gives.

Contacts are interactions: all legs sharing an ``interaction_id``. A contact is at its first
leg's start and has that leg's channel, queue, agent and reason. Surveys and messages naming an
interaction take its dimensions; otherwise their own channel and empty ones.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from services.metrics.facts import LEG, MESSAGE, SURVEY, Fact
from services.metrics.stats import Stats, hist_index
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2

#: (channel, queue, agent, reason, source)
Dims = tuple[int, str, str, str, str]
#: (the local hour's start as a UTC instant, dims)
Key = tuple[dt.datetime, int, str, str, str, str]

RESOLVED_CASE = (event_pb2.CASE_STATUS_RESOLVED, event_pb2.CASE_STATUS_CLOSED)


def hour_of_exact(t: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """:func:`hour_of` by converting the instant (the reference the fast path is tested against)."""
    local = t.astimezone(tz)
    return local.replace(minute=0, second=0, microsecond=0).astimezone(dt.UTC)


_MISSING = object()
#: (zone, quarter hour since the epoch) -> the local hour start of every instant in it, or None
#: when the quarter holds an offset change, an hour boundary or a fold change. Bounded.
_QUARTERS: dict[tuple[zoneinfo.ZoneInfo, int], dt.datetime | None] = {}
_CACHE_LIMIT = 200_000


def _quarter(q: int, tz: zoneinfo.ZoneInfo) -> dt.datetime | None:
    lo = dt.datetime.fromtimestamp(q * 900, tz)
    hi = dt.datetime.fromtimestamp(q * 900 + 899.999999, tz)
    if (lo.utcoffset(), lo.date(), lo.hour, lo.fold) != (hi.utcoffset(), hi.date(), hi.hour, hi.fold):
        return None
    return hour_of_exact(lo, tz)


def hour_of(t: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """The start of the local hour holding ``t``, as a UTC instant (DST-correct: the repeated
    hour of a fall-back change is two buckets, the skipped one none).

    The consumer asks this for every fact it derives, so it is answered per UTC quarter hour:
    every instant of a quarter with one offset, one local hour and one fold has the same answer;
    any other quarter (an offset change inside it, an odd historical offset) takes the slow path.
    A test checks it against the slow path across transitions."""
    q = int(t.timestamp() // 900)
    found = _QUARTERS.get((tz, q), _MISSING)
    if found is _MISSING:
        if len(_QUARTERS) > _CACHE_LIMIT:
            _QUARTERS.clear()
        found = _QUARTERS[(tz, q)] = _quarter(q, tz)
    if found is None:
        return hour_of_exact(t, tz)
    assert isinstance(found, dt.datetime)
    return found


def day_of(hour: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.date:
    return hour.astimezone(tz).date()


@dataclass(frozen=True)
class Attribution:
    """What an interaction's legs (whoever's they are) say about it."""

    dims: Dims
    handled: bool
    #: No agent handled it and a leg says the customer left.
    abandoned: bool = False


def attributions(legs: Iterable[Fact]) -> dict[str, Attribution]:
    by_iid: dict[str, list[Fact]] = {}
    for f in legs:
        if f.kind == LEG:
            by_iid.setdefault(f.interaction_id, []).append(f)
    out = {}
    for iid, group in by_iid.items():
        first = min(group, key=lambda f: (f.start, f.leg_id))
        handled = any(f.handled for f in group)
        out[iid] = Attribution(
            (first.channel, first.queue, first.agent, _reason(group), ""),
            handled,
            not handled and any(f.abandoned for f in group),
        )
    return out


def _reason(legs: Sequence[Fact]) -> str:
    """The contact's reason: its earliest leg's that names one."""
    for f in sorted(legs, key=lambda f: (f.start, f.leg_id)):
        if f.reason:
            return f.reason
    return ""


@dataclass(frozen=True)
class Contact:
    interaction_id: str
    start: dt.datetime
    dims: Dims
    handled: bool
    reason: str


#: The part of a customer's contribution that their legs make (contacts, AHT, FCR, cases).
CONTACTS = "contacts"
#: The prefix of a conversation's part: its messages, by interaction.
CONVERSATION = "conv:"


def part_of(f: Fact) -> str:
    """Which part of its customer's contribution a fact is in: every leg in :data:`CONTACTS`
    (FCR needs them all together), each survey its own, each conversation's messages one."""
    if f.kind == LEG:
        return CONTACTS
    if f.kind == SURVEY:
        return f.key
    return CONVERSATION + f.interaction_id


@dataclass
class Derived:
    """One customer's contribution to the rollups, by part (:func:`part_of`), and their contacts
    still waiting on FCR. The parts add up to the whole: the consumer re-derives only the parts
    a batch touched (a survey does not re-read the customer's other facts)."""

    parts: dict[str, dict[Key, Stats]] = field(default_factory=dict)
    #: Handled contacts with a reason and no repeat yet: pending while their window is open.
    unrepeated: list[Contact] = field(default_factory=list)
    contacts: list[Contact] = field(default_factory=list)

    @property
    def contrib(self) -> dict[Key, Stats]:
        """Every part summed."""
        out: dict[Key, Stats] = {}
        for part in self.parts.values():
            accumulate(out, part, 1)
        return {k: v for k, v in out.items() if not v.is_zero()}

    def pending(self, now: dt.datetime, window: dt.timedelta) -> int:
        return sum(1 for c in self.unrepeated if c.start + window > now)


def accumulate(into: dict[Key, Stats], contrib: dict[Key, Stats], sign: int) -> None:
    """Add ``sign`` times ``contrib`` to ``into``, key by key."""
    for key, s in contrib.items():
        found = into.get(key)
        if found is None:
            found = into[key] = Stats.zero()
        found.merge(s, sign)


def _at(part: dict[Key, Stats], when: dt.datetime, dims: Dims, tz: zoneinfo.ZoneInfo) -> Stats:
    key = (hour_of(when, tz), *dims)
    found = part.get(key)
    if found is None:
        found = part[key] = Stats.zero()
    return found


def derive(
    facts: Sequence[Fact],
    others: Mapping[str, Attribution],
    config: MetricsConfig,
    only: Container[str] | None = None,
) -> Derived:
    """What the facts of one customer add to the rollups. ``others`` attributes interactions whose
    legs are not among ``facts`` (a survey on a contact recorded under another profile). With
    ``only``, just those parts (the facts must hold all of each: every leg for :data:`CONTACTS`,
    a conversation's every message, and every leg of the customer's own on the interactions
    they name)."""
    tz = config.tz
    out = Derived()
    legs = [f for f in facts if f.kind == LEG]
    own = attributions(legs)
    attribution = {**others, **own}
    if only is None or CONTACTS in only:
        _contacts(out, legs, own, config)

    # Surveys, at their own time, with the dimensions of the contact they name.
    for f in facts:
        if f.kind != SURVEY or f.score is None or (only is not None and f.key not in only):
            continue
        part = out.parts[f.key] = {}
        a_ = attribution.get(f.interaction_id) if f.interaction_id else None
        dims = (*a_.dims[:4], f.source) if a_ else (f.channel, "", "", "", f.source)
        s = _at(part, f.at, dims, tz)
        score = f.score
        if f.survey_type == event_pb2.SURVEY_TYPE_NPS and 0 <= score <= 10:
            s.add("nps_n")
            s.add("nps_promoters", int(score >= 9))
            s.add("nps_detractors", int(score <= 6))
        elif f.survey_type == event_pb2.SURVEY_TYPE_CSAT and 1 <= score <= 5:
            s.add("csat_n")
            s.add("csat_top2", int(score >= 4))
            s.add("csat_sum", score)
            s.add_square("csat_sq", score)
        elif f.survey_type == event_pb2.SURVEY_TYPE_CES and 1 <= score <= 7:
            s.add("ces_n")
            s.add("ces_agree", int(score >= 5))
            s.add("ces_sum", score)
            s.add_square("ces_sq", score)

    # Messages: customer sentiment at each message; self-service per conversation.
    conversations: dict[str, list[Fact]] = {}
    for f in facts:
        if f.kind == MESSAGE:
            conversations.setdefault(f.interaction_id, []).append(f)
    for iid, msgs in conversations.items():
        name = CONVERSATION + iid
        if only is not None and name not in only:
            continue
        part = out.parts[name] = {}
        a_ = attribution.get(iid)
        known = a_.dims if a_ else None
        for m in msgs:
            if m.author == event_pb2.AUTHOR_CUSTOMER:
                s = _at(part, m.at, known or (m.channel, "", "", "", ""), tz)
                units = round(m.compound * 10_000)
                s.add("sentiment_n")
                s.add("sentiment_sum", units)
                s.add_square("sentiment_sq", units)
                s.add("sentiment_positive", int(m.compound >= 0.05))
                s.add("sentiment_negative", int(m.compound <= -0.05))
        if not any(m.author == event_pb2.AUTHOR_BOT for m in msgs):
            continue
        agent = (a_ is not None and a_.handled) or any(m.author == event_pb2.AUTHOR_AGENT for m in msgs)
        first_msg = min(msgs, key=lambda m: (m.at, m.event_id))
        s = _at(part, first_msg.at, a_.dims if a_ else (first_msg.channel, "", "", "", ""), tz)
        s.add("bot_contacts")
        if agent:
            s.add("handoffs")
        elif a_ is None or not a_.abandoned:
            s.add("contained")
    for name, part in out.parts.items():
        out.parts[name] = {k: v for k, v in part.items() if not v.is_zero()}
    return out


def _contacts(out: Derived, legs: Sequence[Fact], own: Mapping[str, Attribution], config: MetricsConfig) -> None:
    """The :data:`CONTACTS` part: handled legs, contacts, contact-based and case-based FCR."""
    tz = config.tz
    window = dt.timedelta(days=config.fcr_window_days)
    part = out.parts[CONTACTS] = {}
    by_iid: dict[str, list[Fact]] = {}
    for f in legs:
        by_iid.setdefault(f.interaction_id, []).append(f)
        if f.handled:
            s = _at(part, f.start, (f.channel, f.queue, f.agent, f.reason, ""), tz)
            s.add("legs_handled")
            handle_ms = round(f.handle_seconds * 1000)
            s.add("handle_ms", handle_ms)
            s.add_square("handle_sq", handle_ms)
            s.add_hist(hist_index(f.handle_seconds))

    contacts: list[Contact] = []
    for iid, group in by_iid.items():
        first = min(group, key=lambda f: (f.start, f.leg_id))
        a = own[iid]
        handled = a.handled
        contact = Contact(iid, first.start, a.dims, handled, a.dims[3])
        contacts.append(contact)
        s = _at(part, contact.start, a.dims, tz)
        s.add("offered")
        s.add("wait_ms", round(first.wait * 1000))
        if handled:
            s.add("handled")
            if any(f.transferred for f in group):
                s.add("transferred")
            if first.wait <= config.service_level_seconds:
                s.add("answered_sl")
        elif any(f.abandoned for f in group):
            s.add("abandoned")
    out.contacts = contacts

    # Contact-based FCR and repeats: per reason, in time order, across channels.
    by_reason: dict[str, list[Contact]] = {}
    for c in contacts:
        if c.reason:
            by_reason.setdefault(c.reason, []).append(c)
    for group_ in by_reason.values():
        group_.sort(key=lambda c: (c.start, c.interaction_id))
        for i, c in enumerate(group_):
            followed = i + 1 < len(group_) and group_[i + 1].start <= c.start + window
            preceded = i > 0 and c.start <= group_[i - 1].start + window
            s = _at(part, c.start, c.dims, tz)
            if preceded:
                s.add("repeats")
            if c.handled:
                s.add("fcr_handled")
                if followed:
                    s.add("fcr_repeated")
                else:
                    out.unrepeated.append(c)

    # Case-based FCR: at the case's first contact.
    cases: dict[str, list[Fact]] = {}
    for f in legs:
        if f.case_id:
            cases.setdefault(f.case_id, []).append(f)
    for group in cases.values():
        statuses = [f for f in group if f.case_status]
        if not statuses or max(statuses, key=lambda f: (f.at, f.event_id)).case_status not in RESOLVED_CASE:
            continue
        first = min(group, key=lambda f: (f.start, f.leg_id))
        s = _at(part, first.start, own[first.interaction_id].dims, tz)
        s.add("cases_resolved")
        if len({f.interaction_id for f in group}) == 1:
            s.add("cases_single")


@dataclass(frozen=True)
class InteractionSentiment:
    interaction_id: str
    first_at: dt.datetime
    mean: float
    #: The last customer message's score minus the first's.
    trend: float
    messages: int


def sentiment_trend(facts: Iterable[Fact], limit: int = 20) -> list[InteractionSentiment]:
    """Per interaction with customer messages (customer messages only): when it began, its mean
    compound score and how it moved from the first message to the last; oldest first, the last
    ``limit``."""
    by_iid: dict[str, list[Fact]] = {}
    for f in facts:
        if f.kind == MESSAGE and f.author == event_pb2.AUTHOR_CUSTOMER:
            by_iid.setdefault(f.interaction_id, []).append(f)
    points = []
    for iid, msgs in by_iid.items():
        msgs.sort(key=lambda m: (m.at, m.event_id))
        scores = [m.compound for m in msgs]
        points.append(
            InteractionSentiment(iid, msgs[0].at, sum(scores) / len(scores), scores[-1] - scores[0], len(scores))
        )
    points.sort(key=lambda p: (p.first_at, p.interaction_id))
    return points[-limit:]


def since(facts: Iterable[Fact], start: dt.datetime) -> list[Fact]:
    """The facts from ``start`` on (legs by their start), for a customer's 30- and 90-day windows."""
    return [f for f in facts if (f.start if f.kind == LEG else f.at) >= start]
