"""``tessera import``'s pure parts: readable enums, CSV columns, and failures collected per line."""

from __future__ import annotations

import io
import json

import pytest

from services.cli import importer
from services.cli.importer import ParseFailure, csv_row_to_dict, normalize_enums, parse_event, read_events
from tessera.v1 import event_pb2

# --- normalize_enums --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["web", "Web", "WEB", " web ", "CHANNEL_WEB", "channel_web"])
def test_channel_short_forms(raw: str) -> None:
    assert normalize_enums({"channel": raw}) == {"channel": "CHANNEL_WEB"}


@pytest.mark.parametrize(("raw", "expected"), [("in-store", "CHANNEL_IN_STORE"), ("mobile app", "CHANNEL_MOBILE_APP")])
def test_channel_dashes_and_spaces(raw: str, expected: str) -> None:
    assert normalize_enums({"channel": raw})["channel"] == expected


def test_nested_enums() -> None:
    obj = {
        "channel": "voice",
        "survey_response": {"type": "nps", "score": 9},
        "message": {"author": "customer"},
        "interaction": {"direction": "inbound", "case_status": "Open"},
    }
    assert normalize_enums(obj) == {
        "channel": "CHANNEL_VOICE",
        "survey_response": {"type": "SURVEY_TYPE_NPS", "score": 9},
        "message": {"author": "AUTHOR_CUSTOMER"},
        "interaction": {"direction": "DIRECTION_INBOUND", "case_status": "CASE_STATUS_OPEN"},
    }


def test_non_string_enums_and_other_fields_are_left_alone() -> None:
    obj = {"channel": 3, "source": "web", "track": {"event": "web"}, "survey_response": None}
    assert normalize_enums(dict(obj)) == obj


def test_parse_event_with_short_enums() -> None:
    ev = parse_event(
        {
            "message_id": "m1",
            "channel": "chat",
            "identifiers": [{"type": "email", "value": "ada@example.com"}],
            "message": {"interaction_id": "c-1", "author": "bot", "text": "hi"},
        }
    )
    assert ev.channel == event_pb2.CHANNEL_CHAT
    assert ev.message.author == event_pb2.AUTHOR_BOT


# --- csv_row_to_dict --------------------------------------------------------------------------------


def test_csv_row_maps_every_column_kind() -> None:
    row = {
        "message_id": "m1",
        "timestamp": "2025-01-02T03:04:05Z",
        "channel": "web",
        "source": "shop",
        "type": "identify",
        "id.email": "ada@example.com",
        "id.phone": "+14155550100",
        "traits.name": "Ada",
        "traits.age": "36",
        "traits.vip": "true",
        "traits.zip": "02134",
        "context.ip": "10.0.0.1",
        "empty": "",
    }
    assert csv_row_to_dict(row) == {
        "message_id": "m1",
        "timestamp": "2025-01-02T03:04:05Z",
        "channel": "web",
        "source": "shop",
        "identifiers": [
            {"type": "email", "value": "ada@example.com"},
            {"type": "phone", "value": "+14155550100"},
        ],
        "identify": {"traits": {"name": "Ada", "age": 36, "vip": True, "zip": "02134"}},
        "context": {"ip": "10.0.0.1"},
    }


def test_csv_track_row_with_typed_properties() -> None:
    row = {
        "type": "track",
        "event": "Order Completed",
        "properties.revenue": "42.5",
        "properties.gift": "false",
        "properties.currency": "EUR",
        "id.user_id": "u-1",
    }
    out = csv_row_to_dict(row)
    assert out["track"] == {"event": "Order Completed"}
    assert out["properties"] == {"revenue": 42.5, "gift": False, "currency": "EUR"}
    assert out["identifiers"] == [{"type": "user_id", "value": "u-1"}]


def test_csv_survey_row_parses_to_an_event() -> None:
    row = {
        "message_id": "s1",
        "channel": "email",
        "type": "survey_response",
        "id.email": "ada@example.com",
        "survey_response.type": "nps",
        "survey_response.score": "9",
        "survey_response.comment": "42",
    }
    out = csv_row_to_dict(row)
    assert out["survey_response"] == {"type": "nps", "score": "9", "comment": "42"}
    ev = parse_event(out)
    assert ev.survey_response.type == event_pb2.SURVEY_TYPE_NPS
    assert ev.survey_response.score == 9
    assert ev.survey_response.comment == "42"  # payload fields keep their text, unlike free-form structs


def test_csv_type_alone_creates_the_empty_payload() -> None:
    assert csv_row_to_dict({"type": " Identify ", "message_id": "m"}) == {"message_id": "m", "identify": {}}


