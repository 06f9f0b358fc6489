"""Every ingest validation rule, table-driven: the field path and reason a producer sees."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from services.core.errors import InvalidArgument
from services.ingest import validation
from tessera.v1 import event_pb2
from tests.support.events import interaction, survey, track

NOW = time.time()


def _mut(fn: Callable[[event_pb2.Event], object], base: Callable[[], event_pb2.Event] = track) -> event_pb2.Event:
    ev = base()
    fn(ev)
    return ev


def _set_future(ev: event_pb2.Event, seconds: float) -> None:
    ev.timestamp.FromSeconds(int(NOW + seconds))


CASES: list[tuple[str, event_pb2.Event, str, str]] = [
    ("missing message_id", _mut(lambda e: setattr(e, "message_id", "")), "events[0].message_id", "REQUIRED"),
    ("long message_id", _mut(lambda e: setattr(e, "message_id", "x" * 101)), "events[0].message_id", "TOO_LONG"),
    ("no channel", _mut(lambda e: setattr(e, "channel", 0)), "events[0].channel", "REQUIRED"),
    ("unknown channel", _mut(lambda e: setattr(e, "channel", 99)), "events[0].channel", "UNKNOWN_VALUE"),
    ("no identifiers", _mut(lambda e: e.ClearField("identifiers")), "events[0].identifiers", "REQUIRED"),
    (
        "blank identifier value",
        _mut(lambda e: setattr(e.identifiers[0], "value", "  ")),
        "events[0].identifiers[0].value",
        "REQUIRED",
    ),
    (
        "identifier value over 256",
        _mut(lambda e: setattr(e.identifiers[0], "value", "v" * 257)),
        "events[0].identifiers[0].value",
        "TOO_LONG",
    ),
    (
        "identifier type not snake case",
        _mut(lambda e: setattr(e.identifiers[0], "type", "E-Mail")),
        "events[0].identifiers[0].type",
        "INVALID_FORMAT",
    ),
    ("timestamp > 24h ahead", _mut(lambda e: _set_future(e, 25 * 3600)), "events[0].timestamp", "TIMESTAMP_IN_FUTURE"),
    ("timestamp at epoch", _mut(lambda e: e.timestamp.FromSeconds(0)), "events[0].timestamp", "OUT_OF_RANGE"),
    ("no payload", _mut(lambda e: e.ClearField("track")), "events[0].payload", "REQUIRED"),
    ("track without name", _mut(lambda e: setattr(e.track, "event", "")), "events[0].track.event", "REQUIRED"),
    ("track name too long", _mut(lambda e: setattr(e.track, "event", "n" * 201)), "events[0].track.event", "TOO_LONG"),
    ("NPS 11", survey(11), "events[0].survey_response.score", "OUT_OF_RANGE"),
    ("NPS -1", survey(-1), "events[0].survey_response.score", "OUT_OF_RANGE"),
    ("CSAT 0", survey(0, event_pb2.SURVEY_TYPE_CSAT), "events[0].survey_response.score", "OUT_OF_RANGE"),
    ("CSAT 6", survey(6, event_pb2.SURVEY_TYPE_CSAT), "events[0].survey_response.score", "OUT_OF_RANGE"),
    ("CES 8", survey(8, event_pb2.SURVEY_TYPE_CES), "events[0].survey_response.score", "OUT_OF_RANGE"),
    ("survey without score", survey(None), "events[0].survey_response.score", "REQUIRED"),
    ("survey without type", survey(5, 0), "events[0].survey_response.type", "REQUIRED"),
    (
        "interaction without id",
        _mut(lambda e: setattr(e.interaction, "interaction_id", ""), interaction),
        "events[0].interaction.interaction_id",
        "REQUIRED",
    ),
    (
        "negative talk time",
        _mut(lambda e: setattr(e.interaction, "talk_seconds", -1), interaction),
        "events[0].interaction.talk_seconds",
        "OUT_OF_RANGE",
    ),
    (
        "NaN hold time",
        _mut(lambda e: setattr(e.interaction, "hold_seconds", float("nan")), interaction),
        "events[0].interaction.hold_seconds",
        "OUT_OF_RANGE",
    ),
    (
        "ended before started",
        _mut(lambda e: e.interaction.ended_at.FromSeconds(1_600_000_000), interaction),
        "events[0].interaction.ended_at",
        "OUT_OF_RANGE",
    ),
    (
        "abandoned with talk time",
        _mut(lambda e: setattr(e.interaction, "abandoned", True), interaction),
        "events[0].interaction.talk_seconds",
        "INCONSISTENT",
    ),
    (
        "message without author",
        event_pb2.Event(
            message_id="m1",
            channel=event_pb2.CHANNEL_CHAT,
            identifiers=[event_pb2.Identifier(type="chat_id", value="c1")],
            message=event_pb2.Message(interaction_id="chat-1", text="hi"),
        ),
        "events[0].message.author",
        "REQUIRED",
    ),
    (
        "message without text",
        event_pb2.Event(
            message_id="m1",
            channel=event_pb2.CHANNEL_CHAT,
            identifiers=[event_pb2.Identifier(type="chat_id", value="c1")],
            message=event_pb2.Message(interaction_id="chat-1", author=event_pb2.AUTHOR_CUSTOMER),
        ),
        "events[0].message.text",
        "REQUIRED",
    ),
    (
        "event over 32 KB",
        _mut(lambda e: e.properties.update({"blob": "x" * 33_000})),
        "events[0]",
        "TOO_LARGE",
    ),
]


@pytest.mark.parametrize(("name", "event", "field", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rule_names_field_and_reason(name: str, event: event_pb2.Event, field: str, reason: str) -> None:
    violations = validation.validate_event(event, 0, NOW)
    assert (field, reason) in [(v.field, v.reason) for v in violations], violations
    assert all(v.description for v in violations)


@pytest.mark.parametrize(
    "event",
    [
        track(),
        survey(0),
        survey(10),
        survey(1, event_pb2.SURVEY_TYPE_CSAT),
        survey(7, event_pb2.SURVEY_TYPE_CES),
        interaction(),
        _mut(lambda e: _set_future(e, 23 * 3600)),
        _mut(lambda e: e.ClearField("timestamp")),
    ],
)
def test_valid_events_pass(event: event_pb2.Event) -> None:
    assert validation.validate_event(event, 0, NOW) == []


def test_index_is_part_of_the_path() -> None:
    violations = validation.validate_event(survey(11), 3, NOW)
    assert violations[0].field == "events[3].survey_response.score"
    assert violations[0].description == "NPS score must be 0-10, got 11"


@pytest.mark.parametrize(
    ("count", "nbytes", "fragment"),
    [(0, 0, "at least one"), (501, 1000, "at most 500 events"), (10, 4 * 1024 * 1024 + 1, "bytes per batch")],
)
def test_batch_limits(count: int, nbytes: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validation.check_batch([track()] * count, nbytes)
    assert fragment in err.value.message
    assert err.value.violations[0].field == "events"


def test_batch_at_the_limits_is_fine() -> None:
    validation.check_batch([track()] * 500, 4 * 1024 * 1024)
