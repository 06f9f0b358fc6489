"""The pure part of ingest: results per event, what is stored, and the stamped payload."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest

from services.ingest import prepare as pipeline
from services.ingest import validation
from tessera.v1 import event_pb2, ingest_pb2
from tests.support.events import interaction, survey, track

_now = dt.datetime.now(dt.UTC)
# Whole milliseconds, so the UUIDv7 time and the stored timestamp compare exactly.
RECEIVED = _now.replace(microsecond=_now.microsecond // 1000 * 1000)
RECEIVED_MS = int(RECEIVED.timestamp() * 1000)
LIMITS = validation.Limits()
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED
UNSPECIFIED = ingest_pb2.EVENT_STATUS_UNSPECIFIED


def _at(ev: event_pb2.Event, seconds: int) -> event_pb2.Event:
    ev.timestamp.FromSeconds(seconds)
    return ev


def stored(prep: pipeline.Prepared, i: int) -> event_pb2.Event:
    ev = event_pb2.Event()
    ev.ParseFromString(prep.to_store[i].payload)
    return ev


def test_results_are_in_request_order_with_index_and_message_id() -> None:
    events = [track("a"), survey(11, message_id="b"), interaction("c"), track("d")]
    prep = pipeline.prepare(events, RECEIVED, LIMITS)
    assert [(r.index, r.message_id) for r in prep.results] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert [n.message_id for n in prep.to_store] == ["a", "c", "d"]
    assert prep.positions == [0, 2, 3]
    assert prep.in_batch_duplicates == {}


def test_rejected_events_carry_violations_and_are_not_stored() -> None:
    no_ids = track("no-ids")
    no_ids.ClearField("identifiers")
    events = [survey(11, message_id="bad-score"), track("ok"), no_ids]
    prep = pipeline.prepare(events, RECEIVED, LIMITS)
    assert [r.status for r in prep.results] == [REJECTED, UNSPECIFIED, REJECTED]
    assert [(v.field, v.reason) for v in prep.results[0].violations] == [
        ("events[0].survey_response.score", "OUT_OF_RANGE")
    ]
    assert [(v.field, v.reason) for v in prep.results[2].violations] == [("events[2].identifiers", "REQUIRED")]
    assert not prep.results[1].violations
    assert [n.message_id for n in prep.to_store] == ["ok"]
    assert not prep.results[0].event_id and not prep.results[2].event_id


def test_in_batch_duplicates_point_at_the_first_occurrence() -> None:
    events = [track("x"), track("y"), track("x"), track("x"), track("y")]
    prep = pipeline.prepare(events, RECEIVED, LIMITS)
    assert prep.in_batch_duplicates == {2: 0, 3: 0, 4: 1}
    assert [n.message_id for n in prep.to_store] == ["x", "y"]
    assert prep.positions == [0, 1]
    assert [r.message_id for r in prep.results] == ["x", "y", "x", "x", "y"]


def test_a_rejected_first_occurrence_does_not_make_the_next_a_duplicate() -> None:
    events = [survey(11, message_id="s"), survey(9, message_id="s")]
    prep = pipeline.prepare(events, RECEIVED, LIMITS)
    assert prep.results[0].status == REJECTED
    assert prep.in_batch_duplicates == {}
    assert prep.positions == [1]


def test_stored_payload_is_the_stamped_event() -> None:
    ev = _at(track("t1"), 1_700_000_000)
    ev.profile_id = "client-chosen-profile"
    ev.event_id = "client-chosen-id"
    prep = pipeline.prepare([ev], RECEIVED, LIMITS)
    (new,) = prep.to_store
    got = stored(prep, 0)
    assert got.event_id == new.event_id
    assert got.event_id != "client-chosen-id"
    assert uuid.UUID(got.event_id).version == 7
    assert got.received_at.ToDatetime(tzinfo=dt.UTC) == RECEIVED
    assert got.timestamp.seconds == 1_700_000_000
    assert got.profile_id == ""
    assert got.message_id == "t1"
    assert got.track.event == "Order Completed"
    assert dict(got.properties) == {"revenue": 42.5, "currency": "EUR"}
    assert new.occurred == 1_700_000_000
    assert new.channel == event_pb2.CHANNEL_WEB
    assert new.kind == "track"


def test_missing_timestamp_defaults_to_received_at() -> None:
    ev = interaction("i1")
    assert not ev.HasField("timestamp")
    prep = pipeline.prepare([ev], RECEIVED, LIMITS)
    got = stored(prep, 0)
    assert got.HasField("timestamp")
    assert got.timestamp == got.received_at
    assert got.timestamp.ToDatetime(tzinfo=dt.UTC) == RECEIVED
    assert prep.to_store[0].occurred == pytest.approx(RECEIVED.timestamp(), abs=1e-6)
    assert prep.to_store[0].kind == "interaction"


def test_event_ids_carry_the_receive_time_and_are_unique() -> None:
    prep = pipeline.prepare([track() for _ in range(50)], RECEIVED, LIMITS)
    ids = [n.event_id for n in prep.to_store]
    assert len(set(ids)) == 50
    assert {uuid.UUID(i).int >> 80 for i in ids} == {RECEIVED_MS}


def test_the_callers_messages_are_not_mutated() -> None:
    events = [track("a"), interaction("b"), survey(11, message_id="c"), track("a")]
    events[0].profile_id = "p-client"
    before = [e.SerializeToString(deterministic=True) for e in events]
    pipeline.prepare(events, RECEIVED, LIMITS)
    assert [e.SerializeToString(deterministic=True) for e in events] == before
    assert not events[1].HasField("timestamp")
    assert not events[0].event_id and events[0].profile_id == "p-client"


def test_tighter_limits_apply() -> None:
    prep = pipeline.prepare([track("big")], RECEIVED, validation.Limits(max_event_bytes=10))
    assert prep.results[0].status == REJECTED
    assert [v.reason for v in prep.results[0].violations] == ["TOO_LARGE"]
    assert prep.to_store == []


# --- new_event_id -----------------------------------------------------------------------------------


def test_new_event_id_is_a_valid_uuid_v7() -> None:
    for _ in range(200):
        u = uuid.UUID(pipeline.new_event_id())
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert str(u) == str(u).lower()


def test_new_event_id_embeds_the_given_millisecond() -> None:
    ms = 1_741_964_966_535
    assert uuid.UUID(pipeline.new_event_id(ms)).int >> 80 == ms
    now_ms = int(time.time() * 1000)
    embedded = uuid.UUID(pipeline.new_event_id()).int >> 80
    assert abs(embedded - now_ms) < 5_000


def test_new_event_ids_sort_by_time() -> None:
    base = 1_741_964_966_000
    stamps = [base + d for d in (0, 1, 2, 10, 999, 1000, 86_400_000, 2**40)]
    for _ in range(20):
        ids = [pipeline.new_event_id(ms) for ms in stamps]
        assert sorted(ids) == ids
        assert sorted(uuid.UUID(i) for i in ids) == [uuid.UUID(i) for i in ids]


def test_new_event_ids_are_random_within_a_millisecond() -> None:
    ids = {pipeline.new_event_id(1_000) for _ in range(1000)}
    assert len(ids) == 1000