def test_csv_unknown_column_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown column 'colour'"):
        csv_row_to_dict({"message_id": "m", "colour": "blue"})


def test_csv_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"type must be one of identify, track, interaction, survey_response, "
        r"message, got 'purchase'",
    ):
        csv_row_to_dict({"type": "purchase"})


# --- read_events ------------------------------------------------------------------------------------


def _jsonl_event(message_id: str, **extra: object) -> str:
    obj = {
        "message_id": message_id,
        "channel": "web",
        "identifiers": [{"type": "email", "value": "ada@example.com"}],
        "track": {"event": "Viewed"},
        **extra,
    }
    return json.dumps(obj)


def test_jsonl_failures_are_collected_with_line_numbers() -> None:
    text = (
        "\n".join(
            [
                _jsonl_event("a"),  # 1
                "{not json",  # 2
                "",  # 3 blank: skipped, still counted
                '[{"message_id": "b"}]',  # 4
                _jsonl_event("c", colour="blue"),  # 5 unknown field
                _jsonl_event("d", channel="teleport"),  # 6 unknown enum value
                _jsonl_event("e"),  # 7
            ]
        )
        + "\n"
    )
    failures: list[ParseFailure] = []
    got = [(line, ev.message_id) for line, ev in read_events(io.StringIO(text), "jsonl", failures)]
    assert got == [(1, "a"), (7, "e")]
    assert [f.line for f in failures] == [2, 4, 5, 6]
    reasons = {f.line: f.reason for f in failures}
    assert "each line must be a JSON object" in reasons[4]
    assert "colour" in reasons[5]
    assert "CHANNEL_TELEPORT" in reasons[6]
    assert all(f.reason for f in failures)


def test_jsonl_good_file_has_no_failures() -> None:
    failures: list[ParseFailure] = []
    text = _jsonl_event("a") + "\n" + _jsonl_event("b", survey_response=None)
    events = list(read_events(io.StringIO(text), "jsonl", failures))
    assert [e.message_id for _, e in events] == ["a", "b"]
    assert failures == []


def test_csv_failures_are_collected_with_line_numbers() -> None:
    text = (
        "message_id,channel,type,event,id.email,survey_response.score\r\n"  # 1 header
        "a,web,track,Viewed,ada@example.com,\r\n"  # 2
        "b,web,purchase,Viewed,ada@example.com,\r\n"  # 3 unknown type
        "c,teleport,track,Viewed,ada@example.com,\r\n"  # 4 unknown channel
        "d,email,survey_response,,ada@example.com,nine\r\n"  # 5 score not a number
        "e,sms,track,Clicked,ada@example.com,\r\n"  # 6
    )
    failures: list[ParseFailure] = []
    got = [(line, ev.message_id, ev.channel) for line, ev in read_events(io.StringIO(text), "csv", failures)]
    assert got == [(2, "a", event_pb2.CHANNEL_WEB), (6, "e", event_pb2.CHANNEL_SMS)]
    assert [f.line for f in failures] == [3, 4, 5]
    assert "got 'purchase'" in failures[0].reason


def test_csv_unknown_column_fails_each_row_but_is_reported() -> None:
    text = "message_id,channel,colour\nm1,web,blue\nm2,web,red\n"
    failures: list[ParseFailure] = []
    assert list(read_events(io.StringIO(text), "csv", failures)) == []
    assert [(f.line, f.reason) for f in failures] == [
        (2, "unknown column 'colour'"),
        (3, "unknown column 'colour'"),
    ]


def test_detect_format() -> None:
    from pathlib import Path

    assert importer.detect_format(Path("events.CSV"), None) == "csv"
    assert importer.detect_format(Path("events.jsonl"), None) == "jsonl"
    assert importer.detect_format(Path("events.txt"), "csv") == "csv"


def test_a_line_that_is_not_utf8_is_reported_and_the_rest_imported() -> None:
    import io

    good = (
        b'{"message_id":"u1","channel":"web","identifiers":[{"type":"email","value":"a@b.c"}],"track":{"event":"X"}}\n'
    )
    data = good + b'{"message_id":"\xff\xfe"}\n' + good.replace(b"u1", b"u2")
    failures: list = []  # type: ignore[type-arg]
    fp = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    parsed = list(read_events(fp, "jsonl", failures))
    assert [(line, ev.message_id) for line, ev in parsed] == [(1, "u1"), (3, "u2")]
    assert [(f.line, f.reason) for f in failures] == [(2, "not UTF-8 text")]
