"""The stream codec: what it splices at the wire level equals what the generated classes build."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from services.core import streams
from tessera.v1 import event_pb2, stream_pb2
from tests.support.events import interaction, track

TENANT = "acme"
TRACEPARENT = f"00-{'4b' * 16}-{'00f067aa0ba902b7'}-01"


def test_an_events_entry_is_the_envelope_the_generated_classes_build() -> None:
    ev = interaction("m-1")
    raw = streams.event_envelope(TENANT, TRACEPARENT, ev.SerializeToString())
    expected = stream_pb2.EventEnvelope(tenant_id=TENANT, traceparent=TRACEPARENT, event=ev)
    assert stream_pb2.EventEnvelope.FromString(raw) == expected
    assert streams.event_envelopes(TENANT, TRACEPARENT, [ev.SerializeToString()]) == [raw]


def test_a_resolved_entry_is_the_events_entry_with_the_profile_set() -> None:
    ev = track("m-2")
    ev.event_id = "0193aaaa-0000-7000-8000-000000000001"
    events_entry = streams.event_envelope(TENANT, TRACEPARENT, ev.SerializeToString())
    resolved = streams.decode(streams.RESOLVED, streams.resolved_envelope(events_entry, "p-1"), TENANT)
    ev.profile_id = "p-1"
    assert resolved == stream_pb2.ResolvedEventEnvelope(tenant_id=TENANT, traceparent=TRACEPARENT, event=ev)
    # No profile: the entry is passed on unchanged, the profile empty.
    assert streams.resolved_envelope(events_entry, None) == events_entry


def test_the_stamp_adds_the_server_fields_and_replaces_none_of_the_clients() -> None:
    received = dt.datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(received)
    stamp = streams.EventStamp(ts.SerializeToString())
    ev = track("m-3")
    stored = event_pb2.Event.FromString(stamp.apply(ev.SerializeToString(), "e" * 36, has_timestamp=False))
    assert stored.event_id == "e" * 36
    assert stored.received_at.ToDatetime(dt.UTC) == received
    assert stored.timestamp == stored.received_at  # defaulted when the client sent none
    ev.timestamp.FromSeconds(1_700_000_000)
    stored = event_pb2.Event.FromString(stamp.apply(ev.SerializeToString(), "short-id", has_timestamp=True))
    assert stored.event_id == "short-id" and stored.timestamp.seconds == 1_700_000_000
    assert stored.message_id == "m-3"


def test_a_change_round_trips_with_every_field() -> None:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    change = streams.change(
        streams.SPLIT, "p-1", new_profile_id="p-2", merge_id=7, moved_event_ids=["e-1", "e-2"], at=at
    )
    got = streams.decode(streams.CHANGES, streams.change_envelope(TENANT, TRACEPARENT, change), TENANT)
    assert got.change == change and got.traceparent == TRACEPARENT
    assert streams.kind_name(got.change.kind) == "split"
    assert got.change.change_time.ToDatetime(dt.UTC) == at


@pytest.mark.parametrize("raw", [b"\xff\xff", b"\x1a\x05abc", b"\x0a\x80"])
def test_what_is_not_an_envelope_is_refused_by_name(raw: bytes) -> None:
    with pytest.raises(streams.UndecodableEntry, match="EventEnvelope"):
        streams.decode(streams.EVENTS, raw)


def test_an_envelope_of_another_tenant_is_refused() -> None:
    raw = streams.event_envelope("other", "", track().SerializeToString())
    with pytest.raises(streams.UndecodableEntry, match="not the stream's"):
        streams.decode(streams.EVENTS, raw, TENANT)
    assert streams.decode(streams.EVENTS, raw, "other").tenant_id == "other"


def test_the_spliced_envelopes_share_their_layout() -> None:
    streams.check_wire_compatibility()  # raises if stream.proto drifts apart
    head = [(f.name, f.number) for f in stream_pb2.ProfileChangeEnvelope.DESCRIPTOR.fields[:2]]
    assert head == [("tenant_id", 1), ("traceparent", 2)]


def test_dead_letter_listing_names_what_the_entry_carried() -> None:
    ev = track()
    ev.event_id = "e-9"
    assert streams.describe("events", streams.event_envelope(TENANT, "", ev.SerializeToString())) == "event e-9"
    change = streams.change_envelope(TENANT, "", streams.change(streams.ERASED, "p-9"))
    assert streams.describe("changes", change) == "erased profiles/p-9"
    assert streams.describe("events", b"\xff") == "undecodable entry"
