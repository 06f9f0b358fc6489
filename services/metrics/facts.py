"""What a resolved event contributes to CX metrics: one :class:`Fact` per interaction leg, survey
answer or message. Pure, no I/O (VADER is a lexicon in the package).

A leg is keyed by (interaction_id, leg_id), so a contact-center system that sends a leg again
(at its start, then at its end) corrects it instead of counting it twice; the one with the
later event time wins, whatever order they arrive in. Surveys and messages are keyed by their
event id. Identify and Track events carry no CX facts.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass, replace

from google.protobuf import timestamp_pb2

from tessera.v1 import event_pb2, stream_pb2

LEG, SURVEY, MESSAGE = 1, 2, 3
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_TEXT = 16_384


@functools.cache
def _analyzer() -> object:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score of ``text``, -1..1."""
    scores: dict[str, float] = _analyzer().polarity_scores(text[:MAX_TEXT])  # type: ignore[attr-defined]
    return float(scores["compound"])


@dataclass(slots=True)
class Fact:
    """One leg, survey answer or message, as the derivation needs it. Treated as immutable (not
    frozen only because a frozen dataclass takes 8x as long to build, and the consumer builds
    every fact of each customer it touches)."""

    key: str
    kind: int
    event_id: str
    profile_id: str
    at: dt.datetime  # event time
    channel: int
    source: str
    interaction_id: str = ""
    # legs
    queue: str = ""
    agent: str = ""
    reason: str = ""
    case_id: str = ""
    case_status: int = 0
    started_at: dt.datetime | None = None
    talk: float = 0.0
    hold: float = 0.0
    acw: float = 0.0
    wait: float = 0.0
    transferred: bool = False
    abandoned: bool = False
    leg_id: str = ""
    # surveys
    survey_type: int = 0
    score: int | None = None
    # messages
    author: int = 0
    compound: float = 0.0
    # legs, again: when it ended (an interaction is evaluated once a leg says so), and the
    # handling agent's team
    ended_at: dt.datetime | None = None
    team: str = ""

    @property
    def start(self) -> dt.datetime:
        """When a leg began (its event time when it did not say)."""
        return self.started_at or self.at

    @property
    def handled(self) -> bool:
        """An agent handled this leg."""
        return self.kind == LEG and bool(self.agent) and not self.abandoned

    @property
    def handle_seconds(self) -> float:
        return self.talk + self.hold + self.acw

    def newer_than(self, other: Fact) -> bool:
        return (self.at, self.event_id) > (other.at, other.event_id)

    def with_profile(self, profile_id: str) -> Fact:
        return replace(self, profile_id=profile_id)


def _time(ts: timestamp_pb2.Timestamp) -> dt.datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=dt.UTC)


def _clean(value: float) -> float:
    """Durations are validated at ingest; a negative or non-finite one counts as zero here."""
    return value if math.isfinite(value) and 0.0 <= value < 1e9 else 0.0


def from_event(ev: event_pb2.Event) -> Fact | None:
    which = ev.WhichOneof("payload")
    if which not in ("interaction", "survey_response", "message") or not ev.event_id:
        return None
    at = _time(ev.timestamp) or _time(ev.received_at) or EPOCH
    common = {
        "event_id": ev.event_id,
        "profile_id": ev.profile_id,
        "at": at,
        "channel": ev.channel,
        "source": ev.source,
    }
    if which == "interaction":
        i = ev.interaction
        if not i.interaction_id:
            return None
        leg = i.leg_id or i.interaction_id
        return Fact(
            key=f"leg:{i.interaction_id}:{leg}",
            kind=LEG,
            interaction_id=i.interaction_id,
            queue=i.queue,
            agent=i.agent_id,
            reason=i.reason,
            case_id=i.case_id,
            case_status=i.case_status,
            started_at=_time(i.started_at),
            talk=_clean(i.talk_seconds),
            hold=_clean(i.hold_seconds),
            acw=_clean(i.after_contact_work_seconds),
            wait=_clean(i.wait_seconds),
            transferred=i.transferred,
            abandoned=i.abandoned,
            leg_id=leg,
            ended_at=_time(i.ended_at),
            team=i.team,
            **common,  # type: ignore[arg-type]
        )
    if which == "survey_response":
        s = ev.survey_response
        if not s.HasField("score") or s.type == event_pb2.SURVEY_TYPE_UNSPECIFIED:
            return None
        return Fact(
            key=f"survey:{ev.event_id}",
            kind=SURVEY,
            interaction_id=s.interaction_id,
            survey_type=s.type,
            score=s.score,
            **common,  # type: ignore[arg-type]
        )
    m = ev.message
    if not m.interaction_id:
        return None
    return Fact(
        key=f"message:{ev.event_id}",
        kind=MESSAGE,
        interaction_id=m.interaction_id,
        author=m.author,
        agent=m.agent_id,
        compound=sentiment(m.text) if m.author == event_pb2.AUTHOR_CUSTOMER else 0.0,
        **common,  # type: ignore[arg-type]
    )


def parse(envelope: stream_pb2.ResolvedEventEnvelope) -> Fact | None:
    """The event's fact, or None when it has none or identity linked it to no profile."""
    if not envelope.event.profile_id:
        return None
    return from_event(envelope.event)
