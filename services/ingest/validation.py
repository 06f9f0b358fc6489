"""Ingest's rules for a well-formed event, as pure functions.

Every problem is reported with a field path relative to the request
(``events[3].survey_response.score``) and a sentence a producer can act on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from services.core.errors import InvalidArgument, Violation
from tessera.v1 import event_pb2

MAX_BATCH_EVENTS = 500
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_MESSAGE_ID = 100
MAX_IDENTIFIER_VALUE = 256
MAX_IDENTIFIERS = 50
MAX_TRACK_EVENT = 200
MAX_TEXT = 16_384
MAX_SHORT_FIELD = 256
MAX_FUTURE_SECONDS = 24 * 3600
# 1970 and earlier are nearly always a zero or missing timestamp, not a real touchpoint.
MIN_TIMESTAMP_SECONDS = 86_400

_CHANNELS = frozenset(event_pb2.Channel.values())
IDENTIFIER_TYPE_RULE = "lower snake case, 1-64 characters, such as 'email'"
IDENTIFIER_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SCORE_RANGES = {
    event_pb2.SURVEY_TYPE_NPS: (0, 10, "NPS"),
    event_pb2.SURVEY_TYPE_CSAT: (1, 5, "CSAT"),
    event_pb2.SURVEY_TYPE_CES: (1, 7, "CES"),
}


@dataclass(frozen=True)
class Limits:
    """The limits in force; tests and tenants may tighten them."""

    max_batch_events: int = MAX_BATCH_EVENTS
    max_batch_bytes: int = MAX_BATCH_BYTES
    max_event_bytes: int = MAX_EVENT_BYTES


DEFAULT_LIMITS = Limits()


def check_batch(events: list[event_pb2.Event] | object, total_bytes: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a whole batch over its limits (INVALID_ARGUMENT): nothing of it is written."""
    count = len(events)  # type: ignore[arg-type]
    violations = []
    if count == 0:
        violations.append(Violation("events", "a batch needs at least one event", "EMPTY_BATCH"))
    if count > limits.max_batch_events:
        violations.append(
            Violation("events", f"at most {limits.max_batch_events} events per batch, got {count}", "BATCH_TOO_LARGE")
        )
    if total_bytes > limits.max_batch_bytes:
        violations.append(
            Violation(
                "events",
                f"at most {limits.max_batch_bytes} bytes per batch, got {total_bytes}",
                "BATCH_TOO_LARGE",
            )
        )
    if violations:
        raise InvalidArgument("batch refused: " + "; ".join(v.description for v in violations), violations)


def _ts_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


# Field paths are only formatted when something is wrong: building them for every valid
# event was a measurable share of ingest's CPU.


def _nonneg(path: str, name: str, value: float, out: list[Violation]) -> None:
    if not (value >= 0 and math.isfinite(value)):
        out.append(Violation(f"{path}.{name}", f"{name} must be a finite number of seconds >= 0", "OUT_OF_RANGE"))


def _too_long(path: str, name: str, value: str, limit: int, out: list[Violation]) -> None:
    if len(value) > limit:
        out.append(Violation(f"{path}.{name}", f"at most {limit} characters, got {len(value)}", "TOO_LONG"))


def _required(path: str, name: str, value: str, out: list[Violation]) -> None:
    if not value or value.isspace():
        out.append(Violation(f"{path}.{name}", "required", "REQUIRED"))


