"""Ingest's rules for a well-formed event, as pure functions.

Every problem is reported with a field path relative to the request
(``events[3].survey_response.score``) and a sentence a producer can act on.

**Ingest is the single gate:** whatever it accepts, every consumer can process and store. So
beyond business rules it refuses what no consumer could keep: a NUL character in any string
(PostgreSQL text and jsonb cannot hold one), a Timestamp that is not a real instant (nanos
outside 0..999,999,999, or outside years 1-9999), a Struct value that JSON cannot express (NaN,
Infinity, an empty Value) or nested deeper than 16 levels, and enum values this version does
not know. ``tests/unit/test_ingest_gate.py`` checks the invariant with arbitrary events.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from google.protobuf import struct_pb2
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
_DIRECTIONS = frozenset(event_pb2.Direction.values())
_CASE_STATUSES = frozenset(event_pb2.CaseStatus.values())
_AUTHORS = frozenset(event_pb2.Author.values())
MAX_STRUCT_DEPTH = 16
# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range a google.protobuf.Timestamp allows.
TIMESTAMP_RANGE = (-62_135_596_800, 253_402_300_799)
IDENTIFIER_TYPE_RULE = "lower snake case, 1-64 characters, such as 'email'"
IDENTIFIER_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")  # used with fullmatch: no trailing newline
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


def _nul(path: str, out: list[Violation]) -> None:
    out.append(Violation(path, "must not contain the NUL character (U+0000)", "INVALID_CHARACTER"))


def _strings(path: str, message: object, names: tuple[str, ...], out: list[Violation]) -> None:
    """NUL check of several string fields at once (one join, one search, when all are clean)."""
    values = [getattr(message, n) for n in names]
    if "\x00" in "".join(values):
        for name, value in zip(names, values, strict=True):
            if "\x00" in value:
                _nul(f"{path}.{name}", out)


def _timestamp(path: str, ts: Timestamp, out: list[Violation]) -> bool:
    """A real instant: nanos in 0..999,999,999 and seconds within years 1-9999."""
    if not 0 <= ts.nanos <= 999_999_999:
        out.append(Violation(path, f"nanos must be 0-999999999, got {ts.nanos}", "OUT_OF_RANGE"))
        return False
    if not TIMESTAMP_RANGE[0] <= ts.seconds <= TIMESTAMP_RANGE[1]:
        out.append(Violation(path, "must be between the years 1 and 9999", "OUT_OF_RANGE"))
        return False
    return True


def _struct(path: str, struct: struct_pb2.Struct, out: list[Violation], depth: int = 1) -> None:
    """Storable as JSON by every consumer: no NaN or Infinity, no empty Value, no NUL in keys or
    strings, nesting bounded."""
    if depth > MAX_STRUCT_DEPTH:
        out.append(Violation(path, f"nested more than {MAX_STRUCT_DEPTH} levels", "TOO_DEEP"))
        return
    for key, value in struct.fields.items():
        if "\x00" in key:
            out.append(Violation(path, "a key contains the NUL character (U+0000)", "INVALID_CHARACTER"))
            continue
        _value(f"{path}.{key}", value, out, depth)


def _value(path: str, value: struct_pb2.Value, out: list[Violation], depth: int) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            out.append(Violation(path, "must be a finite number (JSON has no NaN or Infinity)", "NOT_FINITE"))
    elif kind == "string_value":
        if "\x00" in value.string_value:
            _nul(path, out)
    elif kind == "struct_value":
        _struct(path, value.struct_value, out, depth + 1)
    elif kind == "list_value":
        if depth >= MAX_STRUCT_DEPTH:
            out.append(Violation(path, f"nested more than {MAX_STRUCT_DEPTH} levels", "TOO_DEEP"))
            return
        for i, item in enumerate(value.list_value.values):
            _value(f"{path}[{i}]", item, out, depth + 1)
    elif kind is None:
        out.append(Violation(path, "a value must be set (null_value for null)", "REQUIRED"))


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
    _strings(p, ev, ("message_id", "source"), out)

    if ev.HasField("timestamp") and _timestamp(f"{p}.timestamp", ev.timestamp, out):
        ts = _ts_seconds(ev.timestamp)
        if ts > now_seconds + MAX_FUTURE_SECONDS:
            out.append(Violation(f"{p}.timestamp", "at most 24 hours in the future", "TIMESTAMP_IN_FUTURE"))
        elif ts < MIN_TIMESTAMP_SECONDS:
            out.append(Violation(f"{p}.timestamp", "must be after 1970-01-02", "OUT_OF_RANGE"))
    if ev.HasField("properties"):
        _struct(f"{p}.properties", ev.properties, out)
    if ev.HasField("context"):
        _struct(f"{p}.context", ev.context, out)

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
        if not IDENTIFIER_TYPE_RE.fullmatch(id_type):
            out.append(
                Violation(
                    f"{p}.identifiers[{i}].type", "lower snake case, 1-64 characters, such as 'email'", "INVALID_FORMAT"
                )
            )
        if not value or value.isspace() or len(value) > MAX_IDENTIFIER_VALUE:
            _required(f"{p}.identifiers[{i}]", "value", value, out)
            _too_long(f"{p}.identifiers[{i}]", "value", value, MAX_IDENTIFIER_VALUE, out)
        if "\x00" in value:
            _nul(f"{p}.identifiers[{i}].value", out)

    kind = ev.WhichOneof("payload")
    if kind is None:
        out.append(
            Violation(
                f"{p}.payload",
                "one of identify, track, interaction, survey_response or message is required",
                "REQUIRED",
            )
        )
    elif kind == "identify":
        if ev.identify.HasField("traits"):
            _struct(f"{p}.identify.traits", ev.identify.traits, out)
    elif kind == "track":
        _required(p, "track.event", ev.track.event, out)
        _too_long(p, "track.event", ev.track.event, MAX_TRACK_EVENT, out)
        _strings(f"{p}.track", ev.track, ("event",), out)
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
        elif m.author not in _AUTHORS:
            out.append(Violation(f"{p}.message.author", f"unknown author {m.author}", "UNKNOWN_VALUE"))
        _required(p, "message.text", m.text, out)
        _too_long(p, "message.text", m.text, MAX_TEXT, out)
        _too_long(p, "message.agent_id", m.agent_id, MAX_SHORT_FIELD, out)
        _strings(f"{p}.message", m, ("interaction_id", "text", "agent_id"), out)
        if m.HasField("offset_seconds"):
            _nonneg(f"{p}.message", "offset_seconds", m.offset_seconds, out)
    return out


_INTERACTION_TEXT = ("interaction_id", "queue", "agent_id", "reason", "disposition", "case_id", "leg_id", "team")


def _validate_interaction(it: event_pb2.Interaction, p: str, out: list[Violation]) -> None:
    _required(p, "interaction_id", it.interaction_id, out)
    for name in _INTERACTION_TEXT:
        _too_long(p, name, getattr(it, name), MAX_SHORT_FIELD, out)
    _strings(p, it, _INTERACTION_TEXT, out)
    for name in ("talk_seconds", "hold_seconds", "after_contact_work_seconds", "wait_seconds"):
        _nonneg(p, name, getattr(it, name), out)
    if it.direction not in _DIRECTIONS:
        out.append(Violation(f"{p}.direction", f"unknown direction {it.direction}", "UNKNOWN_VALUE"))
    if it.case_status not in _CASE_STATUSES:
        out.append(Violation(f"{p}.case_status", f"unknown case status {it.case_status}", "UNKNOWN_VALUE"))
    started = it.HasField("started_at") and _timestamp(f"{p}.started_at", it.started_at, out)
    ended = it.HasField("ended_at") and _timestamp(f"{p}.ended_at", it.ended_at, out)
    if started and ended and _ts_seconds(it.ended_at) < _ts_seconds(it.started_at):
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
    _too_long(p, "survey_id", s.survey_id, MAX_SHORT_FIELD, out)
    _strings(p, s, ("comment", "interaction_id", "survey_id"), out)
