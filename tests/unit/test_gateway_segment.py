"""The Segment-to-Tessera mapping, without I/O: shapes, identifiers, Segment's timestamp rule,
channels, and every bad message named by its index and field."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict as as_dict

from services.gateway import segment
from services.gateway.app import decode
from services.gateway.credentials import api_key
from services.gateway.statuses import HttpError
from tessera.v1 import event_pb2

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def one(msg: dict[str, Any], kind: str | None = None) -> event_pb2.Event:
    mapped = segment.map_messages([msg], kind, NOW)
    assert not mapped.violations, mapped.violations
    return mapped.events[0][1]


def bad(msg: Any, kind: str | None = None) -> segment.Violation:
    mapped = segment.map_messages([msg], kind, NOW)
    assert not mapped.events
    (v,) = mapped.violations
    return v


def ids(ev: event_pb2.Event) -> list[tuple[str, str]]:
    return [(i.type, i.value) for i in ev.identifiers]


def test_track_maps_name_properties_context_and_identifiers() -> None:
    ev = one(
        {
            "messageId": "m1",
            "userId": "u1",
            "anonymousId": "a1",
            "event": " Order Completed ",
            "properties": {"total": 10.5, "items": [1, 2]},
            "context": {"library": {"name": "analytics.js"}, "traits": {"email": "Ada@Example.com"}},
        },
        "track",
    )
    assert ev.message_id == "m1" and ev.track.event == "Order Completed"
    assert ev.properties["total"] == 10.5
    assert as_dict(ev.context)["library"]["name"] == "analytics.js"
    assert ids(ev) == [("user_id", "u1"), ("anonymous_id", "a1"), ("email", "Ada@Example.com")]
    assert ev.channel == event_pb2.CHANNEL_WEB and ev.source == "segment:track"


def test_identify_keeps_traits_and_email_phone_become_identifiers() -> None:
    ev = one(
        {"type": "identify", "messageId": "m", "anonymousId": "a", "traits": {"email": "x@y.z", "phone": "+1 415"}}
    )
    assert ev.WhichOneof("payload") == "identify" and ev.identify.traits["email"] == "x@y.z"
    assert ids(ev) == [("anonymous_id", "a"), ("email", "x@y.z"), ("phone", "+1 415")]


def test_numeric_user_id_is_a_string() -> None:
    assert ids(one({"type": "track", "event": "e", "messageId": 7, "userId": 42})) == [("user_id", "42")]


def test_page_screen_group_alias() -> None:
    page = one({"type": "page", "messageId": "p", "userId": "u", "name": "Home", "properties": {"url": "/"}})
    assert page.track.event == "Page Viewed" and page.properties["name"] == "Home"
    assert page.properties["url"] == "/"
    screen = one({"type": "screen", "messageId": "s", "userId": "u", "name": "Cart"})
    assert screen.track.event == "Screen Viewed"
    group = one({"type": "group", "messageId": "g", "userId": "u", "groupId": "acme", "traits": {"plan": "pro"}})
    assert group.track.event == "Group" and group.properties["group_id"] == "acme"
    assert as_dict(group.properties)["traits"]["plan"] == "pro"
    alias = one({"type": "alias", "messageId": "al", "userId": "u", "previousId": "anon-9"})
    assert alias.WhichOneof("payload") == "identify"
    assert ids(alias) == [("user_id", "u"), ("anonymous_id", "anon-9")]


def test_timestamp_is_skew_corrected_with_sent_at_and_original_timestamp() -> None:
    # The device clock is 1 hour fast: it sent 10 s after the event, by its own clock.
    ev = one(
        {
            "type": "track",
            "event": "e",
            "messageId": "m",
            "userId": "u",
            "originalTimestamp": "2026-05-01T13:00:00Z",
            "sentAt": "2026-05-01T13:00:10Z",
            "timestamp": "2020-01-01T00:00:00Z",
        }
    )
    assert ev.timestamp.ToDatetime(dt.UTC) == NOW - dt.timedelta(seconds=10)


def test_batch_sent_at_corrects_original_timestamp_too() -> None:
    msg = {"type": "track", "event": "e", "messageId": "m", "userId": "u", "originalTimestamp": "2026-05-01T13:00:00"}
    mapped = segment.map_messages([msg], None, NOW, dt.datetime(2026, 5, 1, 13, 0, 5, tzinfo=dt.UTC))
    assert mapped.events[0][1].timestamp.ToDatetime(dt.UTC) == NOW - dt.timedelta(seconds=5)


def test_timestamp_else_received_at() -> None:
    given = one(
        {"type": "track", "event": "e", "messageId": "m", "userId": "u", "timestamp": "2026-04-30T10:00:00+02:00"}
    )
    assert given.timestamp.ToDatetime(dt.UTC) == dt.datetime(2026, 4, 30, 8, 0, tzinfo=dt.UTC)
    assert one({"type": "track", "event": "e", "messageId": "m", "userId": "u"}).timestamp.ToDatetime(dt.UTC) == NOW


@pytest.mark.parametrize(
    ("context", "channel"),
    [
        ({"channel": "mobile"}, event_pb2.CHANNEL_MOBILE_APP),
        ({"channel": "Web"}, event_pb2.CHANNEL_WEB),
        ({"library": {"name": "analytics-ios"}}, event_pb2.CHANNEL_MOBILE_APP),
        ({"library": {"name": "analytics-android"}}, event_pb2.CHANNEL_MOBILE_APP),
        ({"library": {"name": "analytics-python"}}, event_pb2.CHANNEL_OTHER),
        ({"channel": "nonsense", "library": {"name": "analytics.js"}}, event_pb2.CHANNEL_WEB),
        ({}, event_pb2.CHANNEL_OTHER),
    ],
)
def test_channel(context: dict[str, Any], channel: int) -> None:
    assert segment.channel(context) == channel


def test_batch_context_fills_a_message_context() -> None:
    msg = {"type": "track", "event": "e", "messageId": "m", "userId": "u", "context": {"ip": "1.2.3.4"}}
    mapped = segment.map_messages([msg], None, NOW, batch_context={"library": {"name": "analytics-ios"}, "ip": "x"})
    ev = mapped.events[0][1]
    assert ev.context["ip"] == "1.2.3.4" and ev.channel == event_pb2.CHANNEL_MOBILE_APP


@pytest.mark.parametrize(
    ("msg", "kind", "field", "words"),
    [
        ({"event": "e", "userId": "u"}, "track", "messageId", "required"),
        ({"event": "e", "messageId": "m"}, "track", "userId", "anonymousId"),
        ({"messageId": "m", "userId": "u"}, "track", "event", "required"),
        ({"event": 3, "messageId": "m", "userId": "u"}, "track", "event", "string"),
        ({"type": "bogus", "messageId": "m", "userId": "u"}, None, "type", "one of"),
        ({"type": "identify", "messageId": "m", "userId": "u"}, "track", "type", "'track'"),
        ({"event": "e", "messageId": "m", "userId": {"x": 1}}, "track", "userId", "string or a number"),
        ({"event": "e", "messageId": "m", "userId": True}, "track", "userId", "string or a number"),
        ({"event": "e", "messageId": "m", "userId": "u", "properties": []}, "track", "properties", "object"),
        ({"event": "e", "messageId": "m", "userId": "u", "timestamp": "yesterday"}, "track", "timestamp", "ISO"),
        ({"event": "e", "messageId": "m", "userId": "u", "timestamp": 5}, "track", "timestamp", "ISO"),
        ({"event": "e", "messageId": "m", "userId": "u", "surprise": 1}, "track", "surprise", "not a field"),
        ({"messageId": "m", "userId": "u", "traits": {"email": 5}}, "identify", "traits.email", "string"),
        ({"messageId": "m", "userId": "u"}, "alias", "previousId", "required"),
        ({"messageId": "m", "anonymousId": "a", "previousId": "p"}, "alias", "userId", "required"),
        ({"messageId": "m", "userId": "u"}, "group", "groupId", "required"),
        ({"messageId": "m", "userId": "u", "name": 5}, "page", "name", "string"),
        ("a string", None, "", "object"),
    ],
)
def test_bad_messages_name_their_field(msg: Any, kind: str | None, field: str, words: str) -> None:
    v = bad(msg, kind)
    assert v.index == 0 and v.field == field and words in v.description


def test_deep_nesting_is_refused_not_recursed() -> None:
    deep: Any = {}
    for _ in range(10_000):
        deep = {"x": deep}
    v = bad({"type": "track", "event": "e", "messageId": "m", "userId": "u", "properties": deep})
    assert "deeper" in v.description


def test_unstorable_values_are_a_violation() -> None:
    v = bad({"type": "track", "event": "e", "messageId": "m", "userId": "u", "properties": {"n": 10**400}})
    assert v.field == "" and "cannot be stored" in v.description


def test_a_batch_keeps_good_messages_and_names_bad_ones_by_index() -> None:
    good = {"type": "track", "event": "e", "messageId": "m", "userId": "u"}
    mapped = segment.map_messages([good, {"type": "track", "userId": "u"}, good], None, NOW)
    assert [i for i, _ in mapped.events] == [0, 2]
    assert [(v.index, v.field) for v in mapped.violations] == [(1, "messageId")]


def test_ingest_fields_in_segment_words() -> None:
    assert segment.ingest_field("events[3].message_id") == "messageId"
    assert segment.ingest_field("events[0].track.event") == "event"
    assert segment.ingest_field("events[0].identifiers[1].value") == "identifiers[1].value"
    assert segment.ingest_field("events[0].identify.traits.x") == "traits.x"


def test_api_key_from_basic_or_bearer() -> None:
    basic = base64.b64encode(b"wk_123:").decode()
    assert api_key(f"Basic {basic}") == "wk_123"
    assert api_key("Bearer wk_9") == "wk_9"
    assert api_key(None) is None and api_key("Basic !!!") is None and api_key("Digest x") is None
    assert api_key("Basic " + base64.b64encode(b":").decode()) is None


def test_decode_refuses_garbage_with_4xx() -> None:
    for raw, status in [
        (b"\xff\xfe{}", 400),
        (b"{not json", 400),
        (b"[" * 100_000, 400),
        (b"x" * 40, 413),
        (b"not gzip", 400),
    ]:
        with pytest.raises(HttpError) as err:
            decode(raw, 32 if raw == b"x" * 40 else 200_000, "gzip" if raw == b"not gzip" else "")
        assert err.value.status == status
    assert decode(gzip.compress(b'{"a": 1}'), 32, "gzip") == {"a": 1}
    with pytest.raises(HttpError) as err:
        decode(gzip.compress(b" " * 10_000), 32, "gzip")
    assert err.value.status == 413
    with pytest.raises(HttpError) as err:
        decode(b"{}", 32, "br")
    assert err.value.status == 415