def validate_event(
    ev: event_pb2.Event, index: int, now_seconds: float, limits: Limits = DEFAULT_LIMITS, size: int | None = None
) -> list[Violation]:
    """All the problems of one event; empty when it may be stored. ``size`` spares a second
    serialization when the caller already has the event's bytes."""
    p = f"events[{index}]"
    out: list[Violation] = []
    if size is None:
        size = ev.ByteSize()
    if size > limits.max_event_bytes:
        out.append(Violation(p, f"an event is at most {limits.max_event_bytes} bytes, got {size}", "TOO_LARGE"))

    _required(p, "message_id", ev.message_id, out)
    _too_long(p, "message_id", ev.message_id, MAX_MESSAGE_ID, out)
    _too_long(p, "source", ev.source, MAX_SHORT_FIELD, out)

    if ev.HasField("timestamp"):
        ts = _ts_seconds(ev.timestamp)
        if ts > now_seconds + MAX_FUTURE_SECONDS:
            out.append(Violation(f"{p}.timestamp", "at most 24 hours in the future", "TIMESTAMP_IN_FUTURE"))
        elif ts < MIN_TIMESTAMP_SECONDS:
            out.append(Violation(f"{p}.timestamp", "must be after 1970-01-02", "OUT_OF_RANGE"))

    if ev.channel == event_pb2.CHANNEL_UNSPECIFIED:
        out.append(Violation(f"{p}.channel", "required; use CHANNEL_OTHER when none fits", "REQUIRED"))
    elif ev.channel not in _CHANNELS:
        out.append(Violation(f"{p}.channel", f"unknown channel {ev.channel}", "UNKNOWN_VALUE"))

    if not ev.identifiers:
        out.append(Violation(f"{p}.identifiers", "at least one identifier is required", "REQUIRED"))
    elif len(ev.identifiers) > MAX_IDENTIFIERS:
        out.append(Violation(f"{p}.identifiers", f"at most {MAX_IDENTIFIERS} identifiers", "TOO_MANY"))
    for i, ident in enumerate(ev.identifiers):
        id_type, value = ident.type, ident.value
        if not IDENTIFIER_TYPE_RE.match(id_type):
            out.append(
                Violation(
                    f"{p}.identifiers[{i}].type", "lower snake case, 1-64 characters, such as 'email'", "INVALID_FORMAT"
                )
            )
        if not value or value.isspace() or len(value) > MAX_IDENTIFIER_VALUE:
            _required(f"{p}.identifiers[{i}]", "value", value, out)
            _too_long(f"{p}.identifiers[{i}]", "value", value, MAX_IDENTIFIER_VALUE, out)

    kind = ev.WhichOneof("payload")
    if kind is None:
        out.append(
            Violation(
                f"{p}.payload",
                "one of identify, track, interaction, survey_response or message is required",
                "REQUIRED",
            )
        )
    elif kind == "track":
        _required(p, "track.event", ev.track.event, out)
        _too_long(p, "track.event", ev.track.event, MAX_TRACK_EVENT, out)
    elif kind == "interaction":
        _validate_interaction(ev.interaction, f"{p}.interaction", out)
    elif kind == "survey_response":
        _validate_survey(ev.survey_response, f"{p}.survey_response", out)
    elif kind == "message":
        m = ev.message
        _required(p, "message.interaction_id", m.interaction_id, out)
        _too_long(p, "message.interaction_id", m.interaction_id, MAX_SHORT_FIELD, out)
        if m.author == event_pb2.AUTHOR_UNSPECIFIED:
            out.append(Violation(f"{p}.message.author", "required: customer, agent or bot", "REQUIRED"))
        _required(p, "message.text", m.text, out)
        _too_long(p, "message.text", m.text, MAX_TEXT, out)
    return out


def _validate_interaction(it: event_pb2.Interaction, p: str, out: list[Violation]) -> None:
    _required(p, "interaction_id", it.interaction_id, out)
    for name in ("interaction_id", "queue", "agent_id", "reason", "disposition", "case_id", "leg_id"):
        _too_long(p, name, getattr(it, name), MAX_SHORT_FIELD, out)
    for name in ("talk_seconds", "hold_seconds", "after_contact_work_seconds", "wait_seconds"):
        _nonneg(p, name, getattr(it, name), out)
    if (
        it.HasField("started_at")
        and it.HasField("ended_at")
        and (_ts_seconds(it.ended_at) < _ts_seconds(it.started_at))
    ):
        out.append(Violation(f"{p}.ended_at", "must not be before started_at", "OUT_OF_RANGE"))
    if it.abandoned and it.talk_seconds > 0:
        out.append(Violation(f"{p}.talk_seconds", "an abandoned contact has no talk time", "INCONSISTENT"))


def _validate_survey(s: event_pb2.SurveyResponse, p: str, out: list[Violation]) -> None:
    rng = SCORE_RANGES.get(s.type)
    if rng is None:
        out.append(Violation(f"{p}.type", "required: SURVEY_TYPE_NPS, SURVEY_TYPE_CSAT or SURVEY_TYPE_CES", "REQUIRED"))
    elif not s.HasField("score"):
        out.append(Violation(f"{p}.score", f"{rng[2]} score is required", "REQUIRED"))
    elif not rng[0] <= s.score <= rng[1]:
        out.append(Violation(f"{p}.score", f"{rng[2]} score must be {rng[0]}-{rng[1]}, got {s.score}", "OUT_OF_RANGE"))
    _too_long(p, "comment", s.comment, MAX_TEXT, out)
    _too_long(p, "interaction_id", s.interaction_id, MAX_SHORT_FIELD, out)
